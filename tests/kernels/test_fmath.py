"""Bit-exact float helpers of the kernels (run by the Triton interpreter on CPU).

NVIDIA GPUs produce the canonical NaN 0x7FFFFFFF while numpy produces 0x7FC00000, so the
rounding is tested on explicit bit patterns, not on NaNs the interpreter happens to make.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fewbit.kernels import fmath  # noqa: E402


@triton.jit
def _round_bf16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, fmath.round_to(x, tl.bfloat16), mask=offs < n)


def _bits(values: list[int]) -> torch.Tensor:
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)


PATTERNS = [
    0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFF800001, 0x7FC00000, 0xFFC00000, 0x7FBFFFFF,
    0x7F800000, 0xFF800000,  # +-inf
    0x7F7FFFFF, 0xFF7FFFFF,  # largest finite: rounds up to +-inf in bfloat16
    0x7F7F8000, 0x7F7F7FFF, 0x7F7F8001, 0x7F7EFFFF,  # ties and neighbours near the top
    0x3F808000, 0x3F818000, 0x3F80FFFF, 0x00000001, 0x80008000, 0x00018000, 0,
    0x80000000, 0x3F800000, 0x40490FDB,
]  # fmt: skip


def test_round_to_bfloat16_on_bit_patterns() -> None:
    x = _bits(PATTERNS).view(torch.float32)
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    _round_bf16_kernel[(1,)](x, y, x.numel(), BLOCK=32)
    ref = x.to(torch.bfloat16)
    nan = x.isnan()
    assert bool(y[nan].isnan().all())  # NaN stays NaN (it was -0.0 for 0x7FFFFFFF)
    assert bool((y[nan].view(torch.int16) == 0x7FFF).all())  # CUDA's canonical quiet NaN
    # everything else: torch's round-to-nearest-even, bit for bit (inf, overflow, ties, -0.0)
    assert torch.equal(y[~nan].view(torch.int16), ref[~nan].view(torch.int16))


def test_round_to_bfloat16_random_bits() -> None:
    x = torch.randint(-(1 << 31), (1 << 31) - 1, (4096,), dtype=torch.int32).view(torch.float32)
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    _round_bf16_kernel[(1,)](x, y, x.numel(), BLOCK=4096)
    nan = x.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), x[~nan].to(torch.bfloat16).view(torch.int16))


@triton.jit
def _erf_fast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, fmath.erf_fast(x), mask=offs < n)


def test_erf_fast_against_float64_erf() -> None:
    """The restated erff (compiled GELU's erf) is within erff's documented 2 ulp of erf.

    In the interpreter 2**x is exact where the GPU's approximation adds up to 2 ulp of a
    value below 0.37, i.e. under 1 ulp of the result 1 - 2**x; the bound holds either way.
    A wrongly transcribed coefficient or branch would be off by far more.
    """
    torch.manual_seed(0)
    x = torch.cat([
        torch.randn(3000) * 2.0,
        torch.linspace(-6.0, 6.0, 1001),
        torch.tensor([0.0, -0.0, 1.002959966659546, -1.002959966659546, 1.0029598, 1e-3,
                      -1e-6, 3.9, -4.5, 10.0, float("inf"), -float("inf"), float("nan")]),
    ]).float()  # fmt: skip
    y = torch.empty_like(x)
    _erf_fast_kernel[(1,)](x, y, x.numel(), BLOCK=8192)
    ref = torch.erf(x.double())
    finite = x.isfinite()
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(2.0**-126)  # ulp <= eps * |v|
    err = (y.double() - ref).abs()
    assert bool((err[finite] <= 2 * ulp[finite]).all()), err[finite].max().item()
    assert bool(y[x.isnan()].isnan().all())
    assert y[x == float("inf")].item() == 1.0 and y[x == -float("inf")].item() == -1.0
    zeros = y[x == 0.0].view(torch.int32)
    assert torch.equal(zeros, x[x == 0.0].view(torch.int32))  # +-0 keep their sign


@triton.jit
def _gelu_pair_kernel(x_ptr, fast_ptr, ref_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(fast_ptr + offs, fmath.gelu_fast(x), mask=offs < n)
    ref = x * 0.5 * (1.0 + fmath.erf_fast(x * 0.7071067811865476))  # torch's CUDA formula
    tl.store(ref_ptr + offs, ref, mask=offs < n)


def test_gelu_fast_is_torch_cuda_formula_bit_for_bit() -> None:
    """gelu_fast (sign handled once, 0.5 folded into an fma) equals torch's CUDA formula with
    erff restated, on random float32 bit patterns of every exponent: bit for bit, except a
    float32 subnormal x with its last bit set (torch halves x first: one ulp at most)."""
    torch.manual_seed(1)
    x = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 18,), dtype=torch.int32).view(torch.float32)
    special = [0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3e-45, 3.4e38, -3.4e38]
    x = torch.cat([x, torch.tensor(special), torch.linspace(-12.0, 12.0, 1 << 16)])
    fast, ref = torch.empty_like(x), torch.empty_like(x)
    _gelu_pair_kernel[(triton.cdiv(x.numel(), 1 << 16),)](x, fast, ref, x.numel(), BLOCK=1 << 16)
    nan = ref.isnan()
    assert torch.equal(fast.isnan(), nan)
    odd_subnormal = (x.abs() < 2.0**-126) & (x.view(torch.int32) & 1 == 1)
    exact = ~nan & ~odd_subnormal
    assert torch.equal(fast[exact].view(torch.int32), ref[exact].view(torch.int32))
    step = (fast[odd_subnormal].view(torch.int32) - ref[odd_subnormal].view(torch.int32)).abs()
    assert int(odd_subnormal.sum()) > 0 and bool((step <= 1).all())


@triton.jit
def _less_bit_kernel(t_ptr, x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    t = tl.load(t_ptr + offs, mask=offs < n, other=0.0)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, fmath.less_bit(t, x), mask=offs < n)


def test_less_bit_is_the_comparison() -> None:
    """less_bit(t, x) == (t < x) for unequal t, x: signs, zeros against subnormals, the
    extremes, infinities, and NaN t or x of either sign (0)."""
    vals = [0x00000001, 0x80000001, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000,
            0xBF800000, 0x7F800000, 0xFF800000, 0x00010001, 0x80010001, 0x7FC00001,
            0xFFC00001]  # fmt: skip
    t = _bits(vals).view(torch.float32)
    xs = torch.cat([t, _bits([0, 0x80000000, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF,
                              0xFFFFFFFF]).view(torch.float32)])  # fmt: skip
    tt, xx = torch.meshgrid(t, xs, indexing="ij")
    keep = tt.view(torch.int32) != xx.view(torch.int32)
    tt, xx = tt[keep].contiguous(), xx[keep].contiguous()
    out = torch.empty(tt.numel(), dtype=torch.int32)
    _less_bit_kernel[(1,)](tt, xx, out, tt.numel(), BLOCK=512)
    assert torch.equal(out, (tt < xx).int())


@triton.jit
def _silu_pair_kernel(x_ptr, fast_ptr, ref_ptr, n, RCP_ERR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(fast_ptr + offs, fmath.silu_fast(x, False, RCP_ERR), mask=offs < n)
    ref = tl.math.div_rn(x, 1.0 + fmath.exp(-x, False))  # torch's formula, IEEE division
    tl.store(ref_ptr + offs, ref, mask=offs < n)


@pytest.mark.parametrize("rcp_err", [-2, -1, 0, 1, 2])
def test_silu_fast_division_is_ieee(rcp_err: int) -> None:
    """silu_fast's division (reciprocal approximation, Newton step, remainder correction, the
    divisor scaled by 1/4) equals the IEEE quotient x / (1 + exp(-x)) bit for bit, even with
    the reciprocal approximation off by up to 2 ulps (the GPU's MUFU.RCP is within 1): every
    bfloat16 value, random float32 patterns of every exponent, and the edges of its ranges
    (x = -0.0, tiny and subnormal x where the divisor is 2, x > 20, 1 + exp(-x) near 2**128
    and infinite)."""
    torch.manual_seed(2)
    every_bf16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    edges = [0.0, -0.0, 1e-45, -1e-45, 6e-45, -6e-45, 1e-38, 20.0, 20.000002, 3.4e38,
             -3.4e38, 8.5e37, -87.33, -87.34, -87.35, -88.72, -88.7228, -88.73, -89.0,
             float("inf"), -float("inf"), float("nan")]  # fmt: skip
    x = torch.cat([
        every_bf16.view(torch.bfloat16).float(),
        torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 17,), dtype=torch.int32).view(
            torch.float32
        ),
        torch.linspace(-100.0, 30.0, 1 << 16),
        torch.tensor(edges),
    ])  # fmt: skip
    fast, ref = torch.empty_like(x), torch.empty_like(x)
    grid = (triton.cdiv(x.numel(), 1 << 16),)
    _silu_pair_kernel[grid](x, fast, ref, x.numel(), RCP_ERR=rcp_err, BLOCK=1 << 16)
    nan = ref.isnan()
    assert torch.equal(fast.isnan(), nan)
    assert torch.equal(fast[~nan].view(torch.int32), ref[~nan].view(torch.int32))
