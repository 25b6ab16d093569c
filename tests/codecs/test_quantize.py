"""Tests of the per-group stochastic quantizer (fewbit.codecs.quantize)."""

from __future__ import annotations

import math

import pytest
import torch

from fewbit.codecs import quantize as qmod
from fewbit.codecs.bitpack import packed_nbytes
from fewbit.codecs.quantize import QuantizedTensor, dequantize, quantize, quantized_nbytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BITS = [1, 2, 4, 8]
BF16_REL_ULP = 2.0**-7  # bf16 keeps 8 significant bits: one ulp <= 2**-7 * |value|
FP16_REL_ULP = 2.0**-10


def group_ids(shape: tuple[int, ...], group_size: int, per_sample: bool = True) -> torch.Tensor:
    """Reference: the group index of every element, in x's shape (written independently)."""
    numel = math.prod(shape)
    if per_sample and len(shape) >= 2:
        rows, row_len = shape[0], numel // shape[0]
    else:
        rows, row_len = 1, numel
    per_row = -(-row_len // group_size)
    r = torch.arange(rows).unsqueeze(1)
    c = torch.arange(row_len).unsqueeze(0)
    return (r * per_row + c // group_size).reshape(shape)


def group_minmax(x: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xf, idf = x.double().reshape(-1), ids.reshape(-1)
    mn = torch.full((n,), math.inf, dtype=torch.float64).scatter_reduce(0, idf, xf, "amin")
    mx = torch.full((n,), -math.inf, dtype=torch.float64).scatter_reduce(0, idf, xf, "amax")
    return mn, mx


# ---- arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [0, 3, 5, 16, -1])
def test_bad_bits_value(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(10), bits)
    with pytest.raises(ValueError, match="bits"):
        quantized_nbytes((10,), bits)


@pytest.mark.parametrize("bits", [2.0, True, "2"])
def test_bad_bits_type(bits: object) -> None:
    with pytest.raises(TypeError, match="bits"):
        quantize(torch.randn(10), bits)  # type: ignore[arg-type]


@pytest.mark.parametrize("group_size", [0, -3])
def test_bad_group_size(group_size: int) -> None:
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(10), 2, group_size)
    with pytest.raises(ValueError, match="group_size"):
        quantized_nbytes((10,), 2, group_size)


def test_bad_input_dtype() -> None:
    with pytest.raises(TypeError, match="floating"):
        quantize(torch.arange(10), 2)
    with pytest.raises(TypeError, match="Tensor"):
        quantize([1.0, 2.0], 2)  # type: ignore[arg-type]


# ---- layout and size ---------------------------------------------------------------------
def test_nbytes_formula_examples() -> None:
    # (3, 300), G=256, 2 bits: 900 codes -> 225 bytes; 3 rows x 2 groups x 4 bytes = 24.
    assert quantized_nbytes((3, 300), 2, 256) == 225 + 24
    # Without per-sample grouping: ceil(900 / 256) = 4 groups.
    assert quantized_nbytes((3, 300), 2, 256, per_sample=False) == 225 + 16
    assert quantized_nbytes((), 2) == 1 + 4  # one element, one group
    assert quantized_nbytes((0, 7), 8) == 0
    # Overhead at the default G=256: 32 bits per 256 elements = 0.125 bits per element.
    n = 256 * 1024
    assert quantized_nbytes((n,), 2) * 8 / n == 2.125


SHAPES = [(3, 300), (1000,), (2, 3, 5), (0, 4), (), (7,), (5, 1), (4, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_roundtrip_layout(dtype: torch.dtype, bits: int) -> None:
    for shape in SHAPES:
        for per_sample in (True, False):
            x = torch.randn(shape, dtype=dtype)
            q = quantize(x, bits, 16, per_sample=per_sample)
            y = dequantize(q)
            assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
            assert q.nbytes() == quantized_nbytes(shape, bits, 16, per_sample)
            assert q.packed.dtype == torch.uint8
            assert q.packed.numel() == packed_nbytes(x.numel(), bits)
            assert q.scale.dtype == torch.bfloat16
            assert q.lo.dtype == (torch.float16 if dtype == torch.float16 else torch.bfloat16)
            n_groups = int(group_ids(tuple(shape), 16, per_sample).max()) + 1 if x.numel() else 0
            assert q.lo.numel() == q.scale.numel() == n_groups


# ---- error bound -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_error_bound_and_scale(dtype: torch.dtype, bits: int) -> None:
    shape, g = (6, 100), 32
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    q = quantize(x, bits, g)
    ids = group_ids(shape, g)
    mn, mx = group_minmax(x, ids, q.lo.numel())
    lo, scale = q.lo.double(), q.scale.double()
    levels = 2**bits - 1
    # Stored range covers the group: lo <= min and lo + levels * scale >= max.
    assert bool((lo <= mn).all())
    assert bool((lo + levels * scale >= mx).all())
    # lo is min rounded down by at most one ulp of the 16-bit lo dtype (exact for fp16 input).
    rel = FP16_REL_ULP if dtype == torch.float16 else BF16_REL_ULP
    assert bool((mn - lo <= mn.abs() * rel).all())
    # scale = (max - lo) / (2^b - 1) rounded up by at most one bf16 ulp (+2^-20 margin).
    ideal = (mx - lo) / levels
    assert bool((scale <= ideal * (1 + BF16_REL_ULP) * (1 + 2.0**-19)).all())
    # So: scale <= ((max - min) + ulp(min)) / (2^b - 1) * (1 + 2^-7) up to the margin.
    # Per element, one draw is one of the two levels around x: |dequant - x| <= scale.
    # The final cast to x.dtype adds at most half an ulp of that dtype.
    y = dequantize(q).double()
    cast = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(dtype, 0.0) * y.abs()
    assert bool(((y - x.double()).abs() <= scale[ids] + cast).all())


def test_levels_cover_range_exactly_at_ends() -> None:
    # Group min and max are representable levels' neighbours: with 1 bit every code is 0 or
    # 1, so every output is lo or lo + scale.
    x = torch.randn(4, 64)
    q = quantize(x, 1, 64)
    y = dequantize(q)
    lo = q.lo.float().unsqueeze(1)
    hi = lo + q.scale.float().unsqueeze(1)
    assert bool(((y == lo) | (y == hi)).all())


# ---- unbiasedness ------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_unbiased_mean_converges(bits: int) -> None:
    # D independent draws of the same 1024 values: repeat x as D samples; per-sample grouping
    # gives every sample the same groups, hence the same lo/scale (checked below).
    n, draws, g = 1024, 2000, 256
    x = torch.randn(n) * 2
    gen = torch.Generator().manual_seed(1)
    q = quantize(x.expand(draws, n), bits, g, generator=gen)
    scale = q.scale.float().view(draws, -1)
    assert bool((scale == scale[0]).all())
    s = scale[0].repeat_interleave(g)[:n]
    err = dequantize(q).mean(0) - x
    # One draw is lo + floor(v)*s or lo + ceil(v)*s with P = frac(v): mean x, variance
    # s^2 p(1-p) <= s^2/4, values in an interval of length s. Hoeffding: P(|mean of D - x| >=
    # k s / sqrt(D)) <= 2 exp(-2 k^2); k = 3 with a union bound over n elements gives a
    # failure probability <= 2 n e^-18 ~ 3e-5.
    assert bool((err.abs() <= 3 * s / math.sqrt(draws)).all())
    # Rate: E[err^2] <= s^2 / (4 D). Averaged over n = 1024 elements the ratio concentrates
    # (relative sd ~ sqrt(2 / n) ~ 4.4%); the average p(1-p) is ~1/6 < 1/4, so 1.2x is ample.
    assert float((err / s).square().mean()) <= 1.2 / (4 * draws)
    # A biased (round-to-nearest) quantizer has errors ~ s/4 on average, 15x the bound.
    nearest = (x - q.lo.float()[: n // g].repeat_interleave(g)) / s
    biased = nearest.round() * s + q.lo.float()[: n // g].repeat_interleave(g) - x
    assert float((biased / s).square().mean()) > 10 / (4 * draws)


def test_tiny_range_groups_keep_a_finite_reciprocal_and_stay_unbiased() -> None:
    # Groups spanning subnormal floats only: their step (range / 3) is below 2**-126, so the
    # scale is raised to 2**-126 (the smallest normal float32): 1 / scale is finite and the
    # codes stay stochastic (an infinite reciprocal would send every x > lo to the top code).
    n, draws, g = 256, 512, 256
    x = torch.linspace(0.0, 2.0**-130, n)  # subnormal float32 values
    gen = torch.Generator().manual_seed(5)
    q = quantize(x.expand(draws, n), 2, g, generator=gen)
    scale = q.scale.float()
    assert bool((scale == 2.0**-126).all()) and bool(torch.isfinite(1 / scale).all())
    y = dequantize(q)
    s = 2.0**-126
    assert bool(((y - x).abs() < s).all())  # one draw errs by less than one step
    # unbiased: each element's mean over D draws is within 3 s / sqrt(D) (Hoeffding, as in
    # test_unbiased_mean_converges), and the codes are not all at the top level
    err = y.mean(0) - x
    assert bool((err.abs() <= 3 * s / math.sqrt(draws)).all())
    assert bool((y < x.max()).any())


def test_generator_reproducible_and_global_rng_untouched() -> None:
    x = torch.randn(8, 300)
    state = torch.get_rng_state()
    a = quantize(x, 2, generator=torch.Generator().manual_seed(5))
    b = quantize(x, 2, generator=torch.Generator().manual_seed(5))
    c = quantize(x, 2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.packed, b.packed)
    assert not torch.equal(a.packed, c.packed)
    # Without a generator the global RNG drives the noise.
    torch.manual_seed(3)
    d = quantize(x, 2)
    torch.manual_seed(3)
    e = quantize(x, 2)
    assert torch.equal(d.packed, e.packed)
    assert not torch.equal(torch.get_rng_state(), state)


# ---- per-sample grouping -----------------------------------------------------------------
def test_per_sample_isolates_outlier() -> None:
    # Rows of 300 elements, G=256: without per-sample grouping, group 1 spans the tail of
    # row 0 and the head of row 1.
    x = torch.randn(4, 300)
    x[1] *= 1e4  # outlier sample
    bits = 2
    q = quantize(x, bits, 256, per_sample=True)
    y = dequantize(q)
    for r in (0, 2, 3):
        bound = (x[r].max() - x[r].min()) / 3 * (1 + 2 * BF16_REL_ULP) + x[r].abs().max() / 64
        assert float((y[r] - x[r]).abs().max()) <= float(bound)
    flat = quantize(x, bits, 256, per_sample=False)
    yf = dequantize(flat)
    # Group 1 of the flat layout contains row 1 values of magnitude ~1e4: its step is huge.
    assert float(flat.scale[1]) > 1000 * float(q.scale[0])
    assert float((yf[0, 256:] - x[0, 256:]).abs().max()) > 10 * float(bound)


# ---- special values ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_exact_half(dtype: torch.dtype, bits: int) -> None:
    vals = torch.randn(5, 1).to(dtype)
    x = vals.expand(5, 64).contiguous()
    q = quantize(x, bits, 32)
    assert bool((q.scale == 0).all())
    assert torch.equal(dequantize(q), x)


@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_fp32(bits: int) -> None:
    # Values representable in bf16 (0, 1, -2.5, 1024) are exact; others are within one bf16
    # ulp of the value (lo is rounded down to bf16, scale covers the rest).
    x = torch.tensor([0.0, 1.0, -2.5, 1024.0]).unsqueeze(1).expand(4, 64).contiguous()
    assert torch.equal(dequantize(quantize(x, bits, 64)), x)
    z = torch.full((4, 64), 0.1)
    y = dequantize(quantize(z, bits, 64))
    assert float((y - z).abs().max()) <= 0.1 * BF16_REL_ULP


def test_empty_tensors() -> None:
    for shape in [(0,), (0, 5), (3, 0), (2, 0, 4)]:
        x = torch.empty(shape)
        q = quantize(x, 4)
        assert q.nbytes() == 0
        y = dequantize(q)
        assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_group_is_nan_others_intact(bad: float) -> None:
    x = torch.randn(3, 512)
    x[1, 300] = bad  # row 1, group 1 (elements 256..511)
    q = quantize(x, 2, 256)
    y = dequantize(q)
    assert bool(y[1, 256:].isnan().all())
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 256:] = False
    assert bool(y[mask].isfinite().all())
    ids = group_ids((3, 512), 256)
    assert bool(((y - x).abs()[mask] <= q.scale.float()[ids][mask]).all())


def test_all_nan_and_out_of_float32_range() -> None:
    y = dequantize(quantize(torch.full((10,), float("nan")), 8))
    assert bool(y.isnan().all())
    x = torch.randn(2, 64, dtype=torch.float64)
    x[0, 0] = 1e300  # beyond the float32 range: treated as non-finite
    y = dequantize(quantize(x, 4, 64))
    assert bool(y[0].isnan().all()) and bool(y[1].isfinite().all())


# ---- chunked processing ------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 1001), (10, 20), (1, 1000), (7, 3, 5)])
def test_chunked_matches_whole(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(shape)
    whole = quantize(x, 2, 16)
    y_whole = dequantize(whole)
    monkeypatch.setattr(qmod, "_CHUNK", 64)  # forces multi-row and intra-row blocks
    chunked = quantize(x, 2, 16)
    # lo/scale are deterministic: identical; the codes differ only by the noise draws.
    assert torch.equal(chunked.lo, whole.lo) and torch.equal(chunked.scale, whole.scale)
    assert chunked.nbytes() == whole.nbytes()
    ids = group_ids(shape, 16)
    assert bool(((dequantize(chunked) - x).abs() <= whole.scale.float()[ids]).all())
    # Dequantizing in chunks gives bit-identical output.
    assert torch.equal(dequantize(whole), y_whole)


def test_to_keeps_metadata() -> None:
    q = quantize(torch.randn(4, 40), 4, 16)
    r = q.to("cpu")
    assert isinstance(r, QuantizedTensor) and r.nbytes() == q.nbytes()
    assert torch.equal(dequantize(r), dequantize(q))


# ---- torch.compile and meta tensors --------------------------------------------------------
def test_quantize_dequantize_compile_fullgraph_and_match_eager() -> None:
    def roundtrip(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = quantize(x, 2, 64)
        return dequantize(q), q.packed

    x = torch.randn(6, 100).t()  # non-contiguous: decode restores the strides
    compiled = torch.compile(roundtrip, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    y, packed = compiled(x)
    torch.manual_seed(0)
    y_ref, packed_ref = roundtrip(x)
    # same global-RNG seed draw, same custom ops: bit-identical to eager
    assert torch.equal(packed, packed_ref) and torch.equal(y, y_ref)
    assert y.stride() == x.stride()


def test_meta_tensors_propagate_shapes() -> None:
    x = torch.empty(5, 64, device="meta", dtype=torch.bfloat16)
    q = quantize(x, 4, 32)
    assert q.packed.shape == (5 * 64 * 4 // 8,) and q.lo.shape == (10,)
    y = dequantize(q)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_call_equals_the_custom_op(dtype: torch.dtype) -> None:
    """quantize/dequantize skip the dispatcher for plain CPU tensors: the bytes and values
    are those of the custom ops on the same seed."""
    from fewbit.codecs import native
    from fewbit.codecs import quantize as qmod

    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(3)).to(dtype)
    seed = torch.tensor([0x5EED5EED1234], dtype=torch.int64)
    assert native.direct_call_ok(x, seed)
    direct = qmod._quantize_impl(x, seed, 2, 64, True)
    via_op = torch.ops.fewbit.quantize(x, seed, 2, 64, True)
    assert all(torch.equal(a, b) for a, b in zip(direct, via_op))
    args = (*direct, [7, 300], dtype, 2, 64, True)
    assert torch.equal(qmod._dequantize_impl(*args), torch.ops.fewbit.dequantize(*args))
    torch.manual_seed(11)
    q = quantize(x, 2, 64)
    torch.manual_seed(11)
    want = torch.ops.fewbit.quantize(x, qmod.draw_seed(None, "cpu"), 2, 64, True)
    assert torch.equal(q.packed, want[0]) and torch.equal(dequantize(q), dequantize(q))


def test_dispatch_modes_and_subclasses_take_the_custom_op() -> None:
    """Under a dispatch mode (fake tensors) or for tensor subclasses the codec goes through its
    custom op (the fake implementation gives shapes; no data pointer is touched)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fewbit.codecs import native

    with FakeTensorMode():
        x = torch.empty(4, 256)
        assert not native.direct_call_ok(x)
        q = quantize(x, 2)
        y = dequantize(q)
    assert q.packed.shape == (4 * 256 * 2 // 8,) and y.shape == (4, 256)
    assert not native.direct_call_ok(torch.nn.Parameter(torch.randn(3)))
    assert not native.direct_call_ok(torch.randn(3, device="meta"))
