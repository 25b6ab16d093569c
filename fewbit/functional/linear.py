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
    DEFAULT_SKETCH,
    DENSE_SKETCHES,
    SEEDED_SKETCHES,
    check_proj_args,
    check_sketch,
    chunk_rows,
    draw_by_norm,
    draw_seed,
    draw_seed_tensor,
    importance_rows,
    mix62,
    project,
    sketch_dim,
)

__all__ = ["linear_crs", "linear_grp", "linear_randomized"]


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_kernel(x: Tensor, matmul: str) -> bool:
    """Automatic dispatch: the Triton sketch for CUDA float32/float16/bfloat16 inputs when
    :func:`fewbit.kernels.available`; everything else uses the torch generators."""
    return matmul in DENSE_SKETCHES and x.dtype in _KERNEL_DTYPES and kernels.available(x)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _weight_grad_wanted(weight: Tensor) -> bool:
    """Whether this call will be differentiated with respect to the weight: grad mode on
    (not ``no_grad``, not ``inference_mode``) and the weight requiring grad. Otherwise no
    gradient needs the sketch and the layers run plain ``F.linear`` (no RNG draw, no extra
    work; a frozen weight with an input that requires grad gets ``F.linear``'s exact input
    gradient). Module ``train()``/``eval()`` plays no part, as for ``nn.Linear``."""
    return torch.is_grad_enabled() and weight.requires_grad


def _draw_key(generator: Optional[torch.Generator], independent_ranks: bool) -> Tensor:
    """A fresh seed tensor (:func:`fewbit.codecs.sketch.draw_seed_tensor`), salted with the
    id of the backward pass when drawn inside one.

    Why: a reentrant checkpoint (``use_reentrant=True``) runs its forward under no_grad (no
    draw here) and recomputes it in backward between a save and a restore of the RNG state
    (``preserve_rng_state=True``): without the salt every step would draw the same seed
    whenever nothing else in the region draws random numbers, and the weight gradient's
    errors would repeat from step to step. The id (torch's graph-task counter) is new for
    every ``backward()``, so steps differ; runs of the same program stay reproducible."""
    seed = draw_seed_tensor(generator, independent_ranks)
    if torch.compiler.is_compiling():
        return seed
    task = torch._C._current_graph_task_id()  # -1 outside backward
    return seed if task < 0 else seed.bitwise_xor_(mix62(task + 1))


# The sketches run as torch.library custom ops: opaque to torch.compile (no graph break, no
# tracing of the generators, of the kernel policy or of the Triton launch), with fake
# implementations that give shapes for compile and for meta tensors. The seed travels as a
# 1-element int64 "key" tensor: bits 0-61 the seed, bit 62 set when the Triton generator
# made the forward sketch, so that backward (which reads only the saved key) regenerates
# the same matrix whatever the kernel policy says by then.
_SEED_BITS = (1 << 62) - 1
_KERNEL_BIT = 1 << 62


def _project_with(x: Tensor, k: int, seed: int, kind: str, chunk: int, kernel: bool) -> Tensor:
    """Unscaled ``R^T x`` (``k x f``; float32 for half inputs, else ``x.dtype``) for the
    random matrix ``R`` of ``kind`` regenerated from ``seed``: by the Triton kernel (Philox,
    :mod:`fewbit.kernels.sketch`; ``chunk`` unused) when ``kernel``, else by
    :func:`fewbit.codecs.sketch.project`. The two paths draw different matrices; each gives
    the same ``R`` for the same arguments."""
    if not kernel:
        return project(x, k, seed, kind, chunk)
    from ..kernels.sketch import project as kernel_project

    return kernel_project(x, k, seed, kind, 1.0, _work_dtype(x.dtype))


@torch.library.custom_op("fewbit::sketch_forward", mutates_args=())
def _sketch_forward_op(x: Tensor, k: int, seed: Tensor, kind: str, chunk: int,
                       use_kernel: int) -> tuple[Tensor, Tensor]:
    """``(R^T x, key)``: the sketch of :func:`_project_with` and the key that regenerates
    its ``R``. ``use_kernel``: 1 Triton, 0 torch generators, -1 the kernel policy."""
    kernel = _use_kernel(x, kind) if use_kernel < 0 else bool(use_kernel)
    value = int(seed.item()) & _SEED_BITS
    key = seed.new_full((1,), value | (_KERNEL_BIT if kernel else 0))
    return _project_with(x, k, value, kind, chunk, kernel), key


@_sketch_forward_op.register_fake
def _sketch_forward_fake(x: Tensor, k: int, seed: Tensor, kind: str, chunk: int,
                         use_kernel: int) -> tuple[Tensor, Tensor]:
    return x.new_empty((k, x.shape[1]), dtype=_work_dtype(x.dtype)), torch.empty_like(seed)


