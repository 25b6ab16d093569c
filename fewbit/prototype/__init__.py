"""What is not yet measured where it matters, kept apart until it is (then promoted out).

==========================  ====================================================================
adaptive                    per-layer adaptive bits of levels L3-L5 (no GPU measurement yet)
allocator                   CUDA allocator settings of levels L3.1 and L5 (CUDA only)
LinearCRS                   column-row sampling linear (re-exported from fewbit.modules.linear)
offload                     ``Compress(offload=True)`` / ``Generic(offload=True)`` (implemented
                            in :mod:`fewbit.compress`) and the ``Offload`` config
                            (``save_on_cpu`` per forward): useful on CUDA only, unmeasured
GPU kernels                 :mod:`fewbit.kernels` run only on CUDA and are unmeasured there
==========================  ====================================================================

Everything here is importable from its old place too (``fewbit.levels.allocate_bits``,
``fewbit.LinearCRS``); the files here are the implementation.
"""

from ..modules.linear import LinearCRS
from .adaptive import AdaptiveBitAllocator, allocate_bits, get_allocator

__all__ = ["AdaptiveBitAllocator", "LinearCRS", "allocate_bits", "get_allocator"]
