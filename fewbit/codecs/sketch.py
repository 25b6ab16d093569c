"""Random sketches of a tall matrix along its rows, for randomized matrix products.

A sketch replaces an ``N x f`` matrix ``X`` by ``k x f`` rows ``S^T X`` with a random
``N x k`` matrix ``S`` such that ``E[S S^T] = I``; then ``(S^T G)^T (S^T X)`` is an
unbiased estimate of ``G^T X`` for any ``G`` with ``N`` rows. The random matrix is never
stored: it is regenerated from an integer seed, chunk by chunk, whenever it is needed.

Kinds (``matmul`` names, as in the published FewBit API):

* ``'gaussian'``: ``S`` has i.i.d. ``N(0, 1/k)`` entries. Frobenius variance of the
  estimate of ``A^T B``: ``(||A||_F^2 ||B||_F^2 + ||A^T B||_F^2) / k``.
* ``'rademacher'``: i.i.d. ``+-1/sqrt(k)`` entries. Variance: the Gaussian one minus
  ``2/k * sum_n ||a_n||^2 ||b_n||^2`` (never larger than Gaussian).
* ``'sampling'``: ``k`` rows drawn with replacement with probability ``p_n`` proportional
  to ``||x_n||`` and reweighted by ``1/(k p_n)``; no dense random matrix at all. Variance:
  ``(sum_n ||a_n||^2 ||b_n||^2 / p_n - ||A^T B||_F^2) / k``; it needs the ``k`` row indices
  (int64) besides the ``k x f`` rows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "DENSE_SKETCHES",
    "SKETCHES",
    "check_sketch",
    "chunk_rows",
    "draw_by_norm",
    "draw_seed",
    "importance_rows",
    "project",
    "sketch_dim",
]

DENSE_SKETCHES = ("gaussian", "rademacher")
SKETCHES = DENSE_SKETCHES + ("sampling",)

_SEED_HIGH = 2**62


def check_sketch(matmul: str) -> str:
    """``matmul`` if it names a supported sketch, else ValueError naming the argument."""
    if matmul not in SKETCHES:
        raise ValueError(f"matmul must be one of {list(SKETCHES)}, got {matmul!r}")
    return matmul


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A fresh 62-bit seed: from ``generator`` if given (the global RNG is then untouched),
    else from torch's global CPU generator (reproducible under ``torch.manual_seed``)."""
    if generator is None:
        return int(torch.randint(0, _SEED_HIGH, (1,)).item())
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)!r}")
    value = torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=generator.device)
    return int(value.item())


