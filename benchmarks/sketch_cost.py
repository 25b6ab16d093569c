"""Cost and accuracy of the randomized-linear sketches on the CPU (issue 10, item 3).

For one linear layer of a roberta-small-sized model (N = batch x sequence rows) this times
forward+backward of ``linear_randomized`` for every ``matmul`` against ``F.linear``, and
measures the relative Frobenius error of the weight gradient over ``--draws`` draws against
the exact one, next to the theoretical RMS error. Kinds are interleaved over repeats so that
a noisy machine affects them alike; the median and the spread are printed.

    python benchmarks/sketch_cost.py --rows 2048 --fin 256 --fout 1024 --ratio 0.2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fewbit.codecs.sketch import SKETCHES
from fewbit.functional.linear import linear_randomized


def _step(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, kind: str, ratio: float) -> None:
    if kind == "exact":
        y = F.linear(x, w)
    else:
        y = linear_randomized(x, w, proj_dim_ratio=ratio, matmul=kind)
    y.backward(g)


def _theory(kind: str, g: torch.Tensor, x: torch.Tensor, k: int) -> float:
    """Expected ||estimate - G^T X||_F / ||G^T X||_F of one draw (fewbit.codecs.sketch)."""
    gx = g.t() @ x
    gn, xn = g.norm(dim=1) ** 2, x.norm(dim=1) ** 2
    if kind == "gaussian":
        v = g.norm() ** 2 * x.norm() ** 2 + gx.norm() ** 2
    elif kind in ("rademacher", "countsketch"):
        v = g.norm() ** 2 * x.norm() ** 2 + gx.norm() ** 2 - 2 * (gn * xn).sum()
    else:
        p = x.norm(dim=1) / x.norm(dim=1).sum()
        v = (gn * xn / p).sum() - gx.norm() ** 2
    return float((v / k).sqrt() / gx.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--fin", type=int, default=256)
    parser.add_argument("--fout", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.fin)
    w = torch.randn(args.fout, args.fin, requires_grad=True)
    # Output gradients correlated with the input, as in a trained layer.
    g = x @ torch.randn(args.fin, args.fout) / args.fin**0.5 + torch.randn(args.rows, args.fout)
    kinds = ["exact", *SKETCHES]
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for kind in kinds:
        _step(x, w, g, kind, args.ratio)  # warm-up
    for _ in range(args.repeats):
        for kind in kinds:
            start = time.perf_counter()
            _step(x, w, g, kind, args.ratio)
            times[kind].append(time.perf_counter() - start)
    exact = (g.t() @ x).double()
    k = max(1, round(args.ratio * args.rows))
    print(f"N={args.rows} in={args.fin} out={args.fout} k={k} threads={torch.get_num_threads()}")
    print(f"{'matmul':<12} {'fwd+bwd ms':>10} {'spread':>8} {'vs exact':>8} "
          f"{'rel. error':>10} {'theory':>8}")
    base = statistics.median(times["exact"])
    for kind in kinds:
        median = statistics.median(times[kind])
        spread = max(times[kind]) - min(times[kind])
        error = theory = 0.0
        if kind != "exact":
            errors = []
            for _ in range(args.draws):
                w.grad = None
                _step(x, w, g, kind, args.ratio)
                assert w.grad is not None
                errors.append(float((w.grad.double() - exact).norm() / exact.norm()))
            error = statistics.fmean(e * e for e in errors) ** 0.5
            theory = _theory(kind, g.double(), x.double(), k)
        print(f"{kind:<12} {1e3 * median:>10.2f} {1e3 * spread:>8.2f} {median / base:>8.2f} "
              f"{error:>10.4f} {theory:>8.4f}")


if __name__ == "__main__":
    main()
