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
