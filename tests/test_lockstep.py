"""fewbit.bench.lockstep: the child protocol in-process, and a real round of child processes
on the tiny preset (one failing configuration among them)."""

from __future__ import annotations

import io

from fewbit.bench.lockstep import READY, TIME_PREFIX, cycle_order, run_lockstep_round, serve
from fewbit.bench.memory import child_env
from fewbit.bench.runner import Job


def test_cycle_order_rotates_so_no_configuration_always_steps_first() -> None:
    names = ["vanilla", "gelu3", "L2"]
    orders = [cycle_order(names, c) for c in range(4)]
    assert [o[0] for o in orders[:3]] == names and orders[3] == orders[0]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert cycle_order([], 5) == []


def test_serve_answers_each_step_with_its_time_then_stops() -> None:
    out = io.StringIO()
    serve(Job("gelu3", model="tiny", steps=1, warmup=1), io.StringIO("step\nstep\nquit\nstep\n"),
          out)  # fmt: skip
    lines = out.getvalue().splitlines()
    assert lines[0] == READY and len(lines) == 3  # nothing after quit
    times = [float(ln[len(TIME_PREFIX) :]) for ln in lines[1:]]
    assert all(t > 0 for t in times)


def test_a_round_times_every_live_child_and_reports_the_failed_one() -> None:
    jobs = [Job(n, model="tiny", steps=2, warmup=1) for n in ("vanilla", "no-such-config", "L2")]
    got = run_lockstep_round(jobs, 3, child_env(), timeout_s=300)
    assert sorted(got.times) == ["L2", "vanilla"]
    assert all(len(t) == 3 and min(t) > 0 for t in got.times.values())
    assert list(got.errors) == ["no-such-config"]
    assert "unknown configuration" in got.errors["no-such-config"]
