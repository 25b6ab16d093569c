"""ActNN-style compressed layers: torch's forward, quantized activations saved for backward.

Every quantizing layer subclasses its ``torch.nn`` counterpart (same constructor arguments plus
keywords ``bits`` (1, 2, 4 or 8; default 2) and ``group_size`` (default 256), same
``state_dict`` keys, ``isinstance`` still true) and runs torch's own ``forward`` inside
``torch.autograd.graph.saved_tensors_hooks``. One table, :data:`LAYERS`, says for each class
what it saves compressed (its input, or every floating activation for :class:`Softmax`, which
saves its output) and how autocast treats its op; the classes themselves are one line each.
The hooks replace the saved activation by a
:class:`fewbit.codecs.quantize.GroupQuantizer` encoding of
``quantized_nbytes(shape, bits, group_size)`` bytes; parameters, buffers and small statistics
(BatchNorm/LayerNorm means and inverse std) pass through. So the forward output is bitwise
torch's and backward is torch's own math on the decoded input, whose error per element is
below one quantization step ``range / (2**bits - 1)`` of its group and unbiased.

Composes with the rest of PyTorch as the layer it replaces:

* ``torch.no_grad``/``inference_mode``/frozen parameters: plain torch forward, nothing extra.
* ``torch.autocast``: the input is cast as autocast casts it for the layer's op (linear and
  convolutions to the autocast dtype; on CUDA LayerNorm/GroupNorm/Softmax to float32), so
  the tensor the op saves is the one compressed, and outputs have torch's dtype.
* ``torch.compile``: inference traces as torch's layer. In training, Linear, LayerNorm,
  the convolutions (plain and transposed, zero padding given as numbers, contiguous batched
  input), BatchNorm with batch statistics (not SyncBatchNorm; ``momentum`` set), GroupNorm
  and Softmax (``dim`` set) trace as one autograd Function each (:class:`_TracedQuantLinear`
  and its siblings: no graph break, same record and seed as eager, adaptive statistics
  included, offload skipped where it does nothing, i.e. off CUDA; under autocast the
  arguments are cast as autocast casts them and the Function runs with autocast off);
  other cases (eval-mode
  BatchNorm with gradients, ``padding_mode`` other than zeros, channels-last input, an
  ``output_size`` argument) and offload of CUDA tensors run their training
  forward eagerly between compiled graphs (one graph break per layer: saved-tensor hooks
  are not traceable), with the saved activation quantized and strides preserved.
* Activation checkpointing (``torch.utils.checkpoint`` with ``use_reentrant=False``, or
  :func:`fewbit.checkpoint.checkpoint`): inside a checkpoint region the layer runs as plain
  torch (the region keeps nothing for backward; compressing would make the checkpoint keep
  the compressed data and quantize again in the recompute).

Passes over the saved activation (CPU, eager), forward: one encode
(:class:`~fewbit.codecs.quantize.GroupQuantizer`); backward: one decode. Channels-last and
other dense non-contiguous inputs are encoded in their memory order and decoded as a view with
the saved strides (no copies).

Lossless layers (bitwise torch's gradients; :class:`Dropout` draws its own mask on the CPU, see
:mod:`fewbit.functional.dropout`): :class:`Dropout` (1-bit mask), :class:`MaxPool1d`
/2d/3d (in-window argmax offsets), :class:`AvgPool1d`/2d/3d (nothing saved), and
:data:`ReLU` = :class:`fewbit.modules.activations.ReLU` (1-bit mask).

ActNN's names are aliases: ``QConv2d is Conv2d`` etc.

Measuring: :class:`SavedBytesMeter` counts, per forward, the bytes held for backward by these
layers (their encodings, counted once by :func:`fewbit.codecs.protocol.stored_nbytes`) plus
every other saved tensor (deduplicated by storage, parameters excluded).
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from ..codecs.marks import is_compact
from ..codecs.protocol import stored_nbytes
from ..codecs.quantize import (
    QuantizedTensor,
    check_group_size,
    check_quant_bits,
    dequantize_parts,
    draw_seed,
    quantize_parts,
)
from ..compress import SavedTensorCompressor, observe_saved, report_saved
from ..functional import pooling as FP
from ..functional.dropout import dropout
from ..functional.saved import autocast_dtype, checkpoint_active
from .activations import ReLU

__all__ = [
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "CompressedLayer",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Dropout",
    "GroupNorm",
    "LAYERS",
    "LayerNorm",
    "LayerSpec",
    "LayerStats",
    "Linear",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "ReLU",
    "SavedBytesMeter",
    "Softmax",
    "SyncBatchNorm",
    "QAvgPool1d",
    "QAvgPool2d",
    "QAvgPool3d",
    "QBatchNorm1d",
    "QBatchNorm2d",
    "QBatchNorm3d",
    "QConv1d",
    "QConv2d",
    "QConv3d",
    "QConvTranspose1d",
    "QConvTranspose2d",
    "QConvTranspose3d",
    "QDropout",
    "QGroupNorm",
    "QLayerNorm",
    "QLinear",
    "QMaxPool1d",
    "QMaxPool2d",
    "QMaxPool3d",
    "QReLU",
    "QSoftmax",
    "QSyncBatchNorm",
    "saved_nbytes",
]


# --- measuring ----------------------------------------------------------------------------------


def saved_nbytes(obj: object) -> int:
    """Bytes held by what a pack hook kept: :func:`fewbit.codecs.protocol.stored_nbytes` of
    tensors, encodings and (nested) tuples/lists of them, or of a ``fewbit.compress`` record."""
    if isinstance(obj, (tuple, list)):
        return sum(saved_nbytes(o) for o in obj)
    if isinstance(obj, Tensor) or obj is None:
        return stored_nbytes(obj)
    q = getattr(obj, "q", obj)  # a fewbit.compress record holds its encoding in ``q``
    try:
        return stored_nbytes(q)
    except TypeError:
        return 0


# The compressed layer whose forward is running (read by SavedBytesMeter for ``per_layer``).
_LAYER: contextvars.ContextVar[Optional[nn.Module]] = contextvars.ContextVar(
    "fewbit_compressed_layer", default=None
)


class SavedBytesMeter:
    """Context manager counting the bytes kept for backward by everything run inside it.

    Plain saved tensors are counted once per storage (``untyped_storage().nbytes()``),
    ``nn.Parameter`` objects, views of them and anything sharing storage with ``exclude``
    are not counted. What fewbit's own pack hooks keep (compressed layers, ``fewbit.compress``)
    reaches it through :func:`fewbit.compress.observe_saved`, each kept object once, counted by
    :func:`fewbit.codecs.protocol.stored_nbytes`. ``per_layer`` maps each compressed layer's
    ``id`` to the bytes of its encodings.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: Set[int] = set()
        self.plain_bytes = 0
        self.compressed_bytes = 0
        self.per_layer: Dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._observing: list[Any] = []

    @property
    def total(self) -> int:
        """All bytes held for backward."""
        return self.plain_bytes + self.compressed_bytes

    def _pack(self, t: Tensor) -> Tensor:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._exclude or ptr in self._seen:
            return t
        self._seen.add(ptr)
        self.plain_bytes += t.untyped_storage().nbytes()
        return t

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    def _observe(self, kept: object, nbytes: int) -> None:
        if isinstance(kept, Tensor):
            self._pack(kept)
            return
        self.compressed_bytes += nbytes
        layer = _LAYER.get()
        if layer is not None:
            self.per_layer[id(layer)] = self.per_layer.get(id(layer), 0) + nbytes

    def __enter__(self) -> SavedBytesMeter:
        self._hooks.__enter__()
        observing = observe_saved(self._observe)
        observing.__enter__()
        self._observing.append(observing)
        return self

    def __exit__(self, *exc: object) -> None:
        self._observing.pop().__exit__(*exc)
        self._hooks.__exit__(*exc)


