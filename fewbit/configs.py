"""Configurations for :func:`fewbit.apply`: small frozen dataclasses, one per kind of change.

Each configuration says *what* to do to a model; the handler registered for its class
(:mod:`fewbit.handlers`) does it, reports it and undoes it. Configurations compose:
``fewbit.apply(model, Activations(bits=3), Sketch(ratio=0.2), Generic(bits=2))``. They hold no
tensors and no model, are hashable and compare by value, so a list of them names a setting
(the levels of :mod:`fewbit.levels` are such lists). ``version`` is bumped when the meaning of
a field changes.

==============  ================================================================================
Activations     few-bit activation derivatives (GELU/SiLU/... ``bits``, ReLU-like 1-bit masks)
Sketch          randomized linear layers: a ``ratio`` sketch of each linear input is saved
Compress        ActNN-style layers: inputs of conv/linear/norm/softmax/attention quantized
Generic         every floating saved tensor of the model's forward quantized (saved-tensor hooks)
Offload         every saved tensor of the model's forward copied to CPU memory (exact)
Checkpoint      checkpoint regions (model blocks) whose inputs are stored quantized
Allocator       CUDA caching-allocator settings of ActNN's L3.1 / L5 (prototype, CUDA only)
==============  ================================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

from .codecs.quantize import check_group_size as _group_size
from .codecs.quantize import check_quant_bits as _quant_bits
from .codecs.sketch import DEFAULT_SKETCH, SKETCHES

__all__ = [
    "COMPRESS_GROUPS",
    "DEFAULT_LINEAR_EXCLUDE",
    "Activations",
    "Allocator",
    "Checkpoint",
    "Compress",
    "Config",
    "Generic",
    "Offload",
    "Sketch",
]

#: Paths (dotted, ``re.search``) of linear layers kept exact by default: task heads.
DEFAULT_LINEAR_EXCLUDE = r"(^|\.)(classifier|pooler|lm_head|score|qa_outputs|cls|head|fc)(\.|$)"

#: The layer groups :class:`Compress` can convert (``layers=``).
COMPRESS_GROUPS = ("conv", "linear", "norm", "softmax", "attention", "lossless")



def _int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return value


@dataclass(frozen=True)
class Activations:
    """Few-bit activations (:func:`fewbit.convert` without ``linear``).

    ``bits``: bits of the derivative code of continuous activations (GELU, SiLU, Tanh, ...;
    1-8), or None for the defaults (3); piecewise-linear ones (ReLU, LeakyReLU, Hardtanh, ...)
    always save an exact 1-bit mask. ``classes``: per class name (torch or few-bit spelling)
    bits, None to leave that class alone, e.g. ``{'GELU': 4, 'SiLU': None}``; stored as a
    sorted tuple of pairs. Stored per activated element: ``bits/8`` bytes instead of the input.
    """

    bits: Optional[int] = 3
    classes: Union[Tuple[Tuple[str, Optional[int]], ...], Mapping[str, Optional[int]]] = ()
    version: int = 1

    def __post_init__(self) -> None:
        if self.bits is not None:
            _int("bits", self.bits, 1, 8)
        items = self.classes.items() if isinstance(self.classes, Mapping) else self.classes
        try:
            pairs = tuple(sorted((str(k), v) for k, v in items))
        except (TypeError, ValueError):
            raise TypeError(f"classes must be a dict of class name -> bits or None, "
                            f"got {self.classes!r}") from None
        for name, bits in pairs:
            if bits is not None:
                _int(f"classes[{name!r}]", bits, 1, 8)
        object.__setattr__(self, "classes", pairs)

    def bits_argument(self) -> Union[None, int, dict[str, Optional[int]]]:
        """The ``bits`` argument of :func:`fewbit.convert` meaning the same."""
        if not self.classes:
            return self.bits
        mapping: dict[str, Optional[int]] = dict(self.classes)  # type: ignore[arg-type]
        if self.bits is not None:
            for name in _CONTINUOUS_NAMES:
                mapping.setdefault(name, self.bits)
        return mapping


# Continuous activations (few-bit class names): ``Activations.bits`` applies to these.
_CONTINUOUS_NAMES = ("CELU", "ELU", "GELU", "Hardswish", "LogSigmoid", "Mish", "SELU", "Sigmoid",
                     "SiLU", "Softplus", "Softsign", "Tanh", "Tanhshrink")


@dataclass(frozen=True)
class Sketch:
    """Randomized linear layers (:class:`fewbit.RandomizedLinear`, GPT-2 ``Conv1D`` too).

    Saved for backward: ``ratio * N`` rows of a random sketch of each ``N x in`` linear input
    instead of the input (input and bias gradients exact, weight gradient unbiased).
    ``kind``: a ``matmul`` of :mod:`fewbit.codecs.sketch` (``'countsketch'``, the default,
    ``'gaussian'``, ``'rademacher'``, ``'sampling'``).
    ``exclude``: regex searched in dotted module paths of linears kept exact (task heads by
    default; None converts every linear).
    """

    ratio: float = 0.2
    kind: str = DEFAULT_SKETCH
    exclude: Optional[str] = DEFAULT_LINEAR_EXCLUDE
    version: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (
                0.0 < float(self.ratio) <= 1.0):
            raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}")
        if self.kind not in SKETCHES:
            raise ValueError(f"kind must be one of {list(SKETCHES)}, got {self.kind!r}")
        if self.exclude is not None:
            re.compile(self.exclude)


@dataclass(frozen=True)
class Compress:
    """ActNN-style compressed layers (:mod:`fewbit.modules.compressed`).

    ``bits`` (1, 2, 4, 8): the saved input of each converted layer is quantized per group of
    ``group_size`` values: ``bits + 32/group_size`` bits per element. ``layers``: ``'all'`` or
    a tuple of groups from :data:`COMPRESS_GROUPS`: ``conv`` (Conv/ConvTranspose 1-3d),
    ``linear``, ``norm`` (BatchNorm, SyncBatchNorm, LayerNorm, GroupNorm), ``softmax``,
    ``attention`` (Hugging Face attention routed through the compressed
    ``scaled_dot_product_attention``), ``lossless`` (dropout 1-bit masks, max-pool argmax
    offsets, average pools saving nothing). ``adaptive``: per-layer bits in {1, 2, 4, 8}
    re-allocated every ``interval`` training steps with ``avg_bits`` bits on average
    (prototype: :mod:`fewbit.prototype.adaptive`). ``offload``: the quantized records of CUDA
    tensors go to pinned CPU memory until backward (prototype; nothing on CPU).
    """

    bits: int = 2
    layers: Union[str, Tuple[str, ...]] = "all"
    adaptive: bool = False
    avg_bits: float = 2.0
    interval: int = 100
    group_size: int = 256
    offload: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        _quant_bits(self.bits)
        layers = COMPRESS_GROUPS if self.layers == "all" else self.layers
        if isinstance(layers, str) or not all(g in COMPRESS_GROUPS for g in layers):
            raise ValueError(f"layers must be 'all' or a tuple of {list(COMPRESS_GROUPS)}, "
                             f"got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(g for g in COMPRESS_GROUPS if g in layers))
        if isinstance(self.avg_bits, bool) or not isinstance(self.avg_bits, (int, float)) or \
                not 1 <= self.avg_bits <= 8:
            raise ValueError(f"avg_bits must be a number in [1, 8], got {self.avg_bits!r}")
        _int("interval", self.interval, 1)
        _group_size(self.group_size)


@dataclass(frozen=True)
class Generic:
    """The saved-tensor mode over the whole model (:func:`fewbit.compress` on every forward).

    A forward pre-hook and a forward hook on the root module open and close
    ``fewbit.compress(bits, group_size=..., min_numel=..., model=root)`` around each forward,
    so every floating saved tensor of at least ``min_numel`` elements that is not a parameter,
    buffer or already compact is stored in ``bits + 32/group_size`` bits per element.
    Saved-tensor hooks do not nest: layers with their own hooks (compressed layers) keep theirs.
    """

    bits: int = 2
    group_size: int = 256
    min_numel: int = 4096
    offload: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        _quant_bits(self.bits)
        _group_size(self.group_size)
        _int("min_numel", self.min_numel, 0)


@dataclass(frozen=True)
class Offload:
    """Every tensor saved during the model's forward kept in CPU memory until backward
    (``torch.autograd.graph.save_on_cpu``): exact gradients, device memory of the saved
    activations freed at the cost of one copy each way per tensor. ``pin_memory``: page-locked
    host buffers (faster, asynchronous copies). Useful on CUDA only (on CPU it adds a copy);
    a prototype until measured on a GPU. Like :class:`Generic` it runs as root forward hooks;
    the two are alternatives (saved-tensor hooks do not nest): applying one removes the other.
    """

    pin_memory: bool = True
    version: int = 1


@dataclass(frozen=True)
class Checkpoint:
    """Activation checkpointing of the model's blocks with their inputs stored quantized
    (:func:`fewbit.checkpoint.checkpoint`).

    Each region keeps nothing for backward but its floating inputs of at least ``min_numel``
    elements, quantized to ``bits`` (1, 2, 4, 8) in groups of ``group_size`` (8.125 bits per
    element at the defaults, 3.9x less than float32); backward runs the region's forward
    once more. ``regions``: regex searched in dotted module paths; None picks the blocks of
    every ``nn.ModuleList`` and of every ``nn.Sequential`` of two or more modules of one class
    (transformer layers, residual blocks). Do not also turn on Hugging Face's
    ``gradient_checkpointing``: the regions would be checkpointed twice.
    """

    bits: int = 8
    group_size: int = 256
    min_numel: int = 1024
    regions: Optional[str] = None
    version: int = 1

    def __post_init__(self) -> None:
        _quant_bits(self.bits)
        _group_size(self.group_size)
        _int("min_numel", self.min_numel, 0)
        if self.regions is not None:
            re.compile(self.regions)


@dataclass(frozen=True)
class Allocator:
    """CUDA caching-allocator settings (ActNN's L3.1 and L5; prototype, CUDA only).

    ``empty_cache_threshold``: before each training forward of the root, release cached
    blocks (``torch.cuda.empty_cache()``) when the cached-but-unused fraction of reserved
    memory exceeds it (ActNN L3.1 uses 0.2). ``expandable_segments``: the allocator setting
    that removes most fragmentation (ActNN L5's defragmentation). It is process-global, so
    applying this config changes nothing unless ``set_process_allocator=True``; otherwise the
    report names the environment setting to use (``PYTORCH_CUDA_ALLOC_CONF``).
    """

    empty_cache_threshold: Optional[float] = None
    expandable_segments: bool = False
    set_process_allocator: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        t = self.empty_cache_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))
                              or not 0.0 <= float(t) <= 1.0):
            raise ValueError(f"empty_cache_threshold must be None or in [0, 1], got {t!r}")


Config = Union[Activations, Sketch, Compress, Generic, Offload, Checkpoint, Allocator]
