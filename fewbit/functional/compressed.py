"""Compact saves for backward: dropout, max/avg pooling and quantized attention.

Lossless (gradients bitwise equal to torch's):

* :func:`dropout` stores its keep-mask packed at 1 bit per element (``n / 8`` bytes) instead
  of torch's ``n``-element noise tensor in the input dtype.
* :func:`max_pool1d` / :func:`max_pool2d` / :func:`max_pool3d` store, per output element, the
  position of the maximum inside its window: ``ceil(log2(kernel volume))`` bits, bit-packed
  (4 bits for a 3x3 window) instead of torch's input copy plus 64-bit indices. Backward
  rebuilds the 64-bit indices and calls torch's own ``max_pool*_with_indices_backward``, so
  overlapping windows, padding, dilation and ``ceil_mode`` behave exactly as in torch.
  Windows of more than 256 elements keep 16-bit (or 32-bit) window offsets;
  ``return_indices=True`` falls back to torch's op (the int64 indices are returned anyway).
* :func:`avg_pool1d` / :func:`avg_pool2d` / :func:`avg_pool3d` store nothing but the input
  shape (torch keeps the whole input only for its shape); backward is torch's
  ``avg_pool*_backward``.

Lossy: :func:`scaled_dot_product_attention` computes attention with explicit matmul, softmax
and dropout, and stores ``q``, ``k``, ``v`` and the softmax output ``P`` quantized to ``bits``
bits (:mod:`fewbit.codecs.quantize`) plus a 1-bit dropout mask.

All saved codes are tagged with :func:`fewbit.codecs.marks.mark_compact`, so the generic
``fewbit.compress()`` mode leaves them alone. Double backward is not supported.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ..codecs.bitpack import pack, unpack
from ..codecs.marks import mark_compact
from ..codecs.quantize import (
    QuantizedTensor,
    check_group_size,
    check_quant_bits,
    dequantize,
    quantize,
)

__all__ = [
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "dropout",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "scaled_dot_product_attention",
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


# --- dropout -----------------------------------------------------------------------------------


class _Dropout(torch.autograd.Function):
    """``x * mask / (1 - p)``; saves the mask packed at 1 bit per element."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, p: float, inplace: bool, generator: Optional[torch.Generator]
    ) -> Tensor:
        # Same draws and arithmetic as torch's non-fused dropout: noise = bernoulli(1-p)/(1-p).
        noise = torch.empty_like(x, memory_format=torch.contiguous_format)
        noise.bernoulli_(1 - p, generator=generator)
        mask = noise.reshape(-1).ne(0)
        noise.div_(1 - p)
        ctx.p = p  # type: ignore[attr-defined]
        ctx.shape = x.shape  # type: ignore[attr-defined]
        ctx.save_for_backward(mark_compact(pack(mask, 1)))
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(noise)
        return x * noise

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None, None]:
        (packed,) = ctx.saved_tensors
        n = math.prod(ctx.shape)
        noise = unpack(packed, 1, n).to(grad.dtype).reshape(ctx.shape)
        noise.div_(1 - ctx.p)
        return grad * noise, None, None, None


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Drop-in ``F.dropout`` saving a 1-bit mask (``ceil(n/8)`` bytes) for backward.

    Output ``x * mask / (1 - p)`` with ``mask ~ Bernoulli(1 - p)``; identity when not
    ``training`` or ``p == 0``; zeros when ``p == 1``. On CPU the mask is drawn exactly as
    ``torch.nn.functional.dropout`` draws it, so the same seed gives the same output.
    """
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0 or input.numel() == 0:
        return input
    if p == 1:
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return input.mul_(zero) if inplace else input * zero
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating tensor, got {input.dtype}")
    return _Dropout.apply(input, float(p), bool(inplace), generator)


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


def _encode_offsets(
    idx: Tensor,
    in_spatial: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Flat input indices (int64, output shape) -> position inside the window (int64)."""
    dims = len(kernel)
    code = torch.zeros_like(idx)
    inner_in = 1
    inner_k = 1
    for d in reversed(range(dims)):
        coord = torch.div(idx, inner_in, rounding_mode="floor") % in_spatial[d]
        start = _grid(idx.shape, dims, d, idx.device) * stride[d] - padding[d]
        code += torch.div(coord - start, dilation[d], rounding_mode="floor") * inner_k
        inner_in *= in_spatial[d]
        inner_k *= kernel[d]
    return code


