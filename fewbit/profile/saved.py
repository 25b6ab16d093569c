"""Bytes saved for backward: a log of saved tensors by storage, attributed to the module that
was running and to the autograd node that saved them (see :mod:`fewbit.profile`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..compress import observe_saved
from ..util import saved_tensors_of
from .storage import StorageKey, _sorted_desc, _storage_keys, storage_key, storage_nbytes

__all__ = ["SavedTensorLog", "saved_by_node", "saved_bytes"]

UNATTRIBUTED = "(unattributed)"
RECORD = "(fewbit quantized record)"
ROOT = "(model)"
OUTSIDE = "(outside modules)"


class SavedTensorLog:
    """Records tensors saved for backward while active (a context manager).

    Each untyped storage counts once. Storages listed in ``exclude`` (parameters,
    buffers) are ignored. The log keeps a reference to each saved tensor until
    `clear()` so that a freed storage's address cannot be reused and miscounted.
    """

    def __init__(self, exclude: Iterable[Tensor] = (), model: Optional[nn.Module] = None):
        self.exclude = _storage_keys(exclude)
        self.nbytes: dict[StorageKey, int] = {}
        self.module_of: dict[StorageKey, str] = {}
        self.type_of: dict[StorageKey, str] = {}
        self._keep: list[Tensor] = []
        self._stack: list[tuple[str, str]] = []
        self._model = model
        self._handles: list[Any] = []

    # module path tracking -------------------------------------------------
    def _push(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append((name, type(module).__name__))

        return hook

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def _pack(self, t: Tensor) -> Tensor:
        key = storage_key(t)
        if key not in self.exclude and key not in self.nbytes:
            self.nbytes[key] = storage_nbytes(t)
            name, kind = self._stack[-1] if self._stack else (OUTSIDE, OUTSIDE)
            self.module_of[key] = name
            self.type_of[key] = kind
            self._keep.append(t)
        return t

    def _observe(self, kept: object, nbytes: int) -> None:
        """What fewbit's own pack hooks keep (they hide it from `_pack`, hooks nest)."""
        if isinstance(kept, Tensor):
            self._pack(kept)
            return
        key = (RECORD, id(kept))
        if key not in self.nbytes:
            self.nbytes[key] = nbytes
            name, kind = self._stack[-1] if self._stack else (OUTSIDE, OUTSIDE)
            self.module_of[key] = name
            self.type_of[key] = kind
            self._keep.append(kept)  # keeps id(kept) from being reused while logged

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    @contextmanager
    def record(self) -> Iterator[SavedTensorLog]:
        """Context in which saved tensors (and the running module) are recorded."""
        if self._model is not None:
            for name, module in self._model.named_modules():
                label = name or ROOT
                self._handles.append(module.register_forward_pre_hook(self._push(label)))
                self._handles.append(module.register_forward_hook(self._pop, always_call=True))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                with observe_saved(self._observe):
                    yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._stack.clear()

    @property
    def total(self) -> int:
        return sum(self.nbytes.values())

    def by_module(self) -> dict[str, int]:
        """Bytes per path of the innermost module running when the tensor was saved."""
        return _group(self.nbytes, self.module_of)

    def by_module_type(self) -> dict[str, int]:
        """Bytes per class name of that innermost module."""
        return _group(self.nbytes, self.type_of)

    def clear(self) -> None:
        self._keep.clear()


def _group(nbytes: dict[StorageKey, int], label: dict[StorageKey, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, n in nbytes.items():
        out[label[key]] = out.get(label[key], 0) + n
    return _sorted_desc(out)


def _node_name(node: Any) -> str:
    try:
        return str(node.name())
    except (AttributeError, RuntimeError):
        return type(node).__name__


def _graph_nodes(roots: Sequence[Any]) -> list[Any]:
    seen: set[int] = set()
    order: list[Any] = []
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is not None:
                stack.append(nxt)
    return order


def _sequence_nr(node: Any) -> int:
    try:
        return int(node._sequence_nr())
    except (AttributeError, RuntimeError):
        return 1 << 62


def saved_by_node(roots: Sequence[Any], log: SavedTensorLog) -> dict[str, int]:
    """Group the log's storages by the autograd node (first in forward order) saving them."""
    owner: dict[StorageKey, tuple[int, str]] = {}
    for node in _graph_nodes(roots):
        seq = _sequence_nr(node)
        name = _node_name(node)
        for t in saved_tensors_of(node):
            key = storage_key(t)
            if key in log.nbytes and (key not in owner or seq < owner[key][0]):
                owner[key] = (seq, name)
    out: dict[str, int] = {}
    for key, n in log.nbytes.items():
        name = owner[key][1] if key in owner else RECORD if key[0] == RECORD else UNATTRIBUTED
        out[name] = out.get(name, 0) + n
    return _sorted_desc(out)


def saved_bytes(
    fn: Callable[..., Any], *args: Any, exclude: Optional[Iterable[Tensor]] = None, **kwargs: Any
) -> int:
    """Bytes saved for backward while ``fn(*args, **kwargs)`` runs.

    Each untyped storage counts once, at its full size. Parameters and buffers of ``fn``
    (when it is an `nn.Module`) and the tensors in ``exclude`` do not count.
    """
    excluded: list[Tensor] = list(exclude) if exclude is not None else []
    if isinstance(fn, nn.Module):
        excluded.extend(fn.parameters())
        excluded.extend(fn.buffers())
    log = SavedTensorLog(exclude=excluded)
    with log.record():
        fn(*args, **kwargs)
    total = log.total
    log.clear()
    return total
