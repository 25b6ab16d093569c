"""Fused few-bit activation kernels (Triton interpreter on CPU) against the PyTorch path.

Codes must be bit-identical to ``Table.encode`` / the lead's masks, y must match torch
(exactly for the piecewise-linear ones), and backward must equal grad * levels[code].
"""

import math

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fewbit.approx.functions import CONTINUOUS, normalize_params  # noqa: E402
from fewbit.approx.table import Table  # noqa: E402
from fewbit.codecs import bitpack  # noqa: E402
from fewbit.kernels import activation_backward, activation_forward, available, fmath  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
N = 20003  # not a multiple of 8: the last packed byte is partial
SYMMETRIC = {"sigmoid", "softsign", "tanh", "tanhshrink"}  # even derivatives: code of |x|


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |v| (float64), floored at the smallest normal's ulp."""
    digits, emin = {torch.float32: (24, -126), torch.float16: (11, -14), torch.bfloat16: (8, -126)}[
        dtype
    ]
    _, e = torch.frexp(v.double().abs())
    return torch.ldexp(
        torch.ones_like(v, dtype=torch.float64), torch.clamp(e - 1, min=emin) - digits + 1
    )


def sample(dtype: torch.dtype, n: int = N) -> torch.Tensor:
    return (torch.randn(n, dtype=torch.float64) * 4).to(dtype)


def make_table(bits: int, symmetric: bool) -> Table:
    """Sorted random boundaries over the data's range, distinct levels."""
    lo = 0.0 if symmetric else -6.0
    bounds = torch.empty((1 << bits) - 1, dtype=torch.float64).uniform_(lo, 6.0).sort().values
    levels = torch.randn(1 << bits, dtype=torch.float64)
    return Table(tuple(bounds.tolist()), tuple(levels.tolist()), symmetric)


