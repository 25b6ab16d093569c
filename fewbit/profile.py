"""Memory profiler for one training step.

`profile_step(model, batch)` runs forward, backward and an optimizer step and reports

* the bytes saved for backward (deduplicated by untyped storage, parameters and buffers
  excluded), grouped by the autograd operation that saved them and by module path;
* the peak memory of the step above the memory held before it (CUDA: the caching
  allocator's ``max_memory_allocated``; CPU: torch.profiler's allocation events summed in
  time order);
* the step time (median of several steps after warm-up).

`saved_bytes(fn)` is the one-number helper: bytes saved for backward while ``fn`` runs.

Attribution. A pack hook (`torch.autograd.graph.saved_tensors_hooks`) sees every saved
tensor but not the operation saving it, so the operation is found afterwards by walking
the autograd graph from the loss and reading each node's saved tensors (``_saved_*``
attributes of built-in nodes, ``saved_tensors`` of custom `Function` nodes). A storage
saved by several nodes (a ReLU output that the next Linear saves too) counts once, for
the node created first in the forward pass. The module path is the innermost module
whose forward was running when the tensor was saved (forward pre/post hooks).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from .compress import observe_saved
from .util import saved_tensors_of

__all__ = [
    "StepProfile",
    "profile_step",
    "saved_bytes",
    "SavedTensorLog",
    "storage_key",
    "storage_nbytes",
    "cpu_profiler_peak",
    "rss_step_peak",
    "format_bytes",
    "TrainStep",
    "default_loss",
    "held_bytes",
    "time_steps",
]

LossFn = Callable[[Any, Any], Tensor]
StorageKey = tuple[str, int]

UNATTRIBUTED = "(unattributed)"
RECORD = "(fewbit quantized record)"
ROOT = "(model)"
OUTSIDE = "(outside modules)"


# --------------------------------------------------------------------------- storages


def storage_key(t: Tensor) -> StorageKey:
    """Identity of the untyped storage behind ``t`` (device, data pointer)."""
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. subclasses)
        return ("id", id(t))


def storage_nbytes(t: Tensor) -> int:
    """Bytes of the whole untyped storage behind ``t`` (a saved view keeps all of it)."""
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def _storage_keys(tensors: Iterable[Tensor]) -> set[StorageKey]:
    return {storage_key(t) for t in tensors}


def _unique_nbytes(tensors: Iterable[Tensor]) -> int:
    seen: dict[StorageKey, int] = {}
    for t in tensors:
        seen.setdefault(storage_key(t), storage_nbytes(t))
    return sum(seen.values())


# --------------------------------------------------------------------------- saved tensors


class SavedTensorLog:
    """Records tensors saved for backward while active (a context manager).

    Each untyped storage counts once. Storages listed in ``exclude`` (parameters,
    buffers) are ignored. The log keeps a reference to each saved tensor until
    `clear()` so that a freed storage's address cannot be reused and miscounted.
    """

    def __init__(self, exclude: Iterable[Tensor] = (), model: Optional[nn.Module] = None):
        self.exclude = _storage_keys(exclude)
        self.nbytes: dict[StorageKey, int] = {}
        self.module_of: dict[StorageKey, str] = {}
        self.type_of: dict[StorageKey, str] = {}
        self._keep: list[Tensor] = []
        self._stack: list[tuple[str, str]] = []
        self._model = model
        self._handles: list[Any] = []

    # module path tracking -------------------------------------------------
    def _push(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append((name, type(module).__name__))

        return hook

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def _pack(self, t: Tensor) -> Tensor:
        key = storage_key(t)
        if key not in self.exclude and key not in self.nbytes:
            self.nbytes[key] = storage_nbytes(t)
            name, kind = self._stack[-1] if self._stack else (OUTSIDE, OUTSIDE)
            self.module_of[key] = name
            self.type_of[key] = kind
            self._keep.append(t)
        return t

    def _observe(self, kept: object, nbytes: int) -> None:
        """What fewbit's own pack hooks keep (they hide it from `_pack`, hooks nest)."""
        if isinstance(kept, Tensor):
            self._pack(kept)
            return
        key = (RECORD, id(kept))
        if key not in self.nbytes:
            self.nbytes[key] = nbytes
            name, kind = self._stack[-1] if self._stack else (OUTSIDE, OUTSIDE)
            self.module_of[key] = name
            self.type_of[key] = kind
            self._keep.append(kept)  # keeps id(kept) from being reused while logged

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    @contextmanager
    def record(self) -> Iterator[SavedTensorLog]:
        """Context in which saved tensors (and the running module) are recorded."""
        if self._model is not None:
            for name, module in self._model.named_modules():
                label = name or ROOT
                self._handles.append(module.register_forward_pre_hook(self._push(label)))
                self._handles.append(module.register_forward_hook(self._pop, always_call=True))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                with observe_saved(self._observe):
                    yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._stack.clear()

    @property
    def total(self) -> int:
        return sum(self.nbytes.values())

    def by_module(self) -> dict[str, int]:
        """Bytes per path of the innermost module running when the tensor was saved."""
        return _group(self.nbytes, self.module_of)

    def by_module_type(self) -> dict[str, int]:
        """Bytes per class name of that innermost module."""
        return _group(self.nbytes, self.type_of)

    def clear(self) -> None:
        self._keep.clear()


