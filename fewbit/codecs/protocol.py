"""The codec protocol: how a saved tensor is stored, decoded, counted and moved.

Two roles, both small and explicit:

* a **codec** (anything with ``encode(t: Tensor) -> Encoded``; :class:`Codec` is the
  ``typing.Protocol``) turns a tensor into its stored form. Codecs here:
  :class:`GroupQuantizer` (per-group stochastic k-bit, :mod:`fewbit.codecs.quantize`),
  :class:`BitPacker` (few-bit integer codes, :mod:`fewbit.codecs.bitpack`), :class:`MaskPacker`
  (bool masks at 1 bit) and :class:`Keep` (store the tensor as it is).
* an **encoded** value (subclass of the ABC :class:`Encoded`) is what is kept between forward
  and backward. Every encoded value offers:

  - ``decode() -> Tensor``: a tensor of the original shape, dtype and device; its strides are
    the original ones where the original did not overlap itself (a transposed or sliced input
    comes back with the same strides: compiled backward graphs rely on them), else contiguous;
  - ``tensors() -> tuple[Tensor, ...]``: every tensor it keeps alive (what memory it holds);
  - ``nbytes() -> int``: bytes of those tensors' storages, each storage once
    (:func:`stored_nbytes`);
  - ``device``: where they live; ``to(device, non_blocking=False)`` and ``pin_memory()``:
    copies with the same metadata (offload: ``e.to("cpu").pin_memory()`` or copy into pinned
    buffers, later ``e.to(cuda, non_blocking=True)``);
  - ``with_tensors(tensors) -> Encoded``: the same metadata around other tensors (same order
    as ``tensors()``); ``to`` and ``pin_memory`` are built on it.

A new encoded type (e.g. a sketch) is a ``@dataclass`` subclass of :class:`Encoded` that
implements three methods, ``tensors``, ``with_tensors`` and ``decode``::

    @dataclass
    class Sketched(Encoded):
        rows: Tensor            # k x f, what is stored
        seed: int               # regenerates the random matrix
        def tensors(self): return (self.rows,)
        def with_tensors(self, tensors): return replace(self, rows=tensors[0])
        def decode(self): return self.rows   # what its consumer needs (documented per type)

**Saved-bytes accounting.** :func:`stored_nbytes` is the one function that counts what saved
objects hold: tensors, encoded values and (nested) lists, tuples and dicts of them, each
underlying storage counted once (a view holds its whole storage; two views of one storage
count once). Compressed layers, the generic mode, offload and the profiler all count with it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from .bitpack import check_bits, pack, packed_nbytes, unpack

__all__ = [
    "BitPacker",
    "Codec",
    "Encoded",
    "Keep",
    "MaskPacker",
    "PackedCodes",
    "Plain",
    "packed_codes_nbytes",
    "restride",
    "saved_stride",
    "storage_keys",
    "stored_nbytes",
]


# ----------------------------------------------------------------------------- accounting
def _storage_key(t: Tensor) -> tuple[Any, ...] | None:
    """Identity of ``t``'s storage, or None when it has no address (meta, empty)."""
    storage = t.untyped_storage()
    ptr = storage.data_ptr()
    if ptr == 0:
        return None
    return (t.device, ptr)


def _walk(obj: object) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Encoded):
        yield from obj.tensors()
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
    elif obj is None or isinstance(obj, (int, float, bool, str, torch.dtype, torch.device)):
        return
    else:
        raise TypeError(
            f"stored_nbytes: cannot count a {type(obj).__name__}; pass tensors, Encoded values "
            "or lists/tuples/dicts of them"
        )


def stored_nbytes(*objs: object, seen: set[Any] | None = None) -> int:
    """Bytes of memory held by ``objs``: every distinct tensor storage they keep, once.

    ``objs``: tensors, :class:`Encoded` values, ``None``/numbers, and lists, tuples or dicts
    of these (nested). A tensor counts its whole untyped storage
    (``t.untyped_storage().nbytes()``), since a view keeps all of it alive; storages shared
    by several objects count once. Pass the same ``seen`` set to several calls to
    deduplicate across them (e.g. to skip parameters: pre-fill it with
    :func:`storage_keys` of ``model.parameters()``). Raises TypeError for anything else.
    """
    if seen is None:
        seen = set()
    total = 0
    for obj in objs:
        for t in _walk(obj):
            key = _storage_key(t)
            if key is not None:
                if key in seen:
                    continue
                seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def storage_keys(tensors: Iterable[Tensor]) -> set[Any]:
    """Storage identities of ``tensors``, to pre-fill ``stored_nbytes(..., seen=...)``."""
    keys = {_storage_key(t) for t in tensors}
    keys.discard(None)
    return keys


