"""Parent side of the benchmark: a memory pass, then lockstep timing rounds.

Memory pass: `run_bench` starts ``python -m fewbit.bench.runner`` once per configuration
(never two at once; with ``rss`` with ``MALLOC_MMAP_THRESHOLD_=65536`` for the VmHWM
cross-check), collects the JSON results, and adds the comparisons with the vanilla row (peak
and saved-activation savings, relative L2 error of the full gradient vector, computed with
dropout off, same seed and batch; see `fewbit.bench.runner`) and with the
activation-checkpointing row (``ckpt``: peak).

Timing on a shared machine: ``rounds`` rounds, each a fresh process per configuration, all
alive at once and stepping one at a time in rotation (`fewbit.bench.lockstep`), so the steps
of every configuration alternate within seconds and a slow spell of the machine slows them
alike. A round's time ratio is the median over its cycles of the ratio of the two
configurations' steps in the same cycle; the reported ratio is the median over rounds, with
its lowest and highest round.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any, Optional

import torch

from fewbit.bench.configs import get_config
from fewbit.bench.lockstep import cycle_order, run_lockstep_round
from fewbit.bench.models import resolve_spec
from fewbit.bench.runner import RESULT_PREFIX, Job, stderr_tail

__all__ = [
    "run_bench",
    "child_env",
    "run_child",
    "grad_rel_error",
    "add_comparisons",
    "summarize_times",
    "round_order",
]

BASELINE = "vanilla"
CKPT = "ckpt"


def child_env(rss: bool = False) -> dict[str, str]:
    """Environment for a child: this fewbit importable; with ``rss``, large frees returned to
    the OS at once (``MALLOC_MMAP_THRESHOLD_``) so that VmHWM follows live memory. That
    setting makes every large allocation page-fault and slows the steps, so it is only set
    when the resident-memory cross-check is asked for."""
    env = dict(os.environ)
    if rss:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def run_child(job: Job, timeout_s: Optional[float] = None) -> dict[str, Any]:
    """Run one job in a fresh interpreter; on failure return ``{"error": ...}``."""
    cmd = [sys.executable, "-m", "fewbit.bench.runner", json.dumps(asdict(job))]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=child_env(job.rss),
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"config": job.config, "error": f"timed out after {timeout_s} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            result["config"] = job.config
            return result
    tail = stderr_tail(proc.stderr, 12)
    last = tail[-1] if tail else "no output"
    return {"config": job.config, "error": f"exit {proc.returncode}: {last}", "stderr_tail": tail}


def _flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1).double() for n in names])


def grad_rel_error(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """``||g - g_ref|| / ||g_ref||`` over all parameters both share (ValueError if none)."""
    names = [n for n in reference if n in other]
    if not names:
        raise ValueError("no parameter names in common between the two gradient dumps")
    ref = _flat(reference, names)
    diff = _flat(other, names) - ref
    return float(diff.norm() / ref.norm().clamp_min(1e-300))


def _ratio(x: Optional[float], base: Optional[float]) -> Optional[float]:
    return x / base if x is not None and base else None


def _saving(x: Optional[float], base: Optional[float]) -> Optional[float]:
    return 100.0 * (base - x) / base if x is not None and base else None


def _round_ratio(mine: list[float], theirs: list[float]) -> float:
    """One round's ratio: the median over cycles of the two step times of the same cycle
    (lockstep: they ran seconds apart), or the ratio of the medians when the lists do not
    pair up (a child failed mid-round)."""
    if len(mine) == len(theirs):
        return statistics.median(a / b for a, b in zip(mine, theirs))
    return statistics.median(mine) / statistics.median(theirs)


def _paired_ratios(row: dict[str, Any], base: dict[str, Any]) -> list[float]:
    """Per round: the step time of ``row`` over that of ``base`` in the same round (steps
    paired by cycle, see `_round_ratio`; rows without per-cycle times: the ratio of the
    round medians)."""
    mine, theirs = row.get("round_step_times_s"), base.get("round_step_times_s")
    if mine and theirs:
        return [_round_ratio(a, b) for a, b in zip(mine, theirs) if a and b]
    mine, theirs = row.get("round_medians_s"), base.get("round_medians_s")
    if not mine or not theirs:
        return []
    return [a / b for a, b in zip(mine, theirs) if a is not None and b]


def _time_ratio(row: dict[str, Any], base: dict[str, Any]) -> tuple[Optional[float], list[float]]:
    """(median of the paired per-round ratios, [lowest, highest]) or, without rounds, the
    ratio of the two median step times and an empty range."""
    paired = _paired_ratios(row, base)
    if paired:
        return statistics.median(paired), [min(paired), max(paired)]
    return _ratio(row.get("step_time_s"), base.get("step_time_s")), []


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Fill savings (%) against the vanilla row, and step-time ratios against vanilla
    (``time_ratio``) and against activation checkpointing (``time_ratio_ckpt``, when a
    ``ckpt`` row ran), each with its lowest-highest range over the rounds."""
    ok = [r for r in rows if "error" not in r and "skipped" not in r]
    base = next((r for r in ok if r["config"] == BASELINE), None)
    ckpt = next((r for r in ok if r["config"] == CKPT), None)
    for r in ok:
        if base is not None:
            r["peak_saving_pct"] = _saving(r["peak_total_bytes"], base["peak_total_bytes"])
            r["saved_saving_pct"] = _saving(r["saved_bytes"], base["saved_bytes"])
            r["time_ratio"], r["time_ratio_range"] = _time_ratio(r, base)
        if ckpt is not None:
            r["time_ratio_ckpt"], r["time_ratio_ckpt_range"] = _time_ratio(r, ckpt)
            r["peak_vs_ckpt_pct"] = _saving(r["peak_total_bytes"], ckpt["peak_total_bytes"])


