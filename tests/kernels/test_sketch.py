"""Triton random projection ``S^T X`` (Philox ``S`` generated in registers), interpreter on CPU.

``project(I_N)`` is ``S^T`` itself (every output entry is one product by 1 plus exact zeros),
which gives the explicit matrix to check everything else against.
"""

import pytest
import torch

pytest.importorskip("triton")

from fewbit.codecs.sketch import draw_seed  # noqa: E402
from fewbit.functional import linear as fl  # noqa: E402
from fewbit.kernels import sketch as ks  # noqa: E402

KINDS = ["gaussian", "rademacher"]
HALF = [torch.float16, torch.bfloat16]
SEED = 2**40 + 12345  # uses both 32-bit words of the Philox key
U32 = 2.0**-24  # unit roundoff of float32


def explicit(n: int, k: int, seed: int, kind: str) -> torch.Tensor:
    """The unscaled ``N x k`` matrix ``S`` of the kernel, float64."""
    return ks.project(torch.eye(n), k, seed, kind).t().double()


def fp32_dot_bound(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Error bound of float32 dot products of length N against exact ones: gamma_N times
    |S|^T |X| with gamma_N = N u / (1 - N u) ~ N u (any summation order)."""
    n = s.shape[0]
    return 1.01 * n * U32 * (s.abs().t() @ x.abs().double())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transposed", [False, True])
def test_projection_equals_explicit_matrix(kind: str, transposed: bool) -> None:
    n, d, k = 200, 48, 24
    x = torch.randn(d, n).t() if transposed else torch.randn(n, d)  # strided or contiguous
    s = explicit(n, k, SEED, kind)
    out = ks.project(x, k, SEED, kind, scale=0.5)
    assert out.shape == (k, d) and out.dtype == torch.float32
    ref = 0.5 * (s.t() @ x.double())
    # The interpreter's tl.dot is a float32 product: error within gamma_N |S|^T |X| (~1e-5
    # relative here), the scale 0.5 is exact.
    assert bool(((out.double() - ref).abs() <= 0.5 * fp32_dot_bound(s, x)).all())


@pytest.mark.parametrize("kind", KINDS)
def test_tiling_and_chunking_do_not_change_the_matrix(kind: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Small fill tiles (16 x 4 groups: many programs, partial ones at both edges) and
    chunks of 8 rows of X give the S of one large tile and one chunk."""
    n, d, k = 100, 32, 24
    x = torch.randn(n, d)
    whole_s, whole = ks.fill(n, k, SEED, kind, "cpu"), ks.project(x, k, SEED, kind)
    monkeypatch.setattr(ks, "_INTERPRETER_BLOCKS", (16, 4))
    monkeypatch.setattr(ks, "chunk_columns", lambda n, k, d: 8)
    assert torch.equal(ks.fill(n, k, SEED, kind, "cpu"), whole_s)  # bit for bit
    chunked = ks.project(x, k, SEED, kind)
    s = explicit(n, k, SEED, kind)
    # Both are float32 sums of the same products in different orders: each within
    # gamma_N |S|^T |X| of the exact value.
    assert bool(((chunked - whole).double().abs() <= 2 * fp32_dot_bound(s, x)).all())


@pytest.mark.parametrize("kind", KINDS)
def test_each_entry_is_generated_once_per_call(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: the random numbers of S are made once per call (k x N entries in all),
    however wide X is (300 columns: 5 tiles of 64 in the old kernel, each regenerating S)."""
    n, d, k = 90, 300, 40
    made: list[int] = []
    original = ks._fill

    def counting(buf, k, start, count, seed, kind_id):  # type: ignore[no-untyped-def]
        made.append(k * count)
        return original(buf, k, start, count, seed, kind_id)

    monkeypatch.setattr(ks, "_fill", counting)
    monkeypatch.setattr(ks, "chunk_columns", lambda n, k, d: 32)  # 3 chunks of N
    ks.project(torch.randn(n, d), k, SEED, kind)
    assert sum(made) == k * n and len(made) == 3


def test_chunks_bound_the_buffer() -> None:
    for n, k, d in [(1000, 10, 8), (1000, 500, 8), (7, 3, 1), (64, 64, 1), (10, 1, 1), (5, 900, 2)]:
        c = ks.chunk_columns(n, k, d)
        assert c % 4 == 0 and 4 <= c <= 4 * ((n + 3) // 4)
        assert k * c <= max(4 * k, n * d)  # the k x c buffer never exceeds X (or 4 columns)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_product_equals_torch_product_of_the_same_matrix(kind: str) -> None:
    """The projection is torch's product of the generated S^T with X: with small integers
    in X and +-1 in S every float32 sum is exact, so the two agree bit for bit."""
    n, d, k = 64, 16, 8
    x = torch.randint(-3, 4, (n, d)).float()
    s_t = ks.fill(n, k, SEED, kind, "cpu")
    if kind == "rademacher":
        assert torch.equal(ks.project(x, k, SEED, kind), s_t @ x)
    else:
        ref = s_t.double() @ x.double()
        bound = fp32_dot_bound(s_t.t().double(), x)
        assert bool(((ks.project(x, k, SEED, kind).double() - ref).abs() <= bound).all())


def test_counters_use_both_words() -> None:
    """Entry (n, j) uses the 64-bit Philox offset j * 2**32 + n // 4: rows j >= 1 need the
    high word (int64 offsets), and must not repeat row 0."""
    s_t = ks.fill(64, 3, SEED, "gaussian", "cpu")
    assert not torch.equal(s_t[0], s_t[1]) and not torch.equal(s_t[1], s_t[2])
    assert len(set(s_t.flatten().tolist())) == s_t.numel()  # continuous values: all distinct


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_matrix_other_seed_other_matrix(kind: str) -> None:
    n, k = 256, 32
    s = explicit(n, k, SEED, kind)
    assert torch.equal(s, explicit(n, k, SEED, kind))
    m = n * k
    for other in (SEED + 1, SEED % 2**32, SEED + 2**32):  # both key words matter
        agree = (s == explicit(n, k, other, kind)).double().mean().item()
        if kind == "gaussian":
            assert agree == 0.0  # continuous values: a coincidence has probability ~0
        else:
            # Independent signs agree with probability 1/2: 5 sigma = 5 * 0.5 / sqrt(m).
            assert abs(agree - 0.5) <= 5 * 0.5 / m**0.5
    # Same seed, different data: the same S multiplies both (backward's S^T G).
    g = torch.randn(n, 8)
    out = ks.project(g, k, SEED, kind)
    assert bool(((out.double() - s.t() @ g.double()).abs() <= fp32_dot_bound(s, g)).all())


@pytest.mark.parametrize("kind", KINDS)
def test_matrix_statistics(kind: str) -> None:
    n, k = 256, 32
    s = explicit(n, k, 7, kind)
    m = n * k  # 8192 entries
    if kind == "rademacher":
        assert bool((s.abs() == 1).all())  # exactly +-1 (+-scale once scaled)
        scaled = ks.project(torch.eye(n), k, 7, kind, scale=0.25)
        assert bool((scaled.abs() == 0.25).all())
    else:
        # N(0, 1): E s^2 = 1 (var 2), E s^4 = 3 (var 96); 5 sigma bands.
        assert abs((s**2).mean().item() - 1) <= 5 * (2 / m) ** 0.5
        assert abs((s**4).mean().item() - 3) <= 5 * (96 / m) ** 0.5
    assert abs(s.mean().item()) <= 5 / m**0.5  # mean 0, variance 1
    # Neighbouring entries (offsets n*k + j and n*k + j + 1) are uncorrelated.
    assert abs((s[:, 1:] * s[:, :-1]).mean().item()) <= 5 / (n * (k - 1)) ** 0.5
    # E[S S^T / k] = I. Diagonal: mean of m entries s^2. Off-diagonal: the n(n-1)/2 distinct
    # entries have variance 1/k each and are pairwise uncorrelated.
    gram = s @ s.t() / k
    off = gram[~torch.eye(n, dtype=torch.bool)]
    assert abs(gram.diagonal().mean().item() - 1) <= 5 * (2 / m) ** 0.5
    assert abs(off.mean().item()) <= 5 * (1 / (k * n * (n - 1) / 2)) ** 0.5


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", KINDS)
def test_half_inputs_accumulate_in_float32(kind: str, dtype: torch.dtype) -> None:
    n, d, k = 256, 32, 16
    x = (torch.randn(n, d) * 3).to(dtype)
    wide = ks.project(x, k, SEED, kind, out_dtype=torch.float32)
    s = explicit(n, k, SEED, kind)
    # float32 accumulation: within gamma_N |S|^T |X| (~1.5e-5 relative); a half-precision
    # accumulator would be off by ~2^-8..2^-11 relative, hundreds of times more.
    assert bool(((wide.double() - s.t() @ x.double()).abs() <= fp32_dot_bound(s, x)).all())
    out = ks.project(x, k, SEED, kind)
    assert out.dtype == dtype
    assert torch.equal(out, wide.to(dtype))  # one rounding of the float32 result


def test_bad_arguments() -> None:
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="kind"):
        ks.project(x, 2, 0, "sampling")
    with pytest.raises(ValueError, match="k must"):
        ks.project(x, 0, 0)
    with pytest.raises(ValueError, match="seed"):
        ks.project(x, 2, -1)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ks.project(x.flatten(), 2, 0)
    with pytest.raises(TypeError, match="x must be float32"):
        ks.project(x.double(), 2, 0)


# --- the kernel path of linear_randomized ------------------------------------------------------


def _weight_grad(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, k: int, kind: str,
                 seed: int, use_kernel: bool) -> torch.Tensor:
    y = fl._linear_sketched(x, w, None, k, kind, seed, use_kernel)
    return torch.autograd.grad(y, w, g)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_path_uses_one_matrix_forward_and_backward(kind: str) -> None:
    n, fin, fout, k = 40, 16, 8, 12
    x = torch.randn(2, 20, fin, requires_grad=True)
    w = torch.randn(fout, fin, requires_grad=True)
    b = torch.randn(fout, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fl._linear_sketched(x, w, b, k, kind, SEED, True)
    assert torch.equal(y, torch.nn.functional.linear(x, w, b))
    # W, S^T X / k and the int64 seed key
    assert sorted(tuple(t.shape) for t in saved) == [(1,), (fout, fin), (k, fin)]
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    assert torch.equal(gx, g @ w) and torch.equal(gb, g.sum((0, 1)))
    s = explicit(n, k, SEED, kind)
    x2, g2 = x.detach().reshape(n, fin).double(), g.reshape(n, fout).double()
    ref = (s.t() @ g2).t() @ (s.t() @ x2) / k
    # Two float32 sketches (each within gamma_N |S|^T|.|), the division by k and a float32
    # product of length k.
    sx, sg = s.t().abs() @ x2.abs(), s.t().abs() @ g2.abs()
    bound = (2.02 * n + 1.01 * k + 2) * U32 * (sg.t() @ sx) / k  # +2u: the /k, one more
    assert bool(((gw.double() - ref).abs() <= bound).all())


def test_cpu_dispatch_stays_on_torch_generators() -> None:
    x = torch.randn(30, 16)
    w = torch.randn(8, 16, requires_grad=True)
    g = torch.randn(30, 8)
    assert not fl._use_kernel(x, "gaussian")  # CPU tensors never dispatch to Triton
    seed = draw_seed(torch.Generator().manual_seed(5))
    y = fl.linear_randomized(x, w, proj_dim=6, matmul="gaussian",
                             generator=torch.Generator().manual_seed(5))
    auto = torch.autograd.grad(y, w, g)[0]
    assert torch.equal(auto, _weight_grad(x, w, g, 6, "gaussian", seed, False))
    assert not torch.equal(auto, _weight_grad(x, w, g, 6, "gaussian", seed, True))


def _variance(kind: str, g: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """E||estimate - G^T X||_F^2 of one draw (see fewbit.codecs.sketch)."""
    v = g.norm() ** 2 * x.norm() ** 2 + (g.t() @ x).norm() ** 2
    if kind == "rademacher":
        v = v - 2 * (g.norm(dim=1) ** 2 * x.norm(dim=1) ** 2).sum()
    return v / k


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_path_weight_gradient_is_unbiased(kind: str) -> None:
    n, fin, fout, k, draws = 32, 16, 8, 24, 64  # the torch-path test's setup (k < n)
    x = torch.randn(n, fin)
    g = x @ torch.randn(fin, fout) + 0.5 * torch.randn(n, fout)
    w = torch.randn(fout, fin, requires_grad=True)
    exact = (g.t() @ x).double()
    acc = torch.zeros_like(exact)
    for seed in range(draws):
        acc += _weight_grad(x, w, g, k, kind, seed * 7919 + 2**33, True).double()
    rms = (_variance(kind, g.double(), x.double(), k) / draws).sqrt()
    # Unbiased => ||mean - exact|| / rms has mean ~1: on this setup (torch path, same
    # statistics) 400 runs gave [0.68, 1.37], std 0.12, so [0.5, 1.6] is a 4-5 sigma band.
    ratio = ((acc / draws - exact).norm() / rms).item()
    assert 0.5 < ratio < 1.6
    # The test has power: a scale error of 20% (a different S in backward: 100%) gives a
    # ratio ~ sqrt((0.2 ||G^T X|| / rms)^2 + 1) > sqrt(1.8^2 + 1) > 2, outside the band.
    assert (0.2 * exact.norm() / rms).item() > 1.8


@pytest.mark.parametrize("dtype", HALF)
def test_kernel_path_half_dtypes(dtype: torch.dtype) -> None:
    x = torch.randn(48, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    y = fl._linear_sketched(x, w, None, 12, "gaussian", SEED, True)
    assert y.dtype == dtype and torch.equal(y, torch.nn.functional.linear(x, w))
    gw = torch.autograd.grad(y, w, torch.randn_like(y))[0]
    assert gw.dtype == dtype and bool(torch.isfinite(gw).all())


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_dispatch(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(64, 32, device="cuda")
    w = torch.randn(16, 32, device="cuda", requires_grad=True)
    g = torch.randn(64, 16, device="cuda")
    assert fl._use_kernel(x, kind) and not fl._use_kernel(x.double(), kind)
    gen = torch.Generator(device="cuda").manual_seed(3)
    seed = draw_seed(torch.Generator(device="cuda").manual_seed(3))
    y = fl.linear_randomized(x, w, proj_dim=16, matmul=kind, generator=gen)
    auto = torch.autograd.grad(y, w, g)[0]
    assert torch.equal(auto, _weight_grad(x, w, g, 16, kind, seed, True))
    monkeypatch.setenv("FEWBIT_DISABLE_TRITON", "1")
    assert not fl._use_kernel(x, kind)
