"""The codec protocol: encode/decode round trips, stored bytes, strides, device copies."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import pytest
import torch
from torch import Tensor

from fewbit.codecs import (
    BitPacker,
    Codec,
    Encoded,
    GroupQuantizer,
    Keep,
    MaskPacker,
    PackedCodes,
    Plain,
    QuantizedTensor,
    packed_nbytes,
    quantized_nbytes,
    storage_keys,
    stored_nbytes,
)
from fewbit.codecs.quantize import MAX_GROUP_SIZE, quantize


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packer_is_lossless_and_stores_ceil_n_bits_over_8(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (7, 13), dtype=torch.int64)
    enc = BitPacker(bits).encode(codes)
    assert isinstance(enc, PackedCodes) and isinstance(BitPacker(bits), Codec)
    out = enc.decode()
    assert out.dtype == torch.int64 and torch.equal(out, codes)
    assert enc.nbytes() == packed_nbytes(91, bits) == stored_nbytes(enc)


def test_mask_packer_one_bit_per_element() -> None:
    mask = torch.rand(5, 33) > 0.5
    enc = MaskPacker().encode(mask)
    assert torch.equal(enc.decode(), mask) and enc.decode().dtype == torch.bool
    assert enc.nbytes() == (5 * 33 + 7) // 8
    with pytest.raises(TypeError, match="bool"):
        MaskPacker().encode(torch.zeros(3))
    with pytest.raises(TypeError, match="t must be"):
        BitPacker(2).encode(torch.zeros(3))
    with pytest.raises(ValueError, match="bits"):
        BitPacker(9)


def test_group_quantizer_matches_quantize_and_its_byte_formula() -> None:
    x = torch.randn(4, 1000)
    codec = GroupQuantizer(bits=2, group_size=128, generator=torch.Generator().manual_seed(1))
    enc = codec.encode(x)
    ref = quantize(x, 2, 128, generator=torch.Generator().manual_seed(1))
    assert isinstance(enc, QuantizedTensor) and torch.equal(enc.packed, ref.packed)
    assert enc.nbytes() == quantized_nbytes(x.shape, 2, 128) == stored_nbytes(enc)
    out = enc.decode()
    assert out.shape == x.shape and out.dtype == x.dtype
    # one draw errs by less than one quantization step per element
    step = enc.scale.float().view(4, 8).repeat_interleave(128, dim=1)[:, :1000]
    assert bool(((out - x).abs() <= step).all())


def test_group_size_is_capped_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="group_size"):
        GroupQuantizer(2, MAX_GROUP_SIZE + 1)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(10), 2, MAX_GROUP_SIZE * 2)
    assert quantize(torch.randn(10), 2, MAX_GROUP_SIZE).nbytes() == quantized_nbytes((10,), 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(6, 40).t(),  # transposed
        lambda: torch.randn(6, 80)[:, ::2],  # strided slice
        lambda: torch.randn(4, 6, 8).permute(2, 0, 1),  # permuted
    ],
)
def test_decode_restores_strides_of_non_contiguous_saves(make) -> None:
    x = make()
    for enc in (GroupQuantizer(8).encode(x), Keep().encode(x)):
        out = enc.decode()
        assert out.shape == x.shape and out.stride() == x.stride()
    codes = torch.zeros(x.untyped_storage().nbytes() // 4, dtype=torch.uint8).as_strided(
        x.shape, x.stride()
    )
    codes.copy_(x > 0)  # same strides as x
    out = BitPacker(1).encode(codes).decode()
    assert out.stride() == x.stride() and torch.equal(out, codes)


def test_overlapping_strides_decode_contiguous_and_equal() -> None:
    x = torch.randn(1, 8).expand(5, 8)  # stride 0: cannot be re-created without the original
    out = MaskPacker().encode(x > 0).decode()
    assert out.is_contiguous() and torch.equal(out, x > 0)


def test_stored_nbytes_counts_each_storage_once() -> None:
    base = torch.zeros(100)  # 400 bytes
    assert stored_nbytes(base) == 400
    # a view holds its whole storage, and the same storage twice counts once
    assert stored_nbytes(base[:10]) == 400
    assert stored_nbytes([base, base[5:], {"a": (base.view(10, 10), None, 3)}]) == 400
    other = torch.zeros(10, dtype=torch.float64)
    assert stored_nbytes(base, Plain(other), Plain(other)) == 480
    seen = storage_keys([base])  # e.g. parameters, held anyway
    assert stored_nbytes(base, other, seen=seen) == 80
    with pytest.raises(TypeError, match="cannot count"):
        stored_nbytes(object())


def test_to_keeps_metadata_and_copies_storages() -> None:
    x = torch.randn(3, 64)
    enc = GroupQuantizer(4, 32).encode(x)
    moved = enc.to("cpu")  # same device: shares tensors, same decode
    assert isinstance(moved, QuantizedTensor) and moved.bits == 4 and moved.device.type == "cpu"
    assert torch.equal(moved.decode(), enc.decode())
    meta = enc.to("meta")
    assert meta.shape == x.shape and meta.packed.device.type == "meta"


@pytest.mark.cuda
def test_offload_round_trip_on_cuda() -> None:
    x = torch.randn(4, 512, device="cuda")
    enc = GroupQuantizer(2).encode(x)
    host = enc.to("cpu").pin_memory()
    assert host.device.type == "cpu" and all(t.is_pinned() for t in host.tensors())
    back = host.to(x.device, non_blocking=True)
    assert torch.equal(back.decode(), enc.decode())


@dataclass
class _Halved(Encoded):
    """The documented recipe for a new encoded type (a float16 copy)."""

    half: Tensor

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.half,)

    def with_tensors(self, tensors: Sequence[Tensor]) -> _Halved:
        return replace(self, half=tensors[0])

    def decode(self) -> Tensor:
        return self.half.float()


def test_new_encoded_type_needs_three_methods() -> None:
    enc = _Halved(torch.ones(10, dtype=torch.float16))
    assert enc.nbytes() == 20 and stored_nbytes([enc, enc]) == 20
    assert torch.equal(enc.to("cpu").decode(), torch.ones(10))
    with pytest.raises(TypeError):
        Encoded()  # abstract
