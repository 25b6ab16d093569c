"""Launch settings shared by the kernels: interpreter detection and block sizes."""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch
from torch import Tensor

__all__ = [
    "NUM_WARPS",
    "check_launchable",
    "device_guard",
    "groups_per_program",
    "interpreting",
    "precise",
]

# Compiled GPU kernels: 512 groups of 8 elements (4096 elements) per program, 4 warps:
# 32 elements per thread, 16-byte vector loads for fp32 and bf16.
GPU_GROUPS = 512
NUM_WARPS = 4
# Interpreter: each program instance costs ~1.7 ms of Python, so use large blocks.
INTERPRETER_GROUPS = 4096

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(t: Tensor, name: str) -> None:
    """Raise unless ``t`` is a CUDA tensor or the interpreter is on."""
    if t.is_cuda or interpreting():
        return
    raise RuntimeError(
        f"{name} is on {t.device}: the Triton kernels need a CUDA tensor "
        "(or TRITON_INTERPRET=1 set before importing triton, to run them on the CPU)"
    )


def precise(t: Tensor) -> bool:
    """Use libdevice math (compiled GPU kernels) rather than the interpreter-safe formulas."""
    return t.is_cuda and not interpreting()


def groups_per_program(t: Tensor) -> int:
    """Groups of 8 elements handled by one program instance."""
    return INTERPRETER_GROUPS if interpreting() else GPU_GROUPS


def device_guard(t: Tensor) -> ContextManager[object]:
    """Context that makes ``t``'s GPU the current device while a kernel is launched.

    Triton launches on the current CUDA device (and its current stream); without the guard a
    tensor on ``cuda:1`` would be processed by a kernel queued on ``cuda:0``. A no-op for CPU
    tensors (interpreter).
    """
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