# --- sensitivity statistics (used by fewbit.levels for adaptive bits) ----------------------------


@dataclass
class LayerStats:
    """Running averages a layer collects for adaptive bit allocation (see fewbit.levels).

    ``grad_sq``: mean of the squared gradient of the layer output; ``range_sq``: mean over
    quantization groups of the squared group range of the saved activation; ``numel``: elements
    of the saved activation in the last step. EMA factor ``momentum``.

    Eager layers update these floats in forward (range) and from a tensor hook on the output
    (gradient). Under torch.compile the traced layer Functions cannot read to the host: their
    backward returns ``[grad_sq, range_sq, numel]`` (float64, device tensors) as the gradient
    of ``probe``, a 3-element leaf tensor; a post-accumulate-grad hook on it (eager, after the
    compiled backward) folds them in with :meth:`fold` and clears ``probe.grad``.
    ``on_backward`` (set by the allocator) is called after every gradient update.
    """

    grad_sq: float = 0.0
    range_sq: float = 0.0
    numel: int = 0
    steps: int = 0
    momentum: float = 0.9
    probe: Optional[Tensor] = field(default=None, compare=False, repr=False)
    on_backward: Optional[Callable[[], None]] = field(default=None, compare=False, repr=False)

    def _ema(self, old: float, new: float, first: bool) -> float:
        return new if first else self.momentum * old + (1 - self.momentum) * new

    def update_range(self, q: QuantizedTensor, numel: int) -> None:
        if q.scale.device.type == "meta":  # shapes only: nothing to measure
            return
        levels = (1 << q.bits) - 1
        rng = q.scale.float() * levels
        rng = rng[torch.isfinite(rng)]
        value = float((rng * rng).mean()) if rng.numel() else 0.0
        self._set_range(value, numel)

    def _set_range(self, value: float, numel: int) -> None:
        self.range_sq = self._ema(self.range_sq, value, self.numel == 0)
        self.numel = numel

    def update_grad(self, grad: Tensor) -> None:
        if grad.device.type == "meta":  # shapes only: nothing to measure
            return
        value = float(grad.detach().float().pow(2).mean()) if grad.numel() else 0.0
        self._set_grad(value)

    def _set_grad(self, value: float) -> None:
        self.grad_sq = self._ema(self.grad_sq, value, self.steps == 0)
        self.steps += 1
        if self.on_backward is not None:
            self.on_backward()

    def make_probe(self, device: torch.device) -> Tensor:
        """Create ``probe`` on ``device`` with the hook that folds its gradient in."""
        probe = torch.zeros(3, dtype=torch.float64, device=device, requires_grad=True)
        probe.register_post_accumulate_grad_hook(self._probe_hook)
        self.probe = probe
        return probe

    def _probe_hook(self, probe: Tensor) -> None:
        if probe.grad is not None:
            self.fold(probe.grad)
            probe.grad = None

    def fold(self, values: Tensor) -> None:
        """Fold ``[grad_sq, range_sq, numel]`` (one traced backward's) into the averages (one
        host read of three numbers)."""
        if values.device.type == "meta":
            return
        grad_sq, range_sq, numel = values.tolist()
        self._set_range(range_sq, int(numel))
        self._set_grad(grad_sq)


