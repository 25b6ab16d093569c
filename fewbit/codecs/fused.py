"""Fused CPU codecs: plain torch functions compiled by ``torch.compile`` at first use.

``fused(fn)`` wraps a codec function written in plain torch ops. On its first call with CPU
tensors it is compiled with ``torch.compile(fn, dynamic=True)`` (Inductor's C++ backend: one
loop over the data instead of one pass per op); nothing is compiled at install or import
time. The compiled function computes exactly what ``fn`` computes (integer and exact float
ops only in the codecs that use it; tests compare bytes), so eager and fused paths are
interchangeable.

Eager instead of compiled:

* ``FEWBIT_COMPILE=0`` in the environment (read at every call);
* tensors not on the CPU (CUDA has the Triton kernels; the wrapper never compiles for them);
* inside a ``torch.compile`` trace (the outer compiler sees the plain ops);
* after a compile failure (e.g. no C compiler): one ``RuntimeWarning`` naming the function,
  then eager for the rest of the process.

Cost: the first call per function and input dtype compiles (seconds to tens of seconds; Inductor
caches the result on disk for later processes); sizes are dynamic, so new shapes do not
recompile.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor

__all__ = ["compile_enabled", "fused"]

F = TypeVar("F", bound=Callable[..., Any])


def compile_enabled() -> bool:
    """False when ``FEWBIT_COMPILE=0`` (then every fused codec runs eagerly)."""
    return os.environ.get("FEWBIT_COMPILE", "1") != "0"


class _Fused:
    """Callable holding ``fn`` and, once built, its compiled form (see :func:`fused`)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Optional[Callable[..., Any]] = None
        self.failed = False
        functools.update_wrapper(self, fn)

    def _wants_compile(self, args: tuple[Any, ...]) -> bool:
        if self.failed or not compile_enabled() or torch.compiler.is_compiling():
            return False
        tensors = [a for a in args if isinstance(a, Tensor)]
        return bool(tensors) and all(t.device.type == "cpu" for t in tensors)

    def __call__(self, *args: Any) -> Any:
        if not self._wants_compile(args):
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True)
            return self.compiled(*args)
        except Exception as err:  # compiler missing or failing: eager from now on
            self.failed = True
            warnings.warn(
                f"fewbit: compiling {self.fn.__qualname__} failed ({type(err).__name__}: {err}); "
                "using the eager PyTorch codec (same results, slower). Set FEWBIT_COMPILE=0 to "
                "skip compiling.",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)


def fused(fn: F) -> F:
    """``fn`` compiled lazily for CPU tensors (see the module docstring); same results."""
    return _Fused(fn)  # type: ignore[return-value]
