"""The one policy that decides between the Triton kernels and the PyTorch path.

:func:`use_kernel` is asked by every codec and op with a kernel (few-bit activations, bit
packing, masks, the group quantizer, sketches). It answers True when

* ``t`` is on a CUDA device, ``triton`` is importable and CUDA is available, and
* the environment variable ``FEWBIT_DISABLE_TRITON`` is not ``"1"`` (read at every call);

unless a :func:`force_kernels` block is active in the current thread/task, which overrides
the answer for its duration (tests use ``with force_kernels(True):`` to run the kernels on CPU
tensors under ``TRITON_INTERPRET=1``; ``force_kernels(False)`` forces the PyTorch path).
The override is a ``contextvars.ContextVar`` token, restored on exit: no global default
changes. While torch.compile traces, the override is not read (dynamo cannot trace a
ContextVar): the device and the environment decide. Importing this module does not import
triton.
"""

from __future__ import annotations

import contextvars
import importlib.util
import os
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
from torch import Tensor

__all__ = ["force_kernels", "has_triton", "use_kernel"]

_FORCED: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar(
    "fewbit_force_kernels", default=None
)
_HAS_TRITON: Optional[bool] = None  # cache of an import probe (a fact, not a setting)


def has_triton() -> bool:
    """True when the ``triton`` package can be imported."""
    global _HAS_TRITON
    if _HAS_TRITON is None:
        _HAS_TRITON = importlib.util.find_spec("triton") is not None
    return _HAS_TRITON


def use_kernel(t: Union[Tensor, torch.device, str, None]) -> bool:
    """True when tensors on ``t`` (a tensor or a device) should go to the Triton kernels.

    While torch.compile traces, the :func:`force_kernels` override is not read (dynamo
    cannot trace a ``ContextVar``): the answer then comes from the device and the
    environment only, and the device is checked first, so a non-CUDA tensor gets False
    without anything else being read."""
    if not torch.compiler.is_compiling():
        forced = _FORCED.get()
        if forced is not None:
            return forced
    device = t.device if isinstance(t, Tensor) else t
    if device is None or torch.device(device).type != "cuda":
        return False
    if os.environ.get("FEWBIT_DISABLE_TRITON", "0") == "1":
        return False
    return has_triton() and torch.cuda.is_available()


@contextmanager
def force_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`use_kernel` returns ``enabled`` for every tensor.

    ``force_kernels(True)`` needs triton; on CPU tensors the kernels then run only under
    ``TRITON_INTERPRET=1`` (set before triton is imported), otherwise they raise.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    if enabled and not has_triton():
        raise RuntimeError("force_kernels(True) needs the triton package")
    token = _FORCED.set(enabled)
    try:
        yield
    finally:
        _FORCED.reset(token)
