"""Output of the memory benchmark: text and Markdown tables, JSON file, the memory-time
frontier (PNG) and a bar chart of where the peak goes (PNG)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

from fewbit.profile import format_bytes

__all__ = [
    "format_markdown",
    "format_table",
    "write_json",
    "pareto_frontier",
    "plot_frontier",
    "plot_memory",
    "plot_convergence",
]

PathLike = Union[str, "os.PathLike[str]"]


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{0.0 - x:+.1f}%"


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ratio_cell(r: dict[str, Any], key: str) -> str:
    """``1.34 (1.30-1.39)``: median ratio over rounds and its lowest-highest round."""
    value = r.get(key)
    if value is None:
        return "-"
    spread = r.get(key + "_range") or []
    if len(spread) == 2 and spread[1] > spread[0]:
        return f"{value:.2f} ({spread[0]:.2f}-{spread[1]:.2f})"
    return f"{value:.2f}"


def _time_cell(r: dict[str, Any]) -> str:
    """Median step time and the interquartile range of all timed steps."""
    ms = r["step_time_s"] * 1e3
    iqr = r.get("step_time_iqr_s") or []
    if len(iqr) == 2 and iqr[1] > iqr[0]:
        return f"{ms:.0f} ms ({iqr[0] * 1e3:.0f}-{iqr[1] * 1e3:.0f})"
    return f"{ms:.0f} ms"


def _has_ckpt(rows: list[dict[str, Any]]) -> bool:
    return any(r.get("time_ratio_ckpt") is not None for r in rows)


def _headers(rss: bool, ckpt: bool, short: bool) -> list[str]:
    head = ["config", "peak" if short else "peak memory", "vs vanilla"]
    if rss:
        head.append("peak (RSS)")
    if ckpt:
        head.append("vs ckpt")
    head += ["saved activations", "vs vanilla", "step time (IQR)", "x vanilla"]
    if ckpt:
        head.append("x ckpt")
    head.append("grad err" if short else "grad rel err")
    return head


def _row_cells(r: dict[str, Any], rss: bool, ckpt: bool = False) -> list[str]:
    if "error" in r:
        return [r["config"], "failed: " + str(r["error"])[:150].replace("|", "/")]
    if "skipped" in r:
        return [r["config"], "n/a: " + str(r["skipped"])]
    cells = [
        r["config"],
        format_bytes(r["peak_total_bytes"]),
        _pct(r.get("peak_saving_pct")),
    ]
    if rss:
        cells.append(
            "-"
            if r.get("rss_peak_bytes") is None
            else format_bytes(r["held_bytes"] + r["rss_peak_bytes"])
        )
    if ckpt:
        cells.append(_pct(r.get("peak_vs_ckpt_pct")))
    cells += [
        format_bytes(r["saved_bytes"]),
        _pct(r.get("saved_saving_pct")),
        _time_cell(r),
        _ratio_cell(r, "time_ratio"),
    ]
    if ckpt:
        cells.append(_ratio_cell(r, "time_ratio_ckpt"))
    cells.append(_num(r.get("grad_rel_err"), ".3g"))
    return cells


def _join(cells: list[str], widths: list[int]) -> str:
    """First cell left-aligned, the others right-aligned (an error row spans the rest)."""
    if len(cells) < len(widths):
        return "  ".join([cells[0].ljust(widths[0]), *cells[1:]])
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def _method(report: dict[str, Any]) -> str:
    s = report["settings"]
    rounds = s.get("rounds", 1)
    return (
        f"peak = parameters, optimizer state and batch held before the step + the step's peak "
        f"above them; step time = median of {rounds} x {s.get('steps')} timed steps "
        f"({rounds} lockstep rounds: a fresh process per configuration and round, all alive, "
        "one step at a time in rotation), IQR in "
        "brackets; x vanilla / x ckpt = median over rounds of the per-round ratio (median "
        "over the round's cycles of the two steps' ratio), lowest-"
        "highest round in brackets; grad err = ||g - g_vanilla|| / ||g_vanilla|| (dropout off, "
        "same weights and batch)"
    )


def _title(report: dict[str, Any]) -> str:
    s = report["settings"]
    params = s.get("n_params")
    return (
        f"model {s['model']}  batch {s.get('batch')}  seq {s.get('seq')}  {s['dtype']}  "
        f"{s['device']}" + (f"  parameters {params:,}" if isinstance(params, int) else "")
    )


def format_markdown(report: dict[str, Any]) -> str:
    """The benchmark table as Markdown (the README's tables are made with this), then the
    settings and the method in one line."""
    rows = report["rows"]
    rss = any(r.get("rss_peak_bytes") is not None for r in rows)
    ckpt = _has_ckpt(rows)
    head = _headers(rss, ckpt, short=True)
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        cells = _row_cells(r, rss, ckpt)
        lines.append("| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
    lines += ["", f"{_title(report)}. {_method(report)}."]
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    """The benchmark table: one row per configuration, savings relative to vanilla, time
    ratios relative to vanilla and to activation checkpointing."""
    rows = report["rows"]
    rss = any(r.get("rss_peak_bytes") is not None for r in rows)
    ckpt = _has_ckpt(rows)
    head = _headers(rss, ckpt, short=False)
    body = [_row_cells(r, rss, ckpt) for r in rows]
    full = [c for c in body if len(c) == len(head)]  # error rows span the other columns
    widths = [max([len(head[i])] + [len(c[i]) for c in full]) for i in range(len(head))]
    lines = [_join(head, widths)] + [_join(cells, widths) for cells in body]
    return "\n".join([_title(report), *lines, _method(report)])


def pareto_frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point beats on both coordinates (lower is better on
    both): a point is on the frontier unless another has both coordinates <= its own and
    one of them strictly lower. Sorted by the first coordinate."""
    front = []
    for name, (x, y) in points.items():
        dominated = any(
            ox <= x and oy <= y and (ox < x or oy < y)
            for other, (ox, oy) in points.items()
            if other != name
        )
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n])


