"""Few-bit activations: torch's forward, table backward, exact masks, stored bytes, bad input."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fewbit.functional as FB
from fewbit.approx import Table, get_table
from fewbit.approx.registry import ACTIVATIONS, Activation, Variant
from fewbit.functional.fewbit_fn import side_store_nbytes


@dataclass
class Case:
    name: str
    fewbit: Callable[..., Tensor]
    torch_fn: Callable[..., Tensor]
    kwargs: dict = field(default_factory=dict)
    table: str | None = None  # table name for continuous functions; None for exact masks
    kinks: tuple[float, ...] = ()
    entry: Activation | None = None

    def __repr__(self) -> str:
        return self.name


def _torch_module_fn(entry: Activation) -> Callable[..., Tensor]:
    """torch's own module as a function: ``fn(x, **kwargs) = torch_module(**kwargs)(x)``."""

    def run(x: Tensor, **kwargs: object) -> Tensor:
        return entry.torch_module(**kwargs)(x)

    return run


def _case(entry: Activation, variant: Variant) -> Case:
    """One registry variant with its example arguments (non-default mask parameters, not
    representable in fp16/bf16, check torch's comparison convention at the kinks)."""
    kwargs = {**entry.example, **variant.when}
    fewbit_fn = getattr(FB, entry.name)
    torch_fn = _torch_module_fn(entry)
    if entry.mask is None:
        return Case(variant.name, fewbit_fn, torch_fn, kwargs, variant.name, entry=entry)
    kinks = entry.mask.kinks(entry.float_params(entry.params(kwargs)))
    return Case(variant.name, fewbit_fn, torch_fn, kwargs, None, kinks, entry)


PIECEWISE = [_case(e, v) for e in ACTIVATIONS.values() if e.is_mask for v in e.variants]
CONTINUOUS = [_case(e, v) for e in ACTIVATIONS.values() if not e.is_mask for v in e.variants]

ALL = PIECEWISE + CONTINUOUS
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def saved_bytes(fn: Callable[[], Tensor]) -> tuple[int, Tensor]:
    """Bytes of distinct storages saved for backward while running fn (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_twenty_one_functions_covered() -> None:
    assert len(ALL) == 22  # 21 functions; gelu counted twice (exact and tanh approximation)


@pytest.mark.parametrize("case", ALL, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (), (7,), (3, 5, 4)], ids=str)
def test_forward_equals_torch(case: Case, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    y = case.fewbit(x, **case.kwargs)
    ref = case.torch_fn(x.detach(), **case.kwargs)
    assert y.dtype == ref.dtype and y.shape == ref.shape and y.device == ref.device
    assert torch.equal(y.detach(), ref)  # bit for bit: the forward is torch's own call


@pytest.mark.parametrize("case", ALL, ids=repr)
def test_out_of_place_on_leaf_and_shared_input(case: Case) -> None:
    x = torch.randn(6, 4, requires_grad=True)
    before = x.detach().clone()
    y = case.fewbit(x, **case.kwargs)
    z = (y * 2 + x).sum()  # x used elsewhere too
    z.backward()
    assert torch.equal(x.detach(), before)
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("case", CONTINUOUS, ids=repr)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_grad_times_table(case: Case, bits: int, dtype: torch.dtype) -> None:
    x = (torch.randn(257, dtype=torch.float64) * 2).to(dtype).requires_grad_(True)
    g = torch.randn(257, dtype=torch.float64).to(dtype)
    y = case.fewbit(x, **case.kwargs, bits=bits)
    (gx,) = torch.autograd.grad(y, x, g)
    table = get_table(case.table, bits, _params(case))
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    lut = torch.tensor(table.levels, dtype=compute)
    expected = (g.to(compute) * lut[table.encode(x.detach()).long()]).to(dtype)
    assert gx.dtype == dtype
    assert torch.equal(gx, expected)  # same lookup, same single rounding: exact


def _params(case: Case) -> dict:
    return {k: v for k, v in case.kwargs.items() if k in ("alpha", "beta", "threshold")}


@pytest.mark.parametrize("case", CONTINUOUS, ids=repr)
def test_gradient_close_to_exact(case: Case) -> None:
    """On x ~ N(0, 1) the relative L2 gradient error is the table's weighted RMS error scale."""
    x = torch.randn(20000, dtype=torch.float64, requires_grad=True)
    y = case.fewbit(x, **case.kwargs, bits=4)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (ref,) = torch.autograd.grad(case.torch_fn(x, **case.kwargs).sum(), x)
    err = (gx - ref).pow(2).mean().sqrt().item()
    # 16 levels of a derivative bounded by ~1.1 (range <= 1.2 for these functions): the optimal
    # table's RMS error is far below the range/16 ~ 0.075 of a uniform step; Monte Carlo over 20k
    # draws changes it by well under 10%.
    assert err < 0.075


