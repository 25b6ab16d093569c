"""Generic compression of every tensor autograd saves for backward.

``with fewbit.compress(bits=2):`` installs ``torch.autograd.graph.saved_tensors_hooks`` that
replace each saved floating tensor by its per-group stochastic quantization
(:mod:`fewbit.codecs.quantize`), so functional calls (``F.gelu``, ``F.linear``,
``torch.matmul``) and modules fewbit does not convert are covered too.

What is stored for backward instead of a saved tensor of ``n`` elements:
``quantized_nbytes(shape, bits, group_size)`` bytes, i.e. ``bits + 32 / group_size`` bits per
element (2.125 at the defaults: 15x less than float32, 7.5x less than bfloat16).

Passed through unchanged: non-floating tensors (masks, indices, packed codes), tensors with
fewer than ``min_numel`` elements, tensors tagged with :func:`fewbit.codecs.marks.mark_compact`,
``nn.Parameter`` objects and views of them, and tensors sharing storage with anything in
``skip`` (``compress(model=...)`` puts all parameters and buffers of ``model`` there). Those
are kept alive elsewhere anyway, so compressing them would only add memory.

A tensor saved by several ops (same storage, offset, shape, stride and version) is quantized
once while it is alive; the dequantized copy is shared between unpacks while one is alive.
Unpacked tensors do not require grad: double backward through compressed tensors is not
supported. An unpacked tensor has the saved tensor's shape, dtype and strides (compiled
backward graphs check strides): a tensor whose elements fill its storage densely in some
order (contiguous, channels-last, transposed) is quantized in that memory order with no copy
and comes back as a view with the same strides; any other layout (a slice, an ``expand``) is
quantized from a contiguous copy and copied back into its strides (overlapping ones:
contiguous).

The object :func:`compress` returns is a reusable, re-entrant context manager, like torch's
own ``saved_tensors_hooks``: ``c = compress(bits=2); with c: ...; with c: ...``.

Offload (``offload=True``, ActNN level L4): the quantized form of a CUDA tensor is copied to
pinned CPU memory (non-blocking, on the current stream) in ``pack``. In ``unpack`` it is
copied back, and the ``prefetch`` tensors packed just before it (which backward needs next)
start copying on a side stream. On CPU tensors offload does nothing.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .codecs.marks import is_compact
from .codecs.protocol import Encoded, stored_nbytes
from .codecs.quantize import GroupQuantizer, check_group_size, check_quant_bits

__all__ = [
    "CompressStats",
    "PrefetchSchedule",
    "SavedTensorCompressor",
    "compress",
    "observe_saved",
    "report_saved",
]


@dataclass
class CompressStats:
    """Counters of one :class:`SavedTensorCompressor`."""

    compressed: int = 0  # distinct tensors quantized
    deduplicated: int = 0  # saves that reused an earlier quantization of the same tensor
    passed: int = 0  # saves kept as they are
    bytes_before: int = 0  # bytes of the tensors that were quantized
    bytes_after: int = 0  # bytes of their quantized form

    @property
    def ratio(self) -> float:
        """bytes_before / bytes_after (1.0 when nothing was compressed)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0


class PrefetchSchedule:
    """Which offloaded items to start copying back, given backward's reverse order.

    Items are registered in pack order. ``request(i)`` (item ``i`` is needed now) starts item
    ``i`` if it is not started, then up to ``depth`` live items packed before it. Items
    whose owner died are skipped. ``done(i)`` forgets that ``i`` was started (its device copy
    was consumed), so a later request fetches it again. ``start`` does the copy.
    """

    def __init__(self, depth: int, start: Callable[[Any], None]) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"prefetch depth must be an int >= 0, got {depth!r}")
        self.depth = depth
        self._start = start
        self._items: dict[int, weakref.ref[Any]] = {}
        self._started: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()

    def add(self, item: Any) -> int:
        """Register ``item`` (weakly) and return its index."""
        with self._lock:
            i = self._next
            self._next += 1
            self._items[i] = weakref.ref(item, lambda _: self._forget(i))
            return i

    def _forget(self, i: int) -> None:
        self._items.pop(i, None)
        self._started.discard(i)

    def request(self, i: int) -> None:
        """Item ``i`` is needed now: start it and prefetch its predecessors."""
        with self._lock:
            self._start_one(i)
            live = 0
            j = i - 1
            limit = i - 64 * (self.depth + 1)  # bound the scan over dead items
            while live < self.depth and j >= max(0, limit):
                if j in self._items:
                    live += 1
                    self._start_one(j)
                j -= 1

    def _start_one(self, i: int) -> None:
        ref = self._items.get(i)
        item = ref() if ref is not None else None
        if item is None or i in self._started:
            return
        self._started.add(i)
        self._start(item)

    def done(self, i: int) -> None:
        """Item ``i`` was consumed; a later request starts it again."""
        with self._lock:
            self._started.discard(i)


