"""Where derivative tables come from: the shipped data file, or built (and cached) on demand.

A table costs nothing at run time beyond its 2**bits float32 levels; what backward
stores per element is only the ``bits``-bit code. Tables for default parameters,
the normal density and range [-8, 8] are precomputed in ``tables.json``
(``python -m fewbit.approx`` regenerates it); anything else is optimised on first
use (well under a second for bits <= 4) and cached per normalised arguments.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..codecs.bitpack import check_bits
from .functions import CONTINUOUS, get_definition
from .segment import (
    DEFAULT_RANGE,
    DP_CELLS,
    QUAD_CELLS,
    Moments,
    Segmentation,
    normalize_options,
    parity,
    quadrature,
    solve,
)
from .table import Table

__all__ = [
    "DATA_FILE",
    "GENERATOR",
    "Candidate",
    "build_candidates",
    "build_table",
    "generate",
    "get_table",
    "load_data",
    "report",
    "weighted_rms_error",
    "write_data",
]

GENERATOR = "fewbit.approx.segment/1"
DATA_FILE = Path(__file__).with_name("tables.json")
ParamKey = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Candidate:
    """One form's optimal table for one bit width, with its weighted RMS error."""

    form: str  # 'full', 'even' (|x| table) or 'odd' (c + sign(x) h(|x|), a full-line table)
    table: Table
    rms: float


def get_table(
    name: str,
    bits: int,
    params: Mapping[str, float] | None = None,
    *,
    density: str = "normal",
    range: tuple[float, float] | None = None,  # noqa: A002 - mirrors the documented keyword
) -> Table:
    """The optimal ``bits``-bit derivative table of activation ``name``.

    Minimises E[(f'(x) - q(x))^2] for x ~ ``density`` on ``range`` (default
    N(0, 1) on [-8, 8]). Default parameters come from the shipped file; others
    are computed once and cached.
    """
    check_bits(bits, "bits")
    key, density, bounds = normalize_options(name, params, density, range)
    if density == "normal" and bounds == DEFAULT_RANGE and key == _default_key(name):
        shipped = load_data().get((name, bits))
        if shipped is not None:
            return shipped
    return _build(name, bits, key, density, bounds)


def build_table(
    name: str,
    bits: int,
    params: Mapping[str, float] | None = None,
    *,
    density: str = "normal",
    range: tuple[float, float] | None = None,  # noqa: A002
) -> Table:
    """Like ``get_table`` but always optimised afresh (cached), never read from the file."""
    check_bits(bits, "bits")
    key, density, bounds = normalize_options(name, params, density, range)
    return _build(name, bits, key, density, bounds)


@lru_cache(maxsize=256)
def _build(name: str, bits: int, key: ParamKey, density: str, bounds: tuple[float, float]) -> Table:
    candidates = build_candidates(name, [bits], dict(key), density=density, range=bounds)
    return best_candidate(candidates[bits]).table


def _default_key(name: str) -> ParamKey:
    return tuple(sorted((k, float(v)) for k, v in get_definition(name).defaults.items()))


def weighted_rms_error(
    name: str,
    table: Table,
    params: Mapping[str, float] | None = None,
    *,
    density: str = "normal",
    range: tuple[float, float] | None = None,  # noqa: A002
) -> float:
    """sqrt(E[(f'(x) - q(x))^2]) for x ~ ``density`` on ``range``, by fine quadrature."""
    key, density, bounds = normalize_options(name, params, density, range)
    quad = quadrature(Moments(name, key, density, bounds, "full"))
    cuts, levels = _line_pieces(table)
    lo, hi = bounds
    edges = np.concatenate([[lo], np.clip(cuts, lo, hi), [hi]])
    s0, s1, s2 = np.diff(quad.at(edges), axis=1)
    mse = float(np.sum(s2 - 2.0 * levels * s1 + levels * levels * s0))
    return math.sqrt(max(mse, 0.0))