def summarize_times(row: dict[str, Any], rounds: list[Optional[list[float]]]) -> None:
    """Set the row's step-time statistics from the timed steps of each round (None: that
    round's child failed): median and quartiles of all timed steps, per-round medians."""
    all_times = [t for times in rounds if times for t in times]
    row["round_step_times_s"] = [list(t) if t else None for t in rounds]
    row["round_medians_s"] = [statistics.median(t) if t else None for t in rounds]
    row["step_times_s"] = all_times
    row["step_time_s"] = statistics.median(all_times)
    if len(all_times) >= 2:
        q1, _, q3 = statistics.quantiles(all_times, n=4, method="inclusive")
    else:
        q1 = q3 = all_times[0]
    row["step_time_iqr_s"] = [q1, q3]


def _add_grad_errors(rows: list[dict[str, Any]], paths: dict[str, str]) -> None:
    if BASELINE not in paths or not os.path.exists(paths[BASELINE]):
        return
    reference = torch.load(paths[BASELINE])
    for r in rows:
        path = paths.get(r["config"])
        if "error" in r or path is None or not os.path.exists(path):
            continue
        other = torch.load(path)
        r["grad_rel_err"] = grad_rel_error(reference, other)
        r["grad_params_missing"] = sum(1 for n in reference if n not in other)
        del other


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order in which round ``round_index`` starts ``names``: rotated by one each round,
    as the cycles within a round are (`fewbit.bench.lockstep.cycle_order`)."""
    return cycle_order(names, round_index)


def _not_applicable(name: str, device: str) -> dict[str, Any]:
    config = get_config(name)
    where = ", ".join(config.devices or ())
    return {
        "config": name,
        "skipped": f"does not apply on {torch.device(device).type} (only on {where})",
    }


def run_bench(
    configs: list[str],
    model: str = "roberta-small",
    batch: Optional[int] = None,
    seq: Optional[int] = None,
    dtype: str = "fp32",
    device: str = "cpu",
    steps: int = 5,
    warmup: int = 3,
    seed: int = 0,
    progress: bool = True,
    timeout_s: Optional[float] = None,
    rss: bool = False,
    rounds: int = 3,
) -> dict[str, Any]:
    """Benchmark ``configs`` (vanilla is added first when missing); a JSON-able report.

    The memory pass runs every configuration in a fresh child that measures memory, saved
    bytes and the gradient (and times ``steps`` steps, kept as ``memory_pass_step_times_s``).
    Then ``rounds`` lockstep timing rounds (`fewbit.bench.lockstep`): per round a fresh child
    per configuration, each warmed up by ``warmup`` steps, then ``steps`` cycles of one step
    of each in rotation; the time ratios are taken per round and their median and range
    reported. A configuration that does not apply to ``device`` (``Config.devices``) gets a
    row saying so. ``rss`` adds the independent resident-memory peak (VmHWM) of each step,
    measured in the memory pass with ``MALLOC_MMAP_THRESHOLD_=65536``.
    """
    names = list(dict.fromkeys([BASELINE, *configs]))
    for name in names:
        get_config(name)  # ValueError on an unknown name before any child starts
    resolve_spec(model, batch, seq)
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    from tqdm import tqdm

    t0 = time.perf_counter()
    runnable = [n for n in names if get_config(n).applies_to(device)]
    results: dict[str, dict[str, Any]] = {}
    times: dict[str, list[Optional[list[float]]]] = {n: [] for n in runnable}
    timing_errors: dict[str, list[str]] = {n: [] for n in runnable}
    with tempfile.TemporaryDirectory(prefix="fewbit-bench-") as tmp:
        paths = {n: os.path.join(tmp, f"grad{i}.pt") for i, n in enumerate(runnable)}
        bar = tqdm(total=(rounds + 1) * len(runnable), desc="fewbit bench", unit="child",
                   disable=not progress)  # fmt: skip
        for name in runnable:  # memory pass: one fresh process per configuration
            bar.set_postfix_str(f"memory {name}")
            job = Job(name, model, batch, seq, dtype, device, steps, warmup, seed, paths[name],
                      rss)  # fmt: skip
            results[name] = run_child(job, timeout_s)
            bar.update(1)
        for round_index in range(rounds):  # timing rounds: all configurations in lockstep
            order = [n for n in round_order(runnable, round_index) if "error" not in results[n]]
            bar.set_postfix_str(f"timing round {round_index + 1}")
            jobs = [Job(n, model, batch, seq, dtype, device, steps, warmup, seed) for n in order]
            got = run_lockstep_round(jobs, steps, child_env(), timeout_s)
            for name in runnable:
                times[name].append(got.times.get(name))
                if name in got.errors:
                    timing_errors[name].append(got.errors[name])
            bar.update(len(runnable))
        bar.close()
        rows = []
        for name in names:
            if name not in results:
                rows.append(_not_applicable(name, device))
                continue
            row = results[name]
            if "error" not in row:
                if any(times[name]):
                    row["memory_pass_step_times_s"] = row.get("step_times_s")
                    summarize_times(row, times[name])
                if timing_errors[name]:
                    row["timing_errors"] = timing_errors[name]
            rows.append(row)
        add_comparisons(rows)
        _add_grad_errors(rows, paths)
    settings = {
        "model": model,
        "batch": batch,
        "seq": seq,
        "dtype": dtype,
        "device": device,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "seed": seed,
        "rss": rss,
    }
    first_ok = next((r for r in rows if "error" not in r and "skipped" not in r), None)
    if first_ok is not None:
        settings.update(batch=first_ok["batch"], seq=first_ok["seq"], n_params=first_ok["n_params"])
    return {"settings": settings, "rows": rows, "wall_s": time.perf_counter() - t0}
