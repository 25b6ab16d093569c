"""Command line: ``fewbit bench`` (memory/time/gradient-error table, or ``--convergence``)
and ``fewbit profile`` (saved-activation breakdown of one training step).

Examples::

    fewbit bench                                  # small RoBERTa, default rows, CPU
    fewbit bench --markdown --plot frontier.png   # README table and memory-time frontier
    fewbit bench --preset roberta-base-mrpc --device cuda --json out.json --plot out.png
    fewbit bench --configs gelu3,rand20 --batch 4 --seq 64
    fewbit bench --convergence --plot loss.png    # digits, test accuracy per configuration
    fewbit profile --model roberta-small --config gelu3+rand20
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

__all__ = ["build_parser", "main"]


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "--preset",
        dest="model",
        default="roberta-small",
        help="preset name (roberta-small, roberta-base-mrpc, resnet-small, tiny) or path to a "
        "Hugging Face config JSON (default: roberta-small)",
    )
    p.add_argument("--batch", type=int, default=None, help="batch size (default: preset's)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: preset's)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32, or bf16 autocast with fp32 weights (default: fp32)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (default: 5)")
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="warm-up steps (default: 3; the first steps of a fresh process run slower)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and batch seed (default: 0)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewbit", description="fewbit memory tools")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark configurations, one child process each")
    _add_model_args(bench)
    bench.add_argument(
        "--configs",
        default=None,
        help="comma-separated configurations, or 'all' (default: vanilla, ckpt, offload, "
        "gelu3, ckpt+gelu3, gelu3+rand20, L2, ckpt+L2, compress2; vanilla is always run)",
    )
    bench.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="lockstep timing rounds after the memory pass: per round a fresh process per "
        "configuration, all alive, stepping one at a time in rotation; host memory must hold "
        "every configuration's idle process plus one step's peak (default: 3)",
    )
    bench.add_argument(
        "--plot",
        metavar="PATH",
        default=None,
        help="write the memory-time frontier (PNG; --convergence: loss curves)",
    )
    bench.add_argument(
        "--plot-memory", metavar="PATH", default=None, help="write a bar chart of the peaks"
    )
    bench.add_argument("--timeout", type=float, default=None, help="seconds per configuration")
    bench.add_argument(
        "--rss",
        action="store_true",
        help="also measure each step's resident-memory peak (VmHWM) as an "
        "independent check of the peak; slows the steps",
    )
    bench.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--list", action="store_true", help="list presets and configurations")
    bench.add_argument(
        "--convergence",
        action="store_true",
        help="train on scikit-learn digits instead; report test accuracy",
    )
    bench.add_argument(
        "--conv-model",
        choices=["transformer", "mlp"],
        default="transformer",
        help="model for --convergence (default: transformer)",
    )
    bench.add_argument("--epochs", type=int, default=20, help="epochs for --convergence")
    bench.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="--convergence: average over this many seeds (default: 1)",
    )
    prof = sub.add_parser("profile", help="saved activations of one step, by op and module")
    _add_model_args(prof)
    prof.add_argument("--config", default="vanilla", help="configuration to apply first")
    prof.add_argument("--top", type=int, default=12, help="rows per breakdown (default: 12)")
    return parser


def _config_names(arg: Optional[str]) -> list[str]:
    from fewbit.bench.configs import CONFIGS, DEFAULT_CONFIGS, get_config

    if arg is None:
        return list(DEFAULT_CONFIGS)
    if arg == "all":
        return list(CONFIGS)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    for n in names:
        get_config(n)
    return names


def _list() -> str:
    from fewbit.bench.configs import CONFIGS
    from fewbit.bench.models import PRESETS

    lines = ["presets:"]
    lines += [
        f"  {n:<20} batch {s.batch:>3}  seq {s.seq:>4}  {s.description}" for n, s in PRESETS.items()
    ]
    lines.append("configurations:")
    lines += [f"  {n:<20} {c.description}" for n, c in CONFIGS.items()]
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    from fewbit.bench import report

    if args.list:
        print(_list())
        return 0
    configs = _config_names(args.configs)
    t0 = time.perf_counter()
    if args.convergence:
        from fewbit.bench.convergence import format_convergence, run_convergence

        result = run_convergence(
            configs,
            model=args.conv_model,
            epochs=args.epochs,
            seed=args.seed,
            seeds=args.seeds,
            progress=not args.no_progress,
        )
        print(format_convergence(result))
        if args.plot:
            report.plot_convergence(result, args.plot)
    else:
        from fewbit.bench.memory import run_bench

        result = run_bench(
            configs,
            model=args.model,
            batch=args.batch,
            seq=args.seq,
            dtype=args.dtype,
            device=args.device or _default_device(),
            steps=args.steps,
            warmup=args.warmup,
            seed=args.seed,
            progress=not args.no_progress,
            timeout_s=args.timeout,
            rss=args.rss,
            rounds=args.rounds,
        )
        print(report.format_markdown(result) if args.markdown else report.format_table(result))
        if args.plot:
            report.plot_frontier(result, args.plot)
        if args.plot_memory:
            report.plot_memory(result, args.plot_memory)
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    if args.json:
        report.write_json(result, args.json)
    return 1 if any("error" in r for r in result["rows"]) else 0


def _profile(args: argparse.Namespace) -> int:
    from fewbit.bench.configs import get_config
    from fewbit.bench.models import build_model, make_batch, resolve_spec
    from fewbit.bench.runner import DTYPES
    from fewbit.profile import profile_step

    spec = resolve_spec(args.model, args.batch, args.seq)
    model = get_config(args.config).apply(build_model(spec, args.seed))
    prof = profile_step(
        model,
        make_batch(spec, args.seed),
        steps=args.steps,
        warmup=args.warmup,
        device=args.device or _default_device(),
        amp_dtype=DTYPES[args.dtype],
    )
    print(
        f"model {spec.name}  batch {spec.batch}  seq {spec.seq}  {args.dtype}  config {args.config}"
    )
    print(prof.table(top=args.top))
    if args.json:
        prof.to_json(args.json)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``fewbit`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch", "seq", "epochs", "seeds", "rounds"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"fewbit: --{name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        if args.command == "bench":
            return _bench(args)
        return _profile(args)
    except ValueError as e:
        print(f"fewbit: {e}", file=sys.stderr)
        return 2