@pytest.mark.parametrize("case", PIECEWISE, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_piecewise_gradient_exact_including_kinks(case: Case, dtype: torch.dtype) -> None:
    base = torch.randn(300, dtype=torch.float64) * 4
    kinks = torch.tensor(case.kinks, dtype=torch.float64).to(dtype)
    inf = torch.full_like(kinks, float("inf"))
    near = torch.cat([kinks, kinks.nextafter(inf), kinks.nextafter(-inf)]).repeat(2)
    x = torch.cat([base.to(dtype), near])
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    xa = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(case.fewbit(xa, **case.kwargs), xa, g)
    xb = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(case.torch_fn(xb, **case.kwargs), xb, g)
    assert torch.equal(gx, ref)


@pytest.mark.parametrize("case", ALL, ids=repr)
def test_nan_and_inf_match_torch(case: Case) -> None:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, -1.2, 2.0])
    xa = x.clone().requires_grad_(True)
    ya = case.fewbit(xa, **case.kwargs)
    (ga,) = torch.autograd.grad(ya, xa, torch.ones_like(x))
    xb = x.clone().requires_grad_(True)
    yb = case.torch_fn(xb, **case.kwargs)
    (gb,) = torch.autograd.grad(yb, xb, torch.ones_like(x))
    assert torch.equal(ya.detach().isnan(), yb.detach().isnan())
    finite = ~yb.detach().isnan()
    assert torch.equal(ya.detach()[finite], yb.detach()[finite])
    # Non-finite inputs get exactly torch's gradient (NaN where torch's is NaN).
    assert torch.equal(ga[:3].isnan(), gb[:3].isnan())
    assert torch.equal(ga[:3][~gb[:3].isnan()], gb[:3][~gb[:3].isnan()])
    assert torch.isfinite(ga[3:]).all()


@pytest.mark.parametrize("case", ALL, ids=repr)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 1001])
def test_stored_bytes_are_packed_codes(case: Case, n: int) -> None:
    for bits in [1] if case.table is None else range(1, 9):
        x = torch.randn(n, requires_grad=True)
        kwargs = dict(case.kwargs)
        if case.table is not None:
            kwargs["bits"] = bits
        nbytes, _ = saved_bytes(lambda: case.fewbit(x, **kwargs))  # noqa: B023
        # no header (shape lives in Python attributes); plus the fixed-size non-finite side
        # store, whose size depends on n only (no host read decides it)
        assert nbytes == math.ceil(n * bits / 8) + side_store_nbytes(n)


def test_stored_bytes_nonfinite_side_store() -> None:
    x = torch.randn(64)
    x[5] = float("nan")
    x.requires_grad_(True)
    nbytes, _ = saved_bytes(lambda: FB.gelu(x))
    # packed codes + the fixed side store (8 int64 slots + 1 count for 64 elements): the same
    # bytes as for a finite input, so nothing needs to read the device to size it
    assert nbytes == math.ceil(64 * 3 / 8) + side_store_nbytes(64) == 24 + 8 * 9
    finite, _ = saved_bytes(lambda: FB.gelu(torch.randn(64, requires_grad=True)))
    assert finite == nbytes


def test_non_contiguous_input() -> None:
    base = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    xt = base.t()
    assert not xt.is_contiguous()
    y = FB.gelu(xt)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, base, g)
    table = get_table("gelu", 3)
    lut = torch.tensor(table.levels, dtype=torch.float64)
    expected = g * lut[table.encode(xt.detach()).long()]
    assert torch.equal(gx, expected.t())
    assert torch.equal(y.detach(), F.gelu(xt.detach()))


def test_no_grad_saves_nothing() -> None:
    x = torch.randn(100)
    nbytes, y = saved_bytes(lambda: FB.gelu(x))
    assert nbytes == 0 and y.grad_fn is None
    with torch.no_grad():
        xr = torch.randn(100, requires_grad=True)
        assert FB.silu(xr).grad_fn is None


def test_custom_table_and_pair() -> None:
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    table = Table((-1.0, 0.0, 1.0), (0.0, 0.25, 0.75, 1.0))
    for spec in (table, ((-1.0, 0.0, 1.0), (0.0, 0.25, 0.75, 1.0))):
        (gx,) = torch.autograd.grad(FB.gelu(x, table=spec).sum(), x)
        assert torch.equal(gx, table(x.detach()))
    (gx,) = torch.autograd.grad(FB.activation(x, torch.sin, table).sum(), x)
    assert torch.equal(gx, table(x.detach()))