def _probe_values(grad: Tensor, scale: Tensor, bits: int, numel: int) -> Tensor:
    """``[mean(grad**2), mean over finite groups of range**2, numel]`` as float64 tensor ops
    (what :meth:`LayerStats.update_grad` / ``update_range`` compute, without a host read)."""
    g = grad.float().pow(2).mean() if grad.numel() else grad.new_zeros((), dtype=torch.float32)
    rng = scale.float() * ((1 << bits) - 1)
    finite = torch.isfinite(rng)
    r2 = torch.where(finite, rng * rng, torch.zeros_like(rng)).sum()
    r2 = r2 / finite.sum().clamp_min(1)
    n = torch.full((), float(numel), dtype=torch.float64, device=grad.device)
    return torch.stack([g.double(), r2.double(), n])


def layer_device(layer: nn.Module) -> torch.device:
    """Device of ``layer``'s first own parameter or buffer (CPU if it has none)."""
    for t in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)):
        return t.device
    return torch.device("cpu")


# --- the quantizing layers ----------------------------------------------------------------------

#: How autocast treats a layer's op: cast to autocast's dtype on every device ("low":
#: linear, convolutions), to float32 on CUDA only ("fp32_cuda": layer_norm, group_norm and
#: softmax are in CUDA autocast's float32 list, in no CPU list), or not at all ("none").
AUTOCAST_POLICIES = ("low", "fp32_cuda", "none")


def _autocast_input(input: Tensor, policy: str) -> Tensor:
    """``input`` cast as autocast would cast it for an op of ``policy`` (see the table)."""
    return _autocast_cast(input, policy, input.device.type)  # type: ignore[return-value]


def _autocast_cast(t: Optional[Tensor], policy: str, device_type: str) -> Optional[Tensor]:
    """``t`` (an argument of an op running on ``device_type``; None passes) cast as autocast
    casts the op's floating arguments for ``policy``: floating tensors of that device type
    other than float64 go to autocast's dtype ("low") or to float32 ("fp32_cuda" on CUDA)."""
    low = autocast_dtype(device_type) if policy != "none" else None
    if (
        t is None
        or low is None
        or t.device.type != device_type
        or not t.is_floating_point()
        or t.dtype == torch.float64
    ):
        return t  # autocast off, or a tensor autocast leaves alone
    if policy == "low":
        return t.to(low)
    return t.float() if device_type == "cuda" else t


class _LayerSaver:
    """Pack/unpack hooks of one forward call of a compressed layer."""

    def __init__(self, layer: CompressedLayer, target: Optional[Tensor]) -> None:
        self.layer = layer
        self.stats = layer.fewbit_stats
        tensors = list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False))
        self.skip = {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0}
        # Only the storage of ``target`` (the input) is quantized; None: every activation.
        self.target = None if target is None else target.untyped_storage().data_ptr()
        self.input = target
        self.comp = SavedTensorCompressor(
            layer.bits,
            group_size=layer.group_size,
            min_numel=0,
            skip=tensors,
            offload=layer.offload,
        )

    def release_input(self) -> None:
        """Forget the input (needed only while packing, during the layer's forward)."""
        self.input = None

    def _passes(self, t: Tensor) -> bool:
        if not t.is_floating_point() or t.numel() == 0 or is_compact(t):
            return True
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return True
        ptr = t.untyped_storage().data_ptr()
        return ptr in self.skip or (self.target is not None and ptr != self.target)

    def pack(self, t: Tensor) -> object:
        if self._passes(t):
            if t.untyped_storage().data_ptr() not in self.skip:
                report_saved(t)
            return t
        view = None
        x = self.input
        if (
            x is not None
            and t.shape != x.shape
            and t.numel() == x.numel()
            and t.storage_offset() == x.storage_offset()
            and t.is_contiguous()
            and x.is_contiguous()
        ):
            # A reshaped view of the input (Linear on N-d input): quantize the input itself so
            # groups follow its samples, and reshape back in unpack.
            view, t = t.shape, x
        rec = self.comp.pack(t)  # reports the record to observe_saved
        q = getattr(rec, "q", None)
        if self.stats is not None and isinstance(q, QuantizedTensor):
            self.stats.update_range(q, t.numel())
        return (rec, view)

    def unpack(self, obj: object) -> Tensor:
        if isinstance(obj, Tensor):
            return obj
        assert isinstance(obj, tuple)
        rec, view = obj
        out = self.comp.unpack(rec)  # the saved tensor's shape and strides
        return out if view is None else out.view(view)


