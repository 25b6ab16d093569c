"""ActNN-style compressed layers: torch's forward, quantized activations saved for backward.

Every quantizing layer subclasses its ``torch.nn`` counterpart (same constructor arguments plus
keywords ``bits`` (1, 2, 4 or 8; default 2) and ``group_size`` (default 256), same
``state_dict`` keys, ``isinstance`` still true) and runs torch's own ``forward`` inside
``torch.autograd.graph.saved_tensors_hooks``. The hooks replace the layer's saved activation
(its input; the output for :class:`Softmax`) by a :class:`fewbit.codecs.quantize.QuantizedTensor`
of ``quantized_nbytes(shape, bits, group_size)`` bytes; parameters, buffers and small
statistics (BatchNorm/LayerNorm means and inverse std) pass through. So the forward output is
bitwise torch's and backward is torch's own math on the dequantized input, whose error per
element is below one quantization step ``range / (2**bits - 1)`` of its group and unbiased.

Lossless layers (bitwise torch's gradients): :class:`Dropout` (1-bit mask), :class:`MaxPool1d`
/2d/3d (in-window argmax offsets), :class:`AvgPool1d`/2d/3d (nothing saved), and
:data:`ReLU` = :class:`fewbit.modules.activations.ReLU` (1-bit mask).

ActNN's names are aliases: ``QConv2d is Conv2d`` etc.

Measuring: :class:`SavedBytesMeter` counts, per forward, the bytes held for backward by these
layers (their quantized records) plus every other saved tensor (deduplicated by storage,
parameters excluded).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from ..codecs.marks import is_compact
from ..codecs.quantize import QuantizedTensor, check_group_size, check_quant_bits
from ..compress import SavedTensorCompressor, report_saved
from ..functional import compressed as FC
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
    "LayerNorm",
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
    """Bytes held by a packed saved-tensor record (QuantizedTensor, tensor, nested records)."""
    if isinstance(obj, QuantizedTensor):
        return obj.nbytes()
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(saved_nbytes(o) for o in obj)
    q = getattr(obj, "q", None)  # fewbit.compress record
    if isinstance(q, QuantizedTensor):
        return q.nbytes()
    return 0


_METER: contextvars.ContextVar[Optional[SavedBytesMeter]] = contextvars.ContextVar(
    "fewbit_saved_bytes_meter", default=None
)


class SavedBytesMeter:
    """Context manager counting the bytes kept for backward by everything run inside it.

    Plain saved tensors are counted once per storage (``untyped_storage().nbytes()``),
    ``nn.Parameter`` objects, views of them and anything sharing storage with ``exclude``
    are not counted. Records packed by compressed layers are counted at their
    :func:`saved_nbytes`. ``per_layer`` maps each compressed layer's ``id`` to its bytes.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: Set[int] = set()
        self.plain_bytes = 0
        self.compressed_bytes = 0
        self.per_layer: Dict[int, int] = {}
        self._hooks: Optional[torch.autograd.graph.saved_tensors_hooks] = None
        self._token: Optional[contextvars.Token[Optional[SavedBytesMeter]]] = None

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

    def add_record(self, layer: nn.Module, obj: object) -> None:
        """Called by compressed layers for each record they pack."""
        n = saved_nbytes(obj)
        self.compressed_bytes += n
        self.per_layer[id(layer)] = self.per_layer.get(id(layer), 0) + n

    def __enter__(self) -> SavedBytesMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        self._token = _METER.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None and self._token is not None
        _METER.reset(self._token)
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._token = None


# --- sensitivity statistics (used by fewbit.levels for adaptive bits) ----------------------------


@dataclass
class LayerStats:
    """Running averages a layer collects for adaptive bit allocation (see fewbit.levels).

    ``grad_sq``: mean of the squared gradient of the layer output; ``range_sq``: mean over
    quantization groups of the squared group range of the saved activation; ``numel``: elements
    of the saved activation in the last step. EMA factor ``momentum``.
    """

    grad_sq: float = 0.0
    range_sq: float = 0.0
    numel: int = 0
    steps: int = 0
    momentum: float = 0.9

    def _ema(self, old: float, new: float, first: bool) -> float:
        return new if first else self.momentum * old + (1 - self.momentum) * new

    def update_range(self, q: QuantizedTensor, numel: int) -> None:
        levels = (1 << q.bits) - 1
        rng = q.scale.float() * levels
        rng = rng[torch.isfinite(rng)]
        value = float((rng * rng).mean()) if rng.numel() else 0.0
        self.range_sq = self._ema(self.range_sq, value, self.numel == 0)
        self.numel = numel

    def update_grad(self, grad: Tensor) -> None:
        value = float(grad.detach().float().pow(2).mean()) if grad.numel() else 0.0
        self.grad_sq = self._ema(self.grad_sq, value, self.steps == 0)
        self.steps += 1


