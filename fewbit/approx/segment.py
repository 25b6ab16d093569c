"""Optimal step-function approximation of an activation's derivative.

For a weight density p on [lo, hi] we look for a step function q with K steps
minimising E[(f'(x) - q(x))^2]. Three forms of q are built:

* ``full``: K steps on the line (what a plain ``Table`` encodes);
* ``even``: K steps on |x|, q(x) = h(|x|) (a ``Table(symmetric=True)``);
* ``odd``: q(x) = c + sign(x) h(|x|) with c = f'(0) and K/2 steps for h; this is a
  full-line table with mirrored boundaries (it spends one bit on the sign).

Each form reduces to weighted 1-D segmentation of a "moment" integrand
(w0, w1, w2) on a domain [a, b]: the cost of a segment S is
``int_S w2 - (int_S w1)^2 / int_S w0`` and its level is ``int_S w1 / int_S w0``.
The optimum on a grid of cells is found exactly by dynamic programming (one run
gives every K up to the largest asked for; see ``optimal_splits`` for the exact
band pruning that keeps it fast), then the boundaries are refined off
the grid by Lloyd-Max steps: each boundary moves to where w1/w0 crosses the
midpoint of its two levels, searched near the DP boundary; a step is kept only
if the error does not increase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping

import numpy as np
import torch

from .functions import get_definition, normalize_params

__all__ = [
    "DENSITIES",
    "DEFAULT_RANGE",
    "FORMS",
    "Moments",
    "Quadrature",
    "Segmentation",
    "derivative",
    "normalize_options",
    "optimal_splits",
    "parity",
    "quadrature",
    "solve",
    "split_boundaries",
]

DENSITIES = ("normal", "uniform")
FORMS = ("full", "even", "odd")
DEFAULT_RANGE = (-8.0, 8.0)
DP_CELLS = 2048  # cells of the DP grid (see dp_grid)
QUAD_CELLS = 2**16  # quadrature cells on the domain (3-point Gauss-Legendre each)
WINDOW_CELLS = 4  # refinement searches this many DP cells either side of the DP boundary
MAX_SWEEPS = 100  # Lloyd-Max sweeps at most
OVERRELAX = (8.0, 3.0)  # extrapolation weights tried after each Lloyd-Max step

_GL_NODES = np.array([-math.sqrt(0.6), 0.0, math.sqrt(0.6)])
_GL_WEIGHTS = np.array([5.0, 8.0, 5.0]) / 9.0

ParamKey = tuple[tuple[str, float], ...]


def derivative(name: str, params: Mapping[str, float], x: np.ndarray) -> np.ndarray:
    """f'(x) in float64 by autograd through ``CONTINUOUS[name].forward``."""
    forward = get_definition(name).forward
    with torch.enable_grad():
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).requires_grad_(True)
        (grad,) = torch.autograd.grad(forward(t, params).sum(), t)
    return grad.detach().numpy().copy()


def parity(name: str, params: Mapping[str, float], bound: float) -> str:
    """'even' if f'(x) = f'(-x), 'odd' if f'(x) - f'(0) is odd, else 'none' (on (0, bound])."""
    x = np.linspace(0.0, bound, 4097)[1:]
    both = derivative(name, params, np.concatenate([[0.0], x, -x]))
    center, pos, neg = both[0], both[1 : x.size + 1], both[x.size + 1 :]
    tol = 1e-9 * max(1.0, float(np.abs(both).max()))
    if np.abs(pos - neg).max() <= tol:
        return "even"
    if np.abs(pos + neg - 2.0 * center).max() <= tol:
        return "odd"
    return "none"


