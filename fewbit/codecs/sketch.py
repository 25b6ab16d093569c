"""Random sketches of a tall matrix along its rows, for randomized matrix products.

A sketch replaces an ``N x f`` matrix ``X`` by ``k x f`` rows ``S^T X`` with a random
``N x k`` matrix ``S`` such that ``E[S S^T] = I``; then ``(S^T G)^T (S^T X)`` is an
unbiased estimate of ``G^T X`` for any ``G`` with ``N`` rows. The random matrix is never
stored: it is regenerated from an integer seed, chunk by chunk, whenever it is needed.

Kinds (``matmul`` names: the published FewBit API's, and ``'countsketch'``, the default
here; the published default was ``'gaussian'``):

* ``'gaussian'``: ``S`` has i.i.d. ``N(0, 1/k)`` entries. Frobenius variance of the
  estimate of ``A^T B``: ``(||A||_F^2 ||B||_F^2 + ||A^T B||_F^2) / k``.
* ``'rademacher'``: i.i.d. ``+-1/sqrt(k)`` entries. Variance: the Gaussian one minus
  ``2/k * sum_n ||a_n||^2 ||b_n||^2`` (never larger than Gaussian).
* ``'countsketch'`` (sparse sign sketch, Clarkson-Woodruff): each of the ``N`` rows goes to
  one of ``k`` buckets, drawn uniformly, with a random sign; ``S^T X`` is the ``k`` signed
  bucket sums, one pass over ``X`` (``O(N f)``, no ``k x N`` matrix, no product): ``N``
  random bucket indices and signs instead of ``k N`` random numbers. ``E[S S^T] = I`` with no
  scaling, and its off-diagonal entries have the second moments of the Rademacher ones
  (variance ``1/k``, uncorrelated), so its variance is exactly Rademacher's.
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
    "DEFAULT_SKETCH",
    "DENSE_SKETCHES",
    "SEEDED_SKETCHES",
    "SKETCHES",
    "count_sketch",
    "check_sketch",
    "chunk_rows",
    "draw_by_norm",
    "draw_seed",
    "draw_seed_tensor",
    "mix62",
    "rank_salt",
    "importance_rows",
    "project",
    "sketch_dim",
]

DENSE_SKETCHES = ("gaussian", "rademacher")
SEEDED_SKETCHES = DENSE_SKETCHES + ("countsketch",)  # regenerated from a seed in backward
SKETCHES = SEEDED_SKETCHES + ("sampling",)
# The default ``matmul`` of the randomized layers: Rademacher's variance (never above the
# Gaussian one) at O(N f) cost instead of a k x N random matrix and a k x N x f product.
DEFAULT_SKETCH = "countsketch"

_SEED_HIGH = 2**62


def check_sketch(matmul: str) -> str:
    """``matmul`` if it names a supported sketch, else ValueError naming the argument."""
    if matmul not in SKETCHES:
        raise ValueError(f"matmul must be one of {list(SKETCHES)}, got {matmul!r}")
    return matmul


def _distributed_rank() -> int:
    """This process's rank in torch.distributed's default group, 0 when not initialized."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def mix62(value: int) -> int:
    """The splitmix64 finalizer of ``value``, cut to 62 bits: unrelated outputs (low bits
    included) for neighbouring inputs; ``mix62(0) == 0``."""
    z = (value * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & (_SEED_HIGH - 1)


def rank_salt(rank: int) -> int:
    """A 62-bit constant XOR-ed into every seed drawn on ``rank``: 0 for rank 0, else
    :func:`mix62` of ``rank`` (distinct ranks give unrelated salts, low bits included:
    torch's CPU generator uses only a seed's low 32 bits)."""
    return mix62(rank)


def _check_generator(generator: Optional[torch.Generator]) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)!r}")


def draw_seed_tensor(
    generator: Optional[torch.Generator] = None, independent_ranks: bool = True
) -> Tensor:
    """A fresh 62-bit seed as a 1-element int64 tensor (on ``generator``'s device, else the
    CPU), drawn from ``generator`` if given (the global RNG is then untouched), else from
    torch's global CPU generator (reproducible under ``torch.manual_seed``).

    With ``torch.distributed`` initialized and ``independent_ranks``, the rank's
    :func:`rank_salt` is XOR-ed in, so ranks seeded alike still draw independent sketches
    (rank 0 and single-process runs are unchanged). A tensor, not an int: it is saved for
    backward with the sketch it made (a checkpoint recompute supplies both together), and
    drawing it needs no ``.item()`` (traceable by ``torch.compile`` when ``generator`` is None).
    """
    _check_generator(generator)
    if generator is None:
        seed = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64)
    else:
        seed = torch.randint(0, _SEED_HIGH, (1,), generator=generator, dtype=torch.int64,
                             device=generator.device)
    salt = rank_salt(_distributed_rank()) if independent_ranks else 0
    return seed.bitwise_xor_(salt) if salt else seed


