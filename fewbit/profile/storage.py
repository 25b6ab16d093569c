"""Identity and size of the storage behind a tensor, and byte formatting.

A saved view keeps its whole untyped storage alive, so sizes here are storage sizes, and two
tensors sharing a storage count once.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

__all__ = ["StorageKey", "storage_key", "storage_nbytes", "format_bytes"]

StorageKey = tuple[str, int]


def storage_key(t: Tensor) -> StorageKey:
    """Identity of the untyped storage behind ``t`` (device, data pointer)."""
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. subclasses)
        return ("id", id(t))


def storage_nbytes(t: Tensor) -> int:
    """Bytes of the whole untyped storage behind ``t`` (a saved view keeps all of it)."""
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def _storage_keys(tensors: Iterable[Tensor]) -> set[StorageKey]:
    return {storage_key(t) for t in tensors}


def _unique_nbytes(tensors: Iterable[Tensor]) -> int:
    seen: dict[StorageKey, int] = {}
    for t in tensors:
        seen.setdefault(storage_key(t), storage_nbytes(t))
    return sum(seen.values())


def _sorted_desc(d: dict[str, int]) -> dict[str, int]:
    return dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def format_bytes(n: float) -> str:
    """Human-readable size with binary units (KiB, MiB, GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
