"""The autograd Function behind every few-bit activation.

Forward computes torch's own activation (so the output is torch's, bit for bit)
and stores, for backward, only a packed code of the input: ``ceil(n*bits/8)``
bytes instead of the ``n * element_size`` bytes torch keeps. Backward returns
``grad_output * levels[code]``.

On CUDA (Triton importable, ``FEWBIT_DISABLE_TRITON`` not ``1``) forward and
backward are single fused kernel passes (:mod:`fewbit.kernels`) with the same codes
and packing; their output is within a few ulp of torch's rather than bit-identical.

Non-finite inputs (NaN, +-inf) are rare but must not silently change the
gradient: their flat indices and torch's own derivative there are stored on the
side (nothing when the input is finite), so those elements get exactly torch's
gradient (NaN where torch gives NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .. import kernels
from ..codecs.bitpack import pack, packed_nbytes, unpack
from ..codecs.marks import mark_compact

__all__ = [
    "ActivationSpec",
    "FewBitActivation",
    "apply_fewbit",
    "check_floating",
    "private_autograd",
]

Forward = Callable[[Tensor], Tensor]
Encoder = Callable[[Tensor], Tensor]
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements encoded or looked up at once on the PyTorch path (a multiple of 8, so that each
# chunk starts on a byte boundary of the packed stream for every bit width).
_CHUNK = 1 << 19


def check_floating(input: Tensor, name: str = "input") -> None:
    """Raise a TypeError naming ``name`` unless ``input`` is a floating-point tensor."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {input.dtype}")


def _keep(t: Tensor) -> Tensor:
    return t


def private_autograd() -> torch.autograd.graph.saved_tensors_hooks:
    """Identity saved-tensor hooks for fewbit's own transient graphs (table building, the
    derivative at non-finite inputs): they are not saves of the user's model, so outer hooks
    (the generic compressor, the profiler) must not see them."""
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


def _nonfinite_derivative(x: Tensor, forward: Forward) -> tuple[Tensor, Tensor]:
    """Flat indices of non-finite elements of x and torch's derivative of forward there."""
    flat = x.detach().reshape(-1)
    # A finite sum proves every element finite (NaN and inf propagate); the rare
    # overflow of a finite tensor's sum only sends it down the exact path below.
    total = flat.sum(dtype=torch.float64 if flat.dtype == torch.float64 else torch.float32)
    if bool(torch.isfinite(total)):
        return torch.empty(0, dtype=torch.long, device=x.device), flat.new_empty(0)
    index = (~torch.isfinite(flat)).nonzero().squeeze(1)
    if index.numel() == 0:
        return index, flat.new_empty(0)
    with torch.enable_grad(), private_autograd():
        xs = flat[index].clone().requires_grad_(True)
        (derivative,) = torch.autograd.grad(forward(xs), xs, torch.ones_like(xs))
    return index, derivative


@dataclass(frozen=True)
class ActivationSpec:
    """What one few-bit activation computes, how it encodes its input, what a code means.

    ``kernel`` names the activation for the fused Triton kernels (``None``: a custom
    forward the kernels do not know, always the PyTorch path); ``params``,
    ``boundaries`` and ``symmetric`` are what those kernels need to compute the same
    output and codes.
    """

    forward: Forward
    encode: Encoder
    levels: tuple[float, ...]
    bits: int
    kernel: Optional[str] = None
    params: Mapping[str, float] = field(default_factory=dict)
    boundaries: Optional[tuple[float, ...]] = None
    symmetric: bool = False


def _use_kernels(t: Tensor) -> bool:
    return t.dtype in _KERNEL_DTYPES and kernels.available(t)


def _encode_and_pack(x: Tensor, spec: ActivationSpec) -> Tensor:
    """pack(encode(x)) in chunks of ``_CHUNK`` elements: the uint8 codes and comparison
    masks never exist for the whole tensor at once (a few MiB of transient memory)."""
    flat = x.reshape(-1)
    if flat.numel() <= _CHUNK:
        return pack(spec.encode(flat), spec.bits)
    parts = [
        pack(spec.encode(flat[i : i + _CHUNK]), spec.bits) for i in range(0, flat.numel(), _CHUNK)
    ]
    return torch.cat(parts)


def _forward_and_pack(x: Tensor, spec: ActivationSpec) -> tuple[Tensor, Tensor]:
    """(y, packed codes): one fused Triton pass on CUDA, torch ops elsewhere."""
    if spec.kernel is not None and _use_kernels(x):
        bounds = None
        if spec.boundaries is not None:
            bounds = torch.tensor(spec.boundaries, dtype=torch.float64, device=x.device)
        return kernels.activation_forward(
            x, spec.kernel, dict(spec.params), bounds, spec.symmetric, spec.bits
        )
    return spec.forward(x), _encode_and_pack(x, spec)


def _grad_times_levels(grad: Tensor, packed: Tensor, spec: ActivationSpec, shape: torch.Size):
    """grad * levels[code], multiplied in float32 (float64 for float64) and rounded once.

    On the PyTorch path the codes are unpacked and looked up ``_CHUNK`` elements at a time,
    so the transient memory is a few MiB besides the result.
    """
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    lut = torch.tensor(spec.levels, dtype=compute, device=grad.device)
    if _use_kernels(grad):
        return kernels.activation_backward(grad.contiguous(), packed, lut, spec.bits).view(shape)
    flat = grad.reshape(-1)
    n, bits = flat.numel(), spec.bits

    def levels_at(start: int, stop: int) -> Tensor:
        chunk = packed[start * bits // 8 : packed_nbytes(stop, bits)]
        return torch.take(lut, unpack(chunk, bits, stop - start).long())

    if n <= _CHUNK:
        return torch.mul(flat, levels_at(0, n)).to(grad.dtype).view(shape)
    out = torch.empty_like(flat, memory_format=torch.contiguous_format)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        out[start:stop] = torch.mul(flat[start:stop], levels_at(start, stop))
    return out.view(shape)


class FewBitActivation(torch.autograd.Function):
    """y = forward(x); saves the packed code of x; backward: grad * levels[code]."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, spec: ActivationSpec) -> Tensor:  # type: ignore[override]
        y, packed = _forward_and_pack(x, spec)
        index, derivative = _nonfinite_derivative(x, spec.forward)
        ctx.save_for_backward(mark_compact(packed), index, derivative)
        ctx.shape = x.shape  # type: ignore[attr-defined]
        ctx.spec = spec  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fewbit activations keep only a few-bit code of their input, so they cannot "
                "be differentiated twice (backward with create_graph=True); use the torch.nn "
                "activation where a second derivative is needed"
            )
        packed, index, derivative = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_in = _grad_times_levels(grad, packed, ctx.spec, ctx.shape)  # type: ignore[attr-defined]
        if index.numel():
            grad_in = grad_in.contiguous()
            flat = grad_in.view(-1)
            flat[index] = grad.reshape(-1)[index] * derivative
        return grad_in, None


def apply_fewbit(x: Tensor, spec: ActivationSpec) -> Tensor:
    """Run ``spec.forward`` on x, saving only a ``spec.bits``-bit code when a gradient is needed."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return spec.forward(x)
    return FewBitActivation.apply(x, spec)
