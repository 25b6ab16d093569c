"""Tests of the `fewbit` command line: argument parsing, errors, and a tiny end-to-end
`fewbit bench` run (two configurations, each in its own child process)."""

from __future__ import annotations

import json
import os

import pytest

from fewbit.cli import build_parser, main


def test_parser_defaults_and_preset_alias() -> None:
    args = build_parser().parse_args(["bench"])
    assert (args.model, args.dtype, args.configs) == ("roberta-small", "fp32", None)
    assert (args.steps, args.warmup) == (5, 3)  # 0.3.0: longer warm-up, more timed steps
    args = build_parser().parse_args(["bench", "--preset", "roberta-base-mrpc", "--dtype", "bf16"])
    assert (args.model, args.dtype) == ("roberta-base-mrpc", "bf16")
    assert build_parser().parse_args(["profile", "--config", "gelu3"]).config == "gelu3"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--dtype", "int4"])
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_list_and_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "roberta-base-mrpc" in out and "gelu3+rand20" in out
    assert main(["bench", "--configs", "vanilla,nope"]) == 2
    assert "unknown configuration 'nope'" in capsys.readouterr().err
    assert main(["bench", "--steps", "0"]) == 2
    assert main(["bench", "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "--plot", "f.png", "--plot-memory", "m.png"])
    assert (args.plot, args.plot_memory, args.rounds) == ("f.png", "m.png", 3)
    assert main(["bench", "--model", "no-such-model", "--configs", "vanilla"]) == 2
    assert "preset" in capsys.readouterr().err


def test_tiny_bench_end_to_end(tmp_path: os.PathLike[str],
                               capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(tmp_path, "bench.json")
    status = main(["bench", "--model", "tiny", "--configs", "gelu3,offload", "--steps", "1",
                   "--rounds", "2", "--no-progress", "--rss", "--json", path])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "vanilla" in out and "gelu3" in out and "wall time" in out
    with open(path) as f:
        report = json.load(f)
    assert report["settings"]["model"] == "tiny"
    vanilla, gelu3, offload = report["rows"]
    for key in ("peak_total_bytes", "saved_bytes", "step_time_s", "time_ratio",
                "peak_saving_pct", "grad_rel_err", "rss_peak_bytes", "saved_by_op"):
        assert key in vanilla and key in gelu3
    # two lockstep timing rounds, each a fresh child per configuration timing one step
    assert len(gelu3["round_medians_s"]) == 2 and len(gelu3["step_times_s"]) == 2
    assert len(gelu3["time_ratio_range"]) == 2
    # save_on_cpu offloads GPU tensors: on the CPU the row says so instead of a number
    assert "does not apply on cpu" in offload["skipped"] and "n/a" in out
    assert vanilla["time_ratio"] == 1.0 and vanilla["grad_rel_err"] == 0.0
    assert gelu3["saved_bytes"] < vanilla["saved_bytes"]
    # --rss: each child ran in a fresh process with the malloc setting; RSS peak was measured
    assert vanilla["rss_peak_bytes"] > 0
    assert report["settings"]["rss"] is True


def test_profile_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "tiny", "--steps", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "saved for backward" in out and "AddmmBackward0" in out
