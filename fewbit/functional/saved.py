"""Saving encoded values in an autograd Function, and seeing checkpoint regions.

:func:`save_encoded` passes the tensors of :class:`fewbit.codecs.protocol.Encoded` values
through ``ctx.save_for_backward`` (so saved-tensor hooks, activation checkpointing and the
profiler see exactly what is kept, tagged compact so the generic mode leaves them alone) and
keeps only tensor-free templates on ``ctx``; :func:`load_encoded` puts them back together.

:func:`checkpoint_active`: whether the innermost saved-tensor hooks belong to an activation
checkpoint region (``torch.utils.checkpoint`` with ``use_reentrant=False``, its recompute,
or :func:`fewbit.checkpoint.checkpoint`). Inside one, nothing is kept for backward anyway
(the region is recomputed), so compressing saved tensors there would only cost time and, if
the layer installed its own hooks, hide the tensors from the checkpoint, which would then
keep them.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor

from ..codecs.marks import mark_compact
from ..codecs.protocol import Encoded

__all__ = [
    "CHECKPOINT_HOOK_ATTR",
    "autocast_dtype",
    "checkpoint_active",
    "load_encoded",
    "save_encoded",
]

#: Attribute set (True) on pack hooks that belong to a checkpoint region.
CHECKPOINT_HOOK_ATTR = "fewbit_checkpoint_hook"
_TORCH_CHECKPOINT_HOOKS = ("_checkpoint_hook.", "_recomputation_hook.")


def checkpoint_active() -> bool:
    """True when the innermost saved-tensor hooks are an activation checkpoint's."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is None:
        return False
    pack = top[0]
    if getattr(pack, CHECKPOINT_HOOK_ATTR, False):
        return True
    name = getattr(pack, "__qualname__", "")
    return name.startswith(_TORCH_CHECKPOINT_HOOKS)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """Autocast's low-precision dtype when autocast is on for ``device_type``, else None
    (also for device types autocast does not know, such as ``meta``)."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def save_encoded(ctx: Any, *encoded: Optional[Encoded], extra: Sequence[Tensor] = ()) -> None:
    """``ctx.save_for_backward`` of the tensors of ``encoded`` (None allowed) and ``extra``."""
    tensors: List[Tensor] = []
    templates: List[Any] = []
    for e in encoded:
        if e is None:
            templates.append(None)
            continue
        ts = e.tensors()
        templates.append((e.with_tensors([None] * len(ts)), len(ts)))  # type: ignore[list-item]
        tensors.extend(mark_compact(t) for t in ts)
    ctx.fewbit_templates = templates
    ctx.save_for_backward(*tensors, *extra)


def load_encoded(ctx: Any) -> tuple[List[Optional[Encoded]], tuple[Tensor, ...]]:
    """The values saved by :func:`save_encoded` and the ``extra`` tensors."""
    saved = ctx.saved_tensors
    out: List[Optional[Encoded]] = []
    i = 0
    for item in ctx.fewbit_templates:
        if item is None:
            out.append(None)
            continue
        template, n = item
        out.append(template.with_tensors(saved[i : i + n]))
        i += n
    return out, tuple(saved[i:])
