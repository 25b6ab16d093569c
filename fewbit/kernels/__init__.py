"""Fused Triton kernels for the few-bit ops (optional; pure Python, no compiled extension).

Kernel or PyTorch path: one policy, :func:`use_kernel` (:mod:`fewbit.kernels.policy`): CUDA
tensor, triton importable, ``FEWBIT_DISABLE_TRITON`` not ``'1'``; :func:`force_kernels`
overrides it in a scoped block (tests). ``available(t)`` is the same answer under its
published name. The functions themselves accept any device that Triton can run on,
including CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run them).
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
from torch import Tensor

from .policy import force_kernels, has_triton, use_kernel

__all__ = [
    "activation_backward",
    "activation_forward",
    "available",
    "force_kernels",
    "has_triton",
    "pack",
    "sketch_project",
    "unpack",
    "use_kernel",
]


def available(device: Union[Tensor, torch.device, str, None]) -> bool:
    """True when the Triton kernels should handle tensors on ``device`` (a tensor or device).

    The policy :func:`use_kernel` (kept under this name for existing callers)."""
    return use_kernel(device)


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
    """``scale * S^T x`` with a Philox random ``S`` made once per call; see :mod:`.sketch`."""
    from .sketch import project as impl

    return impl(x, k, seed, kind, scale, out_dtype)
