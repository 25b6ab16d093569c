"""Randomized linear layers with the rest of PyTorch: inference (no_grad, inference_mode,
frozen weights), meta tensors, activation checkpointing, distributed ranks, torch.compile
and autocast (issue 11, items 1-4, 6 and 11)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fewbit.codecs.sketch as cs
from fewbit.codecs.sketch import draw_seed, rank_salt
from fewbit.functional import linear as fl
from fewbit.modules.linear import LinearCRS, RandomizedConv1D, RandomizedLinear

SEEDED = ["gaussian", "rademacher", "countsketch"]
KINDS = SEEDED + ["sampling"]


def _module(name: str) -> nn.Module:
    if name == "crs":
        return LinearCRS(16, 8, proj_dim=3)
    if name == "conv1d":
        return RandomizedConv1D(8, 16, proj_dim=3)
    return RandomizedLinear(16, 8, proj_dim=3, matmul=name)


def _reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = m.weight.t() if isinstance(m, RandomizedConv1D) else m.weight
    return F.linear(x, weight, m.bias)


@contextlib.contextmanager
def _frozen(m: nn.Module) -> Iterator[None]:
    for p in m.parameters():
        p.requires_grad_(False)
    yield


@pytest.fixture
def no_sketch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any sketch work (or seed draw) fails the test."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("sketch work without a weight gradient")

    for name in ("_sketch_forward_op", "_sketch_op", "_sample_op", "_sample_columns",
                 "draw_seed_tensor", "draw_seed"):
        monkeypatch.setattr(fl, name, fail)


CONTEXTS: dict[str, Callable[[nn.Module], contextlib.AbstractContextManager]] = {
    "no_grad": lambda m: torch.no_grad(),
    "inference_mode": lambda m: torch.inference_mode(),
    "grad_mode_off": lambda m: torch.set_grad_enabled(False),
    "frozen_weight": _frozen,
}


@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("name", KINDS + ["crs", "conv1d"])
def test_without_weight_gradient_is_exactly_linear(name: str, context: str,
                                                   no_sketch: None) -> None:
    m = _module(name)
    x = torch.randn(3, 10, 16, requires_grad=context == "frozen_weight")
    with torch.no_grad():
        ref = _reference(m, x)
    state = torch.get_rng_state()
    with CONTEXTS[context](m):
        y = m(x)
    assert torch.equal(torch.get_rng_state(), state)  # no random draw
    assert torch.equal(y, ref) and y.dtype == ref.dtype  # bitwise F.linear
    if context == "frozen_weight":  # the input gradient is F.linear's, exactly
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert torch.equal(gx, torch.autograd.grad(_reference(m, x), x, torch.ones_like(y))[0])


def test_eval_mode_with_grad_still_estimates_the_weight_gradient() -> None:
    """Documented choice: like nn.Linear, eval() changes nothing; with grad enabled the weight
    gradient is the training estimate (a draw happens), the output is F.linear's."""
    m = RandomizedLinear(16, 8, proj_dim=3).eval()
    x = torch.randn(20, 16)
    state = torch.get_rng_state()
    y = m(x)
    assert not torch.equal(torch.get_rng_state(), state)
    assert torch.equal(y, _reference(m, x))
    y.sum().backward()
    assert m.weight.grad is not None and bool(torch.isfinite(m.weight.grad).all())


# --- meta tensors -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_meta_device(kind: str) -> None:
    m = RandomizedLinear(16, 8, device="meta", proj_dim=3, matmul=kind)
    assert m.weight.is_meta and m.bias is not None and m.bias.is_meta
    x = torch.empty(4, 5, 16, device="meta", requires_grad=True)
    with torch.no_grad():
        assert m(x).shape == (4, 5, 8)
    y = m(x)
    assert y.is_meta and y.shape == (4, 5, 8)
    y.sum().backward()
    assert m.weight.grad is not None and m.weight.grad.is_meta
    assert m.weight.grad.shape == (8, 16) and x.grad is not None and x.grad.shape == x.shape
    conv = RandomizedConv1D(8, 16, device="meta", proj_dim=3)
    assert conv(torch.empty(2, 16, device="meta")).shape == (2, 8)


def test_meta_device_crs() -> None:
    m = LinearCRS(16, 8, device="meta", proj_dim=3)
    y = m(torch.empty(4, 5, 16, device="meta"))
    assert y.is_meta and y.shape == (4, 5, 8)
    y.sum().backward()
    assert m.weight.grad is not None and m.weight.grad.shape == (8, 16)


# --- activation checkpointing -----------------------------------------------------------------