@torch.library.custom_op("fewbit::sketch_project", mutates_args=())
def _sketch_op(x: Tensor, k: int, key: Tensor, kind: str, chunk: int) -> Tensor:
    """``R^T x`` for the ``R`` that :func:`_sketch_forward_op` used with this ``key``."""
    value = int(key.item())
    return _project_with(x, k, value & _SEED_BITS, kind, chunk, bool(value & _KERNEL_BIT))


@_sketch_op.register_fake
def _sketch_op_fake(x: Tensor, k: int, key: Tensor, kind: str, chunk: int) -> Tensor:
    return x.new_empty((k, x.shape[1]), dtype=_work_dtype(x.dtype))


@torch.library.custom_op("fewbit::sample_rows", mutates_args=())
def _sample_op(x: Tensor, k: int, seed: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`fewbit.codecs.sketch.importance_rows`: ``(index, rows)``."""
    return importance_rows(x, k, int(seed.item()))


@_sample_op.register_fake
def _sample_op_fake(x: Tensor, k: int, seed: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty((k,), dtype=torch.int64), x.new_empty((k, x.shape[1]))


def _mark(t: Tensor) -> Tensor:
    """:func:`mark_compact` outside torch.compile tracing (an attribute on a traced tensor
    would not survive compilation anyway)."""
    return t if torch.compiler.is_compiling() else mark_compact(t)


def _grad_bias(grad: Tensor) -> Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(0)


class _RandomizedLinear(torch.autograd.Function):
    """Exact forward; saves ``S^T X`` (k rows) or ``X`` itself when ``k >= N``.

    Saved: the weight, the sketch and, for the seeded sketches, the key tensor (seed and
    generator path) that made it: backward regenerates ``S`` from the *saved* key, so a
    recompute (activation checkpointing) that draws a new seed also supplies the matching
    new sketch. ``use_kernel``: dense sketches by the Triton kernel (True), the torch
    generators (False) or by the kernel policy (None, :func:`_use_kernel`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        seed: Optional[Tensor],
        k: int,
        matmul: str,
        use_kernel: Optional[bool],
    ) -> Tensor:
        output = F.linear(input, weight, bias)
        x = input.reshape(-1, input.shape[-1])
        n = x.shape[0]
        ctx.mode = "none"
        ctx.k, ctx.matmul, ctx.chunk = k, matmul, chunk_rows(n, k, x.shape[1])
        path = -1 if use_kernel is None else int(bool(use_kernel))
        saved: list[Optional[Tensor]] = [weight, None, None]
        if weight.requires_grad:
            if k >= n or seed is None:
                ctx.mode = "exact"
                saved[1] = x
            elif matmul in SEEDED_SKETCHES:
                ctx.mode = "seeded"
                sketch, key = _sketch_forward_op(x, k, seed, matmul, ctx.chunk, path)
                if matmul in DENSE_SKETCHES:
                    sketch = sketch / k
                saved[1] = _mark(sketch.to(x.dtype))
                saved[2] = _mark(key)
            else:
                ctx.mode = "sampling"
                index, rows = _sample_op(x, k, seed)
                saved[1] = _mark(rows)
                saved[2] = index
        ctx.save_for_backward(*saved)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        weight, stored, extra = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)
        if ctx.needs_input_grad[1] and stored is not None:
            g = grad_output.reshape(-1, grad_output.shape[-1])
            if ctx.mode == "exact":
                grad_weight = g.t().matmul(stored)
            elif ctx.mode == "seeded":
                g_sketch = _sketch_op(g, ctx.k, extra, ctx.matmul, ctx.chunk)
                grad_weight = g_sketch.t().matmul(stored.to(g_sketch.dtype)).to(stored.dtype)
            else:
                grad_weight = g[extra].t().matmul(stored)
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
    matmul: str = DEFAULT_SKETCH,
    generator: Optional[torch.Generator] = None,
    *,
    independent_ranks: bool = True,
) -> Tensor:
    """``F.linear(input, weight, bias)`` saving a ``k x in_features`` sketch of the input.

    Without a weight gradient to compute (``torch.no_grad()``, ``torch.inference_mode()``,
    grad mode off, or a weight that does not require grad) this *is* ``F.linear``: same
    output, no random draw (the global RNG is untouched), nothing sketched. ``eval()`` mode
    changes nothing (as for ``nn.Linear``): with grad enabled the weight gradient is the same
    unbiased estimate as in training.

    ``k`` is ``proj_dim``, else ``round(proj_dim_ratio * N)`` (ratio 0.5 if neither is
    given) for ``N = input.numel() / in_features``, clamped to ``[proj_dim_min,
    proj_dim_max]`` and to ``[1, N]``; at ``k = N`` the input itself is saved (exact).
    Saved for backward: ``k * in_features`` elements in the input dtype, plus the 8-byte
    int64 seed tensor (``'gaussian'``, ``'rademacher'``, ``'countsketch'``) or ``8 k`` bytes
    of row indices (``'sampling'``). A fresh seed is drawn per call from ``generator``
    (global RNG untouched) or from the global CPU RNG; with ``torch.distributed`` initialized
    the rank is folded into it unless ``independent_ranks=False`` (see
    :func:`fewbit.codecs.sketch.draw_seed_tensor`). Backward uses the saved seed, so
    activation checkpointing (any mode, with or without ``preserve_rng_state``) keeps the
    weight gradient unbiased.

    ``matmul`` defaults to ``'countsketch'`` (the published library's default was
    ``'gaussian'``): the same variance as ``'rademacher'``, never more than ``'gaussian'``'s,
    measured 2-2.5x faster than ``'gaussian'`` per layer on the CPU
    (``benchmarks/sketch_cost.py``). Cost and extra transient memory: ``'countsketch'``
    makes one pass over the input with a ``2k x in_features`` accumulator, no random matrix.
    The dense sketches make the ``k x N`` random matrix ``c`` rows at a time with
    ``k * c <= max(k, N * in_features)``, i.e. one block never larger than the input, plus a
    ``k x in_features`` accumulator (float32 for half inputs, which also get a float32 copy
    of one ``c``-row input chunk); backward does the same with ``out_features``. CUDA
    float32/float16/bfloat16 inputs use the Triton generator of :mod:`fewbit.kernels.sketch`
    for the dense sketches when :func:`fewbit.kernels.available` (not with
    ``FEWBIT_DISABLE_TRITON=1``). ``'sampling'`` needs O(N) for the row probabilities. See
    :mod:`fewbit.codecs.sketch` for the variance of each ``matmul``.
    """
    check_proj_args(proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max)
    check_sketch(matmul)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)!r}")
    if not _weight_grad_wanted(weight):
        return F.linear(input, weight, bias)
    n = input.numel() // max(input.shape[-1], 1) if input.dim() > 0 else 1
    k = sketch_dim(n, proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max)
    seed = _draw_key(generator, independent_ranks) if k < n else None
    return _apply(_RandomizedLinear, input, weight, bias, seed, k, matmul, None)


