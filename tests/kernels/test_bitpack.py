"""Triton bit packing (interpreter on CPU) against fewbit.codecs.bitpack: same bytes both ways."""

import pytest
import torch

pytest.importorskip("triton")

from fewbit.codecs import bitpack as ref  # noqa: E402
from fewbit.kernels import pack, unpack  # noqa: E402

# n = 0 (empty), 1, 13 and 20003 (not multiples of 8), 16384 (a multiple of 8)
SIZES = [0, 1, 13, 16384, 20003]


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_interchangeable_with_torch(bits: int) -> None:
    for n in SIZES:
        codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
        assert torch.equal(packed, ref.pack(codes, bits))  # same bytes, padding bits zero
        assert torch.equal(ref.unpack(packed, bits, n), codes)  # torch unpacks the kernel's
        assert torch.equal(unpack(ref.pack(codes, bits), bits, n), codes)  # and vice versa


def test_pack_accepts_wider_integer_codes_and_shapes() -> None:
    codes = torch.randint(0, 8, (3, 5, 7), dtype=torch.int64)
    assert torch.equal(pack(codes, 3), ref.pack(codes, 3))


def test_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match="codes"):
        pack(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="expected 2"):
        unpack(torch.zeros(3, dtype=torch.uint8), 2, 8)
    with pytest.raises(TypeError, match="packed"):
        unpack(torch.zeros(2, dtype=torch.int32), 2, 8)
