"""One training step: its pieces (`TrainStep`, `default_loss`, `held_bytes`), its timing
(`time_steps`) and its profile (`profile_step` -> `StepProfile`)."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from .peak import cpu_profiler_peak, cuda_peak
from .saved import SavedTensorLog, saved_by_node
from .storage import _unique_nbytes, format_bytes

__all__ = ["TrainStep", "StepProfile", "default_loss", "held_bytes", "profile_step", "time_steps"]

LossFn = Callable[[Any, Any], Tensor]


def _call_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def default_loss(output: Any, batch: Any) -> Tensor:
    """``output.loss`` when the model computes one (Hugging Face with labels), else the
    mean square of the output (``output.logits`` or the first tensor)."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits.float().square().mean()
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"loss_fn is needed: cannot derive a loss from {type(output).__name__}")
    return output.float().square().mean()


def _batch_tensors(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _batch_tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _batch_tensors(v)]
    return []


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    states = optimizer.state.values()
    return [v for state in states for v in state.values() if isinstance(v, Tensor)]


def held_bytes(
    model: nn.Module, batch: Any, optimizer: Optional[torch.optim.Optimizer] = None
) -> int:
    """Bytes held between steps: parameters, buffers, gradients, optimizer state and batch."""
    tensors: list[Tensor] = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += _batch_tensors(batch)
    if optimizer is not None:
        tensors += _optimizer_tensors(optimizer)
    return _unique_nbytes(tensors)


@dataclass
class StepProfile:
    """Memory and time of one training step (all sizes in bytes)."""

    saved_bytes: int
    saved_by_op: dict[str, int]
    saved_by_module: dict[str, int]
    saved_by_module_type: dict[str, int]
    peak_bytes: int
    held_bytes: int
    step_time_s: float
    step_times_s: list[float] = field(default_factory=list)
    device: str = "cpu"
    peak_method: str = "torch.profiler"

    @property
    def peak_total_bytes(self) -> int:
        """Memory held before the step plus the step's peak above it."""
        return self.held_bytes + self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "saved_bytes": self.saved_bytes,
            "saved_by_op": dict(self.saved_by_op),
            "saved_by_module": dict(self.saved_by_module),
            "saved_by_module_type": dict(self.saved_by_module_type),
            "peak_bytes": self.peak_bytes,
            "held_bytes": self.held_bytes,
            "peak_total_bytes": self.peak_total_bytes,
            "step_time_s": self.step_time_s,
            "step_times_s": list(self.step_times_s),
            "device": self.device,
            "peak_method": self.peak_method,
        }

    def to_json(self, path: Union[str, os.PathLike[str]]) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def table(self, top: int = 10) -> str:
        """Readable summary: totals, then the ``top`` operations and modules by saved bytes."""
        lines = [
            f"device {self.device}   step time {self.step_time_s * 1e3:.1f} ms (median)",
            f"held before step   {format_bytes(self.held_bytes):>12}"
            "  (parameters, buffers, optimizer state, batch)",
            f"step peak          {format_bytes(self.peak_bytes):>12}  ({self.peak_method})",
            f"peak total         {format_bytes(self.peak_total_bytes):>12}",
            f"saved for backward {format_bytes(self.saved_bytes):>12}",
        ]
        lines += _share_table("operation", self.saved_by_op, self.saved_bytes, top)
        lines += _share_table("module type", self.saved_by_module_type, self.saved_bytes, top)
        lines += _share_table("module", self.saved_by_module, self.saved_bytes, top)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _share_table(title: str, groups: dict[str, int], total: int, top: int) -> list[str]:
    width = max([len(title)] + [len(k) for k in list(groups)[:top]])
    lines = ["", f"{title:<{width}}  {'saved':>12}  {'share':>6}"]
    for name, n in list(groups.items())[:top]:
        lines.append(f"{name:<{width}}  {format_bytes(n):>12}  {_pct(n, total):>6}")
    rest = list(groups.values())[top:]
    if rest:
        other, n = f"({len(rest)} more)", sum(rest)
        lines.append(f"{other:<{width}}  {format_bytes(n):>12}  {_pct(n, total):>6}")
    return lines


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


class TrainStep:
    """One training step: forward (under autocast when ``amp_dtype`` is set), loss,
    backward, ``optimizer.step()`` and ``zero_grad(set_to_none=True)``."""

    def __init__(
        self,
        model: nn.Module,
        batch: Any,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        amp_dtype: Optional[torch.dtype],
    ):
        self.model = model
        self.batch = batch
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.amp_dtype = amp_dtype

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device, dtype=self.amp_dtype)

    def forward(self) -> Tensor:
        with self._autocast():
            out = _call_model(self.model, self.batch)
            return self.loss_fn(out, self.batch)

    def finish(self, loss: Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self.finish(self.forward())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_peak(step: TrainStep, device: torch.device, held: int) -> tuple[int, int, str]:
    """(held bytes, step peak above them, method); CUDA reads its allocator's counters."""
    if device.type == "cuda":
        base, peak = cuda_peak(step, device)
        return base, peak, "cuda max_memory_allocated"
    return held, cpu_profiler_peak(step), "torch.profiler"


def _record_saved(step: TrainStep, model: nn.Module) -> tuple[SavedTensorLog, dict[str, int]]:
    exclude = list(model.parameters()) + list(model.buffers())
    log = SavedTensorLog(exclude=exclude, model=model)
    with log.record():
        loss = step.forward()
    by_op = saved_by_node([loss.grad_fn], log)
    step.finish(loss)
    del loss
    log.clear()
    return log, by_op


def time_steps(
    step: Callable[[], Any], steps: int, warmup: int = 0, device: Union[str, torch.device] = "cpu"
) -> list[float]:
    """Wall-clock seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed
    calls (CUDA is synchronised before and after each timed call)."""
    dev = torch.device(device)
    for _ in range(warmup):
        step()
    times: list[float] = []
    for _ in range(steps):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return times


def profile_step(
    model: nn.Module,
    batch: Any,
    loss_fn: Optional[LossFn] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    steps: int = 3,
    warmup: int = 1,
    device: Union[str, torch.device, None] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> StepProfile:
    """Profile one training step of ``model`` on ``batch``.

    The step is forward, ``loss_fn(output, batch)`` (default: `default_loss`), backward,
    ``optimizer.step()`` (default: AdamW) and ``zero_grad(set_to_none=True)``. The batch is
    passed as ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple/list, else
    ``model(batch)``. After ``warmup`` steps (so the optimizer state exists), one step is
    recorded for saved tensors, one for peak memory, then ``steps`` steps are timed.
    ``amp_dtype`` runs forward under `torch.autocast` with that dtype. The model's
    parameters are updated (it trains on ``batch``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError("model has no parameters: there is no training step to profile")
    dev = torch.device(device) if device is not None else first.device
    model.to(dev)
    batch = _to_device(batch, dev)
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step = TrainStep(model, batch, loss_fn or default_loss, optimizer, amp_dtype)
    for _ in range(warmup):
        step()
    log, by_op = _record_saved(step, model)
    held, peak, method = _measure_peak(step, dev, held_bytes(model, batch, optimizer))
    times = time_steps(step, steps, 0, dev)
    return StepProfile(
        saved_bytes=log.total,
        saved_by_op=by_op,
        saved_by_module=log.by_module(),
        saved_by_module_type=log.by_module_type(),
        peak_bytes=int(peak),
        held_bytes=int(held),
        step_time_s=statistics.median(times),
        step_times_s=times,
        device=str(dev),
        peak_method=method,
    )
