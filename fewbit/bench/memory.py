"""Parent side of the memory benchmark: one child process per configuration.

`run_bench` starts ``python -m fewbit.bench.runner`` once per configuration (in order,
never two at once; with ``rss``, each with ``MALLOC_MMAP_THRESHOLD_=65536`` for the VmHWM
cross-check), collects the JSON
results, and adds the comparisons with the vanilla row: peak and saved-activation
savings, step-time ratio and the relative L2 error of the full gradient vector
(computed with dropout off, same seed and batch; see `fewbit.bench.runner`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any, Optional

import torch

from fewbit.bench.configs import get_config
from fewbit.bench.models import resolve_spec
from fewbit.bench.runner import RESULT_PREFIX, Job

__all__ = ["run_bench", "child_env", "run_child", "grad_rel_error", "add_comparisons"]

BASELINE = "vanilla"


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
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and "USDT" not in ln][-6:]
    return {"config": job.config, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


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


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Fill savings (%) and the time ratio of each row against the vanilla row."""
    base = next((r for r in rows if r["config"] == BASELINE and "error" not in r), None)
    for r in rows:
        if "error" in r or base is None:
            continue
        r["peak_saving_pct"] = _saving(r["peak_total_bytes"], base["peak_total_bytes"])
        r["saved_saving_pct"] = _saving(r["saved_bytes"], base["saved_bytes"])
        r["time_ratio"] = _ratio(r["step_time_s"], base["step_time_s"])


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


def run_bench(
    configs: list[str],
    model: str = "roberta-small",
    batch: Optional[int] = None,
    seq: Optional[int] = None,
    dtype: str = "fp32",
    device: str = "cpu",
    steps: int = 3,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = True,
    timeout_s: Optional[float] = None,
    rss: bool = False,
) -> dict[str, Any]:
    """Benchmark ``configs`` (vanilla is added first when missing); a JSON-able report.

    ``rss`` adds the independent resident-memory peak (VmHWM) of each step, measured in a
    child started with ``MALLOC_MMAP_THRESHOLD_=65536``; step times are then slower.
    """
    names = list(dict.fromkeys([BASELINE, *configs]))
    for name in names:
        get_config(name)  # ValueError on an unknown name before any child starts
    resolve_spec(model, batch, seq)
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    from tqdm import tqdm

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fewbit-bench-") as tmp:
        paths = {n: os.path.join(tmp, f"grad{i}.pt") for i, n in enumerate(names)}
        bar = tqdm(names, desc="fewbit bench", unit="config", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            job = Job(name, model, batch, seq, dtype, device, steps, warmup, seed, paths[name], rss)
            rows.append(run_child(job, timeout_s))
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
        "seed": seed,
        "rss": rss,
    }
    first = next((r for r in rows if "error" not in r), None)
    if first is not None:
        settings.update(batch=first["batch"], seq=first["seq"], n_params=first["n_params"])
    return {"settings": settings, "rows": rows, "wall_s": time.perf_counter() - t0}
