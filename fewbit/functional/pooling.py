"""Pooling that saves less for backward, with bitwise torch gradients.

* :func:`max_pool1d` / :func:`max_pool2d` / :func:`max_pool3d` store, per output element, the
  position of the maximum inside its window: ``ceil(log2(kernel volume))`` bits, bit-packed
  (4 bits for a 3x3 window) instead of torch's input copy plus 64-bit indices. Backward
  rebuilds the 64-bit indices and calls torch's own ``max_pool*_with_indices_backward``, so
  overlapping windows, padding, dilation and ``ceil_mode`` behave exactly as in torch.
  Windows of more than 256 elements keep 16-bit (or 32-bit) window offsets;
  ``return_indices=True`` falls back to torch's op (the int64 indices are returned anyway).
  The offsets are packed by the custom ops ``fewbit::pack_window_offsets`` /
  ``unpack_window_offsets`` and saved as plain tensors, so ``torch.compile(fullgraph=True)``
  traces max pooling with no graph break and keeps the same bytes as eager. Eager on the CPU
  with the native library (:func:`fewbit.codecs.native.library`, windows of 2-256 elements),
  one C pass (``csrc/maxpool.c``) turns torch's indices into the packed offsets and one turns
  them back (the same bytes; 262K outputs of a 3x3 pool: encode 2.1 ms and decode 1.5 ms
  against 8.8 and 7.8 ms for the torch ops, 1 thread, loaded machine).
* :func:`avg_pool1d` / :func:`avg_pool2d` / :func:`avg_pool3d` store nothing but the input
  shape (torch keeps the whole input only for its shape); backward is torch's
  ``avg_pool*_backward``.

The public functions take exactly the arguments of their ``torch.nn.functional`` namesakes.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ..codecs.bitpack import pack, packed_nbytes, unpack
from ..codecs.marks import mark_compact
from ..codecs.native import library
from ..kernels.policy import use_kernel

__all__ = [
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "window_offset_bits",
]

IntOrTuple = Union[int, Sequence[int]]


def _tuple(
    value: Optional[IntOrTuple], dims: int, name: str, default: Optional[IntOrTuple] = None
) -> Tuple[int, ...]:
    """``value`` as a ``dims``-tuple of ints (an int is repeated)."""
    if value is None or (isinstance(value, (tuple, list)) and len(value) == 0):
        if default is None:
            raise ValueError(f"{name} must be given")
        value = default
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * dims
    out = tuple(value)  # type: ignore[arg-type]
    if len(out) == 1:
        out = out * dims
    if len(out) != dims or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise ValueError(f"{name} must be an int or a tuple of {dims} ints, got {value!r}")
    return out


# --- max pooling --------------------------------------------------------------------------------


def window_offset_bits(kernel_size: Sequence[int]) -> int:
    """Bits per output element used to store the argmax position in a window of this size."""
    volume = math.prod(kernel_size)
    return max(0, math.ceil(math.log2(volume))) if volume > 1 else 0


def _grid(out_shape: Sequence[int], dims: int, d: int, device: torch.device) -> Tensor:
    """Output coordinate along spatial dim ``d``, shaped to broadcast over ``out_shape``."""
    size = out_shape[len(out_shape) - dims + d]
    view = [1] * len(out_shape)
    view[len(out_shape) - dims + d] = size
    return torch.arange(size, device=device).view(view)


Geometry = Tuple[Sequence[int], Sequence[int], Sequence[int], Sequence[int], Sequence[int]]


def _axes(shape: Sequence[int], geom: Geometry, device: torch.device) -> Any:
    """Per spatial dim, innermost first: (window start of each output position, input stride
    of the dim in flat indices, window stride of the dim in window offsets, kernel, dilation,
    input size). ``geom`` = (input spatial sizes, kernel, stride, padding, dilation)."""
    in_spatial, kernel, stride, padding, dilation = geom
    dims = len(kernel)
    inner_in = 1
    inner_k = 1
    for d in reversed(range(dims)):
        start = _grid(shape, dims, d, device) * stride[d] - padding[d]
        yield start, inner_in, inner_k, kernel[d], dilation[d], in_spatial[d]
        inner_in *= in_spatial[d]
        inner_k *= kernel[d]


def _encode_offsets(idx: Tensor, geom: Geometry) -> Tensor:
    """Flat input indices (int64, output shape) -> position inside the window (int64)."""
    code = torch.zeros_like(idx)
    for start, inner_in, inner_k, _, dilation, size in _axes(idx.shape, geom, idx.device):
        coord = torch.div(idx, inner_in, rounding_mode="floor") % size
        code += torch.div(coord - start, dilation, rounding_mode="floor") * inner_k
    return code


def _decode_offsets(code: Tensor, geom: Geometry) -> Tensor:
    """Inverse of :func:`_encode_offsets`."""
    idx = torch.zeros_like(code)
    for start, inner_in, inner_k, kernel, dilation, _ in _axes(code.shape, geom, code.device):
        off = torch.div(code, inner_k, rounding_mode="floor") % kernel
        idx += (start + off * dilation) * inner_in
    return idx


def _store_codes(code: Tensor, bits: int) -> Tuple[Tensor, ...]:
    """What is saved of the window offsets ``code``: nothing for 1-element windows; up to 8
    bits, the codes bit-packed in memory order of the logical shape
    (``ceil(numel * bits / 8)`` bytes, :mod:`fewbit.codecs.bitpack`'s layout, by the custom
    op :func:`_pack_offsets`); wider, int16 (int32 above 15 bits). Plain tensors, so that
    torch.compile can trace the save."""
    if bits == 0:
        return ()
    if bits > 8:
        return (code.to(torch.int16 if bits <= 15 else torch.int32),)
    return (_pack_offsets(code.detach().reshape(-1), bits),)


# Packing runs as custom ops: opaque to torch.compile, so a compiled graph keeps exactly the
# packed bytes (traced as plain torch ops, the partitioner may keep intermediates instead).
@torch.library.custom_op("fewbit::pack_window_offsets", mutates_args=())
def _pack_offsets(flat: Tensor, bits: int) -> Tensor:
    """1-D codes -> ``packed_nbytes(numel, bits)`` uint8 bytes (Triton packer where
    :func:`fewbit.kernels.use_kernel` says so, the torch one otherwise: same bytes)."""
    if use_kernel(flat):
        from ..kernels.bitpack import pack as kernel_pack

        return kernel_pack(flat, bits)
    return pack(flat, bits)


@_pack_offsets.register_fake
def _(flat: Tensor, bits: int) -> Tensor:
    return flat.new_empty(packed_nbytes(flat.numel(), bits), dtype=torch.uint8)


@torch.library.custom_op("fewbit::unpack_window_offsets", mutates_args=())
def _unpack_offsets(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`_pack_offsets`: ``n`` uint8 codes."""
    if use_kernel(packed):
        from ..kernels.bitpack import unpack as kernel_unpack

        return kernel_unpack(packed, bits, n)
    return unpack(packed, bits, n)


