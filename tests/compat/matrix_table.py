"""Print the compatibility matrix as a Markdown table from a pytest JUnit XML report.

    python -m pytest tests/compat --junitxml=compat.xml
    python tests/compat/matrix_table.py compat.xml

Each cell is ``pass``, ``xfail`` (with a numbered note giving the reason), ``FAIL`` or ``-``
(no test). A cell backed by several tests (the level rows' autocast cells also run a tiny
Llama through Hugging Face attention) shows the worst outcome.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Tuple

ROWS = ["gelu3", "randomized", "L1", "L2", "L3", "L3.1", "L4", "L5", "generic"]
ROW_NAMES = {
    "gelu3": "few-bit activations (`fewbit.GELU(bits=3)`)",
    "randomized": "`RandomizedLinear`",
    "L1": "`QModule` L1",
    "L2": "`QModule` L2",
    "L3": "`QModule` L3",
    "L3.1": "`QModule` L3.1",
    "L4": "`QModule` L4",
    "L5": "`QModule` L5",
    "generic": "generic mode (`fewbit.compress(bits=2)`)",
}
COLUMNS = ["compile", "compile fullgraph", "autocast bf16", "autocast fp16", "ckpt non-reentrant",
           "ckpt reentrant", "DDP", "FSDP2", "HF Trainer", "PEFT LoRA", "meta init"]
RANK = {"pass": 0, "xfail": 1, "FAIL": 2}


def cell_of(name: str) -> Optional[Tuple[str, str]]:
    """(row, column) of a test id such as ``test_autocast[bf16-L2]``."""
    m = re.fullmatch(r"(test_\w+?)(?:\[(.*)\])?", name)
    if m is None:
        return None
    test, params = m.group(1), (m.group(2) or "").split("-")
    row = params[-1]
    if test == "test_peft_lora_generic":
        return "generic", "PEFT LoRA"
    simple = {"test_compile_default": "compile", "test_compile_fullgraph": "compile fullgraph",
              "test_meta_init": "meta init", "test_ddp": "DDP", "test_fsdp2": "FSDP2",
              "test_trainer": "HF Trainer", "test_peft_lora": "PEFT LoRA"}
    if test in simple:
        return row, simple[test]
    if test in ("test_autocast", "test_autocast_hf_attention"):
        return row, f"autocast {params[0]}"
    if test == "test_checkpoint":
        return row, "ckpt reentrant" if params[0] == "reentrant" else "ckpt non-reentrant"
    return None


def outcomes(path: str) -> Dict[Tuple[str, str], Tuple[str, str]]:
    cells: Dict[Tuple[str, str], Tuple[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        where = cell_of(case.get("name", ""))
        if where is None:
            continue
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            result = ("FAIL", "")
        elif skipped is not None and "xfail" in (skipped.get("type") or ""):
            result = ("xfail", skipped.get("message", ""))
        elif skipped is not None:
            result = ("FAIL", "skipped: " + skipped.get("message", ""))
        else:
            result = ("pass", "")
        old = cells.get(where)
        if old is None or RANK[result[0]] > RANK[old[0]]:
            cells[where] = result
    return cells


def table(cells: Dict[Tuple[str, str], Tuple[str, str]]) -> str:
    notes: List[str] = []
    lines = ["| | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for row in ROWS:
        out = []
        for col in COLUMNS:
            status, reason = cells.get((row, col), ("-", ""))
            if reason:
                reason = reason.removeprefix("reason: ")
                if reason not in notes:
                    notes.append(reason)
                status += f" ({notes.index(reason) + 1})"
            out.append(status)
        lines.append(f"| {ROW_NAMES[row]} | " + " | ".join(out) + " |")
    lines.append("")
    lines += [f"({i}) {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(outcomes(sys.argv[1])))