def _decode_offsets(
    code: Tensor,
    in_spatial: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Inverse of :func:`_encode_offsets`."""
    dims = len(kernel)
    idx = torch.zeros_like(code)
    inner_in = 1
    inner_k = 1
    for d in reversed(range(dims)):
        off = torch.div(code, inner_k, rounding_mode="floor") % kernel[d]
        start = _grid(code.shape, dims, d, code.device) * stride[d] - padding[d]
        idx += (start + off * dilation[d]) * inner_in
        inner_in *= in_spatial[d]
        inner_k *= kernel[d]
    return idx


def _store_codes(code: Tensor, bits: int) -> Tensor:
    if bits == 0:
        return mark_compact(torch.empty(0, dtype=torch.uint8, device=code.device))
    if bits <= 8:
        return mark_compact(pack(code.reshape(-1), bits))
    dtype = torch.int16 if bits <= 15 else torch.int32
    return mark_compact(code.reshape(-1).to(dtype))


def _load_codes(stored: Tensor, bits: int, shape: Sequence[int]) -> Tensor:
    n = math.prod(shape)
    if bits == 0:
        return torch.zeros(tuple(shape), dtype=torch.int64, device=stored.device)
    if bits <= 8:
        return unpack(stored, bits, n).to(torch.int64).reshape(tuple(shape))
    return stored.to(torch.int64).reshape(tuple(shape))


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
        in_spatial = tuple(xin.shape[-op_dims:])
        code = _encode_offsets(idx, in_spatial, k, s, p, d)
        ctx.args = (op_dims, k, s, p, d, ceil_mode, bits)  # type: ignore[attr-defined]
        ctx.in_shape = xin.shape  # type: ignore[attr-defined]
        ctx.out_shape = out.shape  # type: ignore[attr-defined]
        ctx.channels_last = _channels_last(xin)  # type: ignore[attr-defined]
        ctx.squeeze = dims == 1  # type: ignore[attr-defined]
        ctx.save_for_backward(_store_codes(code, bits))
        return out.squeeze(-2) if dims == 1 else out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (stored,) = ctx.saved_tensors
        op_dims, k, s, p, d, ceil_mode, bits = ctx.args
        code = _load_codes(stored, bits, ctx.out_shape)
        in_spatial = tuple(ctx.in_shape[-op_dims:])
        idx = _decode_offsets(code, in_spatial, k, s, p, d)
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
    stride: Optional[IntOrTuple],
    padding: IntOrTuple,
    dilation: IntOrTuple,
    ceil_mode: bool,
    return_indices: bool,
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


def max_pool1d(
    input: Tensor,
    kernel_size: IntOrTuple,
    stride: Optional[IntOrTuple] = None,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Any:
    """``F.max_pool1d`` saving ``ceil(log2(kernel_size))``-bit argmax offsets per output."""
    return _max_pool(1, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d(
    input: Tensor,
    kernel_size: IntOrTuple,
    stride: Optional[IntOrTuple] = None,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Any:
    """``F.max_pool2d`` saving ``ceil(log2(kh*kw))``-bit argmax offsets per output."""
    return _max_pool(2, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool3d(
    input: Tensor,
    kernel_size: IntOrTuple,
    stride: Optional[IntOrTuple] = None,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Any:
    """``F.max_pool3d`` saving ``ceil(log2(kd*kh*kw))``-bit argmax offsets per output."""
    return _max_pool(3, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


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
    stride: Optional[IntOrTuple],
    padding: IntOrTuple,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Optional[int],
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


def avg_pool1d(
    input: Tensor,
    kernel_size: IntOrTuple,
    stride: Optional[IntOrTuple] = None,
    padding: IntOrTuple = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> Tensor:
    """``F.avg_pool1d`` that saves nothing for backward (torch keeps the input)."""
    return _avg_pool(1, input, kernel_size, stride, padding, ceil_mode, count_include_pad, None)


def avg_pool2d(
    input: Tensor,
    kernel_size: IntOrTuple,
    stride: Optional[IntOrTuple] = None,
    padding: IntOrTuple = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
) -> Tensor:
    """``F.avg_pool2d`` that saves nothing for backward (torch keeps the input)."""
    return _avg_pool(
        2, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )


def avg_pool3d(
    input: Tensor,
    kernel_size: IntOrTuple,
    stride: Optional[IntOrTuple] = None,
    padding: IntOrTuple = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
) -> Tensor:
    """``F.avg_pool3d`` that saves nothing for backward (torch keeps the input)."""
    return _avg_pool(
        3, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )


# --- attention ----------------------------------------------------------------------------------


def _save_quantized(qs: Sequence[QuantizedTensor]) -> List[Tensor]:
    out: List[Tensor] = []
    for q in qs:
        out.extend(mark_compact(t) for t in (q.packed, q.lo, q.scale))
    return out


def _load_quantized(saved: Sequence[Tensor], metas: Sequence[Tuple[Any, ...]]) -> List[Tensor]:
    out = []
    for i, (shape, dtype, bits, group_size) in enumerate(metas):
        packed, lo, scale = saved[3 * i : 3 * i + 3]
        out.append(dequantize(QuantizedTensor(packed, lo, scale, shape, dtype, bits, group_size)))
    return out


def _meta(q: QuantizedTensor) -> Tuple[Any, ...]:
    return (q.shape, q.dtype, q.bits, q.group_size)


class _Attention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) [dropout] @ v with q, k, v and P saved quantized."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Optional[Tensor],
        dropout_p: float,
        scale: float,
        bits: int,
        group_size: int,
        generator: Optional[torch.Generator],
    ) -> Tensor:
        root = math.sqrt(scale)  # scale both operands, as torch's math backend does
        s = torch.matmul(q * root, (k * root).transpose(-2, -1))
        if bias is not None:
            s = s + bias
        p = torch.softmax(s, dim=-1)
        fully_masked = s.amax(dim=-1, keepdim=True) == float("-inf")
        p = p.masked_fill(fully_masked, 0.0)  # torch's _safe_softmax: 0 for all-masked rows
        del s
        pd = p
        has_mask = dropout_p > 0
        mask_packed = torch.empty(0, dtype=torch.uint8, device=q.device)
        if has_mask:
            keep = torch.empty_like(p).bernoulli_(1 - dropout_p, generator=generator)
            mask_packed = pack(keep.reshape(-1).ne(0), 1)
            pd = p * keep.div_(1 - dropout_p)
            del keep
        out = torch.matmul(pd, v)
        quant = [
            quantize(t, bits, group_size, generator=_gen_for(generator, t)) for t in (q, k, v, p)
        ]
        ctx.metas = [_meta(x) for x in quant]  # type: ignore[attr-defined]
        ctx.dropout_p = dropout_p  # type: ignore[attr-defined]
        ctx.scale = scale  # type: ignore[attr-defined]
        ctx.p_shape = p.shape  # type: ignore[attr-defined]
        ctx.bias_shape = None if bias is None else bias.shape  # type: ignore[attr-defined]
        ctx.save_for_backward(*_save_quantized(quant), mark_compact(mask_packed))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        saved = ctx.saved_tensors
        q, k, v, p = _load_quantized(saved[:12], ctx.metas)
        mask_packed = saved[12]
        pd = p
        keep: Optional[Tensor] = None
        if ctx.dropout_p > 0:
            keep = unpack(mask_packed, 1, p.numel()).to(p.dtype).reshape(p.shape)
            keep.div_(1 - ctx.dropout_p)
            pd = p * keep
        grad_v = _sum_to(torch.matmul(pd.transpose(-2, -1), grad), v.shape)
        dpd = torch.matmul(grad, v.transpose(-2, -1))
        dp = dpd * keep if keep is not None else dpd
        ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
        grad_q = _sum_to(torch.matmul(ds, k) * ctx.scale, q.shape)
        grad_k = _sum_to(torch.matmul(ds.transpose(-2, -1), q) * ctx.scale, k.shape)
        grad_bias = None
        if ctx.needs_input_grad[3] and ctx.bias_shape is not None:
            grad_bias = _sum_to(ds, ctx.bias_shape)
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None, None


def _sum_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    return t if tuple(t.shape) == tuple(shape) else t.sum_to_size(tuple(shape))


def _gen_for(generator: Optional[torch.Generator], t: Tensor) -> Optional[torch.Generator]:
    return generator if generator is not None and generator.device.type == t.device.type else None


def _attention_bias(
    attn_mask: Optional[Tensor], is_causal: bool, q: Tensor, k: Tensor
) -> Optional[Tensor]:
    """Additive float bias from a boolean/float mask and ``is_causal`` (as torch defines them)."""
    bias: Optional[Tensor] = None
    if is_causal:
        if attn_mask is not None:
            raise ValueError("attn_mask must be None when is_causal=True")
        L, S = q.size(-2), k.size(-2)
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        else:
            bias = attn_mask
    return bias


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    bits: int = 2,
    group_size: int = 256,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``F.scaled_dot_product_attention`` whose saved operands are quantized.

    Saves ``q``, ``k``, ``v`` and the softmax output at ``bits`` bits each
    (``quantized_nbytes`` of each shape) plus the dropout mask at 1 bit. The output equals
    torch's up to float rounding. Without autograd (no grad mode or no input requiring grad)
    it simply calls ``F.scaled_dot_product_attention``, so evaluation is bitwise torch's.
    """
    check_quant_bits(bits)
    check_group_size(group_size)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p!r}")
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (query, key, value, attn_mask) if t is not None
    )
    if not needs_grad:
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs
        )
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if enable_gqa and key.dim() >= 3 and key.size(-3) != query.size(-3):
        if query.size(-3) % key.size(-3):
            raise ValueError("enable_gqa needs query heads to be a multiple of key/value heads")
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    bias = _attention_bias(attn_mask, is_causal, query, key)
    return _Attention.apply(
        query, key, value, bias, float(dropout_p), float(scale), bits, group_size, generator
    )
