"""linear_randomized / linear_grp / linear_crs: exact forward, exact input and bias
gradients, unbiased weight gradient, saved bytes, seeding, dtypes, autocast."""

import pytest
import torch
import torch.nn.functional as F

from fewbit.functional.linear import linear_crs, linear_grp, linear_randomized
from fewbit.util import memory_usage_hooks

KINDS = ["gaussian", "rademacher", "countsketch", "sampling"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _grads(y: torch.Tensor, g: torch.Tensor, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(y, ts, g)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16,), (5, 16), (3, 7, 16), (2, 3, 4, 16)])
def test_forward_and_exact_grads(kind: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    b = torch.randn(8, dtype=dtype, requires_grad=True)
    y = linear_randomized(x, w, b, proj_dim_ratio=0.3, matmul=kind)
    ref = F.linear(x, w, b)
    assert y.dtype == ref.dtype and torch.equal(y, ref)  # bitwise
    g = torch.randn_like(ref)
    gx, gw, gb = _grads(y, g, x, w, b)
    rx, rw, rb = _grads(ref, g, x, w, b)
    assert torch.equal(gx, rx) and torch.equal(gb, rb)  # exact, same kernels
    assert gw.shape == rw.shape and gw.dtype == rw.dtype and torch.isfinite(gw).all()


def test_non_contiguous_input() -> None:
    base = torch.randn(16, 6, 5, requires_grad=True)
    x = base.transpose(0, 2)  # (5, 6, 16), non-contiguous
    w = torch.randn(4, 16, requires_grad=True)
    y = linear_randomized(x, w, None, proj_dim=30)  # k = N = 30: exact weight gradient
    ref = F.linear(x, w)
    assert torch.equal(y, ref)
    g = torch.randn_like(ref)
    got, want = _grads(y, g, base, w), _grads(ref, g, base, w)
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-5)  # fp32 sum-order rounding


@pytest.mark.parametrize("kind", KINDS)
def test_full_sketch_is_exact(kind: str) -> None:
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 5, 3, dtype=torch.float64)
    (gw,) = _grads(linear_randomized(x, w, proj_dim=20, matmul=kind), g, w)  # k = N = 20
    assert torch.allclose(gw, g.reshape(-1, 3).t() @ x.reshape(-1, 6), rtol=1e-12, atol=1e-12)


def _variance(kind: str, g: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """E||estimate - G^T X||_F^2 for one draw (formulas of fewbit.codecs.sketch)."""
    gx = g.t() @ x
    gn, xn = g.norm(dim=1) ** 2, x.norm(dim=1) ** 2
    if kind == "gaussian":
        v = g.norm() ** 2 * x.norm() ** 2 + gx.norm() ** 2
    elif kind in ("rademacher", "countsketch"):  # same second moments of S S^T
        v = g.norm() ** 2 * x.norm() ** 2 + gx.norm() ** 2 - 2 * (gn * xn).sum()
    else:
        p = x.norm(dim=1) / x.norm(dim=1).sum()
        v = (gn * xn / p).sum() - gx.norm() ** 2
    return v / k


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [8, 24])  # k = 24 > in_features: random matrix built in chunks
def test_weight_gradient_is_unbiased(kind: str, k: int) -> None:
    n, fin, fout, draws = 32, 16, 8, 64
    x = torch.randn(n, fin, dtype=torch.float64)
    g = x @ torch.randn(fin, fout, dtype=torch.float64) + 0.5 * torch.randn(n, fout,
                                                                           dtype=torch.float64)
    w = torch.randn(fout, fin, dtype=torch.float64, requires_grad=True)
    exact = g.t() @ x
    gen = torch.Generator().manual_seed(1)
    acc, errors = torch.zeros_like(exact), {}
    for i in range(1, 4 * draws + 1):
        y = linear_randomized(x, w, None, proj_dim=k, matmul=kind, generator=gen)
        acc += _grads(y, g, w)[0]
        if i in (draws, 4 * draws):
            rms = (_variance(kind, g, x, k) / i).sqrt()  # expected error of a mean of i draws
            errors[i] = ((acc / i - exact).norm() / rms).item()
    # Unbiased => error / rms has mean ~1: over 40 independent runs of this setup it stayed in
    # [0.65, 1.39] (std ~0.15), so [0.5, 1.6] is a ~3.5 sigma band. A 10% bias in scale
    # would give error/rms ~ 0.1 * ||G^T X|| / rms > 3 at 256 draws.
    assert 0.5 < errors[draws] < 1.6
    assert 0.5 < errors[4 * draws] < 1.6
    # Hence the absolute error at 4x draws is about half: ratio observed in [0.3, 0.88].
    e1 = errors[draws] / draws**0.5
    e4 = errors[4 * draws] / (4 * draws) ** 0.5
    assert e4 < e1