class _Packed:
    """What the pack hook returns for a compressed tensor."""

    __slots__ = (
        "q", "device", "layout", "index", "d2h", "fetched", "h2d", "cache", "__weakref__"
    )

    def __init__(self, q: Encoded, device: torch.device, layout: _Layout | None) -> None:
        self.q = q  # on ``device``, or in pinned CPU memory when offloaded
        self.device = device
        self.layout = layout  # how to give the decoded tensor the saved tensor's strides
        self.index = -1  # position in the offload schedule, -1 if not offloaded
        self.d2h: Any = None  # CUDA event: offload copy finished
        self.fetched: Encoded | None = None  # prefetched copy on ``device``
        self.h2d: Any = None  # CUDA event: prefetch copy finished
        self.cache: weakref.ref[Tensor] | None = None  # live dequantized tensor


def _storage_ptr(t: Tensor) -> int:
    """Address of ``t``'s storage; a DTensor (FSDP2 parameter) gives its local shard's."""
    local = getattr(t, "_local_tensor", None)  # torch.distributed.tensor.DTensor
    if isinstance(local, Tensor):
        t = local
    return t.untyped_storage().data_ptr()


@dataclass(frozen=True)
class _Layout:
    """A saved tensor that is dense in memory but not contiguous (transposed, channels-last).

    It is encoded as ``t.permute(order)`` (contiguous: no copy) and decoded as a view with
    the saved ``shape`` and ``stride`` (no copy). Other non-contiguous tensors are left to the
    codec, whose ``decode`` restores their strides with one copy.
    """

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    order: tuple[int, ...]


def _dense_order(t: Tensor) -> tuple[int, ...] | None:
    """Dims of ``t`` from outermost to innermost in memory if ``t`` is dense, else None."""
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -d)))
    expected = 1
    for d in reversed(order):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return order


def _layout_of(t: Tensor) -> tuple[_Layout | None, Tensor]:
    """(layout to restore or None; the tensor to encode)."""
    if t.is_contiguous():
        return None, t
    order = _dense_order(t)
    if order is None:
        return None, t
    return _Layout(tuple(t.shape), tuple(t.stride()), order), t.permute(order)


def _restore(out: Tensor, layout: _Layout | None) -> Tensor:
    """The decoded tensor ``out`` in the saved tensor's shape and strides (a view)."""
    if layout is None:
        return out
    return out.as_strided(layout.shape, layout.stride)


SavedObserver = Callable[[object, int], None]
_OBSERVERS: contextvars.ContextVar[tuple[SavedObserver, ...]] = contextvars.ContextVar(
    "fewbit_saved_observers", default=()
)


@contextmanager
def observe_saved(callback: SavedObserver) -> Iterator[None]:
    """Within the block, ``callback(kept, nbytes)`` is called for everything a fewbit pack
    hook keeps for backward: the tensor itself when it passes through, or a compressed record
    and its stored bytes. Saved-tensor hooks nest (the innermost wins), so an outer observer
    such as the profiler cannot see what fewbit's own hooks keep without this. Scoped to the
    current context (a ``contextvars`` variable), never global."""
    token = _OBSERVERS.set(_OBSERVERS.get() + (callback,))
    try:
        yield
    finally:
        _OBSERVERS.reset(token)


def report_saved(kept: object) -> None:
    """Tell the active observers (:func:`observe_saved`) what a pack hook keeps."""
    observers = _OBSERVERS.get()
    if observers:
        nbytes = stored_nbytes(kept.q if isinstance(kept, _Packed) else kept)
        for callback in observers:
            callback(kept, nbytes)


