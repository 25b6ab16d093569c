"""Output of the memory benchmark: text table, JSON file and PNG bar chart."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

from fewbit.profile import format_bytes

__all__ = [
    "format_markdown",
    "format_table",
    "write_json",
    "plot_memory",
    "plot_convergence",
]

PathLike = Union[str, "os.PathLike[str]"]


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{0.0 - x:+.1f}%"


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _row_cells(r: dict[str, Any], rss: bool) -> list[str]:
    if "error" in r:
        return [r["config"], "failed: " + str(r["error"])[:150]]
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
    cells += [
        format_bytes(r["saved_bytes"]),
        _pct(r.get("saved_saving_pct")),
        f"{r['step_time_s'] * 1e3:.0f} ms",
        _num(r.get("time_ratio"), ".2f"),
        _num(r.get("grad_rel_err"), ".3g"),
    ]
    return cells


def _join(cells: list[str], widths: list[int]) -> str:
    """First cell left-aligned, the others right-aligned (an error row spans the rest)."""
    if len(cells) < len(widths):
        return "  ".join([cells[0].ljust(widths[0]), *cells[1:]])
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def format_markdown(report: dict[str, Any]) -> str:
    """The benchmark table as Markdown (the README's tables are made with this)."""
    rows = report["rows"]
    rss = any(r.get("rss_peak_bytes") is not None for r in rows)
    head = ["config", "peak", "vs vanilla"] + (["peak (RSS)"] if rss else [])
    head += ["saved activations", "vs vanilla", "step time", "ratio", "grad err"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        cells = _row_cells(r, rss)
        lines.append("| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    """The benchmark table: one row per configuration, savings relative to vanilla."""
    rows = report["rows"]
    rss = any(r.get("rss_peak_bytes") is not None for r in rows)
    head = ["config", "peak memory", "vs vanilla"]
    if rss:
        head.append("peak (RSS)")
    head += ["saved activations", "vs vanilla", "step time", "time ratio", "grad rel err"]
    body = [_row_cells(r, rss) for r in rows]
    widths = [
        max([len(head[i])] + [len(c[i]) for c in body if len(c) > i]) for i in range(len(head))
    ]
    lines = [_join(head, widths)] + [_join(cells, widths) for cells in body]
    s = report["settings"]
    params = s.get("n_params")
    title = (
        f"model {s['model']}  batch {s.get('batch')}  seq {s.get('seq')}  {s['dtype']}  "
        f"{s['device']}" + (f"  parameters {params:,}" if isinstance(params, int) else "")
    )
    notes = (
        "peak memory = parameters, optimizer state and batch held before the step + the "
        "step's peak above them; grad rel err = ||g - g_vanilla|| / ||g_vanilla|| "
        "(dropout off, same weights and batch)"
    )
    return "\n".join([title, *lines, notes])


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
    rows = [r for r in report["rows"] if "error" not in r]
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