class _TracedQuantLinear(torch.autograd.Function):
    """``F.linear`` saving its input quantized, as one autograd Function that torch.compile
    traces (the quantizer is the custom ops ``fewbit::quantize``/``dequantize``).

    What the compiled :class:`Linear` runs instead of the saved-tensor hooks (which a graph
    cannot hold). Saves the same record as the eager layer: the input quantized to ``bits``
    bits in groups of ``group_size`` per sample (``quantized_nbytes(input.shape, ...)``
    bytes) with a seed drawn from the global RNG of the input's device, plus the weight.
    Backward: the input is dequantized, then ``grad_input = grad @ W``,
    ``grad_weight = grad^T x`` and ``grad_bias = sum(grad)`` over the leading dimensions.
    ``probe`` (adaptive levels, see :class:`LayerStats`) gets the layer's statistics as its
    gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, input: Tensor, weight: Tensor, bias: Optional[Tensor], bits: int,
        group_size: int, probe: Optional[Tensor] = None,
    ) -> Tensor:  # fmt: skip
        out = torch.nn.functional.linear(input, weight, bias)
        packed, lo, scale = _quantize_saved(ctx, input, bits, group_size)
        ctx.save_for_backward(packed, lo, scale, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        packed, lo, scale, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        grad2d = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_input = grad.matmul(weight)
        if ctx.needs_input_grad[1]:
            x = _dequantize_saved(ctx, packed, lo, scale)
            grad_weight = grad2d.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad2d.sum(0)
        return grad_input, grad_weight, grad_bias, None, None, _probe_grad(ctx, grad, scale, 5)


def _quantize_saved(ctx: Any, x: Tensor, bits: int, group_size: int) -> tuple[Tensor, ...]:
    """The record the eager layer keeps of ``x``: per-sample groups, a seed from the global
    RNG of x's device; ``ctx.qmeta`` gets what :func:`_dequantize_saved` needs."""
    x = x.detach().contiguous()
    seed = draw_seed(None, x.device)
    ctx.qmeta = (tuple(x.shape), x.dtype, bits, group_size)
    return quantize_parts(x, seed, bits, group_size, True)


def _probe_grad(ctx: Any, grad: Tensor, scale: Tensor, index: int) -> Optional[Tensor]:
    """The statistics returned as the gradient of the probe (input ``index``), or None."""
    if not ctx.needs_input_grad[index]:
        return None
    shape, _, bits, _ = ctx.qmeta
    return _probe_values(grad, scale, bits, math.prod(shape))


def _dequantize_saved(ctx: Any, packed: Tensor, lo: Tensor, scale: Tensor) -> Tensor:
    shape, dtype, bits, group_size = ctx.qmeta
    return dequantize_parts(packed, lo, scale, shape, dtype, bits, group_size, True)


class _TracedQuantLayerNorm(torch.autograd.Function):
    """``F.layer_norm`` saving its input quantized, traceable by torch.compile (see
    :class:`_TracedQuantLinear`). Saves what the eager layer keeps: the quantized input, the
    per-row mean and reciprocal std (``native_layer_norm``'s, exact), weight and bias.
    Backward is ``native_layer_norm_backward`` on the dequantized input, the op autograd runs
    for the eager layer."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, input: Tensor, normalized_shape: tuple[int, ...], weight: Optional[Tensor],
        bias: Optional[Tensor], eps: float, bits: int, group_size: int,
        probe: Optional[Tensor] = None,
    ) -> Tensor:  # fmt: skip
        out, mean, rstd = torch.native_layer_norm(input, normalized_shape, weight, bias, eps)
        packed, lo, scale = _quantize_saved(ctx, input, bits, group_size)
        ctx.save_for_backward(packed, lo, scale, mean, rstd, weight, bias)
        ctx.normalized_shape = normalized_shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        packed, lo, scale, mean, rstd, weight, bias = ctx.saved_tensors
        x = _dequantize_saved(ctx, packed, lo, scale)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
            grad, x, list(ctx.normalized_shape), mean, rstd, weight, bias, mask
        )
        probe = _probe_grad(ctx, grad, scale, 7)
        return grad_input, None, grad_weight, grad_bias, None, None, None, probe


class _TracedQuantConv(torch.autograd.Function):
    """``aten.convolution`` (any dimension, plain or transposed) saving its input quantized,
    traceable by torch.compile (see :class:`_TracedQuantLinear`). Saves what the eager layer
    keeps: the quantized input and the weight. Backward is ``aten.convolution_backward`` on
    the dequantized input with the layer's stride/padding/dilation/groups/output_padding, the
    op autograd runs for the eager layer."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, input: Tensor, weight: Tensor, bias: Optional[Tensor], conv: tuple[Any, ...],
        bits: int, group_size: int, probe: Optional[Tensor] = None,
    ) -> Tensor:  # fmt: skip
        out = torch.ops.aten.convolution(input, weight, bias, *conv)
        packed, lo, scale = _quantize_saved(ctx, input, bits, group_size)
        ctx.save_for_backward(packed, lo, scale, weight)
        ctx.conv = conv
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        packed, lo, scale, weight = ctx.saved_tensors
        x = _dequantize_saved(ctx, packed, lo, scale)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, weight, ctx.bias_sizes, *ctx.conv, mask
        )
        probe = _probe_grad(ctx, grad, scale, 6)
        return grad_input, grad_weight, grad_bias, None, None, None, probe


