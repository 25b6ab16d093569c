"""Triton group quantizer (interpreter on CPU) against fewbit.codecs.quantize: same format."""

import importlib

import pytest
import torch

pytest.importorskip("triton")

from fewbit.kernels import quantize as kq  # noqa: E402

codec = importlib.import_module("fewbit.codecs.quantize")

CASES = [
    ((4, 3000), 256),  # per-sample rows, short last group in each row
    ((10001,), 256),  # one row, n not a multiple of 8
    ((3, 200), 40),  # group size not a power of two
    ((2, 3, 8), 8),
]


def codec_noise(shape: tuple, group_size: int, seed: int) -> torch.Tensor:
    """The uniform draws the torch codec makes (one block: padded rows), in element order."""
    rows, row_len, gpr = kq._layout(shape, group_size, True)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((rows, gpr * group_size), generator=gen)[:, :row_len].reshape(-1)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))  # NaN == NaN bitwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_same_format_given_same_noise(bits: int, dtype: torch.dtype) -> None:
    for shape, group_size in CASES:
        x = (torch.randn(shape) * 3 + 1).to(dtype)
        if shape == (4, 3000):
            x[1, 5] = float("nan")  # its group decodes to NaN
            x[2, 300] = float("inf")
            x[3, :256] = 0.25  # constant group: scale 0
        ref = codec.quantize(x, bits, group_size, generator=torch.Generator().manual_seed(3))
        got = kq.quantize(x, bits, group_size, noise=codec_noise(shape, group_size, 3))
        assert same_bits(got.lo, ref.lo) and got.lo.dtype == ref.lo.dtype
        assert same_bits(got.scale, ref.scale)
        assert torch.equal(got.packed, ref.packed)
        assert got.nbytes() == codec.quantized_nbytes(shape, bits, group_size)
        # dequantizers are interchangeable and agree bit for bit (NaN groups included)
        expect = codec.dequantize(ref)
        for out in (kq.dequantize(ref), kq.dequantize(got), codec.dequantize(got)):
            assert out.dtype == dtype and out.shape == x.shape
            assert torch.equal(out.nan_to_num(7.0), expect.nan_to_num(7.0))
            assert torch.equal(out.isnan(), expect.isnan())


def test_philox_noise_is_unbiased() -> None:
    x = torch.randn(8, 4096)
    q = kq.quantize(x, 2, 256, seed=11)
    err = kq.dequantize(q) - x
    scale = q.scale.float().repeat_interleave(256).reshape(8, 4096)
    assert bool((err.abs() < scale).all())  # one draw errs by less than one step
    # E[err] = 0 and Var[err] <= scale^2 / 4 per element, independent draws: the mean of
    # err / scale over 32768 elements has std <= 0.5 / sqrt(32768) = 0.0028; allow 5 sigma.
    assert abs((err / scale).mean().item()) < 5 * 0.5 / 32768**0.5
    other = kq.quantize(x, 2, 256, seed=12)
    assert not torch.equal(other.packed, q.packed)  # the seed matters
    assert torch.equal(kq.quantize(x, 2, 256, seed=11).packed, q.packed)  # and is all that does


def test_layout_restrictions_and_errors() -> None:
    assert kq.supports((4, 3000), 256) and not kq.supports((3, 20), 8)  # 20 % 8 != 0
    assert not kq.supports((100,), 12) and kq.supports((3, 20), 8, per_sample=False)
    with pytest.raises(ValueError, match="group_size"):
        kq.quantize(torch.randn(3, 20), 2, 8)
    with pytest.raises(ValueError, match="bits"):
        kq.quantize(torch.randn(64), 3, 8)
    with pytest.raises(TypeError, match="x must be"):
        kq.quantize(torch.randn(64).double(), 2, 8)
    with pytest.raises(ValueError, match="noise"):
        kq.quantize(torch.randn(64), 2, 8, noise=torch.rand(63))
    q = kq.quantize(torch.empty(0, 5), 2, 8)
    assert q.packed.numel() == 0 and kq.dequantize(q).shape == (0, 5)