def _check_positive_int(value: Optional[int], name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_proj_args(
    proj_dim_ratio: Optional[float],
    proj_dim: Optional[int],
    proj_dim_min: Optional[int],
    proj_dim_max: Optional[int],
) -> None:
    """ValueError/TypeError naming the bad argument among the projection-size arguments."""
    _check_positive_int(proj_dim, "proj_dim")
    _check_positive_int(proj_dim_min, "proj_dim_min")
    _check_positive_int(proj_dim_max, "proj_dim_max")
    if proj_dim_ratio is not None:
        if isinstance(proj_dim_ratio, bool) or not isinstance(proj_dim_ratio, (int, float)):
            raise TypeError(
                f"proj_dim_ratio must be a float or None, got {type(proj_dim_ratio).__name__}"
            )
        if not 0.0 < float(proj_dim_ratio) <= 1.0:
            raise ValueError(f"proj_dim_ratio must be in (0, 1], got {proj_dim_ratio}")
    if proj_dim_min is not None and proj_dim_max is not None and proj_dim_min > proj_dim_max:
        raise ValueError(
            f"proj_dim_min ({proj_dim_min}) must not exceed proj_dim_max ({proj_dim_max})"
        )


DEFAULT_RATIO = 0.5


def sketch_dim(
    n: int,
    proj_dim_ratio: Optional[float] = None,
    proj_dim: Optional[int] = None,
    proj_dim_min: Optional[int] = None,
    proj_dim_max: Optional[int] = None,
) -> int:
    """Sketch size ``k`` for ``n`` rows: ``proj_dim``, else ``round(ratio * n)`` (ratio
    defaults to 0.5), clamped to ``[proj_dim_min, proj_dim_max]`` and then to ``[1, n]``."""
    if proj_dim is not None:
        k = proj_dim
    else:
        ratio = DEFAULT_RATIO if proj_dim_ratio is None else float(proj_dim_ratio)
        k = int(round(ratio * n))
    if proj_dim_min is not None:
        k = max(k, proj_dim_min)
    if proj_dim_max is not None:
        k = min(k, proj_dim_max)
    return max(1, min(k, max(n, 1)))


def chunk_rows(n: int, k: int, features: int) -> int:
    """Rows of the random matrix generated at once: the ``k x c`` block never has more
    elements than the ``n x features`` matrix it multiplies (and ``c >= 1``)."""
    return max(1, min(n, (n * features) // max(k, 1)))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision sketches are accumulated in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def project(mat: Tensor, k: int, seed: int, kind: str, chunk: int) -> Tensor:
    """``R^T mat`` for the unscaled dense random ``n x k`` matrix ``R`` of ``kind``
    (``'gaussian'``: N(0, 1) entries, ``'rademacher'``: +-1), regenerated from ``seed``.

    ``R`` is produced ``chunk`` rows at a time, so the extra memory is one ``k x chunk``
    block plus a ``k x f`` accumulator (float32 for half inputs). The same ``(n, k, seed,
    kind, chunk)`` gives the same ``R`` on the same device. Returns float32 for half inputs.
    """
    n, f = mat.shape
    work = _work_dtype(mat.dtype)
    gen = torch.Generator(device=mat.device)
    gen.manual_seed(seed)
    out = torch.zeros(k, f, dtype=work, device=mat.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = _random_block(kind, (k, stop - start), gen, work, mat.device)
        out.addmm_(block, mat[start:stop].to(work))
    return out


def _random_block(kind: str, shape: tuple[int, int], gen: torch.Generator,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, dtype=dtype, device=device)
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, generator=gen, dtype=dtype, device=device)
        return bits.mul_(2).sub_(1)
    raise ValueError(f"matmul must be one of {list(DENSE_SKETCHES)} here, got {kind!r}")


def draw_by_norm(norms: Tensor, draws: int, seed: int) -> tuple[Tensor, Tensor]:
    """``draws`` indices drawn with replacement with probability proportional to ``norms``
    (uniform when they are all zero or not finite), from a generator seeded with ``seed``;
    returns the indices and the float64 probabilities of every index."""
    total = norms.sum()
    if not bool(total > 0) or not bool(torch.isfinite(total)):
        norms = torch.ones_like(norms)
        total = norms.sum()
    probs = norms / total
    cdf = torch.cumsum(probs, 0)
    gen = torch.Generator(device=norms.device)
    gen.manual_seed(seed)
    u = torch.rand(draws, generator=gen, dtype=torch.float64, device=norms.device) * cdf[-1]
    index = torch.searchsorted(cdf, u, right=True).clamp_(max=norms.numel() - 1)
    return index, probs


def importance_rows(x: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """Row-sampling sketch of ``x`` (``n x f``): ``k`` row indices drawn with replacement
    with ``p_n`` proportional to ``||x_n||`` (uniform if ``x`` is all zero), and the rows
    ``x_n / (k p_n)`` (dtype of ``x``). Extra memory: O(n) for the probabilities."""
    norms = torch.linalg.vector_norm(x.to(torch.float64), dim=1)
    index, probs = draw_by_norm(norms, k, seed)
    scale = 1.0 / (k * probs[index])
    rows = (x[index].to(torch.float64) * scale[:, None]).to(x.dtype)
    return index, rows