def _line_pieces(table: Table) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints and levels of q on the whole line (a symmetric table is mirrored)."""
    bounds, levels = np.array(table.boundaries), np.array(table.levels)
    if not table.symmetric:
        return bounds, levels
    return np.concatenate([-bounds[::-1], bounds]), np.concatenate([levels[:0:-1], levels])


def build_candidates(
    name: str,
    bits: Iterable[int],
    params: Mapping[str, float] | None = None,
    *,
    density: str = "normal",
    range: tuple[float, float] | None = None,  # noqa: A002
) -> dict[int, list[Candidate]]:
    """Optimal tables of every applicable form for each bit width (one DP per form).

    The full-line form is always built; on a symmetric range the |x| form is added
    when f' is even and the odd form c + sign(x) h(|x|) when f' - f'(0) is odd.
    """
    bits = sorted({check_bits(b, "bits") for b in bits})
    key, density, bounds = normalize_options(name, params, density, range)
    kind = parity(name, dict(key), max(abs(bounds[0]), abs(bounds[1])))
    forms = ["full"]
    if bounds[0] == -bounds[1] and kind != "none":
        forms.append(kind)
    out: dict[int, list[Candidate]] = {b: [] for b in bits}
    for form in forms:
        moments = Moments(name, key, density, bounds, form)
        steps = {b: 2 ** (b - 1) if form == "odd" else 2**b for b in bits}
        solved = solve(moments, steps.values())
        for b in bits:
            table = _to_table(moments, solved[steps[b]])
            rms = weighted_rms_error(name, table, dict(key), density=density, range=bounds)
            out[b].append(Candidate(form, table, rms))
    return out


TIE = 1e-9  # relative RMS differences below this are quadrature/round-off noise


def best_candidate(candidates: list[Candidate]) -> Candidate:
    """The candidate of least error; the full-line form (listed first) wins ties."""
    best = candidates[0]
    for cand in candidates[1:]:
        if cand.rms < best.rms * (1.0 - TIE):
            best = cand
    return best


def _to_table(moments: Moments, seg: Segmentation) -> Table:
    if moments.form == "full":
        return Table(tuple(seg.boundaries), tuple(seg.levels), False)
    if moments.form == "even":
        return Table(tuple(seg.boundaries), tuple(seg.levels), True)
    c, half, levels = moments.center, seg.boundaries, seg.levels
    bounds = np.concatenate([-half[::-1], [0.0], half])
    return Table(tuple(bounds), tuple(np.concatenate([c - levels[::-1], c + levels])), False)


def _round(value: float) -> float:
    return float(f"{value:.9g}")


def generate(
    functions: Iterable[str] | None = None, bits: Iterable[int] = (1, 2, 3, 4, 5, 6, 7, 8)
) -> dict[str, Any]:
    """The data-file content for default parameters (floats rounded to 9 digits)."""
    names = list(functions) if functions is not None else sorted(CONTINUOUS)
    data: dict[str, Any] = {"functions": {}}
    data.update(_metadata())
    for name in names:
        entries = {}
        for b, candidates in build_candidates(name, bits).items():
            chosen = best_candidate(candidates)
            table = Table(
                tuple(_round(v) for v in chosen.table.boundaries),
                tuple(_round(v) for v in chosen.table.levels),
                chosen.table.symmetric,
            )
            entry: dict[str, Any] = {
                "form": chosen.form,
                "symmetric": table.symmetric,
                "rms": _round(weighted_rms_error(name, table)),
            }
            entry.update({f"rms_{c.form}": _round(c.rms) for c in candidates})
            entry["boundaries"], entry["levels"] = list(table.boundaries), list(table.levels)
            entries[str(b)] = entry
        data["functions"][name] = {"params": dict(get_definition(name).defaults), "tables": entries}
    return data


def _metadata() -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "density": "normal",
        "range": list(DEFAULT_RANGE),
        "grid": {"dp_cells": DP_CELLS, "quadrature_cells": QUAD_CELLS, "gauss_points": 3},
    }


def write_data(data: dict[str, Any], path: Path | str = DATA_FILE) -> None:
    """Write ``data`` as compact JSON, one table per line."""
    lines = ["{"]
    for key, value in data.items():
        if key != "functions":
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    lines.append('  "functions": {')
    names = list(data["functions"])
    for n, name in enumerate(names):
        item = data["functions"][name]
        lines.append(f'    {json.dumps(name)}: {{"params": {json.dumps(item["params"])},')
        lines.append('      "tables": {')
        keys = list(item["tables"])
        for t, b in enumerate(keys):
            sep = "," if t + 1 < len(keys) else ""
            body = json.dumps(item["tables"][b], separators=(",", ":"))
            lines.append(f"        {json.dumps(b)}: {body}{sep}")
        lines.append("      }}" + ("," if n + 1 < len(names) else ""))
    lines.append("  }")
    lines.append("}")
    Path(path).write_text("\n".join(lines) + "\n")


def read_data(path: Path | str = DATA_FILE) -> dict[str, Any] | None:
    """The parsed data file if it exists and was made for the default settings, else None."""
    path = Path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    meta = _metadata()
    if any(data.get(k) != meta[k] for k in ("generator", "density", "range")):
        return None
    return data


@lru_cache(maxsize=1)
def load_data() -> dict[tuple[str, int], Table]:
    """Shipped tables by (name, bits), loaded once; empty if the file is missing or stale."""
    data = read_data()
    out: dict[tuple[str, int], Table] = {}
    for name, item in (data or {}).get("functions", {}).items():
        if name not in CONTINUOUS or item.get("params") != dict(CONTINUOUS[name].defaults):
            continue
        for b, entry in item["tables"].items():
            out[(name, int(b))] = Table(
                tuple(entry["boundaries"]), tuple(entry["levels"]), bool(entry["symmetric"])
            )
    return out


def report(functions: Iterable[str] | None = None, bits: Iterable[int] = (1, 2, 3, 4)) -> str:
    """Markdown table of weighted RMS errors of each form, computed afresh (default settings)."""
    names = list(functions) if functions is not None else sorted(CONTINUOUS)
    bits = list(bits)
    labels = {"full": "full line", "even": "\\|x\\| (even f')", "odd": "c + sign(x)·h(\\|x\\|)"}
    head = "| function | table form | " + " | ".join(f"b={b}" for b in bits) + " |"
    lines = [head, "|" + "---|" * (len(bits) + 2)]
    for name in names:
        candidates = build_candidates(name, bits)
        chosen = {b: best_candidate(candidates[b]).form for b in bits}
        for i, form in enumerate(c.form for c in candidates[bits[0]]):
            cells = []
            for b in bits:
                cand = next(c for c in candidates[b] if c.form == form)
                text = f"{cand.rms:.3e}"
                cells.append(f"**{text}**" if chosen[b] == form else text)
            title = name if i == 0 else ""
            lines.append(f"| {title} | {labels[form]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Weighted RMS error sqrt(E[(f'(x) - q(x))^2]), x ~ N(0, 1) on [-8, 8]; "
        "bold: the table used."
    )
    return "\n".join(lines)
