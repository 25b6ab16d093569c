"""Codecs: how a saved tensor is stored between forward and backward.

* :mod:`~fewbit.codecs.protocol`: the codec protocol (``Codec.encode(t) -> Encoded``;
  ``Encoded.decode() / nbytes() / to() / pin_memory()``) and :func:`stored_nbytes`, the one
  saved-bytes accounting; codecs :class:`Keep`, :class:`BitPacker`, :class:`MaskPacker`.
* :mod:`~fewbit.codecs.bitpack`: dense packing of b-bit codes (ceil(n*b/8) bytes).
* :mod:`~fewbit.codecs.quantize`: per-group unbiased stochastic quantization (1/2/4/8 bits),
  codec :class:`GroupQuantizer`; ``fewbit.codecs.quantize.quantize`` (not re-exported here:
  it would shadow the module).
* :mod:`~fewbit.codecs.marks`: tags on tensors that are already compact.
"""

from .bitpack import check_bits, pack, packed_nbytes, unpack
from .marks import is_compact, mark_compact
from .protocol import (
    BitPacker,
    Codec,
    Encoded,
    Keep,
    MaskPacker,
    PackedCodes,
    Plain,
    storage_keys,
    stored_nbytes,
)
from .quantize import GroupQuantizer, QuantizedTensor, dequantize, quantized_nbytes

__all__ = [
    "BitPacker",
    "Codec",
    "Encoded",
    "GroupQuantizer",
    "Keep",
    "MaskPacker",
    "PackedCodes",
    "Plain",
    "QuantizedTensor",
    "check_bits",
    "dequantize",
    "is_compact",
    "mark_compact",
    "pack",
    "packed_nbytes",
    "quantized_nbytes",
    "storage_keys",
    "stored_nbytes",
    "unpack",
]
