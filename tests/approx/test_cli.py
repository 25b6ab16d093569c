"""``python -m fewbit.approx``: regeneration (merged into an existing file) and --report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewbit.approx import store
from fewbit.approx.__main__ import main, missing_functions


def test_regenerate_subset_into_new_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tables.json"
    assert main(["--out", str(out), "--functions", "tanh", "--bits", "1", "2"]) == 0
    data = store.read_data(out)
    assert data is not None and data["density"] == "normal" and data["range"] == [-8.0, 8.0]
    entries = data["functions"]["tanh"]["tables"]
    assert sorted(entries) == ["1", "2"]
    assert entries["2"]["symmetric"] and len(entries["2"]["levels"]) == 4
    assert entries["2"]["rms"] < entries["2"]["rms_full"]
    # A second run with other bits merges instead of replacing.
    assert main(["--out", str(out), "--functions", "tanh", "--bits", "3"]) == 0
    assert sorted(json.loads(out.read_text())["functions"]["tanh"]["tables"]) == ["1", "2", "3"]
    assert "wrote" in capsys.readouterr().out


def test_report_is_markdown(capsys: pytest.CaptureFixture) -> None:
    assert main(["--report", "--functions", "gelu", "tanh", "--bits", "1", "2"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| function | table form | b=1 | b=2 |"
    assert len(lines) == 2 + 4  # header, rule, two forms for each function
    assert any("gelu" in line and "full line" in line for line in lines)
    assert any("(even f')" in line and "**" in line for line in lines)


def test_shipped_file_is_compact() -> None:
    assert store.DATA_FILE.stat().st_size < 1_000_000


def test_missing_builds_only_functions_the_file_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "tables.json"
    assert main(["--out", str(out), "--functions", "tanh", "--bits", "1"]) == 0
    lacking = [n for n in sorted(store.CONTINUOUS) if n != "tanh"]
    assert missing_functions(str(out)) == lacking
    assert missing_functions(str(store.DATA_FILE)) == []  # the shipped file is complete
    assert main(["--out", str(store.DATA_FILE), "--missing"]) == 0  # nothing to build
    assert "has every registered function" in capsys.readouterr().out
