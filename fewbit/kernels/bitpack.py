"""Bit packing in Triton, in the layout of :mod:`fewbit.codecs.bitpack`.

Codes form a little-endian bit stream: code ``i`` occupies bits ``[i*b, (i+1)*b)``,
so each group of 8 codes fills exactly ``b`` bytes. A program packs a block of
many groups: it sums ``code_j << (j*b)`` into one word per group and writes the
word's low ``b`` bytes; unpacking reverses this. Codes past ``n`` are packed as 0,
matching the torch packer, so both produce identical bytes and each unpacks the other.

Traffic: pack reads 1 B and writes b/8 B per code; unpack reads b/8 B and writes 1 B.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..codecs.bitpack import check_bits, packed_nbytes
from .launch import NUM_WARPS, check_launchable, device_guard, groups_per_program

__all__ = [
    "byte_pad",
    "pack",
    "unpack",
    "pack_groups",
    "unpack_groups",
    "store_packed",
    "load_packed",
]


def byte_pad(bits: int) -> int:
    """Power of two >= bits: the register width (in bytes) of one packed group."""
    return 1 << (bits - 1).bit_length()


@triton.jit
def pack_groups(codes, BITS: tl.constexpr, P: tl.constexpr):
    """[G, 8] int codes in [0, 2**BITS) -> [G, P] int32 bytes (P = BITS rounded up to 2**k).

    Columns >= BITS hold zeros and must not be stored.
    """
    j = tl.arange(0, 8)
    k = tl.arange(0, P)
    if BITS <= 3:  # 8 codes fit in 24 bits
        word = tl.sum(codes.to(tl.int32) << (j * BITS)[None, :], axis=1)
        byte = (word[:, None] >> (k * 8)[None, :]) & 0xFF
    else:
        word64 = tl.sum(codes.to(tl.int64) << (j * BITS).to(tl.int64)[None, :], axis=1)
        byte = ((word64[:, None] >> (k * 8).to(tl.int64)[None, :]) & 0xFF).to(tl.int32)
    return byte


@triton.jit
def unpack_groups(byte, BITS: tl.constexpr, P: tl.constexpr):
    """[G, P] bytes (zero beyond column BITS) -> [G, 8] int32 codes."""
    j = tl.arange(0, 8)
    k = tl.arange(0, P)
    if BITS <= 3:
        word = tl.sum(byte.to(tl.int32) << (k * 8)[None, :], axis=1)
        codes = (word[:, None] >> (j * BITS)[None, :]) & ((1 << BITS) - 1)
    else:
        word64 = tl.sum(byte.to(tl.int64) << (k * 8).to(tl.int64)[None, :], axis=1)
        shifted = word64[:, None] >> (j * BITS).to(tl.int64)[None, :]
        codes = (shifted & ((1 << BITS) - 1)).to(tl.int32)
    return codes


@triton.jit
def store_packed(packed_ptr, group, codes, nbytes, BITS: tl.constexpr, P: tl.constexpr):
    """Pack ``codes`` ([G, 8], groups ``group``) and store their bytes below ``nbytes``."""
    k = tl.arange(0, P)
    byte = pack_groups(codes, BITS, P)
    offs = group.to(tl.int64)[:, None] * BITS + k[None, :]
    mask = (k[None, :] < BITS) & (offs < nbytes)
    tl.store(packed_ptr + offs, byte.to(tl.uint8), mask=mask)


@triton.jit
def load_packed(packed_ptr, group, nbytes, BITS: tl.constexpr, P: tl.constexpr):
    """Load the bytes of groups ``group`` and return their [G, 8] int32 codes."""
    k = tl.arange(0, P)
    offs = group.to(tl.int64)[:, None] * BITS + k[None, :]
    mask = (k[None, :] < BITS) & (offs < nbytes)
    byte = tl.load(packed_ptr + offs, mask=mask, other=0)
    return unpack_groups(byte, BITS, P)


@triton.jit
def _pack_kernel(
    codes_ptr, packed_ptr, n, nbytes, BITS: tl.constexpr, P: tl.constexpr, GROUPS: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    group = pid * GROUPS + tl.arange(0, GROUPS)
    offs = group[:, None] * 8 + tl.arange(0, 8)[None, :]
    codes = tl.load(codes_ptr + offs, mask=offs < n, other=0).to(tl.int32)
    codes = codes & ((1 << BITS) - 1)
    store_packed(packed_ptr, group, codes, nbytes, BITS, P)


@triton.jit
def _unpack_kernel(
    packed_ptr, codes_ptr, n, nbytes, BITS: tl.constexpr, P: tl.constexpr, GROUPS: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    group = pid * GROUPS + tl.arange(0, GROUPS)
    offs = group[:, None] * 8 + tl.arange(0, 8)[None, :]
    codes = load_packed(packed_ptr, group, nbytes, BITS, P)
    tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=offs < n)


def _grid(n: int, groups: int) -> tuple[int]:
    return (triton.cdiv(triton.cdiv(n, 8), groups),)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer ``codes`` (values in [0, 2**bits)) into ``ceil(n*bits/8)`` uint8 bytes.

    Same bytes as :func:`fewbit.codecs.bitpack.pack`. Bits above ``bits`` are ignored.
    """
    check_bits(bits)
    check_launchable(codes, "codes")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1).contiguous()
    n = flat.numel()
    nbytes = packed_nbytes(n, bits)
    out = torch.empty(nbytes, dtype=torch.uint8, device=codes.device)
    if n == 0:
        return out
    groups = groups_per_program(flat)
    with device_guard(flat):
        _pack_kernel[_grid(n, groups)](
            flat, out, n, nbytes, BITS=bits, P=byte_pad(bits), GROUPS=groups, num_warps=NUM_WARPS
        )
    return out


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: ``n`` uint8 codes (same as :func:`fewbit.codecs.bitpack.unpack`)."""
    check_bits(bits)
    check_launchable(packed, "packed")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    nbytes = packed_nbytes(n, bits)
    if packed.numel() != nbytes:
        raise ValueError(
            f"packed has {packed.numel()} bytes, expected {nbytes} for n={n} codes of {bits} bits"
        )
    out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    if n == 0:
        return out
    flat = packed.reshape(-1).contiguous()
    groups = groups_per_program(flat)
    with device_guard(flat):
        _unpack_kernel[_grid(n, groups)](
            flat, out, n, nbytes, BITS=bits, P=byte_pad(bits), GROUPS=groups, num_warps=NUM_WARPS
        )
    return out