def normalize_options(
    name: str,
    params: Mapping[str, float] | None,
    density: str,
    range: tuple[float, float] | None,  # noqa: A002 - public keyword of get_table
) -> tuple[ParamKey, str, tuple[float, float]]:
    """Validated, hashable (params, density, range); raises ValueError naming the argument."""
    key = tuple(sorted(normalize_params(name, params).items()))
    if density not in DENSITIES:
        raise ValueError(f"density must be one of {DENSITIES}, got {density!r}")
    if range is None:
        return key, density, DEFAULT_RANGE
    try:
        lo, hi = (float(v) for v in range)
    except (TypeError, ValueError):
        raise ValueError(f"range must be a pair (lo, hi) of floats, got {range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"range must be finite with lo < hi, got {range!r}")
    return key, density, (lo, hi)


@dataclass(frozen=True)
class Moments:
    """The integrand (w0, w1, w2) of one form of the problem on its domain [a, b]."""

    name: str
    params: ParamKey
    density: str
    range: tuple[float, float]
    form: str

    @property
    def domain(self) -> tuple[float, float]:
        lo, hi = self.range
        return (lo, hi) if self.form == "full" else (0.0, hi)

    @property
    def center(self) -> float:
        """c of the odd form (f'(0)); 0 for the other forms."""
        if self.form != "odd":
            return 0.0
        return float(derivative(self.name, dict(self.params), np.zeros(1))[0])

    def pdf(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.range
        if self.density == "uniform":
            return np.full_like(x, 1.0 / (hi - lo))
        mass = 0.5 * (math.erf(hi / math.sqrt(2.0)) - math.erf(lo / math.sqrt(2.0)))
        return np.exp(-0.5 * x * x) / (math.sqrt(2.0 * math.pi) * mass)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        params = dict(self.params)
        p = self.pdf(x)
        if self.form == "full":
            d = derivative(self.name, params, x)
            return p, p * d, p * d * d
        both = derivative(self.name, params, np.concatenate([x, -x]))
        pos, neg = both[: x.size], both[x.size :]
        if self.form == "even":
            return 2.0 * p, p * (pos + neg), p * (pos * pos + neg * neg)
        c = self.center
        pos, neg = pos - c, neg - c
        return 2.0 * p, p * (pos - neg), p * (pos * pos + neg * neg)


class Quadrature:
    """Cumulative integrals of (w0, w1, w2) from the domain start, by Gauss-Legendre.

    Nodes are a uniform grid plus every integer inside the domain (so kinks of
    f' at integers, e.g. hardswish at +-3, never fall inside a cell).
    """

    def __init__(self, moments: Moments, cells: int = QUAD_CELLS) -> None:
        a, b = moments.domain
        integers = np.arange(math.ceil(a), math.floor(b) + 1, dtype=np.float64)
        self.moments = moments
        self.nodes = np.unique(np.concatenate([np.linspace(a, b, cells + 1), integers]))
        self.nodes = self.nodes[(self.nodes >= a) & (self.nodes <= b)]
        left, width = self.nodes[:-1], np.diff(self.nodes)
        cell = self._gauss(left, width)
        self.cum = np.concatenate([np.zeros((3, 1)), np.cumsum(cell, axis=1)], axis=1)
        w0, w1, _ = moments(self.nodes)
        self.ratio = w1 / w0  # g(x): the level that is optimal at x alone

    def _gauss(self, left: np.ndarray, width: np.ndarray) -> np.ndarray:
        """Integrals of (w0, w1, w2) over [left, left + width], shape (3, n)."""
        half = 0.5 * width
        x = (left + half)[:, None] + half[:, None] * _GL_NODES[None, :]
        values = np.stack(self.moments(x.reshape(-1))).reshape(3, *x.shape)
        return (values * _GL_WEIGHTS).sum(axis=2) * half

    def at(self, t: np.ndarray) -> np.ndarray:
        """Cumulative integrals at points t (clipped to the domain), shape (3, len(t))."""
        t = np.clip(np.asarray(t, dtype=np.float64), self.nodes[0], self.nodes[-1])
        k = np.clip(np.searchsorted(self.nodes, t, side="right") - 1, 0, len(self.nodes) - 2)
        return self.cum[:, k] + self._gauss(self.nodes[k], t - self.nodes[k])


@lru_cache(maxsize=64)
def quadrature(moments: Moments) -> Quadrature:
    """The (cached) quadrature of one problem form."""
    return Quadrature(moments)


def segment_costs(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """Cost int w2 - (int w1)^2 / int w0 of segments whose integrals are (c0, c1, c2)."""
    safe = np.where(c0 > 0, c0, 1.0)
    return np.maximum(np.where(c0 > 0, c2 - c1 * c1 / safe, c2), 0.0)


def optimal_splits(prefix: np.ndarray, max_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact DP over grid cells: optimal segmentation into k = 1..max_segments segments.

    ``prefix`` (3, n + 1) holds prefix sums of the cells' (w0, w1, w2) integrals.
    Returns ``(cost, split)``: ``cost[k]`` is the least total cost with k segments and
    ``split[k, j]`` the start of the last segment in an optimal cover of cells [0, j)
    by k segments.

    Speed-up that keeps it exact: a fast heuristic pass (divide and conquer, which
    would be exact only for monotone f') gives feasible costs U_k >= OPT_k. No segment
    of an optimal k-segmentation costs more than OPT_k, and a segment's cost only grows
    when it is extended, so layer m scans only the band of segments [i, j) with
    cost <= max_{k >= m} U_k: O(n * band) per layer instead of O(n^2).
    """
    n = prefix.shape[1] - 1
    if not 1 <= max_segments <= n:
        raise ValueError(f"max_segments must be in [1, {n}], got {max_segments}")
    upper = _heuristic_costs(prefix, max_segments)
    limit = np.maximum.accumulate(upper[::-1])[::-1] * (1 + 1e-9) + 1e-300
    split = np.zeros((max_segments + 1, n + 1), dtype=np.int32)
    best = np.full(max_segments + 1, np.inf)
    layer = _cost(prefix, np.zeros(n + 1, dtype=np.int64), np.arange(n + 1))
    layer[0] = np.inf
    best[1] = layer[n]
    if max_segments == 1:
        return best, split
    band = Band(prefix, limit[2])
    for k in range(2, max_segments + 1):
        if k in (8, 32, 128):  # narrower bands as k grows (a looser band is exact too)
            band = Band(prefix, limit[k])
        layer, split[k] = band.relax(layer)
        best[k] = layer[n]
    return best, split


def _cost(prefix: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cost of segments [i, j) (inf where i >= j)."""
    s = prefix[:, j] - prefix[:, i]
    return np.where(i < j, segment_costs(s[0], s[1], s[2]), np.inf)


class Band:
    """All segments [i, j) with cost <= limit, grouped by j (flat arrays, one group per j)."""

    def __init__(self, prefix: np.ndarray, limit: float) -> None:
        n = prefix.shape[1] - 1
        j = np.arange(n + 1)
        lo, hi = np.zeros(n + 1, dtype=np.int64), np.maximum(j - 1, 0)
        empty = _cost(prefix, hi, j) > limit
        while np.any(lo < hi):  # smallest i with cost(i, j) <= limit (cost grows as i falls)
            mid = (lo + hi) // 2
            ok = _cost(prefix, mid, j) <= limit
            hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid + 1)
        first = np.where(empty, j - 1, lo)  # an empty group keeps one (infinite) entry
        counts = np.maximum(j - first, 1)
        self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.rows = np.repeat(j, counts)
        self.start = np.repeat(first - self.offsets, counts) + np.arange(int(counts.sum()))
        self.start = np.maximum(self.start, 0)
        self.cost = _cost(prefix, self.start, self.rows)
        self.cost[empty[self.rows]] = np.inf
        self.index = np.arange(self.start.size)

    def relax(self, prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """new[j] = min over the band of prev[i] + cost(i, j), and the first argmin i."""
        total = prev[self.start] + self.cost
        low = np.minimum.reduceat(total, self.offsets)
        pos = np.where(total <= low[self.rows], self.index, self.index.size)
        return low, self.start[np.minimum.reduceat(pos, self.offsets)]


def _heuristic_costs(prefix: np.ndarray, max_segments: int) -> np.ndarray:
    """Costs of feasible k-segmentations for every k (upper bounds on the optimum).

    Divide and conquer over j with monotone split points: exact when f' is monotone,
    a good feasible answer otherwise.
    """
    n = prefix.shape[1] - 1
    upper = np.full(max_segments + 1, np.inf)
    layer = _cost(prefix, np.zeros(n + 1, dtype=np.int64), np.arange(n + 1))
    upper[1] = layer[n]
    for k in range(2, max_segments + 1):
        layer = _monotone_layer(prefix, layer, k)
        upper[k] = layer[n]
    return upper


def _monotone_layer(prefix: np.ndarray, prev: np.ndarray, k: int) -> np.ndarray:
    """new[j] ~ min_{k-1 <= i < j} prev[i] + cost(i, j), assuming monotone argmins."""
    n = prefix.shape[1] - 1
    new = np.full(n + 1, np.inf)
    jlo, jhi = np.array([k]), np.array([n])
    ilo, ihi = np.array([k - 1]), np.array([n - 1])
    while jlo.size:
        mid = (jlo + jhi) // 2
        lengths = np.minimum(ihi, mid - 1) - ilo + 1
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        total = int(lengths.sum())
        i = np.repeat(ilo - starts, lengths) + np.arange(total)
        values = prev[i] + _cost(prefix, i, np.repeat(mid, lengths))
        low = np.minimum.reduceat(values, starts)
        pos = np.where(values <= np.repeat(low, lengths), np.arange(total), total)
        opt = i[np.minimum.reduceat(pos, starts)]
        new[mid] = low
        left, right = jlo <= mid - 1, mid + 1 <= jhi
        jlo, jhi, ilo, ihi = (
            np.concatenate([jlo[left], mid[right] + 1]),
            np.concatenate([mid[left] - 1, jhi[right]]),
            np.concatenate([ilo[left], opt[right]]),
            np.concatenate([opt[left], ihi[right]]),
        )
    return new


def split_boundaries(split: np.ndarray, k: int) -> np.ndarray:
    """Interior cell edges (indices) of the optimal k-segmentation from ``optimal_splits``."""
    edges = []
    j = split.shape[1] - 1
    for layer in range(k, 1, -1):
        j = int(split[layer, j])
        edges.append(j)
    return np.array(edges[::-1], dtype=np.int64)


@dataclass(frozen=True)
class Segmentation:
    """An optimised step function on a form's domain: boundaries, levels, weighted MSE."""

    boundaries: np.ndarray
    levels: np.ndarray
    mse: float


def levels_and_mse(quad: Quadrature, boundaries: np.ndarray) -> tuple[np.ndarray, float]:
    """Optimal levels (weighted means) for fixed boundaries, and the resulting MSE."""
    a, b = quad.nodes[0], quad.nodes[-1]
    cum = quad.at(np.concatenate([[a], boundaries, [b]]))
    s0, s1, s2 = np.diff(cum, axis=1)
    levels = s1 / np.where(s0 > 0, s0, 1.0)
    mse = float(segment_costs(s0, s1, s2).sum())
    return levels, mse


def dp_grid(quad: Quadrature, cells: int = DP_CELLS) -> np.ndarray:
    """Indices of quadrature nodes used as DP cell edges.

    Cell density is 20% uniform in x and 80% proportional to w0^(1/3), the density
    of optimal boundaries for a smooth f' (Panter-Dite); every integer (a possible
    kink of f') is an edge.
    """
    x = quad.nodes
    w0, _, _ = quad.moments(x)
    root = np.cbrt(np.maximum(w0, 0.0))
    mass = np.concatenate([[0.0], np.cumsum(0.5 * (root[1:] + root[:-1]) * np.diff(x))])
    u = 0.2 * (x - x[0]) / (x[-1] - x[0]) + 0.8 * mass / mass[-1]
    target = np.interp(np.linspace(0.0, 1.0, cells + 1), u, x)
    idx = np.clip(np.searchsorted(x, target), 0, len(x) - 1)
    integers = np.flatnonzero(x == np.round(x))
    return np.unique(np.concatenate([[0], idx, integers, [len(x) - 1]]))


def solve(moments: Moments, ks: Iterable[int], cells: int = DP_CELLS) -> dict[int, Segmentation]:
    """Optimal k-step approximations of ``moments`` for every k in ``ks`` (one DP run)."""
    ks = sorted(set(ks))
    quad = quadrature(moments)
    grid = dp_grid(quad, cells)
    _, split = optimal_splits(quad.cum[:, grid], max(ks))
    out = {}
    for k in ks:
        edges = split_boundaries(split, k)
        out[k] = refine(quad, grid, edges)
    return out


def refine(quad: Quadrature, grid: np.ndarray, edges: np.ndarray) -> Segmentation:
    """Lloyd-Max refinement of a DP solution (boundaries at ``quad.nodes[grid[edges]]``)."""
    x = quad.nodes
    t = x[grid[edges]]
    levels, mse = levels_and_mse(quad, t)
    if t.size == 0:
        return Segmentation(t, levels, mse)
    lo_lim = x[grid[np.maximum(edges - WINDOW_CELLS, 0)]]
    hi_lim = x[grid[np.minimum(edges + WINDOW_CELLS, len(grid) - 1)]]
    for _ in range(MAX_SWEEPS):
        new_t = _move_boundaries(quad, t, levels, lo_lim, hi_lim)
        if np.array_equal(new_t, t):
            break
        new_levels, new_mse = levels_and_mse(quad, new_t)
        if not new_mse <= mse:
            break
        t, levels, mse = _extrapolate(quad, t, (new_t, new_levels, new_mse), lo_lim, hi_lim)
    return Segmentation(t, levels, mse)


def _extrapolate(
    quad: Quadrature,
    t: np.ndarray,
    lloyd: tuple[np.ndarray, np.ndarray, float],
    lo_lim: np.ndarray,
    hi_lim: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Over-relaxed Lloyd step t + w (step - t) for the largest w in OVERRELAX that helps."""
    step, _, step_mse = lloyd
    for weight in OVERRELAX:
        trial = np.clip(t + weight * (step - t), lo_lim, hi_lim)
        if np.all(np.diff(trial) > 0) and trial[0] > quad.nodes[0] and trial[-1] < quad.nodes[-1]:
            levels, mse = levels_and_mse(quad, trial)
            if mse < step_mse:
                return trial, levels, mse
    return lloyd


def _move_boundaries(
    quad: Quadrature, t: np.ndarray, levels: np.ndarray, lo_lim: np.ndarray, hi_lim: np.ndarray
) -> np.ndarray:
    """Best position of each boundary for fixed levels, within its search window."""
    x = quad.nodes
    ends = np.concatenate([[x[0]], t, [x[-1]]])
    left = np.maximum(0.5 * (ends[:-2] + t), lo_lim)
    right = np.minimum(0.5 * (t + ends[2:]), hi_lim)
    below, above = levels[:-1], levels[1:]
    slope1, slope0 = 2.0 * (above - below), above * above - below * below

    first = np.searchsorted(x, left, side="right")
    count = np.maximum(np.searchsorted(x, right, side="left") - first, 0)
    new_t = t.copy()
    has = count > 0
    if not has.any():
        return new_t
    starts = np.concatenate([[0], np.cumsum(count[has])[:-1]])
    total = int(count[has].sum())
    node = np.repeat(first[has] - starts, count[has]) + np.arange(total)
    values = slope1[has].repeat(count[has]) * quad.cum[1, node]
    values -= slope0[has].repeat(count[has]) * quad.cum[0, node]
    low = np.minimum.reduceat(values, starts)
    pos = np.where(values <= np.repeat(low, count[has]), np.arange(total), total)
    best = node[np.minimum.reduceat(pos, starts)]
    cand = x[best]
    # Locate the midpoint crossing inside the quadrature cells next to the best node,
    # by linear interpolation of w1/w0 between nodes.
    lo_node = np.maximum(best - 1, 0)
    hi_node = np.minimum(best + 1, len(x) - 1)
    mid = 0.5 * (below[has] + above[has])
    sign = above[has] - below[has]
    before = sign * (quad.ratio[best] - mid)  # < 0: moving right lowers the error
    cand = np.where(before < 0, _crossing(quad, best, hi_node, mid), x[best])
    after = sign * (quad.ratio[lo_node] - mid)
    cand = np.where((before >= 0) & (after < 0), _crossing(quad, lo_node, best, mid), cand)
    cand = np.clip(cand, left[has], right[has])
    # Keep the current position unless the candidate is strictly better.
    s1, s0 = slope1[has], slope0[has]
    cur, new = quad.at(t[has]), quad.at(cand)
    better = s1 * new[1] - s0 * new[0] < s1 * cur[1] - s0 * cur[0]
    new_t[has] = np.where(better, cand, t[has])
    return new_t


def _crossing(quad: Quadrature, i: np.ndarray, j: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Where the linear interpolant of w1/w0 between nodes i and j crosses ``level``."""
    gi, gj = quad.ratio[i], quad.ratio[j]
    span = gj - gi
    frac = np.where(span != 0, (level - gi) / np.where(span != 0, span, 1.0), 0.0)
    return quad.nodes[i] + np.clip(frac, 0.0, 1.0) * (quad.nodes[j] - quad.nodes[i])