# ----------------------------------------------------------------------------- strides
def _overlaps(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """True when two indices of a (shape, stride) view may address the same element."""
    dims = sorted((st, sz) for sz, st in zip(shape, stride) if sz > 1)
    reach = 0  # largest offset reachable with the dims seen so far
    for st, sz in dims:
        if st <= reach:
            return True
        reach += st * (sz - 1)
    return False


def restride(t: Tensor, stride: Sequence[int] | None) -> Tensor:
    """``t`` (contiguous) laid out with ``stride`` when given and not self-overlapping.

    Used by ``decode`` to give back what was saved: one extra copy, only for tensors that
    were saved non-contiguous. Overlapping strides (``expand``) come back contiguous.
    """
    if stride is None or tuple(stride) == t.stride() or t.numel() <= 1:
        return t
    if _overlaps(t.shape, stride):
        return t
    out = torch.empty_strided(t.shape, tuple(stride), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def saved_stride(t: Tensor) -> tuple[int, ...] | None:
    """``t.stride()`` when ``t`` is not contiguous (what ``decode`` must restore), else None."""
    return None if t.is_contiguous() else tuple(t.stride())


# ----------------------------------------------------------------------------- protocol
class Encoded(abc.ABC):
    """A stored saved tensor (see the module docstring for the contract)."""

    @abc.abstractmethod
    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor this value keeps alive, in the order :meth:`with_tensors` takes."""

    @abc.abstractmethod
    def with_tensors(self, tensors: Sequence[Tensor]) -> Encoded:
        """The same metadata around ``tensors`` (same order and meaning as :meth:`tensors`)."""

    @abc.abstractmethod
    def decode(self) -> Tensor:
        """The tensor back (original shape, dtype, device; strides, see the module doc)."""

    def nbytes(self) -> int:
        """Bytes held: the storages of :meth:`tensors`, each once."""
        return stored_nbytes(self)

    @property
    def device(self) -> torch.device:
        """Device of the stored tensors (CPU when there are none)."""
        ts = self.tensors()
        return ts[0].device if ts else torch.device("cpu")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Encoded:
        """Copy on ``device`` (no copy for tensors already there); same metadata."""
        return self.with_tensors([t.to(device, non_blocking=non_blocking) for t in self.tensors()])

    def pin_memory(self) -> Encoded:
        """Copy in pinned (page-locked) CPU memory, for asynchronous copies to a GPU."""
        return self.with_tensors([t.pin_memory() for t in self.tensors()])


@runtime_checkable
class Codec(Protocol):
    """Anything that encodes a tensor into an :class:`Encoded` value."""

    def encode(self, t: Tensor) -> Encoded: ...


# ----------------------------------------------------------------------------- plain
@dataclass
class Plain(Encoded):
    """A tensor kept as it is (lossless, ``nbytes`` = its storage's bytes)."""

    tensor: Tensor

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.tensor,)

    def with_tensors(self, tensors: Sequence[Tensor]) -> Plain:
        return replace(self, tensor=tensors[0])

    def decode(self) -> Tensor:
        return self.tensor


@dataclass(frozen=True)
class Keep:
    """Codec that stores tensors unchanged (:class:`Plain`)."""

    def encode(self, t: Tensor) -> Plain:
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a Tensor, got {type(t).__name__}")
        return Plain(t)


# ----------------------------------------------------------------------------- packed codes
def _pack(codes: Tensor, bits: int) -> Tensor:
    from ..kernels.policy import use_kernel  # policy only; no triton import

    if use_kernel(codes):
        from ..kernels.bitpack import pack as kernel_pack

        return kernel_pack(codes, bits)
    return pack(codes, bits)


def _unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    from ..kernels.policy import use_kernel

    if use_kernel(packed):
        from ..kernels.bitpack import unpack as kernel_unpack

        return kernel_unpack(packed, bits, n)
    return unpack(packed, bits, n)


@dataclass
class PackedCodes(Encoded):
    """Integer codes in ``[0, 2**bits)`` bit-packed: ``ceil(numel * bits / 8)`` bytes.

    ``decode()`` gives the codes as ``dtype`` (``torch.bool`` for 1-bit masks) in ``shape``
    (and ``stride`` when the codes were saved non-contiguous). Layout:
    :mod:`fewbit.codecs.bitpack`; on CUDA packed and unpacked by the Triton kernels (same
    bytes) when :func:`fewbit.kernels.use_kernel` says so.
    """

    packed: Tensor  # uint8, ceil(n * bits / 8) bytes
    bits: int
    shape: torch.Size
    dtype: torch.dtype = torch.uint8
    stride: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.packed,)

    def with_tensors(self, tensors: Sequence[Tensor]) -> PackedCodes:
        return replace(self, packed=tensors[0])

    def decode(self) -> Tensor:
        codes = _unpack(self.packed, self.bits, self.numel).reshape(self.shape)
        return restride(codes.to(self.dtype), self.stride)


@dataclass(frozen=True)
class BitPacker:
    """Codec for integer codes of ``bits`` bits (values must lie in ``[0, 2**bits)``)."""

    bits: int

    def __post_init__(self) -> None:
        check_bits(self.bits)

    def encode(self, t: Tensor) -> PackedCodes:
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"t must be an integer or bool tensor of codes, got {t.dtype}")
        packed = _pack(t.detach().reshape(-1), self.bits)
        return PackedCodes(packed, self.bits, t.shape, t.dtype, saved_stride(t))


@dataclass(frozen=True)
class MaskPacker:
    """Codec for bool masks: 1 bit per element, lossless."""

    def encode(self, t: Tensor) -> PackedCodes:
        if not isinstance(t, Tensor) or t.dtype != torch.bool:
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"t must be a bool tensor, got {got}")
        packed = _pack(t.detach().reshape(-1).view(torch.uint8), 1)
        return PackedCodes(packed, 1, t.shape, torch.bool, saved_stride(t))


def packed_codes_nbytes(shape: Sequence[int], bits: int) -> int:
    """Bytes a :class:`PackedCodes` of ``shape`` holds: ``ceil(numel * bits / 8)``."""
    n = 1
    for s in shape:
        n *= int(s)
    return packed_nbytes(n, bits)