class _TracedQuantBatchNorm(torch.autograd.Function):
    """``native_batch_norm`` in training mode (batch statistics; running statistics updated
    in place as torch does) saving its input quantized, traceable by torch.compile (see
    :class:`_TracedQuantLinear`). Saves what the eager layer keeps: the quantized input, the
    per-channel batch mean and inverse std (exact) and the weight. Backward is
    ``native_batch_norm_backward`` on the dequantized input."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
        running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
        eps: float, bits: int, group_size: int, probe: Optional[Tensor] = None,
    ) -> Tensor:  # fmt: skip
        out, mean, invstd = torch.native_batch_norm(
            input, weight, bias, running_mean, running_var, True, momentum, eps
        )
        packed, lo, scale = _quantize_saved(ctx, input, bits, group_size)
        ctx.save_for_backward(packed, lo, scale, mean, invstd, weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        packed, lo, scale, mean, invstd, weight = ctx.saved_tensors
        x = _dequantize_saved(ctx, packed, lo, scale)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, mask
        )
        probe = _probe_grad(ctx, grad, scale, 9)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, probe


class _TracedQuantGroupNorm(torch.autograd.Function):
    """``native_group_norm`` saving its input quantized, traceable by torch.compile (see
    :class:`_TracedQuantLinear`). Saves what the eager layer keeps: the quantized input, the
    per-(sample, group) mean and reciprocal std (exact) and the weight. Backward is
    ``native_group_norm_backward`` on the dequantized input."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, input: Tensor, num_groups: int, weight: Optional[Tensor],
        bias: Optional[Tensor], eps: float, bits: int, group_size: int,
        probe: Optional[Tensor] = None,
    ) -> Tensor:  # fmt: skip
        n, c = input.shape[0], input.shape[1]
        hxw = math.prod(input.shape[2:])
        out, mean, rstd = torch.native_group_norm(input, weight, bias, n, c, hxw, num_groups, eps)
        packed, lo, scale = _quantize_saved(ctx, input, bits, group_size)
        ctx.save_for_backward(packed, lo, scale, mean, rstd, weight)
        ctx.sizes = (n, c, hxw, num_groups)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        packed, lo, scale, mean, rstd, weight = ctx.saved_tensors
        x = _dequantize_saved(ctx, packed, lo, scale)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
            grad, x, mean, rstd, weight, *ctx.sizes, mask
        )
        probe = _probe_grad(ctx, grad, scale, 7)
        return grad_input, None, grad_weight, grad_bias, None, None, None, probe


