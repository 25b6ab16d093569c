"""``python -m fewbit.approx``: regenerate the shipped tables, or ``--report`` their errors.

The functions are the table variants of the activation registry
(:mod:`fewbit.approx.registry`); ``--missing`` builds only those the data file lacks (what a
newly registered activation needs).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from .functions import CONTINUOUS
from .store import DATA_FILE, generate, read_data, report, write_data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fewbit.approx",
        description="Regenerate the optimal derivative tables (tables.json) or report errors.",
    )
    parser.add_argument("--out", default=str(DATA_FILE), help="data file to write (merged)")
    parser.add_argument(
        "--functions", nargs="+", choices=sorted(CONTINUOUS), help="functions (default: all)"
    )
    parser.add_argument(
        "--bits", nargs="+", type=int, choices=range(1, 9), help="bit widths (default: 1..8)"
    )
    parser.add_argument(
        "--report", action="store_true", help="print a markdown table of errors for b=1..4"
    )
    parser.add_argument(
        "--missing",
        action="store_true",
        help="only the registry's functions that the data file lacks (default functions)",
    )
    args = parser.parse_args(argv)
    if args.missing and args.functions is None:
        args.functions = missing_functions(args.out)
        if not args.functions:
            print(f"{args.out} has every registered function")
            return 0
    if args.report:
        print(report(args.functions, args.bits or (1, 2, 3, 4)))
        return 0
    start = time.perf_counter()
    fresh = generate(args.functions, args.bits or range(1, 9))
    data = read_data(args.out) or fresh
    data.update({key: value for key, value in fresh.items() if key != "functions"})
    for name, item in fresh["functions"].items():
        old = data["functions"].get(name)
        if old is not None and old is not item and old["params"] == item["params"]:
            old["tables"].update(item["tables"])
            old["tables"] = dict(sorted(old["tables"].items(), key=lambda kv: int(kv[0])))
        else:
            data["functions"][name] = item
    data["functions"] = dict(sorted(data["functions"].items()))
    write_data(data, args.out)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.out} ({len(fresh['functions'])} functions) in {elapsed:.1f} s")
    return 0


def missing_functions(path: str) -> list[str]:
    """Table functions of the registry that the data file at ``path`` does not hold."""
    data = read_data(path) or {"functions": {}}
    return [name for name in sorted(CONTINUOUS) if name not in data["functions"]]


if __name__ == "__main__":
    sys.exit(main())