def _variance(kind: str, g: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """E||estimate - G^T X||_F^2 for one draw (fewbit.codecs.sketch)."""
    v = g.norm() ** 2 * x.norm() ** 2 + (g.t() @ x).norm() ** 2
    if kind != "gaussian":  # rademacher and countsketch
        v = v - 2 * (g.norm(dim=1) ** 2 * x.norm(dim=1) ** 2).sum()
    return v / k


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
@pytest.mark.parametrize("preserve", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_keeps_weight_gradient_unbiased(kind: str, preserve: bool,
                                                   reentrant: bool) -> None:
    n, fin, fout, k, draws = 32, 16, 8, 8, 64
    x = torch.randn(n, fin, dtype=torch.float64, requires_grad=True)
    g = x.detach() @ torch.randn(fin, fout, dtype=torch.float64)
    g += 0.5 * torch.randn(n, fout, dtype=torch.float64)
    w = torch.randn(fout, fin, dtype=torch.float64, requires_grad=True)
    exact = g.t() @ x.detach()
    acc = torch.zeros_like(exact)
    for _ in range(draws):
        w.grad = None
        y = checkpoint(lambda t: fl.linear_randomized(t, w, None, proj_dim=k, matmul=kind), x,
                       use_reentrant=reentrant, preserve_rng_state=preserve)
        y.backward(g)
        assert w.grad is not None
        acc += w.grad
    rms = (_variance(kind, g, x.detach(), k) / draws).sqrt()
    # Unbiased => ||mean - exact|| / rms has mean ~1; the unbiasedness tests of
    # test_linear.py (same setup) stay in [0.65, 1.39], std ~0.15: [0.5, 1.6] is ~3.5 sigma.
    ratio = ((acc / draws - exact).norm() / rms).item()
    assert 0.5 < ratio < 1.6
    # Power: a forward sketch and a backward matrix from different seeds give a mean near 0,
    # i.e. a ratio ~ ||G^T X|| / rms, far outside the band.
    assert (exact.norm() / rms).item() > 3


# --- distributed ranks ------------------------------------------------------------------------


def test_rank_is_folded_into_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    rank0 = [draw_seed() for _ in range(4)]
    monkeypatch.setattr(cs, "_distributed_rank", lambda: 1)
    torch.manual_seed(3)
    rank1 = [draw_seed() for _ in range(4)]
    torch.manual_seed(3)
    shared = [draw_seed(independent_ranks=False) for _ in range(4)]
    assert shared == rank0  # opt-out: every rank draws the same seeds
    assert [a ^ rank_salt(1) for a in rank0] == rank1  # documented folding
    assert all(a != b for a, b in zip(rank0, rank1))
    # The CPU generator keeps only a seed's low 32 bits: the salt must change them.
    assert rank_salt(1) % 2**32 != 0 and len({rank_salt(r) % 2**32 for r in range(64)}) == 64
    assert rank_salt(0) == 0 and all(0 <= rank_salt(r) < 2**62 for r in range(64))


def _weight_grad(rank: int, independent: bool, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    monkeypatch.setattr(cs, "_distributed_rank", lambda: rank)
    torch.manual_seed(0)  # the same seed on every rank, as usual
    m = RandomizedLinear(16, 8, proj_dim=4, independent_ranks=independent)
    torch.manual_seed(1)
    m(torch.ones(20, 16)).sum().backward()
    assert m.weight.grad is not None
    return m.weight.grad


def test_ranks_draw_different_sketches(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not torch.equal(_weight_grad(0, True, monkeypatch), _weight_grad(1, True, monkeypatch))
    assert torch.equal(_weight_grad(0, False, monkeypatch), _weight_grad(1, False, monkeypatch))
    assert "independent_ranks=False" in repr(RandomizedLinear(4, 4, independent_ranks=False))


def test_rank_comes_from_the_default_group(tmp_path: pytest.TempPathFactory) -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialized")
    assert cs._distributed_rank() == 0
    store = dist.FileStore(str(tmp_path / "store"), 1)  # type: ignore[operator]
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert cs._distributed_rank() == 0  # rank 0 keeps its seeds
        torch.manual_seed(2)
        seed = draw_seed()
        torch.manual_seed(2)
        assert draw_seed(independent_ranks=False) == seed
    finally:
        dist.destroy_process_group()


# --- torch.compile and autocast ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
def test_compile_fullgraph_matches_eager(kind: str) -> None:
    torch._dynamo.reset()
    m = nn.Sequential(RandomizedLinear(16, 32, proj_dim=5, matmul=kind), nn.GELU(),
                      RandomizedLinear(32, 8, proj_dim=5, matmul=kind))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")  # fails on a graph break
    x = torch.randn(4, 6, 16, requires_grad=True)

    def step(model: nn.Module) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(1)  # same seeds drawn in both runs
        y = model(x)
        return (y, *torch.autograd.grad(y.square().sum(), [x, *m.parameters()]))

    got, want = step(compiled), step(m)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):  # same sketches; float32 sum order may differ
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    state = torch.get_rng_state()
    with torch.no_grad():
        assert torch.equal(compiled(x), want[0])
    assert torch.equal(state, torch.get_rng_state())
    # A new batch size: recompiled with dynamic shapes (torch's automatic dynamic), still
    # without graph breaks; the forward stays exact.
    x = torch.randn(7, 6, 16)
    y = compiled(x)
    assert torch.equal(y, m(x))
    y.sum().backward()


@pytest.mark.parametrize("grad", [True, False])
def test_autocast_follows_linear(grad: bool) -> None:
    torch.manual_seed(0)
    ref = nn.Linear(16, 8)
    m = RandomizedLinear(16, 8, proj_dim=3)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(6, 16)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = m(x), ref(x)
    assert y.dtype == want.dtype == torch.bfloat16 and torch.equal(y, want)
    if grad:
        y.float().sum().backward()
        want.float().sum().backward()
        assert m.weight.grad is not None and m.weight.grad.dtype == torch.float32
        assert m.bias is not None and m.bias.grad is not None and ref.bias.grad is not None
        assert torch.equal(m.bias.grad, ref.bias.grad)
