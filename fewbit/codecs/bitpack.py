"""Dense bit packing of small unsigned codes.

Layout (shared with the Triton kernels): the codes form one little-endian bit
stream. Code ``i`` occupies bits ``[i*b, (i+1)*b)`` of the stream and byte ``j``
holds stream bits ``[8j, 8j+8)``, lowest bit first. Every group of 8 codes
therefore fills exactly ``b`` bytes. The packed tensor holds exactly
``ceil(n*b/8)`` bytes; the element count and shape live in Python attributes of
the caller (no tensor header).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["packed_nbytes", "pack", "unpack", "check_bits"]


def check_bits(bits: int, name: str = "bits", low: int = 1, high: int = 8) -> int:
    """Validate a bit width and return it as an int."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int in [{low}, {high}], got {bits!r}")
    if not low <= bits <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {bits}")
    return bits


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    return (n * bits + 7) // 8


def _pack_plan(bits: int) -> list[list[tuple[int, int]]]:
    """For each of the ``bits`` bytes of a group of 8 codes: (code index, left shift) terms.

    A negative shift means a right shift. Code k occupies stream bits [k*b, k*b+b).
    """
    plan: list[list[tuple[int, int]]] = []
    for j in range(bits):
        terms = []
        for k in range(8):
            lo, hi = k * bits, (k + 1) * bits
            if lo < 8 * (j + 1) and hi > 8 * j:
                terms.append((k, lo - 8 * j))
        plan.append(terms)
    return plan


def _shift(t: Tensor, shift: int) -> Tensor:
    return t << shift if shift >= 0 else t >> -shift


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes`` (integer tensor, values in ``[0, 2**bits)``) into a 1-D uint8 tensor.

    Returns exactly ``packed_nbytes(codes.numel(), bits)`` bytes on the codes' device.
    Works byte-wise in uint8 (shifts wrap modulo 256), about ``(8 + bits) / 8`` passes
    over the codes.
    """
    check_bits(bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    nbytes = packed_nbytes(n, bits)
    if bits == 8:
        return flat.to(torch.uint8).clone()
    groups = (n + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.uint8, device=flat.device)
    padded[:n] = flat
    cols = padded.view(groups, 8)
    out = torch.empty(groups, bits, dtype=torch.uint8, device=flat.device)
    for j, terms in enumerate(_pack_plan(bits)):
        k, shift = terms[0]
        acc = _shift(cols[:, k], shift)
        for k, shift in terms[1:]:
            acc |= _shift(cols[:, k], shift)
        out[:, j] = acc
    out = out.view(-1)
    if out.numel() == nbytes:
        return out
    return out[:nbytes].clone()  # clone so the stored storage is exactly nbytes


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: a 1-D uint8 tensor of ``n`` codes."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(
            f"packed has {packed.numel()} bytes, expected {packed_nbytes(n, bits)} "
            f"for n={n} codes of {bits} bits"
        )
    if bits == 8:
        return packed.reshape(-1).clone()
    groups = (n + 7) // 8
    full = torch.zeros(groups * bits, dtype=torch.uint8, device=packed.device)
    full[: packed.numel()] = packed.reshape(-1)
    rows = full.view(groups, bits)
    mask = (1 << bits) - 1
    codes = torch.empty(groups, 8, dtype=torch.uint8, device=packed.device)
    for k in range(8):
        acc = None
        for j, terms in enumerate(_pack_plan(bits)):
            for kk, shift in terms:
                if kk == k:
                    part = _shift(rows[:, j], -shift)
                    acc = part if acc is None else acc | part
        assert acc is not None
        codes[:, k] = acc & mask
    return codes.view(-1)[:n]