@_unpack_offsets.register_fake
def _(packed: Tensor, bits: int, n: int) -> Tensor:
    return packed.new_empty(n, dtype=torch.uint8)


def _load_codes(saved: Tuple[Tensor, ...], bits: int, shape: Sequence[int],
                device: torch.device) -> Tensor:
    """The int64 window offsets, ``shape``, from what :func:`_store_codes` saved."""
    shape = tuple(shape)
    if bits == 0:
        return torch.zeros(shape, dtype=torch.int64, device=device)
    if bits > 8:
        return saved[0].to(torch.int64)
    codes = _unpack_offsets(saved[0], bits, math.prod(shape))
    return codes.reshape(shape).to(torch.int64)


def _native_geometry(
    out_shape: Sequence[int], device: torch.device, geom: Geometry, bits: int
) -> Optional[Tensor]:
    """The int64[18] geometry of csrc/maxpool.c (out, in, kernel, stride, padding, dilation,
    spatial dims padded in front to 3) when the native passes apply: CPU, eager, 1-8 bits,
    input planes below 2**31 elements; else None."""
    if device.type != "cpu" or not 0 < bits <= 8 or torch.compiler.is_compiling():
        return None
    in_spatial, kernel, stride, padding, dilation = geom
    if math.prod(in_spatial) >= 2**31 or library() is None:
        return None
    pad = 3 - len(kernel)
    out = tuple(out_shape[-len(kernel):])
    rows = [(1,) * pad + tuple(v) for v in (out, in_spatial, kernel, stride)]
    rows += [(0,) * pad + tuple(padding), (1,) * pad + tuple(dilation)]
    return torch.tensor([v for row in rows for v in row], dtype=torch.int64)


def _native_encode(idx: Tensor, g: Tensor, bits: int) -> Tensor:
    """One C pass: torch's indices -> packed window offsets (the bytes of
    :func:`_encode_offsets` then :func:`_store_codes`)."""
    flat = idx.detach().contiguous()
    packed = torch.empty(packed_nbytes(flat.numel(), bits), dtype=torch.uint8)
    lib = library()
    assert lib is not None
    lib.fewbit_maxpool_encode(flat.data_ptr(), flat.numel(), g.data_ptr(), bits, packed.data_ptr())
    return packed


