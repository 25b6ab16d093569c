"""Activation checkpointing whose region inputs are stored compressed.

``fewbit.checkpoint.checkpoint(fn, *args, bits=8)`` works like
``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)``: ``fn`` runs once in
forward and keeps nothing for backward; the first backward that needs one of its saved
tensors runs ``fn`` again (same RNG state and autocast settings) and hands out what the
recompute saved. The difference: torch's checkpoint keeps the region's inputs (the
"boundary" tensors, e.g. each transformer layer's hidden states) at full precision until
backward. Here every floating tensor among ``args`` (not a parameter, at least
``min_numel`` elements) is encoded by :class:`fewbit.codecs.quantize.GroupQuantizer` and the
full-precision tensor is not referenced by the region; the recompute runs on the decoded
inputs. Other arguments (integer tensors, masks, keyword arguments, small tensors) are kept
as they are.

Memory: a boundary tensor of ``n`` elements holds ``quantized_nbytes(shape, bits,
group_size)`` = ``ceil(n * bits / 8) + 4 * groups`` bytes instead of ``n * element_size``
(at 8 bits and group 256: 8.125 bits per element, 3.9x less than float32, 2x less than
bfloat16; at 2 bits 15x / 7.5x less). Nothing else of the region is held between forward
and backward. Fewbit's compressed layers inside a region run as plain torch layers (the
region keeps nothing anyway).

Accuracy: the forward output is exact (computed from the original inputs). Backward is the
exact gradient evaluated at the decoded inputs ``x^ = x + e``: each element of ``e`` is
below one quantization step, ``|e| < range / (2**bits - 1)`` of its group of ``group_size``
elements (``range / 255`` at the default 8 bits), with ``E[e] = 0`` (stochastic rounding).
So a gradient that is linear in the input (a Linear's weight gradient from its input) is
unbiased; through nonlinear layers the error is bounded by their Lipschitz constants times
``|e|`` (second order in ``e`` for the mean). Default 8 bits: gradients agree with torch's
checkpoint to about 1% relative in the tests.

Randomness: the rounding noise comes from a private generator (seeded from the CPU stream,
which is restored), so dropout inside and after a region draws exactly what it would draw
under torch's checkpoint.

Time: one extra forward of every region (as torch's checkpoint), plus one encode per input in
forward and one decode per input in backward.

Hugging Face models (transformers 5): ``model._set_gradient_checkpointing(True,
functools.partial(fewbit.checkpoint.checkpoint, bits=8))`` makes every decoder layer a region
(hidden states compressed; keyword arguments such as masks and rotary tables kept).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import get_device_states, set_device_states

from .codecs.protocol import Encoded
from .codecs.quantize import GroupQuantizer
from .functional.saved import CHECKPOINT_HOOK_ATTR

__all__ = ["checkpoint"]


class _Region:
    """One call of :func:`checkpoint`: the encoded inputs and what the recompute saved."""

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        codec: GroupQuantizer,
        min_numel: int,
        preserve_rng_state: bool,
    ) -> None:
        self.fn = fn
        self.kwargs = kwargs
        # Each argument: ("enc", Encoded, requires_grad) or ("keep", value).
        self.inputs: List[Tuple[Any, ...]] = [self._store(a, codec, min_numel) for a in args]
        self.count = 0  # tensors saved by the forward
        self.recomputed: Dict[int, Tensor] = {}
        self.autocast = _autocast_state(args)
        self.rng: Optional[Tuple[Tensor, List[int], List[Tensor]]] = None
        if preserve_rng_state:
            devices, states = get_device_states(*args)
            self.rng = (torch.get_rng_state(), devices, states)

    @staticmethod
    def _store(a: Any, codec: GroupQuantizer, min_numel: int) -> Tuple[Any, ...]:
        if (
            isinstance(a, Tensor)
            and a.is_floating_point()
            and not isinstance(a, nn.Parameter)
            and a.numel() >= min_numel
        ):
            return ("enc", codec.encode(a.detach()), a.requires_grad)
        return ("keep", a)

    # -- hooks of the forward: store an index, keep nothing --------------------------------
    def pack(self, t: Tensor) -> int:
        i = self.count
        self.count += 1
        return i

    def unpack(self, i: int) -> Tensor:
        if i not in self.recomputed:
            self.recompute()
        t = self.recomputed.pop(i, None)
        if t is None:
            raise RuntimeError(
                "fewbit.checkpoint: the recompute saved fewer tensors than the forward "
                f"(no tensor {i}); the checkpointed function must run the same ops each call"
            )
        return t

    # -- the recompute -----------------------------------------------------------------------
    def _decoded_args(self) -> List[Any]:
        out = []
        for item in self.inputs:
            if item[0] == "enc":
                enc: Encoded = item[1]
                x = enc.decode().detach()
                out.append(x.requires_grad_(item[2]))
            else:
                out.append(item[1])
        return out

    def recompute(self) -> None:
        args = self._decoded_args()
        saved: List[Tensor] = []

        def pack(t: Tensor) -> None:
            saved.append(t.detach())

        def unpack(_: None) -> Tensor:
            raise RuntimeError("fewbit.checkpoint: backward through a recompute graph")

        setattr(pack, CHECKPOINT_HOOK_ATTR, True)  # fewbit layers inside stay plain
        with ExitStack() as stack:
            if self.rng is not None:
                cpu_state, devices, states = self.rng
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.set_rng_state(cpu_state)
                set_device_states(devices, states)
            for device_type, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
            self.fn(*args, **self.kwargs)
        self.recomputed = dict(enumerate(saved[: self.count]))


def _private_generator(args: Tuple[Any, ...]) -> Optional[torch.Generator]:
    """A generator for the rounding noise, so that encoding leaves the global RNG streams
    (dropout inside and after the region) as they would be without fewbit. Its seed is
    drawn from the CPU stream, which is then restored: deterministic under
    ``torch.manual_seed``, the stream itself untouched."""
    device = next((a.device for a in args if isinstance(a, Tensor) and a.is_floating_point()),
                  None)
    if device is None:
        return None
    state = torch.get_rng_state()
    seed = int(torch.randint(0, 2**62, ()))
    torch.set_rng_state(state)
    return torch.Generator(device=device).manual_seed(seed)


def _autocast_state(args: Tuple[Any, ...]) -> Dict[str, Tuple[bool, torch.dtype]]:
    types = {"cpu"} | {a.device.type for a in args if isinstance(a, Tensor)}
    return {
        t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
        for t in sorted(types)
        if torch.amp.is_autocast_available(t)
    }


def checkpoint(
    function: Callable[..., Any],
    *args: Any,
    bits: int = 8,
    group_size: int = 256,
    min_numel: int = 1024,
    preserve_rng_state: bool = True,
    **kwargs: Any,
) -> Any:
    """``function(*args, **kwargs)`` as an activation checkpoint region with compressed inputs.

    Floating tensor ``args`` of at least ``min_numel`` elements (not parameters) are kept
    quantized to ``bits`` (1, 2, 4 or 8) bits in groups of ``group_size`` until backward
    recomputes ``function`` from them; nothing else the region computes is kept. See the
    module docstring for memory (``quantized_nbytes`` per input), time (one recompute) and the
    gradient error (exact gradient at inputs off by < one step ``range/(2**bits-1)`` per
    element, unbiased rounding). ``preserve_rng_state``: the recompute draws the same random
    numbers (dropout masks) as the forward. Without grad mode this is ``function(*args)``.
    """
    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__}")
    codec = GroupQuantizer(bits, group_size)
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"min_numel must be an int >= 0, got {min_numel!r}")
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    codec = GroupQuantizer(bits, group_size, generator=_private_generator(args))
    region = _Region(function, args, kwargs, codec, min_numel, bool(preserve_rng_state))

    def pack(t: Tensor) -> int:
        return region.pack(t)

    def unpack(i: int) -> Tensor:
        return region.unpack(i)

    setattr(pack, CHECKPOINT_HOOK_ATTR, True)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return function(*args, **kwargs)