class _TracedQuantSoftmax(torch.autograd.Function):
    """``softmax`` saving its OUTPUT quantized (what the eager layer keeps), traceable by
    torch.compile (see :class:`_TracedQuantLinear`). Backward is ``_softmax_backward_data``
    on the dequantized output."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, input: Tensor, dim: int, bits: int, group_size: int,
        probe: Optional[Tensor] = None,
    ) -> Tensor:  # fmt: skip
        out = torch._softmax(input, dim, False)
        packed, lo, scale = _quantize_saved(ctx, out, bits, group_size)
        ctx.save_for_backward(packed, lo, scale)
        ctx.dim = dim
        ctx.input_dtype = input.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        packed, lo, scale = ctx.saved_tensors
        y = _dequantize_saved(ctx, packed, lo, scale)
        grad_input = torch.ops.aten._softmax_backward_data(grad, y, ctx.dim, ctx.input_dtype)
        return grad_input, None, None, None, _probe_grad(ctx, grad, scale, 4)


class CompressedLayer(nn.Module):
    """Mixin (listed first among the bases) of the quantizing layers.

    Constructor: the torch class's arguments plus keywords ``bits`` and ``group_size``.
    Attributes: ``bits`` (1, 2, 4, 8), ``group_size``, ``offload`` (copy the quantized records
    of CUDA tensors to CPU, ActNN level L4) and ``fewbit_stats`` (a :class:`LayerStats` while an
    adaptive allocator watches this layer, else None). What is saved and how autocast casts
    the input come from the layer's :data:`LAYERS` entry.
    """

    bits: int
    group_size: int
    offload: bool
    fewbit_stats: Optional[LayerStats]

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def _init_compression(
        self, bits: int = 2, group_size: int = 256, offload: bool = False
    ) -> None:
        self.bits = check_quant_bits(bits)
        self.group_size = check_group_size(group_size)
        self.offload = bool(offload)
        self.fewbit_stats = None

    def set_compression(
        self,
        bits: Optional[int] = None,
        group_size: Optional[int] = None,
        offload: Optional[bool] = None,
    ) -> None:
        """Change bits / group_size / offload (None keeps the current value)."""
        if bits is not None:
            self.bits = check_quant_bits(bits)
        if group_size is not None:
            self.group_size = check_group_size(group_size)
        if offload is not None:
            self.offload = bool(offload)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        """torch's ``_apply`` (``.to``, ``.cuda``, ``to_empty``, ...); then the adaptive
        statistics' probe (not a parameter or buffer) follows the layer to its new device."""
        out = super()._apply(fn, recurse)
        stats = self.fewbit_stats
        if stats is not None and stats.probe is not None:
            device = layer_device(self)
            if stats.probe.device != device:
                stats.make_probe(device)
        return out

    @classmethod
    def layer_spec(cls) -> LayerSpec:
        """This class's :data:`LAYERS` entry (the nearest one up its bases)."""
        for klass in cls.__mro__:
            spec = _SPECS.get(klass)
            if spec is not None:
                return spec
        raise TypeError(f"{cls.__name__} has no entry in fewbit.modules.compressed.LAYERS")

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The torch class's forward, with this layer's saved activation quantized."""
        return self._compressed(super().forward, input, *args, **kwargs)

    def _compressed(self, fn: Callable[..., Tensor], input: Tensor, *args: Any,
                    **kwargs: Any) -> Tensor:
        """Run ``fn(input, *args, **kwargs)`` with this layer's saved activations quantized."""
        grads = torch.is_grad_enabled() and (
            input.requires_grad or any(p.requires_grad for p in self.parameters(recurse=False))
        )
        if not grads:
            return fn(input, *args, **kwargs)
        if (
            torch.compiler.is_compiling()
            and not args
            and not kwargs
            and self._traceable_training(input)
        ):
            return self._traced_training(input)
        return self._compressed_training(fn, input, *args, **kwargs)

    def _traced_training(self, input: Tensor) -> Tensor:
        """The training forward under torch.compile: this layer's traced Function.

        Under autocast it does what autocast does to the torch op (the eager path's cast,
        :func:`_autocast_input`): input, weight and bias are cast as the layer's
        :data:`AUTOCAST_POLICIES` entry says (autograd records the casts, so the parameters'
        gradients come back in their own dtype), then the Function runs with autocast off
        on the input's device type, so it computes and saves exactly what eager does."""
        stats = self.fewbit_stats
        probe = stats.probe if stats is not None and self.training else None
        quant = (self.bits, self.group_size, probe)
        device_type = input.device.type
        weight: Optional[Tensor] = getattr(self, "weight", None)  # Softmax has none
        bias: Optional[Tensor] = getattr(self, "bias", None)
        if autocast_dtype(device_type) is None:
            return self._traced_apply(input, weight, bias, quant)
        policy = self.layer_spec().autocast
        input = _autocast_input(input, policy)
        weight = _autocast_cast(weight, policy, device_type)
        bias = _autocast_cast(bias, policy, device_type)
        with torch.autocast(device_type, enabled=False):
            return self._traced_apply(input, weight, bias, quant)

    def _traced_apply(self, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      quant: tuple[Any, ...]) -> Tensor:
        """This layer's traced Function on ``input`` with these (possibly cast) parameters."""
        if isinstance(self, nn.LayerNorm):
            return _TracedQuantLayerNorm.apply(
                input, tuple(self.normalized_shape), weight, bias, self.eps, *quant
            )
        if isinstance(self, nn.modules.conv._ConvNd):
            conv = (list(self.stride), list(self.padding), list(self.dilation),
                    self.transposed, list(self.output_padding), self.groups)
            return _TracedQuantConv.apply(input, weight, bias, conv, *quant)
        if isinstance(self, nn.modules.batchnorm._BatchNorm):
            return self._traced_batch_norm(input, weight, bias, quant)
        if isinstance(self, nn.GroupNorm):
            return _TracedQuantGroupNorm.apply(input, self.num_groups, weight, bias, self.eps,
                                               *quant)
        if isinstance(self, nn.Softmax):
            return _TracedQuantSoftmax.apply(input, self.dim, *quant)
        assert isinstance(self, nn.Linear)
        return _TracedQuantLinear.apply(input, weight, bias, *quant)

    def _traced_batch_norm(self, input: Tensor, weight: Optional[Tensor],
                           bias: Optional[Tensor], quant: tuple[Any, ...]) -> Tensor:
        """``nn.BatchNorm*.forward`` with batch statistics (see :meth:`_traceable_training`)
        through :class:`_TracedQuantBatchNorm`: the same input check, step count and
        running-statistics update as torch's."""
        assert isinstance(self, nn.modules.batchnorm._BatchNorm)
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        if tracking and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        keep = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep else None
        running_var = self.running_var if keep else None
        return _TracedQuantBatchNorm.apply(
            input, weight, bias, running_mean, running_var, self.momentum,
            self.eps, *quant,
        )  # fmt: skip

    def _traceable_layer(self, input: Tensor) -> bool:
        """Whether this layer has a traced Function for this call: Linear, LayerNorm; a
        convolution with zero padding given as numbers (not "same"/"valid", which torch pads
        itself) on a batched contiguous input (eager encodes other layouts in memory order);
        BatchNorm (not SyncBatchNorm) using batch statistics with a fixed ``momentum``
        (eval mode with running statistics stays eager); GroupNorm; Softmax with ``dim``."""
        if isinstance(self, (nn.Linear, nn.LayerNorm, nn.GroupNorm)):
            return True
        if isinstance(self, nn.modules.conv._ConvNd):
            return (
                self.padding_mode == "zeros"
                and not isinstance(self.padding, str)
                and input.dim() == self.weight.dim()
                and input.is_contiguous()
            )
        if isinstance(self, nn.modules.batchnorm._BatchNorm):
            batch_stats = self.training or (self.running_mean is None and self.running_var is None)
            return (
                not isinstance(self, nn.SyncBatchNorm)
                and batch_stats
                and self.momentum is not None
            )
        if isinstance(self, nn.Softmax):
            return self.dim is not None
        return False

    def _traceable_training(self, input: Tensor) -> bool:
        """Whether torch.compile can trace this call through a traced Function
        (:class:`_TracedQuantLinear`, :class:`_TracedQuantLayerNorm`,
        :class:`_TracedQuantConv`, :class:`_TracedQuantBatchNorm`,
        :class:`_TracedQuantGroupNorm`, :class:`_TracedQuantSoftmax`; no graph break): a layer
        and call :meth:`_traceable_layer` accepts (with or without autocast, see
        :meth:`_traced_training`), no offload of a CUDA tensor (on other devices offload
        does nothing), adaptive statistics (if any) with their probe on the input's device."""
        stats = self.fewbit_stats
        return (
            self._traceable_layer(input)
            and input.is_floating_point()
            and not (self.offload and input.is_cuda)
            and (stats is None or (stats.probe is not None and stats.probe.device == input.device))
        )

    @torch.compiler.disable
    def _compressed_training(self, fn: Callable[..., Tensor], input: Tensor, *args: Any,
                             **kwargs: Any) -> Tensor:
        """The training forward. Saved-tensor hooks cannot be traced: under torch.compile this
        runs eagerly between compiled graphs (one graph break per layer), so the saved
        activation is still quantized."""
        if checkpoint_active():
            return fn(input, *args, **kwargs)
        spec = self.layer_spec()
        input = _autocast_input(input, spec.autocast)
        saver = _LayerSaver(self, input if spec.saves == "input" else None)
        token = _LAYER.set(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(saver.pack, saver.unpack):
                out = fn(input, *args, **kwargs)
        finally:
            _LAYER.reset(token)
            # autograd keeps ``saver.unpack`` with every record until backward: the saver must
            # not keep the full-precision input alive with it.
            saver.release_input()
        stats = self.fewbit_stats
        if stats is not None and self.training and out.requires_grad:
            out.register_hook(stats.update_grad)
        return out

    def extra_repr(self) -> str:
        base = super().extra_repr()
        mine = f"bits={self.bits}, group_size={self.group_size}"
        if self.offload:
            mine += ", offload=True"
        return f"{base}, {mine}" if base else mine


class Conv1d(CompressedLayer, nn.Conv1d):
    """``nn.Conv1d`` saving its input quantized to ``bits`` bits."""


class Conv2d(CompressedLayer, nn.Conv2d):
    """``nn.Conv2d`` saving its input quantized to ``bits`` bits."""


class Conv3d(CompressedLayer, nn.Conv3d):
    """``nn.Conv3d`` saving its input quantized to ``bits`` bits."""


class ConvTranspose1d(CompressedLayer, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` saving its input quantized to ``bits`` bits."""


class ConvTranspose2d(CompressedLayer, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` saving its input quantized to ``bits`` bits."""


class ConvTranspose3d(CompressedLayer, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` saving its input quantized to ``bits`` bits."""


class Linear(CompressedLayer, nn.Linear):
    """``nn.Linear`` saving its input quantized to ``bits`` bits."""


class BatchNorm1d(CompressedLayer, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` saving its input quantized to ``bits`` bits (statistics exact)."""


class BatchNorm2d(CompressedLayer, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` saving its input quantized to ``bits`` bits (statistics exact)."""


class BatchNorm3d(CompressedLayer, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` saving its input quantized to ``bits`` bits (statistics exact)."""


class SyncBatchNorm(CompressedLayer, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` saving its input quantized (a single process: BatchNorm)."""


class LayerNorm(CompressedLayer, nn.LayerNorm):
    """``nn.LayerNorm`` saving its input quantized to ``bits`` bits (mean/rstd exact)."""


class GroupNorm(CompressedLayer, nn.GroupNorm):
    """``nn.GroupNorm`` saving its input quantized to ``bits`` bits (mean/rstd exact)."""


class Softmax(CompressedLayer, nn.Softmax):
    """``nn.Softmax`` saving its output quantized to ``bits`` bits."""


@dataclass(frozen=True)
class LayerSpec:
    """One row of :data:`LAYERS`.

    ``saves``: ``"input"`` (only the input's storage is quantized; everything else the op
    saves passes) or ``"activations"`` (every floating non-parameter tensor it saves: Softmax
    saves its output). ``autocast``: one of :data:`AUTOCAST_POLICIES`. The codec is the
    group quantizer at the layer's ``bits`` and ``group_size``.
    """

    torch_class: type
    layer: type
    saves: str
    autocast: str


#: The quantizing layers: (torch class, compressed class, what is saved, autocast policy).
LAYERS: Tuple[LayerSpec, ...] = (
    LayerSpec(nn.Conv1d, Conv1d, "input", "low"),
    LayerSpec(nn.Conv2d, Conv2d, "input", "low"),
    LayerSpec(nn.Conv3d, Conv3d, "input", "low"),
    LayerSpec(nn.ConvTranspose1d, ConvTranspose1d, "input", "low"),
    LayerSpec(nn.ConvTranspose2d, ConvTranspose2d, "input", "low"),
    LayerSpec(nn.ConvTranspose3d, ConvTranspose3d, "input", "low"),
    LayerSpec(nn.Linear, Linear, "input", "low"),
    LayerSpec(nn.BatchNorm1d, BatchNorm1d, "input", "none"),
    LayerSpec(nn.BatchNorm2d, BatchNorm2d, "input", "none"),
    LayerSpec(nn.BatchNorm3d, BatchNorm3d, "input", "none"),
    LayerSpec(nn.SyncBatchNorm, SyncBatchNorm, "input", "none"),
    LayerSpec(nn.LayerNorm, LayerNorm, "input", "fp32_cuda"),
    LayerSpec(nn.GroupNorm, GroupNorm, "input", "fp32_cuda"),
    LayerSpec(nn.Softmax, Softmax, "activations", "fp32_cuda"),
)
_SPECS: Dict[type, LayerSpec] = {spec.layer: spec for spec in LAYERS}


# --- lossless layers ----------------------------------------------------------------------------


class Dropout(nn.Dropout):
    """``nn.Dropout`` saving a 1-bit mask (``n/8`` bytes); gradients exact. On the CPU the mask
    is a counter hash keyed from torch's generator (same distribution as torch's, other
    numbers: :func:`fewbit.functional.dropout.dropout`)."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training, self.inplace)


class _MaxPoolForward(nn.Module):
    """forward of the max-pooling layers: ``pool`` (a :mod:`fewbit.functional.pooling`
    function) with the module's settings."""

    pool: Callable[..., Any]
    kernel_size: Any
    stride: Any
    padding: Any
    dilation: Any
    ceil_mode: bool
    return_indices: bool

    def forward(self, input: Tensor) -> Any:
        return self.pool(input, self.kernel_size, self.stride, self.padding, self.dilation,
                         ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class _AvgPoolForward(nn.Module):
    """forward of the average-pooling layers (see :class:`_MaxPoolForward`)."""

    pool: Callable[..., Any]
    kernel_size: Any
    stride: Any
    padding: Any
    ceil_mode: bool
    count_include_pad: bool

    def forward(self, input: Tensor) -> Tensor:
        return self.pool(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                         self.count_include_pad, getattr(self, "divisor_override", None))


class MaxPool1d(_MaxPoolForward, nn.MaxPool1d):
    """``nn.MaxPool1d`` saving ``ceil(log2(kernel_size))``-bit argmax offsets; exact grads."""

    pool = staticmethod(FP.max_pool1d)


class MaxPool2d(_MaxPoolForward, nn.MaxPool2d):
    """``nn.MaxPool2d`` saving ``ceil(log2(kh*kw))``-bit argmax offsets; exact grads."""

    pool = staticmethod(FP.max_pool2d)


class MaxPool3d(_MaxPoolForward, nn.MaxPool3d):
    """``nn.MaxPool3d`` saving ``ceil(log2(kd*kh*kw))``-bit argmax offsets; exact grads."""

    pool = staticmethod(FP.max_pool3d)


class AvgPool1d(_AvgPoolForward, nn.AvgPool1d):
    """``nn.AvgPool1d`` saving nothing for backward; exact grads."""

    pool = staticmethod(FP.avg_pool1d)


class AvgPool2d(_AvgPoolForward, nn.AvgPool2d):
    """``nn.AvgPool2d`` saving nothing for backward; exact grads."""

    pool = staticmethod(FP.avg_pool2d)


class AvgPool3d(_AvgPoolForward, nn.AvgPool3d):
    """``nn.AvgPool3d`` saving nothing for backward; exact grads."""

    pool = staticmethod(FP.avg_pool3d)


# --- ActNN names --------------------------------------------------------------------------------

QConv1d = Conv1d
QConv2d = Conv2d
QConv3d = Conv3d
QConvTranspose1d = ConvTranspose1d
QConvTranspose2d = ConvTranspose2d
QConvTranspose3d = ConvTranspose3d
QLinear = Linear
QBatchNorm1d = BatchNorm1d
QBatchNorm2d = BatchNorm2d
QBatchNorm3d = BatchNorm3d
QSyncBatchNorm = SyncBatchNorm
QLayerNorm = LayerNorm
QGroupNorm = GroupNorm
QSoftmax = Softmax
QReLU = ReLU
QDropout = Dropout
QMaxPool1d = MaxPool1d
QMaxPool2d = MaxPool2d
QMaxPool3d = MaxPool3d
QAvgPool1d = AvgPool1d
QAvgPool2d = AvgPool2d
QAvgPool3d = AvgPool3d

#: torch.nn class -> compressed class (exact type match), derived from :data:`LAYERS`.
QUANTIZED: Tuple[Tuple[type, type], ...] = tuple((s.torch_class, s.layer) for s in LAYERS)
LOSSLESS: Tuple[Tuple[type, type], ...] = (
    (nn.Dropout, Dropout),
    (nn.MaxPool1d, MaxPool1d),
    (nn.MaxPool2d, MaxPool2d),
    (nn.MaxPool3d, MaxPool3d),
    (nn.AvgPool1d, AvgPool1d),
    (nn.AvgPool2d, AvgPool2d),
    (nn.AvgPool3d, AvgPool3d),
)
