"""Linear layers whose weight gradient is estimated from a small random sketch of the input.

``linear_randomized`` (published name ``linear_grp``) computes exactly ``F.linear(x, W, b)``
but saves for backward only ``S^T X`` (``k x in_features``) instead of the input ``X``
(``N x in_features``, ``N`` = all leading dimensions flattened). Backward is exact for the
input and the bias and unbiased for the weight: ``grad_W = (S^T G)^T (S^T X)``, ``E[S S^T] = I``.
``linear_crs`` samples input features (column-row sampling) instead.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from ..codecs.marks import mark_compact
from ..codecs.sketch import (
    DENSE_SKETCHES,
    check_proj_args,
    check_sketch,
    chunk_rows,
    draw_by_norm,
    draw_seed,
    importance_rows,
    project,
    sketch_dim,
)

__all__ = ["linear_crs", "linear_grp", "linear_randomized"]


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_kernel(x: Tensor, matmul: str) -> bool:
    """Automatic dispatch: the Triton sketch for CUDA float32/float16/bfloat16 inputs when
    :func:`fewbit.kernels.available`; everything else uses the torch generators."""
    return matmul in DENSE_SKETCHES and x.dtype in _KERNEL_DTYPES and kernels.available(x)


def _project(x: Tensor, k: int, seed: int, kind: str, chunk: int, use_kernel: bool) -> Tensor:
    """Unscaled ``R^T x`` (``k x f``; float32 for half inputs, else ``x.dtype``) for the dense
    random matrix ``R`` of ``kind`` regenerated from ``seed``: by the Triton kernel
    (Philox, :mod:`fewbit.kernels.sketch`; ``chunk`` unused) when ``use_kernel``, else by
    :func:`fewbit.codecs.sketch.project`. The two paths draw different matrices; each
    gives the same ``R`` for the same arguments."""
    if not use_kernel:
        return project(x, k, seed, kind, chunk)
    from ..kernels.sketch import project as kernel_project

    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return kernel_project(x, k, seed, kind, 1.0, work)


def _grad_bias(grad: Tensor) -> Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(0)


class _RandomizedLinear(torch.autograd.Function):
    """Exact forward; saves ``S^T X`` (k rows) or ``X`` itself when ``k >= N``.

    ``use_kernel``: dense sketches by the Triton kernel (True), the torch generators (False)
    or automatically (None, :func:`_use_kernel`); the choice is kept in ``ctx`` so that
    backward regenerates the same matrix."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        k: int,
        matmul: str,
        seed: int,
        use_kernel: Optional[bool],
    ) -> Tensor:
        output = F.linear(input, weight, bias)
        x = input.reshape(-1, input.shape[-1])
        n = x.shape[0]
        ctx.mode = "none"
        ctx.k, ctx.matmul, ctx.seed, ctx.chunk = k, matmul, seed, 1
        ctx.kernel = _use_kernel(x, matmul) if use_kernel is None else bool(use_kernel)
        saved: list[Optional[Tensor]] = [weight, None]
        if weight.requires_grad:
            if k >= n:
                ctx.mode = "exact"
                saved[1] = x
            elif matmul in DENSE_SKETCHES:
                ctx.mode = "dense"
                ctx.chunk = chunk_rows(n, k, x.shape[1])
                sketch = _project(x, k, seed, matmul, ctx.chunk, ctx.kernel).div_(k)
                saved[1] = mark_compact(sketch.to(x.dtype))
            else:
                ctx.mode = "sampling"
                index, rows = importance_rows(x, k, seed)
                saved[1] = mark_compact(rows)
                saved.append(index)
        ctx.save_for_backward(*saved)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        weight, stored, *rest = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)
        if ctx.needs_input_grad[1] and stored is not None:
            g = grad_output.reshape(-1, grad_output.shape[-1])
            if ctx.mode == "exact":
                grad_weight = g.t().matmul(stored)
            elif ctx.mode == "dense":
                g_sketch = _project(g, ctx.k, ctx.seed, ctx.matmul, ctx.chunk, ctx.kernel)
                grad_weight = g_sketch.t().matmul(stored.to(g_sketch.dtype)).to(stored.dtype)
            else:
                grad_weight = g[rest[0]].t().matmul(stored)
        if ctx.needs_input_grad[2]:
            grad_bias = _grad_bias(grad_output)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``F.linear`` would run in under the active autocast, if any."""
    if device_type not in ("cpu", "cuda", "xpu", "mps"):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """Autocast's rule: floating tensors other than float64 are cast."""
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        return tensor.to(dtype)
    return tensor


def _apply(
    function: type[torch.autograd.Function],
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    *args: Any,
) -> Tensor:
    """Run ``function`` like ``F.linear`` runs under autocast: inputs cast to the autocast
    dtype, then the function itself with autocast disabled."""
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension")
    device_type = input.device.type
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return function.apply(input, weight, bias, *args)
    input, weight = _autocast(input, dtype), _autocast(weight, dtype)
    bias = None if bias is None else _autocast(bias, dtype)
    with torch.autocast(device_type, enabled=False):
        return function.apply(input, weight, bias, *args)


