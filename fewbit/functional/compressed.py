"""Compact saves for backward, re-exported from the modules that hold them.

* :mod:`fewbit.functional.dropout`: :func:`dropout` (1-bit mask, lossless);
* :mod:`fewbit.functional.pooling`: max pooling (in-window argmax offsets) and average
  pooling (nothing saved), both lossless;
* :mod:`fewbit.functional.attention`: :func:`scaled_dot_product_attention` with quantized
  ``q``, ``k``, ``v`` and softmax output (lossy).

All saved codes are tagged with :func:`fewbit.codecs.marks.mark_compact`, so the generic
``fewbit.compress()`` mode leaves them alone.
"""

from __future__ import annotations

from .attention import scaled_dot_product_attention
from .dropout import dropout
from .pooling import (
    avg_pool1d,
    avg_pool2d,
    avg_pool3d,
    max_pool1d,
    max_pool2d,
    max_pool3d,
    window_offset_bits,
)

__all__ = [
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "dropout",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "scaled_dot_product_attention",
    "window_offset_bits",
]