def test_crs_is_unbiased_and_exact_elsewhere() -> None:
    n, fin, fout, draws = 20, 10, 4, 600
    x = torch.randn(n, fin, dtype=torch.float64)
    w = torch.randn(fout, fin, dtype=torch.float64, requires_grad=True)
    b = torch.randn(fout, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n, fout, dtype=torch.float64)
    y = linear_crs(x, w, b, proj_dim=3)
    assert torch.equal(y, F.linear(x, w, b))
    gw, gb = _grads(y, g, w, b)
    assert torch.equal(gb, g.sum(0))
    assert int((gw.abs().sum(0) > 0).sum()) <= 3  # at most 3 sampled columns
    exact = g.t() @ x
    gen = torch.Generator().manual_seed(0)
    acc = torch.zeros_like(exact)
    for _ in range(draws):
        acc += _grads(linear_crs(x, w, b, proj_dim=3, generator=gen), g, w)[0]
    # Column j estimate: count_j/(c p_j) * exact_j, Var = exact_j^2 (1/p_j - 1)/c per draw.
    p = x.norm(dim=0) / x.norm(dim=0).sum()
    var = (exact.norm(dim=0) ** 2 * (1 / p - 1) / 3).sum()
    rms = (var / draws).sqrt()
    assert (acc / draws - exact).norm() < 3 * rms  # Markov on the squared error: P < 1/9


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_saved_bytes(kind: str, dtype: torch.dtype) -> None:
    n, fin, fout, k = 64, 32, 16, 8
    w = torch.randn(fout, fin, dtype=dtype, requires_grad=True)
    b = torch.randn(fout, dtype=dtype, requires_grad=True)
    x = torch.randn(4, n // 4, fin, dtype=dtype)
    with memory_usage_hooks(exclude=[w, b]) as usage:
        y = linear_randomized(x, w, b, proj_dim=k, matmul=kind)
    size = torch.finfo(dtype).bits // 8
    # int64 row indices, else the int64 seed key that regenerates S in backward
    index_bytes = 8 * k if kind == "sampling" else 8
    assert usage.unique == k * fin * size + index_bytes
    assert usage.unique < n * fin * size  # a fraction k/N of the input
    y.sum().backward()  # what was saved suffices for backward


def test_nothing_saved_for_frozen_weight() -> None:
    w = torch.randn(4, 8)
    x = torch.randn(10, 8, requires_grad=True)
    with memory_usage_hooks(exclude=[w]) as usage:
        y = linear_randomized(x, w, proj_dim=2)
    assert usage.unique == 0
    (gx,) = _grads(y, torch.ones_like(y), x)
    assert torch.equal(gx, torch.ones(10, 4) @ w)


def test_generator_keeps_global_rng_and_reproduces() -> None:
    x = torch.randn(30, 8)
    w = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(30, 4)

    def grad(gen: torch.Generator) -> torch.Tensor:
        return _grads(linear_randomized(x, w, proj_dim=3, generator=gen), g, w)[0]

    state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(3)
    first, second = grad(gen), grad(gen)
    assert torch.equal(state, torch.get_rng_state())  # global RNG neither read nor advanced
    assert not torch.equal(first, second)  # a new projection per call
    again = torch.Generator().manual_seed(3)
    assert torch.equal(grad(again), first) and torch.equal(grad(again), second)


def test_global_seed_reproduces() -> None:
    x = torch.randn(30, 8)
    w = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(30, 4)
    torch.manual_seed(11)
    a = _grads(linear_randomized(x, w, proj_dim=3), g, w)[0]
    b = _grads(linear_randomized(x, w, proj_dim=3), g, w)[0]
    torch.manual_seed(11)
    assert torch.equal(_grads(linear_randomized(x, w, proj_dim=3), g, w)[0], a)
    assert not torch.equal(a, b)


def test_tiny_batch_gives_one_row_not_zero_gradient() -> None:
    x = torch.randn(2, 8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    with memory_usage_hooks(exclude=[w]) as usage:
        y = linear_randomized(x, w, proj_dim_ratio=0.1)  # round(0.2) = 0 -> k = 1
    assert usage.unique == 1 * 8 * 8 + 8  # one float64 row and the int64 seed key
    (gw,) = _grads(y, torch.ones_like(y), w)
    assert gw.abs().sum() > 0


def test_autocast_bf16_cpu() -> None:
    x = torch.randn(6, 16)
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_randomized(x, w, b, proj_dim=3)
        ref = F.linear(x, w, b)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(y, ref)
    gw, gb = _grads(y, torch.ones_like(y), w, b)
    rb = _grads(ref, torch.ones_like(ref), b)[0]
    assert gw.dtype == torch.float32 and gb.dtype == torch.float32
    assert torch.equal(gb, rb)


def test_linear_grp_published_positional_order() -> None:
    x = torch.randn(40, 8)
    w = torch.randn(4, 8, requires_grad=True)
    with memory_usage_hooks(exclude=[w]) as usage:
        # (input, weight, bias, proj_dim_ratio, proj_dim, proj_dim_max, proj_dim_min, ...)
        linear_grp(x, w, None, 0.5, None, 6, 2, "rademacher")
    assert usage.unique == 6 * 8 * 4 + 8  # ratio 0.5 -> 20, clamped to 6; + the seed key


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"proj_dim": 0}, ValueError, "proj_dim"),
        ({"proj_dim_ratio": 0.0}, ValueError, "proj_dim_ratio"),
        ({"proj_dim_ratio": 1.01}, ValueError, "proj_dim_ratio"),
        ({"matmul": "dct"}, ValueError, "matmul"),
        ({"generator": 5}, TypeError, "generator"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        linear_randomized(torch.randn(3, 4), torch.randn(2, 4), **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda(kind: str, dtype: torch.dtype) -> None:
    x = torch.randn(4, 50, 32, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(16, 32, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(16, device="cuda", dtype=dtype, requires_grad=True)
    y = linear_randomized(x, w, b, proj_dim_ratio=0.25, matmul=kind)
    ref = F.linear(x, w, b)
    assert torch.equal(y, ref)
    g = torch.randn_like(ref)
    gx, gw, gb = _grads(y, g, x, w, b)
    rx, _, rb = _grads(ref, g, x, w, b)
    assert torch.equal(gx, rx) and torch.equal(gb, rb) and torch.isfinite(gw).all()
    state = torch.cuda.get_rng_state()
    gen = torch.Generator(device="cuda").manual_seed(0)
    linear_randomized(x, w, b, proj_dim=10, matmul=kind, generator=gen).sum().backward()
    assert torch.equal(state, torch.cuda.get_rng_state())


@pytest.mark.parametrize("k", [4, 40, 64])
def test_random_blocks_never_exceed_the_input(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import fewbit.codecs.sketch as sketch

    blocks: list[int] = []
    original = sketch._random_block

    def recording(kind, shape, gen, dtype, device):  # type: ignore[no-untyped-def]
        blocks.append(shape[0] * shape[1])
        return original(kind, shape, gen, dtype, device)

    monkeypatch.setattr(sketch, "_random_block", recording)
    n, fin, fout = 80, 3, 2
    w = torch.randn(fout, fin, requires_grad=True)
    y = linear_randomized(torch.randn(n, fin), w, proj_dim=k, matmul="gaussian")
    forward_blocks = list(blocks)
    y.sum().backward()
    assert max(forward_blocks) <= n * fin  # k x c block <= the N x in_features input
    assert max(blocks) <= max(n * fin, k)
    assert sum(forward_blocks) == k * n  # together the blocks form the whole k x N matrix
