"""Peak memory of a function on the CPU: torch.profiler allocation events, or the resident
high-water mark (Linux)."""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["cpu_profiler_memory", "cpu_profiler_peak", "cuda_peak", "rss_step_peak"]


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
    return cpu_profiler_memory(fn)[0]


def cpu_profiler_memory(fn: Callable[[], Any]) -> tuple[int, int]:
    """(peak, held): bytes allocated by ``fn`` above what was allocated before it, at their
    peak and when ``fn`` has returned, with its result still alive (so ``held`` counts the
    result and whatever autograd saved for it; ``peak - held`` is the transient memory).
    CPU only, from `torch.profiler` allocation events as `cpu_profiler_peak`.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        result = fn()
    running = 0
    peak = 0
    for _, size in _allocation_events(prof):
        running += size
        peak = max(peak, running)
    del result
    return peak, running


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


def cuda_peak(fn: Callable[[], Any], device: torch.device) -> tuple[int, int]:
    """(bytes allocated on CUDA ``device`` before ``fn()``, peak allocated during it above
    them), from the caching allocator's counters (synchronized before and after)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return base, torch.cuda.max_memory_allocated(device) - base
