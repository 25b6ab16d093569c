"""CI runs benchmarks/gpu_check.py --cpu-dry-run: its correctness rows at toy sizes on the CPU,
Triton kernels in the interpreter with the kernel dispatch forced (a fresh process: the script
sets TRITON_INTERPRET=1 before importing triton)."""

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def dry_run() -> tuple[int, list[tuple[str, str, str]]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run"], capture_output=True,
                          text=True, env=env, timeout=300, check=False)  # fmt: skip
    table = proc.stdout.split("=" * 118)[1] if proc.stdout.count("=" * 118) >= 2 else ""
    rows = []
    for line in table.splitlines()[3:]:
        section, rest = line[:8].strip(), line[9:]
        rows.append((section, rest[:44].strip(), rest[45:51].strip()))
    assert rows, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.returncode, rows


def test_dry_run_rows_pass(dry_run: tuple[int, list]) -> None:
    status, rows = dry_run
    sections = {r[0] for r in rows}
    assert {"check", "big", "roberta"} <= sections
    # every activation x dtype x size row and the layout, NaN, pack, quantize, sketch rows ran
    assert sum(r[0] == "check" for r in rows) >= 50
    failed = [r for r in rows if r[2] != "PASS"]
    assert not failed
    # the exit status says whether anything failed
    assert status == 0