def _group(nbytes: dict[StorageKey, int], label: dict[StorageKey, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, n in nbytes.items():
        out[label[key]] = out.get(label[key], 0) + n
    return _sorted_desc(out)


def _node_name(node: Any) -> str:
    try:
        return str(node.name())
    except (AttributeError, RuntimeError):
        return type(node).__name__


def _graph_nodes(roots: Sequence[Any]) -> list[Any]:
    seen: set[int] = set()
    order: list[Any] = []
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is not None:
                stack.append(nxt)
    return order


def _sequence_nr(node: Any) -> int:
    try:
        return int(node._sequence_nr())
    except (AttributeError, RuntimeError):
        return 1 << 62


def saved_by_node(roots: Sequence[Any], log: SavedTensorLog) -> dict[str, int]:
    """Group the log's storages by the autograd node (first in forward order) saving them."""
    owner: dict[StorageKey, tuple[int, str]] = {}
    for node in _graph_nodes(roots):
        seq = _sequence_nr(node)
        name = _node_name(node)
        for t in saved_tensors_of(node):
            key = storage_key(t)
            if key in log.nbytes and (key not in owner or seq < owner[key][0]):
                owner[key] = (seq, name)
    out: dict[str, int] = {}
    for key, n in log.nbytes.items():
        name = owner[key][1] if key in owner else RECORD if key[0] == RECORD else UNATTRIBUTED
        out[name] = out.get(name, 0) + n
    return _sorted_desc(out)


def saved_bytes(
    fn: Callable[..., Any], *args: Any, exclude: Optional[Iterable[Tensor]] = None, **kwargs: Any
) -> int:
    """Bytes saved for backward while ``fn(*args, **kwargs)`` runs.

    Each untyped storage counts once, at its full size. Parameters and buffers of ``fn``
    (when it is an `nn.Module`) and the tensors in ``exclude`` do not count.
    """
    excluded: list[Tensor] = list(exclude) if exclude is not None else []
    if isinstance(fn, nn.Module):
        excluded.extend(fn.parameters())
        excluded.extend(fn.buffers())
    log = SavedTensorLog(exclude=excluded)
    with log.record():
        fn(*args, **kwargs)
    total = log.total
    log.clear()
    return total


# --------------------------------------------------------------------------- peak memory


def _allocation_events(prof: torch.profiler.profile) -> list[tuple[int, int]]:
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((int(node.start_time_ns), int(node.extra_fields.alloc_size)))
        stack.extend(node.children)
    events.sort()
    return events


def cpu_profiler_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it, on the CPU.

    Runs ``fn`` under `torch.profiler` with ``profile_memory=True`` and returns the maximum
    of the running sum of allocation sizes (frees are negative) in time order.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    running = 0
    peak = 0
    for _, size in _allocation_events(prof):
        running += size
        peak = max(peak, running)
    return peak


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def rss_step_peak(fn: Callable[[], Any]) -> int:
    """Peak resident memory of this process during ``fn`` above its resident size before.

    Resets the high-water mark (``5 > /proc/self/clear_refs``), runs ``fn`` and reads
    ``VmHWM``. Linux only. Meaningful only in a process started with
    ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the OS at once
    (setting it later with ``mallopt`` is not enough: memory freed before stays resident
    and is reused without raising VmHWM).
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


# --------------------------------------------------------------------------- one step


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


def _sorted_desc(d: dict[str, int]) -> dict[str, int]:
    return dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def format_bytes(n: float) -> str:
    """Human-readable size with binary units (KiB, MiB, GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


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
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
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
