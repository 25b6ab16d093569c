"""Scaled dot-product attention with its saved operands quantized (lossy).

:func:`scaled_dot_product_attention` computes attention with explicit matmul, softmax and
dropout, and stores ``q``, ``k``, ``v`` and the softmax output ``P`` quantized to ``bits``
bits (:class:`fewbit.codecs.quantize.GroupQuantizer`: ``quantized_nbytes`` of each shape)
plus the dropout mask at 1 bit (fewbit's dropout,
:func:`fewbit.functional.dropout.dropout_with_mask`: one C pass on the CPU, its mask from a
counter hash seeded from ``generator``). Gradients are torch's formulas on the decoded
operands: each decoded element is off by less than one quantization step
(``range / (2**bits - 1)`` of its group), unbiased.

Follows torch's op where it is silent: without autograd it calls
``F.scaled_dot_product_attention`` (evaluation bitwise torch's); under ``torch.autocast``
the floating inputs are cast to the autocast dtype first, as autocast does for torch's op;
zero keys or queries give torch's result (zeros); inside an activation checkpoint region
(which keeps nothing and recomputes) it is torch's op. Double backward is not supported.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ..codecs.quantize import GroupQuantizer, check_group_size, check_quant_bits
from .dropout import apply_mask, dropout_with_mask
from .saved import autocast_dtype, checkpoint_active, load_encoded, save_encoded

__all__ = ["scaled_dot_product_attention"]


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
        mask = None
        if dropout_p > 0:  # one pass: p * noise and the packed mask (fewbit's dropout)
            pd, mask = dropout_with_mask(p, dropout_p, generator)
        out = torch.matmul(pd, v)
        del pd
        codec = GroupQuantizer(bits, group_size, generator=generator)
        ctx.dropout_p = dropout_p  # type: ignore[attr-defined]
        ctx.scale = scale  # type: ignore[attr-defined]
        ctx.bias_shape = None if bias is None else bias.shape  # type: ignore[attr-defined]
        save_encoded(ctx, *(codec.encode(t) for t in (q, k, v, p)), mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        encoded, _ = load_encoded(ctx)
        q, k, v, p = (e.decode() for e in encoded[:4])  # type: ignore[union-attr]
        mask = encoded[4]
        pd = p if mask is None else apply_mask(p, mask, ctx.dropout_p)
        grad_v = _sum_to(torch.matmul(pd.transpose(-2, -1), grad), v.shape)
        del pd
        dpd = torch.matmul(grad, v.transpose(-2, -1))
        dp = dpd if mask is None else apply_mask(dpd, mask, ctx.dropout_p)
        ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
        grad_q = _sum_to(torch.matmul(ds, k) * ctx.scale, q.shape)
        grad_k = _sum_to(torch.matmul(ds.transpose(-2, -1), q) * ctx.scale, k.shape)
        grad_bias = None
        if ctx.needs_input_grad[3] and ctx.bias_shape is not None:
            grad_bias = _sum_to(ds, ctx.bias_shape)
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None, None


def _sum_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    return t if tuple(t.shape) == tuple(shape) else t.sum_to_size(tuple(shape))


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
    empty = key.size(-2) == 0 or query.size(-2) == 0
    if not needs_grad or empty or checkpoint_active():
        # Nothing to save, or a checkpoint region that keeps nothing and recomputes: torch's.
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
    device_type = query.device.type
    low = autocast_dtype(device_type)
    if low is not None:
        # Autocast runs torch's op in its low-precision dtype: cast the floating arguments
        # as it would, then compute with autocast off (backward then sees one dtype).
        query, key, value = (t.to(low) for t in (query, key, value))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(low)
        with torch.autocast(device_type, enabled=False):
            bias = _attention_bias(attn_mask, is_causal, query, key)
            return _Attention.apply(
                query, key, value, bias, float(dropout_p), float(scale), bits, group_size,
                generator,
            )
    bias = _attention_bias(attn_mask, is_causal, query, key)
    return _Attention.apply(
        query, key, value, bias, float(dropout_p), float(scale), bits, group_size, generator
    )