# --- the quantizing layers ----------------------------------------------------------------------


class _LayerSaver:
    """Pack/unpack hooks of one forward call of a compressed layer."""

    def __init__(self, layer: CompressedLayer, target: Optional[Tensor]) -> None:
        self.layer = layer
        self.stats = layer.fewbit_stats
        self.meter = _METER.get()
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
        self.formats: Dict[int, torch.memory_format] = {}

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
                if self.meter is not None:
                    self.meter._pack(t)
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
        rec = self.comp.pack(t)
        if self.meter is not None:
            self.meter.add_record(self.layer, rec)
        q = getattr(rec, "q", None)
        if self.stats is not None and isinstance(q, QuantizedTensor):
            self.stats.update_range(q, t.numel())
        return (rec, _memory_format(t), view)

    def unpack(self, obj: object) -> Tensor:
        if isinstance(obj, Tensor):
            return obj
        assert isinstance(obj, tuple)
        rec, fmt, view = obj
        out = self.comp.unpack(rec)
        if view is not None:
            return out.view(view)
        return out if fmt is None else out.contiguous(memory_format=fmt)


def _memory_format(t: Tensor) -> Optional[torch.memory_format]:
    if t.is_contiguous():
        return None
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


class CompressedLayer(nn.Module):
    """Mixin (listed first among the bases) of the quantizing layers.

    Attributes: ``bits`` (1, 2, 4, 8), ``group_size``, ``offload`` (copy the quantized records
    of CUDA tensors to CPU, ActNN level L4) and ``fewbit_stats`` (a :class:`LayerStats` while an
    adaptive allocator watches this layer, else None). ``quantize_output``: quantize every
    saved activation (Softmax saves its output) instead of only the input.
    """

    bits: int
    group_size: int
    offload: bool
    fewbit_stats: Optional[LayerStats]
    quantize_output = False

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

    def _compressed(self, fn: Callable[..., Tensor], input: Tensor, *args: Any) -> Tensor:
        """Run ``fn(input, *args)`` with this layer's saved activations quantized."""
        grads = torch.is_grad_enabled() and (
            input.requires_grad or any(p.requires_grad for p in self.parameters(recurse=False))
        )
        if not grads:
            return fn(input, *args)
        saver = _LayerSaver(self, None if self.quantize_output else input)
        try:
            with torch.autograd.graph.saved_tensors_hooks(saver.pack, saver.unpack):
                out = fn(input, *args)
        finally:
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

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor) -> Tensor:
        return self._compressed(super().forward, input)


class Conv2d(CompressedLayer, nn.Conv2d):
    """``nn.Conv2d`` saving its input quantized to ``bits`` bits."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor) -> Tensor:
        return self._compressed(super().forward, input)


class Conv3d(CompressedLayer, nn.Conv3d):
    """``nn.Conv3d`` saving its input quantized to ``bits`` bits."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor) -> Tensor:
        return self._compressed(super().forward, input)


