"""Lockstep timing: every configuration in its own process, one training step at a time.

A timing round of `fewbit bench` starts one child per configuration (``python -m
fewbit.bench.lockstep '<job json>'``), one after the other; each builds its model, runs its
warm-up steps and says it is ready, then waits. The parent then asks for one untimed and
``steps`` timed cycles of one step from each child in turn (the order rotated every cycle),
so the steps of all
configurations alternate within seconds: a slow spell of a shared machine (other jobs, another
VM on the same host) slows every configuration alike instead of whichever happened to run
then. Each configuration keeps a process of its own (its own heap and allocator state, as in a
user's training run), and only one step runs at a time: an idle child blocks on its pipe.

Protocol: the child prints ``READY`` after its warm-up, then answers each ``step`` line on its
stdin with ``TIME <seconds>`` and exits on ``quit`` or end of input. Its stderr goes to a file
(a full pipe would block it); the last lines are reported when it fails.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Optional

import torch

from fewbit.bench.runner import Job, build_job, stderr_tail
from fewbit.profile.step import time_steps

__all__ = ["LockstepRound", "run_lockstep_round", "cycle_order"]

READY = "READY"
TIME_PREFIX = "TIME "


@dataclass
class LockstepRound:
    """Step times (seconds) per configuration of one round, and the errors of the children
    that failed (their configurations have no times in this round)."""

    times: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[str]
    stderr: IO[str]


def cycle_order(names: list[str], cycle: int) -> list[str]:
    """Order of the children in cycle ``cycle``: rotated by one each cycle, so that no
    configuration always steps first or right after the same neighbour."""
    k = cycle % len(names) if names else 0
    return names[k:] + names[:k]


def _read_line(child: _Child, timeout_s: Optional[float]) -> str:
    """The child's next stdout line; ``""`` on end of output or after ``timeout_s``."""
    assert child.proc.stdout is not None
    ready, _, _ = select.select([child.proc.stdout], [], [], timeout_s)
    if not ready:
        return ""
    return child.proc.stdout.readline()


def _failure(child: _Child, what: str) -> str:
    child.proc.kill()
    child.proc.wait()
    child.stderr.seek(0)
    tail = stderr_tail(child.stderr.read(), 1)
    return f"{what}: {tail[-1] if tail else 'no output'}"


def _start(job: Job, env: dict[str, str], timeout_s: Optional[float]) -> _Child | str:
    """Start the child of ``job`` and wait for its ``READY``; the child, or an error."""
    stderr = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fewbit.bench.lockstep", json.dumps(asdict(job))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    child = _Child(job.config, proc, stderr)
    while True:
        line = _read_line(child, timeout_s)
        if not line:
            return _failure(child, "no READY (failed or timed out while building)")
        if line.strip() == READY:
            return child


def _step(child: _Child, timeout_s: Optional[float]) -> float | str:
    """One timed step of the child: its seconds, or an error."""
    assert child.proc.stdin is not None
    try:
        child.proc.stdin.write("step\n")
        child.proc.stdin.flush()
    except BrokenPipeError:
        return _failure(child, "exited")
    while True:
        line = _read_line(child, timeout_s)
        if not line:
            return _failure(child, "no step time (failed or timed out)")
        if line.startswith(TIME_PREFIX):
            return float(line[len(TIME_PREFIX) :])


def _stop(child: _Child) -> None:
    try:
        assert child.proc.stdin is not None
        child.proc.stdin.write("quit\n")
        child.proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    try:
        child.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.wait()
    child.stderr.close()


def run_lockstep_round(
    jobs: list[Job], steps: int, env: dict[str, str], timeout_s: Optional[float] = None
) -> LockstepRound:
    """Start every job's child (one after the other, each through its warm-up), then run one
    untimed cycle and ``steps`` timed cycles of one step per live child; stop them all. The
    times of a configuration are in cycle order (entry ``c`` of every list ran in cycle
    ``c``). ``timeout_s`` bounds each wait for a child (its build and warm-up, or one step)."""
    result = LockstepRound()
    children: list[_Child] = []
    try:
        for job in jobs:
            started = _start(job, env, timeout_s)
            if isinstance(started, str):
                result.errors[job.config] = started
            else:
                children.append(started)
                result.times[job.config] = []
        # cycle -1 is untimed: a child's first step after waiting for the others to build
        # and warm up ran up to 2x slower than the next ones
        for cycle in range(-1, steps):
            by_name = {c.name: c for c in children}
            for name in cycle_order([c.name for c in children], cycle):
                got = _step(by_name[name], timeout_s)
                if isinstance(got, str):
                    result.errors[name] = got
                    del result.times[name]
                    children = [c for c in children if c.name != name]
                elif cycle >= 0:
                    result.times[name].append(got)
    finally:
        for child in children:
            _stop(child)
    return result


def serve(job: Job, stdin: IO[str], stdout: IO[str]) -> None:
    """The child: build the job, warm up, print READY, then one timed step per ``step``."""
    built = build_job(job)
    torch.manual_seed(job.seed + 2)
    time_steps(built.step, 0, job.warmup, job.device)
    stdout.write(READY + "\n")
    stdout.flush()
    for line in stdin:
        if line.strip() != "step":
            break
        seconds = time_steps(built.step, 1, 0, job.device)[0]
        stdout.write(f"{TIME_PREFIX}{seconds!r}\n")
        stdout.flush()


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fewbit.bench.lockstep '<job json>'", file=sys.stderr)
        return 2
    start = time.perf_counter()
    serve(Job(**json.loads(args[0])), sys.stdin, sys.stdout)
    print(f"lockstep child done after {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
