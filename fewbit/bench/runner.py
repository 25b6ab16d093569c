"""Child-process worker: one benchmark configuration, result as JSON on stdout.

Run as ``python -m fewbit.bench.runner '<job json>'`` (the parent, `fewbit.bench.bench`,
starts it with ``MALLOC_MMAP_THRESHOLD_=65536`` so that the CPU resident-size peak is
meaningful). The job fields are those of `Job`. The result is printed on one line
prefixed with `RESULT_PREFIX`.

Gradient error: the child builds the model from ``seed``, converts it, and computes the
gradient of the loss on the fixed batch once with every dropout probability set to 0, so
that the difference from vanilla isolates the approximation (dropout masks would
otherwise differ between configurations). The gradients go to ``grad_path`` as a dict
name -> float32 tensor. Then dropout is restored and the step is profiled.

The timing rounds run in `fewbit.bench.lockstep` children instead (built by `build_job`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

from fewbit.bench.configs import get_config
from fewbit.bench.models import ModelSpec, build_model, make_batch, resolve_spec
from fewbit.profile import (
    TrainStep,
    default_loss,
    profile_step,
    rss_step_peak,
)

__all__ = [
    "Built", "Job", "build_job", "run_job", "stderr_tail", "RESULT_PREFIX", "DTYPES",
    "dropout_disabled",
]

RESULT_PREFIX = "FEWBIT_RESULT "
DTYPES: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Job:
    """What one child measures."""

    config: str
    model: str = "roberta-small"
    batch: Optional[int] = None
    seq: Optional[int] = None
    dtype: str = "fp32"
    device: str = "cpu"
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    grad_path: Optional[str] = None
    rss: bool = False


@contextmanager
def dropout_disabled(model: nn.Module) -> Iterator[None]:
    """Set every dropout module's probability to 0 inside the block, then restore it."""
    saved: list[tuple[nn.modules.dropout._DropoutNd, float]] = []
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            saved.append((module, module.p))
            module.p = 0.0
    try:
        yield
    finally:
        for module, p in saved:
            module.p = p


def _dump_grads(model: nn.Module, step: TrainStep, seed: int, path: str) -> None:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed + 1)
    with dropout_disabled(model):
        step.forward().backward()
    grads = {
        name: p.grad.detach().float().cpu()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    torch.save(grads, path)
    del grads
    model.zero_grad(set_to_none=True)


def stderr_tail(text: str, lines: int) -> list[str]:
    """The last ``lines`` lines of a child's stderr worth reporting: stripped, non-blank, not
    torch.profiler's ``USDT`` trace lines."""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip() and "USDT" not in ln]
    return kept[-lines:]


@dataclass
class Built:
    """A job's resolved model preset, converted model on its device, batch, optimizer and
    training step."""

    spec: ModelSpec
    model: nn.Module
    batch: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    step: TrainStep


def build_job(job: Job) -> Built:
    """Build the job's model from its seed, convert it to its configuration and set up the
    training step (AdamW, the job's autocast dtype, `default_loss`)."""
    if job.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {job.dtype!r}")
    device = torch.device(job.device)
    spec = resolve_spec(job.model, job.batch, job.seq)
    model = get_config(job.config).apply(build_model(spec, job.seed)).to(device)
    batch = {k: v.to(device) for k, v in make_batch(spec, job.seed).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step = TrainStep(model, batch, default_loss, optimizer, DTYPES[job.dtype])
    return Built(spec, model, batch, optimizer, step)


def run_job(job: Job) -> dict[str, Any]:
    """Build, convert and profile one configuration; return the JSON-able result."""
    t0 = time.perf_counter()
    built = build_job(job)
    spec, model, batch, step = built.spec, built.model, built.batch, built.step
    device = torch.device(job.device)
    amp = DTYPES[job.dtype]
    if job.grad_path:
        _dump_grads(model, step, job.seed, job.grad_path)
    torch.manual_seed(job.seed + 2)
    prof = profile_step(
        model,
        batch,
        optimizer=built.optimizer,
        steps=job.steps,
        warmup=job.warmup,
        device=device,
        amp_dtype=amp,
    )
    result: dict[str, Any] = {"job": asdict(job), **prof.to_dict()}
    rss = job.rss and device.type == "cpu"
    result["rss_peak_bytes"] = rss_step_peak(step) if rss else None
    result["n_params"] = sum(p.numel() for p in model.parameters())
    result["model_name"] = spec.name
    result["batch"] = spec.batch
    result["seq"] = spec.seq
    result["torch"] = torch.__version__
    result["child_wall_s"] = time.perf_counter() - t0
    return result


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fewbit.bench.runner '<job json>'", file=sys.stderr)
        return 2
    job = Job(**json.loads(args[0]))
    result = run_job(job)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