def test_non_default_parameters_get_their_own_table() -> None:
    x = torch.randn(500, requires_grad=True)
    (g2,) = torch.autograd.grad(FB.elu(x, alpha=2.0).sum(), x)
    assert torch.equal(g2, get_table("elu", 3, {"alpha": 2.0})(x.detach()))
    assert get_table("elu", 3, {"alpha": 2.0}) != get_table("elu", 3)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(bits: int) -> None:
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(ValueError, match="bits"):
        FB.gelu(x, bits=bits)
    with pytest.raises(ValueError, match="bits"):
        FB.relu(x, bits=bits)


@pytest.mark.parametrize("bits", [2.5, "3", True])
def test_bits_wrong_type(bits: object) -> None:
    with pytest.raises(TypeError, match="bits"):
        FB.gelu(torch.randn(4), bits=bits)  # type: ignore[arg-type]


INTEGER_REJECTED = [c for c in ALL if c.entry is not None and not c.entry.integer_inputs]
INTEGER_ACCEPTED = [c for c in ALL if c.entry is not None and c.entry.integer_inputs]
INTEGER_DTYPES = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("case", INTEGER_REJECTED, ids=repr)
def test_non_floating_input_rejected(case: Case) -> None:
    """Ops torch rejects on integer tensors: a TypeError naming the argument."""
    with pytest.raises(TypeError, match="input"):
        case.fewbit(torch.arange(4), **case.kwargs)


def test_integer_cases_cover_the_functions_torch_accepts() -> None:
    """relu, threshold, hardtanh, relu6 keep integers; sigmoid, softsign, tanh, tanhshrink
    promote (issue 11 item 10); torch rejects integers for every other activation."""
    assert {c.name for c in INTEGER_ACCEPTED} == {
        "relu", "threshold", "hardtanh", "relu6", "sigmoid", "softsign", "tanh", "tanhshrink"
    }  # fmt: skip


@pytest.mark.parametrize("case", INTEGER_ACCEPTED, ids=repr)
@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
def test_integer_input_follows_torch(case: Case, dtype: torch.dtype) -> None:
    """Integer tensors: torch's output and dtype exactly, or torch's own error."""
    x = torch.tensor([-3, -1, 0, 1, 2, 7]).to(dtype)
    try:
        ref = case.torch_fn(x, **case.kwargs)
    except Exception as error:  # noqa: BLE001 - the error type torch raises is the reference
        with pytest.raises(type(error)):
            case.fewbit(x, **case.kwargs)
        return
    y = case.fewbit(x, **case.kwargs)
    assert y.dtype == ref.dtype and torch.equal(y, ref)


def test_complex_input_rejected() -> None:
    with pytest.raises(TypeError, match="input"):
        FB.tanh(torch.randn(3, dtype=torch.complex64))


def test_bad_tables_rejected() -> None:
    with pytest.raises(ValueError, match="increasing"):
        Table((0.0, -1.0, 1.0), (0.0, 1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="boundaries"):
        Table((0.0,), (0.0, 1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="levels"):
        Table((0.0, 1.0), (0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="finite"):
        Table((float("nan"),), (0.0, 1.0))
    with pytest.raises(TypeError, match="table"):
        FB.gelu(torch.randn(3), table=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="approximate"):
        FB.gelu(torch.randn(3), approximate="fast")


def test_double_backward_raises_clear_error() -> None:
    x = torch.randn(10, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        torch.autograd.grad(FB.gelu(x).sum(), x, create_graph=True)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_chunked_encode_and_lookup_match_whole_tensor(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large tensors are encoded/packed and looked up in chunks; a small chunk (not dividing n)
    must give the same packed bytes and gradient as the whole-tensor definition."""
    import fewbit.functional.fewbit_fn as fn
    from fewbit.codecs import pack

    monkeypatch.setattr(fn, "_CHUNK", 64)
    x = torch.randn(1001, dtype=torch.float32, requires_grad=True)
    g = torch.randn(1001)
    saved: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = FB.gelu(x, bits=bits)
    (gx,) = torch.autograd.grad(y, x, g)
    table = get_table("gelu", bits)
    assert torch.equal(saved[0], pack(table.encode(x.detach()), bits))
    lut = torch.tensor(table.levels)
    assert torch.equal(gx, g * lut[table.encode(x.detach()).long()])