class SavedTensorCompressor:
    """Pack/unpack hooks that quantize saved tensors to ``bits`` bits (see module docs).

    Also a reusable, re-entrant context manager installing those hooks
    (``with comp: ...``, any number of times, nested or not).

    ``generator`` (optional) supplies the rounding noise for tensors on its device;
    tensors on other devices use their device's global RNG. ``prefetch`` is the number of
    offloaded tensors brought back ahead of use. ``stats`` counts what happened.
    """

    def __init__(
        self,
        bits: int = 2,
        *,
        group_size: int = 256,
        min_numel: int = 4096,
        skip: Iterable[Tensor] = (),
        offload: bool = False,
        generator: torch.Generator | None = None,
        prefetch: int = 2,
    ) -> None:
        self.bits = check_quant_bits(bits)
        self.group_size = check_group_size(group_size)
        self.codec = GroupQuantizer(self.bits, self.group_size, generator=generator)
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be an int >= 0, got {min_numel!r}")
        self.min_numel = min_numel
        self.offload = bool(offload)
        self.generator = generator
        self._skip = {_storage_ptr(t) for t in skip if t.numel() > 0}
        self._seen: dict[tuple[Any, ...], tuple[weakref.ref[Tensor], weakref.ref[_Packed]]] = {}
        self._lock = threading.Lock()
        self._schedule = PrefetchSchedule(prefetch, self._start_fetch)
        self._side_streams: dict[torch.device, Any] = {}
        self.stats = CompressStats()
        # torch's hooks object may be entered several times (it pushes on each enter and
        # pops on each exit), so this compressor is a reusable, re-entrant context manager.
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __enter__(self) -> SavedTensorCompressor:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    # ---- pack -------------------------------------------------------------------------
    def _passes(self, t: Tensor) -> bool:
        if not t.is_floating_point() or t.numel() < self.min_numel or is_compact(t):
            return True
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return True
        return bool(self._skip) and _storage_ptr(t) in self._skip

    def pack(self, t: Tensor) -> object:
        """Pack hook: ``t`` itself if it passes through, else a quantized record."""
        if self._passes(t):
            self.stats.passed += 1
            report_saved(t)
            return t
        key = (
            _storage_ptr(t),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
            t.device,
            t._version,
        )
        with self._lock:
            entry = self._seen.get(key)
            rec = entry[1]() if entry is not None and entry[0]() is not None else None
            if rec is not None:
                self.stats.deduplicated += 1
                report_saved(rec)
                return rec
        layout, dense = _layout_of(t)
        rec = _Packed(self.codec.encode(dense), t.device, layout)
        self.stats.compressed += 1
        self.stats.bytes_before += t.numel() * t.element_size()
        self.stats.bytes_after += rec.q.nbytes()
        if self.offload and t.is_cuda:
            self._offload(rec)
        with self._lock:
            self._seen[key] = (weakref.ref(t, lambda _: self._drop(key)), weakref.ref(rec))
        report_saved(rec)
        return rec

    @staticmethod
    def stored_nbytes(packed: object) -> int:
        """Bytes held by one result of :meth:`pack`
        (:func:`fewbit.codecs.protocol.stored_nbytes` of the tensor or of its encoding)."""
        if isinstance(packed, Tensor):
            return stored_nbytes(packed)
        if isinstance(packed, _Packed):
            return stored_nbytes(packed.q)
        raise TypeError(f"unexpected packed object {type(packed).__name__}")

    def _drop(self, key: tuple[Any, ...]) -> None:
        self._seen.pop(key, None)

    def _offload(self, rec: _Packed) -> None:
        host = [
            torch.empty(s.shape, dtype=s.dtype, pin_memory=True).copy_(s, non_blocking=True)
            for s in rec.q.tensors()
        ]
        rec.d2h = torch.cuda.Event()
        rec.d2h.record(torch.cuda.current_stream(rec.device))
        rec.q = rec.q.with_tensors(host)
        rec.index = self._schedule.add(rec)

    # ---- unpack -----------------------------------------------------------------------
    def _side_stream(self, device: torch.device) -> Any:
        s = self._side_streams.get(device)
        if s is None:
            s = self._side_streams[device] = torch.cuda.Stream(device)
        return s

    def _start_fetch(self, rec: _Packed) -> None:
        side = self._side_stream(rec.device)
        with torch.cuda.stream(side):
            side.wait_event(rec.d2h)
            rec.fetched = rec.q.to(rec.device, non_blocking=True)
            rec.h2d = torch.cuda.Event()
            rec.h2d.record(side)

    def _on_device(self, rec: _Packed) -> Encoded:
        if rec.index < 0:
            return rec.q
        self._schedule.request(rec.index)
        q, event = rec.fetched, rec.h2d
        assert q is not None and event is not None
        current = torch.cuda.current_stream(rec.device)
        current.wait_event(event)
        for s in q.tensors():
            s.record_stream(current)  # allocated on the side stream, used on this one
        rec.fetched = None
        self._schedule.done(rec.index)
        return q

    def unpack(self, packed: object) -> Tensor:
        """Unpack hook: the tensor itself, or the dequantized copy of a record."""
        if isinstance(packed, Tensor):
            return packed
        if not isinstance(packed, _Packed):
            raise TypeError(f"unexpected packed object {type(packed).__name__}")
        out = packed.cache() if packed.cache is not None else None
        if out is None:
            out = _restore(self._on_device(packed).decode(), packed.layout)
            packed.cache = weakref.ref(out)
        return out


def compress(
    bits: int = 2,
    *,
    group_size: int = 256,
    min_numel: int = 4096,
    model: nn.Module | None = None,
    offload: bool = False,
) -> SavedTensorCompressor:
    """Quantize every saved floating activation to ``bits`` bits inside ``with`` blocks.

    Returns a :class:`SavedTensorCompressor`: a reusable, re-entrant context manager
    (``c = compress(bits=2); with c: ...; with c: ...``) whose ``stats`` report the bytes
    saved. ``model`` (optional ``nn.Module``): its parameters and buffers are never
    compressed (matched by storage). Backward may run after the block ends.
    """
    skip: list[Tensor] = []
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        skip.extend(model.parameters())
        skip.extend(model.buffers())
    return SavedTensorCompressor(
        bits, group_size=group_size, min_numel=min_numel, skip=skip, offload=offload
    )