def _native_decode(packed: Tensor, g: Tensor, bits: int, shape: Sequence[int]) -> Tensor:
    """One C pass: packed window offsets -> torch's int64 indices, ``shape``."""
    idx = torch.empty(tuple(shape), dtype=torch.int64)
    lib = library()
    assert lib is not None
    lib.fewbit_maxpool_decode(packed.data_ptr(), idx.numel(), g.data_ptr(), bits, idx.data_ptr())
    return idx


_MAXPOOL_FWD = {
    2: torch.ops.aten.max_pool2d_with_indices,
    3: torch.ops.aten.max_pool3d_with_indices,
}
_MAXPOOL_BWD = {
    2: torch.ops.aten.max_pool2d_with_indices_backward,
    3: torch.ops.aten.max_pool3d_with_indices_backward,
}


class _MaxPool(torch.autograd.Function):
    """Max pooling that saves bit-packed in-window argmax offsets (see module docs)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        dims: int,
        kernel: Tuple[int, ...],
        stride: Tuple[int, ...],
        padding: Tuple[int, ...],
        dilation: Tuple[int, ...],
        ceil_mode: bool,
    ) -> Tensor:
        # 1-d pooling runs as 2-d pooling over a unit height, as torch itself does.
        op_dims = 2 if dims == 1 else dims
        xin = x.unsqueeze(-2) if dims == 1 else x
        pre = (1,) if dims == 1 else ()
        k, s = pre + kernel, pre + stride
        p, d = ((0,) if dims == 1 else ()) + padding, pre + dilation
        out, idx = _MAXPOOL_FWD[op_dims](xin, k, s, p, d, ceil_mode)
        bits = window_offset_bits(k)
        geom = (tuple(xin.shape[-op_dims:]), k, s, p, d)
        native = _native_geometry(idx.shape, idx.device, geom, bits)
        ctx.args = (op_dims, k, s, p, d, ceil_mode, bits)  # type: ignore[attr-defined]
        ctx.in_shape = xin.shape  # type: ignore[attr-defined]
        ctx.out_shape = out.shape  # type: ignore[attr-defined]
        ctx.channels_last = _channels_last(xin)  # type: ignore[attr-defined]
        ctx.squeeze = dims == 1  # type: ignore[attr-defined]
        if native is not None:  # one C pass, the same bytes
            saved: Tuple[Tensor, ...] = (_native_encode(idx, native, bits),)
        else:
            saved = _store_codes(_encode_offsets(idx, geom), bits)
        if not torch.compiler.is_compiling():  # a trace cannot set Python attributes on tensors
            saved = tuple(mark_compact(t) for t in saved)  # the generic mode leaves them alone
        ctx.save_for_backward(*saved)
        return out.squeeze(-2) if dims == 1 else out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        op_dims, k, s, p, d, ceil_mode, bits = ctx.args
        in_spatial = tuple(ctx.in_shape[-op_dims:])
        geom = (in_spatial, k, s, p, d)
        native = _native_geometry(ctx.out_shape, grad.device, geom, bits)
        if native is not None:
            idx = _native_decode(ctx.saved_tensors[0], native, bits, ctx.out_shape)
        else:
            code = _load_codes(ctx.saved_tensors, bits, ctx.out_shape, grad.device)
            idx = _decode_offsets(code, geom)
        g = grad.unsqueeze(-2) if ctx.squeeze else grad
        fmt = (
            torch.channels_last
            if ctx.channels_last and op_dims == 2
            else (torch.channels_last_3d if ctx.channels_last else torch.contiguous_format)
        )
        # torch's backward reads only the shape and memory format of ``self``.
        like = torch.empty(ctx.in_shape, dtype=grad.dtype, device=grad.device, memory_format=fmt)
        gi = _MAXPOOL_BWD[op_dims](g, like, k, s, p, d, ceil_mode, idx)
        if ctx.squeeze:
            gi = gi.squeeze(-2)
        return gi, None, None, None, None, None, None


def _channels_last(x: Tensor) -> bool:
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return False


_TORCH_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _max_pool(
    dims: int,
    input: Tensor,
    kernel_size: IntOrTuple,
    stride: Optional[IntOrTuple] = None,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Any:
    if return_indices or not input.requires_grad or not torch.is_grad_enabled():
        # Nothing to save (or int64 indices returned anyway): torch's own op.
        return _TORCH_MAXPOOL[dims](
            input,
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode=ceil_mode,
            return_indices=return_indices,
        )
    if input.dim() not in (dims + 1, dims + 2):
        raise ValueError(
            f"input must be {dims + 1}-D or {dims + 2}-D for max_pool{dims}d, got {input.dim()}-D"
        )
    k = _tuple(kernel_size, dims, "kernel_size")
    s = _tuple(stride, dims, "stride", default=k)
    p = _tuple(padding, dims, "padding")
    d = _tuple(dilation, dims, "dilation")
    return _MaxPool.apply(input, dims, k, s, p, d, bool(ceil_mode))


def max_pool1d(input: Tensor, *args: Any, **kwargs: Any) -> Any:
    """``F.max_pool1d`` (same arguments) saving ``ceil(log2(kernel_size))``-bit offsets."""
    return _max_pool(1, input, *args, **kwargs)


def max_pool2d(input: Tensor, *args: Any, **kwargs: Any) -> Any:
    """``F.max_pool2d`` (same arguments) saving ``ceil(log2(kh*kw))``-bit argmax offsets."""
    return _max_pool(2, input, *args, **kwargs)


def max_pool3d(input: Tensor, *args: Any, **kwargs: Any) -> Any:
    """``F.max_pool3d`` (same arguments) saving ``ceil(log2(kd*kh*kw))``-bit offsets."""
    return _max_pool(3, input, *args, **kwargs)


# --- average pooling ----------------------------------------------------------------------------


class _AvgPool(torch.autograd.Function):
    """Average pooling that saves only the input shape (torch saves the input)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, dims: int, args: Tuple[Any, ...]) -> Tensor:
        kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = args
        if dims == 1:
            out = F.avg_pool1d(x, kernel, stride, padding, ceil_mode, count_include_pad)
        elif dims == 2:
            out = F.avg_pool2d(
                x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
            )
        else:
            out = F.avg_pool3d(
                x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
            )
        ctx.dims = dims  # type: ignore[attr-defined]
        ctx.args = args  # type: ignore[attr-defined]
        ctx.in_shape = x.shape  # type: ignore[attr-defined]
        ctx.channels_last = _channels_last(x)  # type: ignore[attr-defined]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None]:
        kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = ctx.args
        fmt = torch.contiguous_format
        if ctx.channels_last:
            fmt = torch.channels_last if len(ctx.in_shape) == 4 else torch.channels_last_3d
        if ctx.dims == 1:  # torch runs avg_pool1d as avg_pool2d over a unit height
            shape = ctx.in_shape[:-1] + (1, ctx.in_shape[-1])
            like = torch.empty(shape, dtype=grad.dtype, device=grad.device)
            gi = torch.ops.aten.avg_pool2d_backward(
                grad.unsqueeze(-2),
                like,
                (1,) + kernel,
                (1,) + stride,
                (0,) + padding,
                ceil_mode,
                count_include_pad,
                None,
            )
            return gi.squeeze(-2), None, None
        like = torch.empty(ctx.in_shape, dtype=grad.dtype, device=grad.device, memory_format=fmt)
        op = (
            torch.ops.aten.avg_pool2d_backward
            if ctx.dims == 2
            else torch.ops.aten.avg_pool3d_backward
        )
        gi = op(grad, like, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
        return gi, None, None


def _avg_pool(
    dims: int,
    input: Tensor,
    kernel_size: IntOrTuple,
    stride: Optional[IntOrTuple] = None,
    padding: IntOrTuple = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
) -> Tensor:
    if not input.requires_grad or not torch.is_grad_enabled():
        return _TORCH_AVGPOOL[dims](
            input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        )
    if input.dim() not in (dims + 1, dims + 2):
        raise ValueError(
            f"input must be {dims + 1}-D or {dims + 2}-D for avg_pool{dims}d, got {input.dim()}-D"
        )
    k = _tuple(kernel_size, dims, "kernel_size")
    s = _tuple(stride, dims, "stride", default=k)
    p = _tuple(padding, dims, "padding")
    args = (k, s, p, bool(ceil_mode), bool(count_include_pad), divisor_override)
    return _AvgPool.apply(input, dims, args)


def _avg_pool1d_torch(
    input: Tensor,
    kernel_size: IntOrTuple,
    stride: Optional[IntOrTuple],
    padding: IntOrTuple,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Optional[int],
) -> Tensor:
    return F.avg_pool1d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)


_TORCH_AVGPOOL = {1: _avg_pool1d_torch, 2: F.avg_pool2d, 3: F.avg_pool3d}


def avg_pool1d(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """``F.avg_pool1d`` (same arguments) saving nothing for backward (torch keeps the input)."""
    return _avg_pool(1, input, *args, **kwargs)


def avg_pool2d(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """``F.avg_pool2d`` (same arguments) saving nothing for backward (torch keeps the input)."""
    return _avg_pool(2, input, *args, **kwargs)


def avg_pool3d(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """``F.avg_pool3d`` (same arguments) saving nothing for backward (torch keeps the input)."""
    return _avg_pool(3, input, *args, **kwargs)