class ConvTranspose1d(CompressedLayer, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` saving its input quantized to ``bits`` bits."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        return self._compressed(super().forward, input, output_size)


class ConvTranspose2d(CompressedLayer, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` saving its input quantized to ``bits`` bits."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        return self._compressed(super().forward, input, output_size)


class ConvTranspose3d(CompressedLayer, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` saving its input quantized to ``bits`` bits."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        return self._compressed(super().forward, input, output_size)


class Linear(CompressedLayer, nn.Linear):
    """``nn.Linear`` saving its input quantized to ``bits`` bits."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor) -> Tensor:
        return self._compressed(super().forward, input)


class BatchNorm1d(CompressedLayer, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` saving its input quantized to ``bits`` bits (statistics exact)."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor) -> Tensor:
        return self._compressed(super().forward, input)


class BatchNorm2d(CompressedLayer, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` saving its input quantized to ``bits`` bits (statistics exact)."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor) -> Tensor:
        return self._compressed(super().forward, input)


class BatchNorm3d(CompressedLayer, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` saving its input quantized to ``bits`` bits (statistics exact)."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor) -> Tensor:
        return self._compressed(super().forward, input)


class SyncBatchNorm(CompressedLayer, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` saving its input quantized (a single process: BatchNorm)."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor) -> Tensor:
        return self._compressed(super().forward, input)


class LayerNorm(CompressedLayer, nn.LayerNorm):
    """``nn.LayerNorm`` saving its input quantized to ``bits`` bits (mean/rstd exact)."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor) -> Tensor:
        return self._compressed(super().forward, input)


class GroupNorm(CompressedLayer, nn.GroupNorm):
    """``nn.GroupNorm`` saving its input quantized to ``bits`` bits (mean/rstd exact)."""

    def __init__(self, *args: Any, bits: int = 2, group_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor) -> Tensor:
        return self._compressed(super().forward, input)


class Softmax(CompressedLayer, nn.Softmax):
    """``nn.Softmax`` saving its output quantized to ``bits`` bits."""

    quantize_output = True

    def __init__(self, dim: Optional[int] = None, *, bits: int = 2, group_size: int = 256) -> None:
        super().__init__(dim)
        self._init_compression(bits, group_size)

    def forward(self, input: Tensor) -> Tensor:
        return self._compressed(super().forward, input)


# --- lossless layers ----------------------------------------------------------------------------


class Dropout(nn.Dropout):
    """``nn.Dropout`` saving a 1-bit mask (``n/8`` bytes); gradients exact."""

    def forward(self, input: Tensor) -> Tensor:
        return FC.dropout(input, self.p, self.training, self.inplace)


class MaxPool1d(nn.MaxPool1d):
    """``nn.MaxPool1d`` saving ``ceil(log2(kernel_size))``-bit argmax offsets; exact grads."""

    def forward(self, input: Tensor) -> Any:
        return FC.max_pool1d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices,
        )


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` saving ``ceil(log2(kh*kw))``-bit argmax offsets; exact grads."""

    def forward(self, input: Tensor) -> Any:
        return FC.max_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices,
        )


class MaxPool3d(nn.MaxPool3d):
    """``nn.MaxPool3d`` saving ``ceil(log2(kd*kh*kw))``-bit argmax offsets; exact grads."""

    def forward(self, input: Tensor) -> Any:
        return FC.max_pool3d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices,
        )


class AvgPool1d(nn.AvgPool1d):
    """``nn.AvgPool1d`` saving nothing for backward; exact grads."""

    def forward(self, input: Tensor) -> Tensor:
        return FC.avg_pool1d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
        )


class AvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` saving nothing for backward; exact grads."""

    def forward(self, input: Tensor) -> Tensor:
        return FC.avg_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )


class AvgPool3d(nn.AvgPool3d):
    """``nn.AvgPool3d`` saving nothing for backward; exact grads."""

    def forward(self, input: Tensor) -> Tensor:
        return FC.avg_pool3d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )


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

#: torch.nn class -> compressed class (exact type match), used by fewbit.levels.
QUANTIZED: Tuple[Tuple[type, type], ...] = (
    (nn.Conv1d, Conv1d),
    (nn.Conv2d, Conv2d),
    (nn.Conv3d, Conv3d),
    (nn.ConvTranspose1d, ConvTranspose1d),
    (nn.ConvTranspose2d, ConvTranspose2d),
    (nn.ConvTranspose3d, ConvTranspose3d),
    (nn.Linear, Linear),
    (nn.BatchNorm1d, BatchNorm1d),
    (nn.BatchNorm2d, BatchNorm2d),
    (nn.BatchNorm3d, BatchNorm3d),
    (nn.SyncBatchNorm, SyncBatchNorm),
    (nn.LayerNorm, LayerNorm),
    (nn.GroupNorm, GroupNorm),
    (nn.Softmax, Softmax),
)
LOSSLESS: Tuple[Tuple[type, type], ...] = (
    (nn.Dropout, Dropout),
    (nn.MaxPool1d, MaxPool1d),
    (nn.MaxPool2d, MaxPool2d),
    (nn.MaxPool3d, MaxPool3d),
    (nn.AvgPool1d, AvgPool1d),
    (nn.AvgPool2d, AvgPool2d),
    (nn.AvgPool3d, AvgPool3d),
)
