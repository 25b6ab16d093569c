"""The few-bit activation op: no host reads, bounded transient memory, exact gradients at
non-finite inputs (including more of them than the side store has slots)."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fewbit.functional as FB
import fewbit.functional.fewbit_fn as fn
from fewbit.approx import get_table
from fewbit.profile import cpu_profiler_peak

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class _HostReads:
    """Counts calls that read a tensor's value on the host or copy a Python list to it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
            self._wrap(monkeypatch, torch.Tensor, name)
        for name in ("tensor", "nonzero"):
            self._wrap(monkeypatch, torch, name)

    def _wrap(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("name", ["gelu", "silu", "tanh", "relu"])
def test_forward_and_backward_read_nothing_from_the_device(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PyTorch path (what CUDA runs without Triton) makes no host read once the tables
    are cached: no .item()/bool()/tolist(), no torch.tensor(list), no nonzero with a
    data-dependent size. Checked on CPU tensors, 2 chunks, with NaN and inf inside (native
    CPU codecs off: they read per-chunk counts on the host, which is free on the CPU)."""
    monkeypatch.setenv("FEWBIT_NATIVE", "0")
    monkeypatch.setattr(fn, "_CHUNK", 512)
    f = getattr(FB, name)

    def step() -> Tensor:
        x = torch.randn(1000, dtype=dtype)
        x[3], x[700] = float("nan"), float("inf")
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(f(x), x, torch.ones_like(x))
        return g

    step()  # first use: builds and caches the tables
    reads = _HostReads(monkeypatch)
    g = step()
    assert reads.calls == []
    assert g.shape == (1000,)


def _peak_bytes(run: Callable[[], object]) -> tuple[int, object]:
    """Peak of the running sum of CPU allocations during run() (torch.profiler memory events
    in time order, deterministic: :func:`fewbit.profile.cpu_profiler_peak`), and its result."""
    out: list[object] = []
    peak = cpu_profiler_peak(lambda: out.append(run()))
    return peak, out[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_transient_memory_within_ten_percent_of_torch(dtype: torch.dtype) -> None:
    """Peak of a 3-bit GELU forward, less what it keeps (the code and the side store that
    replace torch's saved input), is at most 1.1x torch's own forward peak (its output).
    The old op summed the whole tensor in float32 (a float32 copy of fp16 inputs)."""
    n = 1 << 22
    x = torch.randn(n, dtype=dtype).requires_grad_(True)
    torch_peak, _ = _peak_bytes(lambda: F.gelu(x))
    fewbit_peak, y = _peak_bytes(lambda: FB.gelu(x))
    stored = math.ceil(n * 3 / 8) + fn.side_store_nbytes(n)
    assert torch_peak >= n * x.element_size()  # the output at least
    assert fewbit_peak - stored <= 1.1 * torch_peak, (fewbit_peak, stored, torch_peak)
    del y


def _expected_grad(x: Tensor, g: Tensor, bits: int = 3) -> Tensor:
    """torch's gradient where x is not finite, g * levels[code] elsewhere."""
    table = get_table("gelu", bits)
    out = g * torch.tensor(table.levels)[table.encode(x).long()].to(x.dtype)
    xt = x.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(F.gelu(xt), xt, g)
    bad = ~torch.isfinite(x)
    out[bad] = exact[bad]
    return out


def test_nonfinite_gradients_across_chunks_and_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 64 elements have 8 slots each: a chunk with at most 8 non-finite inputs gets
    exactly torch's gradient; a chunk with more gets torch's at its first 8 and NaN at its
    other elements (never a finite wrong value); the other chunks are unaffected."""
    monkeypatch.setattr(fn, "_CHUNK", 64)
    x = torch.randn(1001)
    x[[2, 70, 71, 1000]] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
    x[64 * 5 : 64 * 5 + 20 : 2] = float("inf")  # 10 in chunk 5: overflow
    x[64 * 5 + 1] = float("nan")  # the 2nd non-finite of chunk 5 (within its first 8)
    g = torch.randn(1001)
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(FB.gelu(xr), xr, g)
    expected = _expected_grad(x, g)
    overflow = torch.zeros(1001, dtype=torch.bool)
    overflow[64 * 5 : 64 * 6] = True
    # exact outside chunk 5, including torch's NaN at the non-finite inputs there
    torch.testing.assert_close(gx[~overflow], expected[~overflow], rtol=0, atol=0, equal_nan=True)
    bad5 = (~torch.isfinite(x) & overflow).nonzero().squeeze(1)
    first = bad5[:8]
    assert torch.equal(gx[first].isnan(), expected[first].isnan())
    keep = ~expected[first].isnan()
    assert torch.equal(gx[first][keep], expected[first][keep])
    rest = overflow.clone()
    rest[first] = False
    assert bool(gx[rest].isnan().all())


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_nonfinite_gradient_is_torchs(dtype: torch.dtype) -> None:
    """+inf, -inf and NaN: torch's own gradient, in every dtype, on every activation kind."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, -2.0], dtype=dtype)
    g = torch.tensor([1.0, -2.0, 3.0, 1.0, 1.0], dtype=dtype)
    for name in ("gelu", "silu", "tanh", "softplus", "relu", "hardtanh", "elu"):
        xa = x.clone().requires_grad_(True)
        (ga,) = torch.autograd.grad(getattr(FB, name)(xa), xa, g)
        xb = x.clone().requires_grad_(True)
        (gb,) = torch.autograd.grad(getattr(F, name)(xb), xb, g)
        assert torch.equal(ga[:3].isnan(), gb[:3].isnan()), name
        finite = ~gb[:3].isnan()
        assert torch.equal(ga[:3][finite], gb[:3][finite]), name


def test_meta_tensors_propagate_shapes() -> None:
    """Grad mode on meta tensors (deferred init): shapes and dtypes, no .item()."""
    x = torch.empty(4, 1000, device="meta", requires_grad=True)
    y = FB.gelu(x)
    assert y.shape == x.shape and y.device.type == "meta"
    (gx,) = torch.autograd.grad(y, x, torch.empty_like(y))
    assert gx.shape == x.shape and gx.device.type == "meta"


class _Mlp(torch.nn.Module):
    """Linear -> few-bit activation (spec built once, as a converted module holds it) -> Linear."""

    def __init__(self, spec: fn.ActivationSpec) -> None:
        super().__init__()
        self.a, self.b, self.spec = torch.nn.Linear(16, 64), torch.nn.Linear(64, 8), spec

    def forward(self, x: Tensor) -> Tensor:
        return self.b(fn.apply_fewbit(self.a(x), self.spec))


def test_compile_fullgraph_matches_eager() -> None:
    """torch.compile(fullgraph=True) traces the op (custom ops fewbit::activation_forward and
    _backward: no graph break) and matches eager: forward bit for bit, same gradients, the
    gradient at a NaN input included."""
    table = get_table("gelu", 3)
    spec = fn.ActivationSpec(
        F.gelu, table.encode, table.levels, 3, kernel="gelu", boundaries=table.boundaries
    )
    model = _Mlp(spec)
    x = torch.randn(32, 16)
    x[0, 0] = float("nan")  # reaches the activation as a NaN row
    eager_y = model(x)  # the first call registers the spec (traced first, it is a graph break)
    eager_g = torch.autograd.grad(eager_y.nansum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    g = torch.autograd.grad(y.nansum(), list(model.parameters()))
    torch.testing.assert_close(y, eager_y, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(g, eager_g):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel_path", [False, True], ids=["torch", "kernel"])
def test_nonfinite_incoming_gradient_where_the_mask_is_zero(
    dtype: torch.dtype, kernel_path: bool
) -> None:
    """ReLU-like masks: an inf/NaN incoming gradient where the derivative is 0 gives 0, as
    torch's threshold_backward does (grad * 0 would give NaN)."""
    pytest.importorskip("triton")
    from fewbit import kernels

    x = torch.tensor([-1.0, -2.0, 0.0, 1.0, 2.0, -3.0, 0.5, -0.5, 4.0], dtype=dtype)
    g = torch.tensor([float("inf"), float("nan"), -float("inf"), float("nan"), float("inf"),
                      1.0, 2.0, 3.0, 4.0], dtype=dtype)  # fmt: skip
    for name in ("relu", "hardtanh", "relu6", "hardsigmoid", "hardshrink"):
        xb = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(getattr(F, name)(xb), xb, g)
        xa = x.clone().requires_grad_(True)
        with kernels.force_kernels(kernel_path):
            (got,) = torch.autograd.grad(getattr(FB, name)(xa), xa, g)
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True, msg=name)
