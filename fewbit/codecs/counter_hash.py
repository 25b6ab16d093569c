"""The counter hash behind fewbit's random bits: the group quantizer's rounding noise and
the CPU dropout masks are ``mix32`` of an element's index and a key.

``mix32`` is a bijection of 32-bit words (xor-shift-multiply, "lowbias32" constants); the C
passes (``csrc/quantize.c``, ``csrc/dropout.c``) and the Triton kernels compute the same
function, so every path draws the same bits. Here it works on Python ints and on int64
tensors holding values in ``[0, 2**32)`` (products split in 16-bit halves: no int64
overflow). The bulk noise of the PyTorch quantizer uses its own int32 form
(:func:`fewbit.codecs.quantize._mix32`).
"""

from __future__ import annotations

from typing import TypeVar

from torch import Tensor

__all__ = ["MASK32", "MIX1", "MIX2", "mix32", "mul32"]

MASK32 = 0xFFFFFFFF
MIX1, MIX2 = 0x7FEB352D, 0x846CA68B

Word = TypeVar("Word", int, Tensor)


def mul32(h: Word, c: int) -> Word:
    """``(h * c) mod 2**32`` for ``h`` in ``[0, 2**32)`` (int or int64 tensor), in 16-bit
    halves of ``c`` so that no int64 product overflows (each is below ``2**48``)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(h: Word) -> Word:
    """``mix32`` of ``h`` in ``[0, 2**32)`` (int, or elementwise on an int64 tensor; shifts
    of non-negative values are logical)."""
    h = h ^ (h >> 16)
    h = mul32(h, MIX1)
    h = h ^ (h >> 15)
    h = mul32(h, MIX2)
    return h ^ (h >> 16)
