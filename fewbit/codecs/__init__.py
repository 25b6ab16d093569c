"""Codecs: how a saved tensor is stored between forward and backward.

* :mod:`~fewbit.codecs.bitpack`: dense packing of b-bit codes (ceil(n*b/8) bytes).
* :mod:`~fewbit.codecs.quantize`: per-group unbiased stochastic quantization (1/2/4/8 bits);
  ``fewbit.codecs.quantize.quantize`` (not re-exported here: it would shadow the module).
* :mod:`~fewbit.codecs.marks`: tags on tensors that are already compact.
"""

from .bitpack import check_bits, pack, packed_nbytes, unpack
from .marks import is_compact, mark_compact
from .quantize import QuantizedTensor, dequantize, quantized_nbytes

__all__ = [
    "QuantizedTensor",
    "check_bits",
    "dequantize",
    "is_compact",
    "mark_compact",
    "pack",
    "packed_nbytes",
    "quantized_nbytes",
    "unpack",
]
