"""Marks for tensors that are already compact (packed codes, sketches).

The generic saved-tensor compressor (:mod:`fewbit.compress`) leaves marked tensors alone, so
a layer that already stores a compact representation is never re-quantized.

The mark is a Python attribute on the tensor object. This works with
``ctx.save_for_backward``: the pack hook of ``torch.autograd.graph.saved_tensors_hooks``
receives the very Python object that was saved (checked for inputs, intermediates and
outputs of a custom ``autograd.Function``, torch 2.13), so the attribute is visible there.
Views and copies of a marked tensor are not marked.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["is_compact", "mark_compact"]

_ATTR = "_fewbit_compact"


def mark_compact(t: Tensor) -> Tensor:
    """Tag ``t`` as compact (in place) and return it."""
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a Tensor, got {type(t).__name__}")
    setattr(t, _ATTR, True)
    return t


def is_compact(t: Tensor) -> bool:
    """True if ``t`` was tagged by :func:`mark_compact`."""
    return bool(getattr(t, _ATTR, False))