def _linear_sketched(input: Tensor, weight: Tensor, bias: Optional[Tensor], k: int,
                     matmul: str, seed: int | Tensor,
                     use_kernel: Optional[bool] = None) -> Tensor:
    """:func:`linear_randomized` with the sketch size ``k``, the ``seed`` and the path given
    (``use_kernel``: True = Triton, False = torch, None = automatic). Test hook: with
    ``TRITON_INTERPRET=1``, ``use_kernel=True`` runs the kernel path on CPU tensors."""
    if not isinstance(seed, Tensor):
        seed = torch.tensor([seed], dtype=torch.int64)
    return _apply(_RandomizedLinear, input, weight, bias, seed, k, matmul, use_kernel)


def linear_grp(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    proj_dim_ratio: Optional[float] = None,
    proj_dim: Optional[int] = None,
    proj_dim_max: Optional[int] = None,
    proj_dim_min: Optional[int] = None,
    matmul: str = DEFAULT_SKETCH,
    generator: Optional[torch.Generator] = None,
    *,
    independent_ranks: bool = True,
) -> Tensor:
    """Published positional order (``proj_dim_max`` before ``proj_dim_min``) of
    :func:`linear_randomized`."""
    return linear_randomized(
        input, weight, bias, proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, matmul,
        generator, independent_ranks=independent_ranks,
    )  # fmt: skip


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
        elif x.is_meta:  # shapes only: the number of distinct columns is at most ``pairs``
            columns = torch.arange(pairs, device=x.device)
            ctx.save_for_backward(weight, x[:, columns], columns)
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
    *,
    independent_ranks: bool = True,
) -> Tensor:
    """``F.linear(input, weight, bias)`` saving ``c <= proj_dim`` sampled input features.

    ``proj_dim`` draws (default ``in_features // 2``, at least 1) pick input features with
    probability proportional to their column norm; saved are the ``N x c`` distinct sampled
    columns, reweighted, and their int64 indices. At ``proj_dim >= in_features`` the input
    is saved exactly. The weight gradient is unbiased; columns not drawn get zero. Without a
    weight gradient to compute (no_grad, inference_mode, frozen weight) this is ``F.linear``
    with no random draw; seeds follow :func:`linear_randomized` (``independent_ranks``).
    """
    if proj_dim is not None:
        check_proj_args(None, proj_dim, None, None)
    in_features = input.shape[-1] if input.dim() > 0 else 1
    pairs = proj_dim if proj_dim is not None else max(1, in_features // 2)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)!r}")
    if not _weight_grad_wanted(weight):
        return F.linear(input, weight, bias)
    seed = draw_seed(generator, independent_ranks)
    return _apply(_ColumnRowLinear, input, weight, bias, pairs, seed)