def draw_seed(generator: Optional[torch.Generator] = None, independent_ranks: bool = True) -> int:
    """:func:`draw_seed_tensor` as a Python int (reads the tensor: a device sync for a CUDA
    ``generator``)."""
    return int(draw_seed_tensor(generator, independent_ranks).item())


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
    """``R^T mat`` for the unscaled random ``n x k`` matrix ``R`` of ``kind``
    (``'gaussian'``: N(0, 1) entries, ``'rademacher'``: +-1, ``'countsketch'``: one +-1 per
    row, see :func:`count_sketch`), regenerated from ``seed``.

    Dense kinds: ``R`` is produced ``chunk`` rows at a time, so the extra memory is one
    ``k x chunk`` block plus a ``k x f`` accumulator (float32 for half inputs). The same
    ``(n, k, seed, kind, chunk)`` gives the same ``R`` on the same device. Returns float32 for
    half inputs. Meta tensors give a meta result of that shape (nothing is drawn).
    """
    if kind == "countsketch":
        return count_sketch(mat, k, seed)
    n, f = mat.shape
    work = _work_dtype(mat.dtype)
    out = torch.zeros(k, f, dtype=work, device=mat.device)
    if mat.is_meta:
        return out
    gen = torch.Generator(device=mat.device)
    gen.manual_seed(seed)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = _random_block(kind, (k, stop - start), gen, work, mat.device)
        out.addmm_(block, mat[start:stop].to(work))
    return out


def count_sketch(mat: Tensor, k: int, seed: int) -> Tensor:
    """``R^T mat`` (``k x f``) for the CountSketch matrix ``R`` (``n x k``, row ``i`` zero but
    for ``sign_i`` at column ``bucket_i``), regenerated from ``seed``: ``n`` bucket indices in
    ``[0, k)`` and ``n`` signs from a generator seeded with ``seed``.

    Cost: one pass over ``mat`` (``index_add_`` of each row into its signed bucket) and ``2 n``
    random integers. Extra memory: a ``2k x f`` accumulator (positive and negative buckets,
    float32 for half inputs), ``16 n`` bytes of indices and, for half inputs, a float32 copy of
    ``2k`` rows at a time. Returns float32 for half inputs. On CUDA ``index_add_`` uses atomic
    adds: bitwise reproducible from run to run under ``torch.use_deterministic_algorithms``.
    """
    n, f = mat.shape
    work = _work_dtype(mat.dtype)
    if mat.is_meta:
        return torch.zeros(k, f, dtype=work, device=mat.device)
    index = _count_sketch_index(n, k, seed, mat.device)
    both = torch.zeros(2 * k, f, dtype=work, device=mat.device)
    step = n if work == mat.dtype else 2 * k  # a float32 chunk no larger than the accumulator
    for start in range(0, n, step):
        stop = min(n, start + step)
        both.index_add_(0, index[start:stop], mat[start:stop].to(work))
    return both[:k] - both[k:]


def _count_sketch_index(n: int, k: int, seed: int, device: torch.device) -> Tensor:
    """Row ``i``'s slot in the ``2k`` signed buckets: ``bucket_i`` (sign +1) or
    ``k + bucket_i`` (sign -1)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    bucket = torch.randint(0, k, (n,), generator=gen, device=device)
    negative = torch.randint(0, 2, (n,), generator=gen, device=device)
    return bucket.add_(negative.mul_(k))


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
    returns the indices and the float64 probabilities of every index. No host sync: the
    fallback to uniform is a ``torch.where``."""
    total = norms.sum()
    usable = (total > 0) & torch.isfinite(total)
    norms = torch.where(usable, norms, torch.ones_like(norms))
    probs = norms / norms.sum()
    if norms.is_meta:
        return torch.zeros(draws, dtype=torch.int64, device=norms.device), probs
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