def linear_randomized(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    proj_dim_ratio: Optional[float] = None,
    proj_dim: Optional[int] = None,
    proj_dim_min: Optional[int] = None,
    proj_dim_max: Optional[int] = None,
    matmul: str = "gaussian",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``F.linear(input, weight, bias)`` saving a ``k x in_features`` sketch of the input.

    ``k`` is ``proj_dim``, else ``round(proj_dim_ratio * N)`` (ratio 0.5 if neither is
    given) for ``N = input.numel() / in_features``, clamped to ``[proj_dim_min,
    proj_dim_max]`` and to ``[1, N]``; at ``k = N`` the input itself is saved (exact).
    Saved for backward: ``k * in_features`` elements in the input dtype (``'sampling'``
    adds ``8 k`` bytes of row indices) and a Python-int seed. A fresh seed is drawn per
    call from ``generator`` (global RNG untouched) or from the global CPU RNG. Extra
    transient memory of the dense sketches: the ``k x N`` random matrix is made ``c`` rows
    at a time with ``k * c <= max(k, N * in_features)``, i.e. one block never larger than the
    input, plus a ``k x in_features`` accumulator (float32 for half inputs, which also get a
    float32 copy of one ``c``-row input chunk); backward does the same with ``out_features``.
    CUDA float32/float16/bfloat16 inputs use the Triton kernel of
    :mod:`fewbit.kernels.sketch` instead when :func:`fewbit.kernels.available` (not with
    ``FEWBIT_DISABLE_TRITON=1``): ``R`` comes from Philox in registers, so the only extra
    memory is the float32 ``k x in_features`` (backward: ``k x out_features``) result.
    ``'sampling'`` needs O(N) for the row probabilities. See :mod:`fewbit.codecs.sketch`
    for the variance of each ``matmul``.
    """
    check_proj_args(proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max)
    check_sketch(matmul)
    seed = draw_seed(generator)
    n = input.numel() // max(input.shape[-1], 1) if input.dim() > 0 else 1
    k = sketch_dim(n, proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max)
    return _linear_sketched(input, weight, bias, k, matmul, seed)


def _linear_sketched(input: Tensor, weight: Tensor, bias: Optional[Tensor], k: int,
                     matmul: str, seed: int, use_kernel: Optional[bool] = None) -> Tensor:
    """:func:`linear_randomized` with the sketch size ``k``, the ``seed`` and the path given
    (``use_kernel``: True = Triton, False = torch, None = automatic). Test hook: with
    ``TRITON_INTERPRET=1``, ``use_kernel=True`` runs the kernel path on CPU tensors."""
    return _apply(_RandomizedLinear, input, weight, bias, k, matmul, seed, use_kernel)


def linear_grp(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    proj_dim_ratio: Optional[float] = None,
    proj_dim: Optional[int] = None,
    proj_dim_max: Optional[int] = None,
    proj_dim_min: Optional[int] = None,
    matmul: str = "gaussian",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Published positional order (``proj_dim_max`` before ``proj_dim_min``) of
    :func:`linear_randomized`."""
    return linear_randomized(
        input, weight, bias, proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, matmul, generator
    )


class _ColumnRowLinear(torch.autograd.Function):
    """Exact forward; saves ``c`` sampled input features (columns of ``X``), reweighted."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        pairs: int,
        seed: int,
    ) -> Tensor:
        output = F.linear(input, weight, bias)
        x = input.reshape(-1, input.shape[-1])
        ctx.exact = pairs >= x.shape[1]
        if not weight.requires_grad:
            ctx.save_for_backward(weight, None, None)
        elif ctx.exact:
            ctx.save_for_backward(weight, x, None)
        else:
            columns, scale = _sample_columns(x, pairs, seed)
            kept = (x[:, columns].to(torch.float64) * scale).to(x.dtype)
            ctx.save_for_backward(weight, kept, columns)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        weight, kept, columns = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)
        if ctx.needs_input_grad[1] and kept is not None:
            g = grad_output.reshape(-1, grad_output.shape[-1])
            if ctx.exact:
                grad_weight = g.t().matmul(kept)
            else:
                grad_weight = torch.zeros_like(weight)
                grad_weight[:, columns] = g.t().matmul(kept).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = _grad_bias(grad_output)
        return grad_input, grad_weight, grad_bias, None, None


def _sample_columns(x: Tensor, pairs: int, seed: int) -> tuple[Tensor, Tensor]:
    """Distinct sampled columns and their weights ``count_j / (c p_j)``, with ``c = pairs``
    draws with replacement and ``p_j`` proportional to ``||x[:, j]||`` (uniform if zero)."""
    norms = torch.linalg.vector_norm(x.to(torch.float64), dim=0)
    draws, probs = draw_by_norm(norms, pairs, seed)
    counts = torch.bincount(draws, minlength=x.shape[1])
    columns = torch.nonzero(counts).flatten()
    scale = counts[columns].to(torch.float64) / (pairs * probs[columns])
    return columns, scale


def linear_crs(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    proj_dim: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``F.linear(input, weight, bias)`` saving ``c <= proj_dim`` sampled input features.

    ``proj_dim`` draws (default ``in_features // 2``, at least 1) pick input features with
    probability proportional to their column norm; saved are the ``N x c`` distinct sampled
    columns, reweighted, and their int64 indices. At ``proj_dim >= in_features`` the input
    is saved exactly. The weight gradient is unbiased; columns not drawn get zero.
    """
    if proj_dim is not None:
        check_proj_args(None, proj_dim, None, None)
    in_features = input.shape[-1] if input.dim() > 0 else 1
    pairs = proj_dim if proj_dim is not None else max(1, in_features // 2)
    seed = draw_seed(generator)
    return _apply(_ColumnRowLinear, input, weight, bias, pairs, seed)