def with_ties(x: torch.Tensor, table: Table) -> torch.Tensor:
    """x with some entries exactly on (dtype-rounded) boundaries and their negatives."""
    b = torch.tensor(table.boundaries, dtype=torch.float64).to(x.dtype)
    x = x.clone()
    x[: b.numel()] = b
    x[b.numel() : 2 * b.numel()] = -b
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_table_activation_forward(name: str, dtype: torch.dtype) -> None:
    symmetric = name in SYMMETRIC
    table = make_table(3, symmetric)
    x = with_ties(sample(dtype), table)
    params = normalize_params(name, {"alpha": 0.7} if name in ("celu", "elu") else {})
    bounds = torch.tensor(table.boundaries, dtype=torch.float64)
    y, packed = activation_forward(x, name, params, bounds, symmetric, 3)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(N * 3 / 8)
    assert torch.equal(bitpack.unpack(packed, 3, N), table.encode(x))  # bit-identical codes
    assert torch.equal(packed, bitpack.pack(table.encode(x), 3))  # identical bytes
    ref = CONTINUOUS[name].forward(x, params)
    assert y.dtype == dtype and y.shape == x.shape
    # Both sides evaluate the same formula in float32 with a few roundings of intermediates
    # no larger than max(|x|, |y|). float32: measured <= 3 units of ulp(y) + ulp(x), allow 4.
    # float16/bfloat16: the float32 values differ far below half an ulp of the output, so
    # one final rounding each: at most 1 unit.
    k = 4.0 if dtype == torch.float32 else 1.0
    err = (y.double() - ref.double()).abs()
    assert bool((err <= k * (ulp(ref, dtype) + ulp(x, dtype))).all()), err.max().item()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # silu(nan) in numpy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_every_bit_width(dtype: torch.dtype) -> None:
    """bits 1..4 count boundaries one by one, 5..8 binary-search: both equal Table.encode."""
    x = sample(dtype, 4099)
    x[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for bits in range(1, 9):
        for symmetric in (False, True):
            table = make_table(bits, symmetric)
            xt = with_ties(x[3:], table)
            xt = torch.cat([x[:3], xt])
            bounds = torch.tensor(table.boundaries, dtype=torch.float64)
            _, packed = activation_forward(xt, "silu", None, bounds, symmetric, bits)
            assert torch.equal(bitpack.unpack(packed, bits, xt.numel()), table.encode(xt))


MASKED_CASES = {
    # name: (params, torch forward, the lead's mask in fewbit.functional.activations)
    "relu": ({}, F.relu, lambda x: x > 0),
    "leaky_relu": (
        {"negative_slope": 0.1},
        lambda x: F.leaky_relu(x, 0.1),
        lambda x: x > 0,
    ),
    "threshold": (
        {"threshold": 0.1, "value": 0.37},
        lambda x: F.threshold(x, 0.1, 0.37),
        lambda x: x > 0.1,
    ),
    "hardsigmoid": ({}, F.hardsigmoid, lambda x: (x > -3.0) & (x < 3.0)),
    "hardtanh": (
        {"min_val": -0.3, "max_val": 0.7},
        lambda x: F.hardtanh(x, -0.3, 0.7),
        lambda x: (x > -0.3) & (x < 0.7),
    ),
    "relu6": ({}, F.relu6, lambda x: (x > 0.0) & (x < 6.0)),
    "hardshrink": (
        {"lambd": 0.3},
        lambda x: F.hardshrink(x, 0.3),
        lambda x: (x < -0.3) | (x > 0.3),
    ),
    "softshrink": (
        {"lambd": 0.3},
        lambda x: F.softshrink(x, 0.3),
        lambda x: (x < -0.3) | (x > 0.3),
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(MASKED_CASES))
def test_masked_activation_forward_exact(name: str, dtype: torch.dtype) -> None:
    params, forward, mask = MASKED_CASES[name]
    x = sample(dtype)
    # edge values: the parameters and their neighbours, as float and as dtype values
    edges = torch.tensor(
        [0.0, -0.0, 0.1, -0.1, 0.3, -0.3, 0.7, 3.0, -3.0, 6.0], dtype=torch.float64
    )
    x[: edges.numel()] = edges.to(dtype)
    x[edges.numel() : 2 * edges.numel()] = (
        edges.to(dtype).float().nextafter(torch.tensor(9.0)).to(dtype)
    )
    y, packed = activation_forward(x, name, params, None, False, 1)
    assert torch.equal(y, forward(x))  # exact: same float32 formula, one rounding
    assert torch.equal(bitpack.unpack(packed, 1, N), mask(x).to(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_backward_is_grad_times_level(bits: int, dtype: torch.dtype) -> None:
    codes = torch.randint(0, 1 << bits, (N,), dtype=torch.uint8)
    levels = torch.randn(1 << bits)
    grad = torch.randn(N, dtype=torch.float64).to(dtype).reshape(83, -1)
    out = activation_backward(grad, bitpack.pack(codes, bits), levels, bits)
    assert out.dtype == dtype and out.shape == grad.shape
    exact = (grad.float().reshape(-1) * levels[codes.long()]).to(dtype).reshape(grad.shape)
    assert torch.equal(out, exact)  # float32 product, one rounding to dtype
    # against the level first cast to dtype (two roundings): within 1 ulp of the product
    twice = (grad.reshape(-1) * levels.to(dtype)[codes.long()]).reshape(grad.shape)
    assert bool(((out.double() - twice.double()).abs() <= ulp(twice, dtype)).all())


def test_forward_backward_roundtrip_shapes_and_noncontiguous() -> None:
    x = sample(torch.float32, 6 * 37).reshape(6, 37).t()  # non-contiguous
    table = make_table(2, False)
    bounds = torch.tensor(table.boundaries, dtype=torch.float64)
    y, packed = activation_forward(x, "gelu", None, bounds, False, 2)
    assert y.shape == x.shape
    assert torch.equal(y, F.gelu(x.contiguous())) or torch.allclose(
        y, F.gelu(x), rtol=1e-6, atol=1e-6
    )
    assert torch.equal(
        bitpack.unpack(packed, 2, x.numel()), table.encode(x.contiguous()).reshape(-1)
    )
    g = torch.randn_like(x)
    out = activation_backward(g, packed, table.level_tensor(), 2)
    assert torch.equal(out, g * table(x))


@pytest.mark.parametrize("shape", [(0,), (3, 0, 2)])
def test_empty(shape: tuple) -> None:
    x = torch.empty(shape, dtype=torch.bfloat16)
    y, packed = activation_forward(x, "relu")
    assert y.shape == x.shape and y.dtype == x.dtype and packed.numel() == 0
    bounds = torch.arange(7, dtype=torch.float64)
    y, packed = activation_forward(x, "gelu", None, bounds, False, 3)
    assert y.shape == x.shape and packed.numel() == 0
    g = activation_backward(torch.empty(shape), packed, torch.zeros(8), 3)
    assert g.shape == shape


def test_argument_errors() -> None:
    x = torch.randn(16)
    bounds = torch.arange(7, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown activation"):
        activation_forward(x, "swish")
    with pytest.raises(ValueError, match="bits"):
        activation_forward(x, "relu", bits=3)
    with pytest.raises(ValueError, match="boundaries"):
        activation_forward(x, "gelu", bits=3)
    with pytest.raises(ValueError, match="boundaries"):
        activation_forward(x, "gelu", None, bounds[:5], False, 3)
    with pytest.raises(ValueError, match="threshold"):
        activation_forward(x, "threshold", {"threshold": 1.0})
    with pytest.raises(ValueError, match="lambd"):
        activation_forward(x, "softshrink", {"lambd": -1.0})
    with pytest.raises(ValueError, match="negative"):
        activation_forward(x, "relu", {"negative": 1.0})
    with pytest.raises(TypeError, match="x must be"):
        activation_forward(x.double(), "relu")
    with pytest.raises(ValueError, match="levels"):
        activation_backward(x, torch.zeros(6, dtype=torch.uint8), torch.zeros(4), 3)
    with pytest.raises(ValueError, match="packed"):
        activation_backward(x, torch.zeros(5, dtype=torch.uint8), torch.zeros(8), 3)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        activation_forward(torch.randn(8), "relu")


def test_available_only_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert available(torch.randn(2)) is False  # CPU tensors never dispatch automatically
    assert available("cpu") is False and available(None) is False
    assert available("cuda") is torch.cuda.is_available()
    monkeypatch.setenv("FEWBIT_DISABLE_TRITON", "1")
    assert available("cuda") is False


# --- every bfloat16 / float16 value; several programs; the word-store path ---------------------


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 bit patterns of a 16-bit float (NaNs, infinities, subnormals, -0.0)."""
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


# Tables whose dtype-rounded boundaries are the hard cases of the tagged 3-bit search: -0.0,
# zero-rounding and subnormal boundaries, the extremes (+-inf once rounded to float16), and
# the shipped GELU table (a boundary of 2.4e-07).
EDGE_TABLES = [
    (-1e38, -2.0, -1e-40, -0.0, 1e-40, 0.5, 3e38),
    (-65504.0, -1.0, -6e-8, 1e-45, 6e-8, 1.0, 65504.0),
    (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0),
    (1.0, 1.0078125, 1.015625, 1.0234375, 1.03125, 1.0390625, 1.046875),  # bf16 neighbours
]


EDGE_TABLES_4 = [
    (-1e38, -65504.0, -3.0, -1.0, -6e-8, -1e-40, -0.0, 1e-45, 1e-40, 6e-8, 0.5, 1.0, 3.0,
     65504.0, 3e38),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_of_every_16_bit_value(bits: int, dtype: torch.dtype) -> None:
    """2-4 bit codes (3 and 4 bits: binary search, boundaries tagged in their low bits) equal
    Table.encode for every value of the dtype."""
    from fewbit.approx.store import get_table

    x = every_value(dtype)
    edges = {2: [(-0.0, 1e-45, 3e38), (-1e38, -1e-40, 0.0)], 3: EDGE_TABLES, 4: EDGE_TABLES_4}
    tables = [Table(b, tuple(range(1 << bits))) for b in edges[bits]]
    tables += [get_table("gelu", bits), make_table(bits, False), make_table(bits, True)]
    for table in tables:
        bounds = torch.tensor(table.boundaries, dtype=torch.float64)
        _, packed = activation_forward(x, "silu", None, bounds, table.symmetric, bits)
        assert torch.equal(bitpack.unpack(packed, bits, x.numel()), table.encode(x)), table


@pytest.mark.parametrize("bits", [3, 4])
def test_float32_codes_at_the_edges(bits: int) -> None:
    """float32 3- and 4-bit codes (binary search, untagged) equal Table.encode for every
    bfloat16 value, its float32 neighbours and random patterns, with edge tables."""
    wide = every_value(torch.bfloat16).float()
    up, down = wide.nextafter(torch.tensor(float("inf"))), wide.nextafter(torch.tensor(-1e39))
    rand = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 14,), dtype=torch.int32)
    x = torch.cat([wide, up, down, rand.view(torch.float32)])
    edges = EDGE_TABLES if bits == 3 else EDGE_TABLES_4
    for table in [Table(b, tuple(range(1 << bits))) for b in edges] + [make_table(bits, False)]:
        bounds = torch.tensor(table.boundaries, dtype=torch.float64)
        _, packed = activation_forward(x, "silu", None, bounds, False, bits)
        assert torch.equal(bitpack.unpack(packed, bits, x.numel()), table.encode(x)), table


@triton.jit
def _gelu_restated_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    y = x * 0.5 * (1.0 + fmath.erf_fast(x * 0.7071067811865476))  # torch's operation order
    tl.store(y_ptr + offs, y, mask=offs < n)


def gelu_erff_restated(x: torch.Tensor) -> torch.Tensor:
    """torch's CUDA GELU in float32 (x * 0.5 * (1 + erff(x / sqrt 2))), erff restated by
    fmath.erf_fast; the interpreter's 2**x is exact where the GPU's is the same
    approximation in both formulas."""
    xf = x.float().contiguous()
    y = torch.empty_like(xf)
    _gelu_restated_kernel[(triton.cdiv(xf.numel(), 1 << 16),)](xf, y, xf.numel(), BLOCK=1 << 16)
    return y


def test_gelu_every_bfloat16_value() -> None:
    """Forward GELU for all 65536 bfloat16 inputs: torch's CUDA formula (erff restated), one
    rounding, bit for bit; and within 1 ulp(y) + 1 ulp(x) of torch's CPU GELU, the tolerance
    of test_table_activation_forward (whose erf is another implementation)."""
    x = every_value(torch.bfloat16)
    bounds = torch.arange(-3.0, 4.0, dtype=torch.float64)
    y, _ = activation_forward(x, "gelu", None, bounds, False, 3)
    ref = gelu_erff_restated(x)
    nan = ref.isnan()  # NaN inputs, and -inf (-inf * 0): the same in y
    assert torch.equal(y.isnan(), nan) and int(nan.sum()) == 255
    assert torch.equal(y[~nan].view(torch.int16), ref[~nan].bfloat16().view(torch.int16))
    # torch's CPU kernel overflows above 1.7e38 (it does not halve x first): compare below
    cpu = F.gelu(x)
    ok = x.isfinite() & (x.abs() < 1e38)
    err = (y[ok].double() - cpu[ok].double()).abs()
    assert bool((err <= ulp(cpu[ok], torch.bfloat16) + ulp(x[ok], torch.bfloat16)).all())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_many_programs_and_partial_blocks(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small programs (8 groups = 64 elements): int32 words from several programs, then the
    byte-stored tail (n % 32 != 0), give the torch packer's bytes; y as with one program."""
    import fewbit.kernels.activations as act

    table = make_table(bits, False)
    bounds = torch.tensor(table.boundaries, dtype=torch.float64)
    for dtype in DTYPES:
        for n in (64, 96, 100, 131, 1000):  # fresh data each time: no stale bytes can match
            x = sample(dtype, n)
            whole_y, whole = activation_forward(x, "gelu", None, bounds, False, bits)
            with monkeypatch.context() as m:
                m.setattr(act, "groups_per_program", lambda t: 8)
                y, packed = activation_forward(x, "gelu", None, bounds, False, bits)
            assert torch.equal(packed, bitpack.pack(table.encode(x), bits)), (dtype, n)
            assert torch.equal(whole, packed) and torch.equal(y, whole_y)
