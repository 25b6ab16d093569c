"""Logic of benchmarks/ops.py without running its (long) measurements: argument checks, the
peak-memory helper on a known allocation, the table."""

import importlib.util
import pathlib
import sys

import torch

PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ops.py"
spec = importlib.util.spec_from_file_location("bench_ops", PATH)
ops = importlib.util.module_from_spec(spec)
sys.modules["bench_ops"] = ops  # dataclasses look their module up
spec.loader.exec_module(ops)


def test_peak_bytes_sees_a_temporary() -> None:
    def fn() -> None:
        t = torch.empty(1 << 20, dtype=torch.uint8)  # 1 MiB, freed at return
        t.fill_(1)

    assert ops.peak_bytes(fn, torch.device("cpu")) >= 1 << 20


def test_n_must_be_a_multiple_of_4096(capsys) -> None:
    assert ops.main(["--n", "5000", "--reps", "1"]) == 2
    assert "multiple of 4096" in capsys.readouterr().err


def test_format_table_marks_missed_goals() -> None:
    rows = [ops.Row("gelu3 fwd+bwd", "float32", 13.0, 10.0, "ms", 1.3, "<= 1.3x", True),
            ops.Row("transient gelu3 fwd", "bfloat16", 3.5, 2.0, "MiB", 1.75, "<= 1.1x", False)]
    text = ops.format_table(rows, "header")
    assert text.splitlines()[0] == "header"
    assert "ok" in text.splitlines()[2] and "MISSED" in text.splitlines()[3]


def test_memory_bytes_separates_held_result_from_temporaries() -> None:
    def fn() -> torch.Tensor:
        tmp = torch.ones(2 << 20, dtype=torch.uint8)  # 2 MiB temporary, freed at return
        out = torch.empty(1 << 20, dtype=torch.uint8)  # 1 MiB result, alive after the call
        out.copy_(tmp[: 1 << 20])
        return out

    peak, held = ops.memory_bytes(fn, torch.device("cpu"))
    assert held == 1 << 20  # exactly the returned tensor
    assert peak >= 3 << 20  # both alive at once
