"""Random projection ``S^T X`` in Triton with ``S`` generated on the fly from a seed.

``S`` is the ``N x k`` random matrix of :mod:`fewbit.codecs.sketch` (unscaled: N(0, 1)
entries for ``'gaussian'``, +-1 for ``'rademacher'``), but its entries come from Philox:
``S[n, j]`` is a function of ``(seed, n * k + j)`` only (``tl.randn`` / the low bit of
``tl.randint`` at that 64-bit offset), so it never exists in memory and the same
``(seed, k, kind)`` gives the same ``S`` for any matrix with ``N`` rows -- the input in
forward and the output gradient in backward. It is not the matrix the torch-generator path
of :func:`fewbit.codecs.sketch.project` draws.

Each program computes a ``(BLOCK_K, BLOCK_D)`` tile of the output: it loops over ``N`` in
``BLOCK_N`` rows, generates the ``(BLOCK_K, BLOCK_N)`` tile of ``S^T`` in registers and
accumulates ``tl.dot(S^T tile, X tile)`` in float32. Memory traffic: ``X`` is read
``ceil(k / BLOCK_K)`` times; nothing but the ``k x d`` output is written. On the GPU the
float32 products use TF32 tensor cores (Triton's default; relative error ~2**-11 per
product, far below the sketch's own ``1/sqrt(k)`` error); the interpreter computes them
in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import fmath
from .launch import FLOAT_DTYPES, check_launchable, interpreting

__all__ = ["KINDS", "project"]

KINDS = ("gaussian", "rademacher")
_GAUSSIAN, _RADEMACHER = 0, 1

# Compiled GPU kernels: 64 x 64 output tiles, 32 rows of N per step, 4 warps.
_GPU_BLOCKS = (32, 64, 64)  # BLOCK_N, BLOCK_K, BLOCK_D
_GPU_WARPS = 4
# Interpreter (~1.7 ms per program instance and per loop step): few, large tiles.
_INTERPRETER_BLOCKS = (256, 64, 128)
_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _random_tile(seed, offsets, KIND: tl.constexpr):
    """Unscaled entries of ``S`` at the given 64-bit Philox offsets, float32."""
    if KIND == 0:
        s = tl.randn(seed, offsets)
    else:
        bit = tl.randint(seed, offsets) & 1
        s = tl.where(bit == 0, 1.0, -1.0)
    return s


@triton.jit
def _project_kernel(
    x_ptr,
    out_ptr,
    n,
    d,
    k,
    stride_n,
    stride_d,
    seed,
    scale,
    KIND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # columns j of S (rows of the output)
    cols_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        rows = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        inside = (rows[:, None] < n) & (cols_d[None, :] < d)
        x_offs = rows[:, None] * stride_n + cols_d[None, :] * stride_d
        x = tl.load(x_ptr + x_offs, mask=inside, other=0.0).to(tl.float32)
        # S^T tile: entry (j, n) at offset n * k + j. Columns j >= k alias other entries but
        # only feed output rows that are never stored; rows n >= N meet zero rows of x.
        s_t = _random_tile(seed, rows[None, :] * k + cols_k[:, None], KIND)
        acc = tl.dot(s_t, x, acc)
    out = acc * scale
    out_mask = (cols_k[:, None] < k) & (cols_d[None, :] < d)
    out_offs = cols_k[:, None].to(tl.int64) * d + cols_d[None, :]
    # Round to nearest even (by hand for bfloat16: the interpreter would truncate).
    tl.store(out_ptr + out_offs, fmath.round_to(out, out_ptr.dtype.element_ty), mask=out_mask)


def _block(limit: int, size: int) -> int:
    """Power of two between _MIN_BLOCK and ``limit`` covering ``size`` if it can."""
    return max(_MIN_BLOCK, min(limit, triton.next_power_of_2(max(size, 1))))


def _check(x: Tensor, k: int, seed: int, kind: str, out_dtype: torch.dtype) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, d), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 for the kernel, got {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    check_launchable(x, "x")


def project(
    x: Tensor,
    k: int,
    seed: int,
    kind: str = "gaussian",
    scale: float = 1.0,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``scale * S^T x`` (``k x d``) for the unscaled ``N x k`` Philox matrix ``S`` of ``kind``.

    ``x``: ``(N, d)``, float32/float16/bfloat16, any strides. Accumulates in float32 and
    returns ``out_dtype`` (default ``x.dtype``). ``scale = 1/k`` gives the sketch with
    ``E[S S^T] = I``. Extra memory: the output only; ``S`` is regenerated in registers
    (``ceil(d / BLOCK_D)`` times per entry), so the same arguments give the same ``S``.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check(x, k, seed, kind, out_dtype)
    n, d = x.shape
    out = torch.empty(k, d, dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    limit_n, limit_k, limit_d = _INTERPRETER_BLOCKS if interpreting() else _GPU_BLOCKS
    block_n, block_k, block_d = _block(limit_n, n), _block(limit_k, k), _block(limit_d, d)
    grid = (triton.cdiv(k, block_k), triton.cdiv(d, block_d))
    kind_id = _GAUSSIAN if kind == "gaussian" else _RADEMACHER
    _project_kernel[grid](
        x, out, n, d, k, x.stride(0), x.stride(1), seed, float(scale),
        KIND=kind_id, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=_GPU_WARPS,
    )  # fmt: skip
    return out