def write_json(report: dict[str, Any], path: PathLike) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_memory(report: dict[str, Any], path: PathLike) -> None:
    """Stacked bars per configuration: held (parameters, optimizer state, batch), saved
    activations, and the rest of the step's peak (gradients, temporaries)."""
    plt = _pyplot()
    rows = [r for r in report["rows"] if "error" not in r and "skipped" not in r]
    mib = 2.0**20
    names = [r["config"] for r in rows]
    held = [r["held_bytes"] / mib for r in rows]
    saved = [r["saved_bytes"] / mib for r in rows]
    rest = [
        max(0.0, (r["peak_total_bytes"] - r["held_bytes"] - r["saved_bytes"]) / mib) for r in rows
    ]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(rows) + 2), 4.5))
    ax.bar(names, held, label="parameters + optimizer state + batch")
    ax.bar(names, saved, bottom=held, label="saved activations")
    ax.bar(names, rest, bottom=[a + b for a, b in zip(held, saved)], label="rest of peak")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(f"fewbit bench: {report['settings']['model']}")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


BASELINES = ("vanilla", "ckpt", "offload")


def plot_frontier(report: dict[str, Any], path: PathLike) -> None:
    """One point per configuration: step-time ratio against vanilla (x, with the range over
    rounds as an error bar) and peak memory (y). The Pareto frontier (no other configuration
    is both faster and smaller) is joined by a line and its points filled; baselines
    (vanilla, checkpointing, offloading) are grey."""
    plt = _pyplot()
    rows = [r for r in report["rows"] if r.get("time_ratio") is not None]
    mib = 2.0**20
    points = {r["config"]: (float(r["time_ratio"]), r["peak_total_bytes"] / mib) for r in rows}
    front = pareto_frontier(points)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in rows:
        name = r["config"]
        x, y = points[name]
        color = "0.45" if name in BASELINES else "tab:blue"
        lo_hi = r.get("time_ratio_range") or [x, x]
        ax.errorbar([x], [y], xerr=[[x - lo_hi[0]], [lo_hi[1] - x]], fmt="none", ecolor=color,
                    elinewidth=1, capsize=3)  # fmt: skip
        ax.scatter([x], [y], s=60, color=color if name in front else "white",
                   edgecolors=color, linewidths=1.5, zorder=3)  # fmt: skip
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if len(front) > 1:
        ax.plot([points[n][0] for n in front], [points[n][1] for n in front], "--",
                drawstyle="steps-post", color="tab:green",
                label="Pareto frontier (filled points)")  # fmt: skip
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel("step time / vanilla's (median over rounds; bar: lowest-highest round)")
    ax.set_ylabel("peak memory (MiB)")
    s = report["settings"]
    ax.set_title(f"fewbit bench: {s['model']} batch {s.get('batch')} {s['dtype']} {s['device']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_convergence(report: dict[str, Any], path: PathLike) -> None:
    """Training-loss curves (one per configuration) of the convergence benchmark."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["rows"]:
        ax.plot(
            range(1, len(r["train_loss"]) + 1),
            r["train_loss"],
            label=f"{r['config']} ({r['test_accuracy']:.2f}%)",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(f"fewbit bench --convergence: {report['settings']['model']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
