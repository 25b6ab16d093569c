"""Fused Triton kernels for the few-bit ops (optional; pure Python, no compiled extension).

``available(t)`` says whether the automatic dispatch should use them for tensor or
device ``t``: CUDA only, triton importable, and ``FEWBIT_DISABLE_TRITON`` not ``'1'``.
The functions themselves accept any device that Triton can run on, including CPU
tensors under ``TRITON_INTERPRET=1`` (how the tests run them).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "activation_backward",
    "activation_forward",
    "available",
    "has_triton",
    "pack",
    "sketch_project",
    "unpack",
]


def has_triton() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def available(device: Union[Tensor, torch.device, str, None]) -> bool:
    """True when the Triton kernels should handle tensors on ``device`` (a tensor or device)."""
    if os.environ.get("FEWBIT_DISABLE_TRITON", "0") == "1":
        return False
    if isinstance(device, Tensor):
        device = device.device
    if device is None or torch.device(device).type != "cuda":
        return False
    return has_triton() and torch.cuda.is_available()


def activation_forward(
    x: Tensor,
    name: str,
    params: Mapping[str, float] | None = None,
    boundaries: Union[Tensor, Sequence[float], None] = None,
    symmetric: bool = False,
    bits: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fused few-bit forward: ``(f(x), packed codes)``; see :mod:`fewbit.kernels.activations`."""
    from .activations import activation_forward as impl

    return impl(x, name, params, boundaries, symmetric, bits)


def activation_backward(grad: Tensor, packed: Tensor, levels: Tensor, bits: int) -> Tensor:
    """Fused few-bit backward: ``grad * levels[code]``; see :mod:`fewbit.kernels.activations`."""
    from .activations import activation_backward as impl

    return impl(grad, packed, levels, bits)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Triton bit packing, same bytes as :func:`fewbit.codecs.bitpack.pack`."""
    from .bitpack import pack as impl

    return impl(codes, bits)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Triton bit unpacking, same codes as :func:`fewbit.codecs.bitpack.unpack`."""
    from .bitpack import unpack as impl

    return impl(packed, bits, n)


def sketch_project(
    x: Tensor,
    k: int,
    seed: int,
    kind: str = "gaussian",
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``scale * S^T x`` with a Philox random ``S`` made in registers; see :mod:`.sketch`."""
    from .sketch import project as impl

    return impl(x, k, seed, kind, scale, out_dtype)
