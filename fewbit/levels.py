"""ActNN's optimization levels as named lists of configs, and ActNN's ``QModule`` /
``set_optimization_level`` as aliases over :func:`fewbit.apply`.

The levels mean what ActNN's mean (``actnn/conf.py``), level by level:

=====  ============================================  =============================================
level  ActNN                                         fewbit configs
=====  ============================================  =============================================
L0     nothing                                       none
L1     4-bit conv/linear, BatchNorm kept in fp32     ``Compress(4, layers=('conv', 'linear',
                                                     'lossless'))``: norms not compressed
L2     4-bit everywhere                              ``Compress(4)``: conv, linear, norms,
                                                     softmax, attention, lossless layers
L3     2-bit, per-group, adaptive (ActNN's default)  ``Compress(2, adaptive=True)``
L3.1   L3 + allocator tuning                         L3 + ``Allocator(empty_cache_threshold=0.2)``
L4     L3 + swapping saved activations to CPU        ``Compress(2, adaptive=True, offload=True)``
L5     L4 + defragmentation                          L4 + ``Allocator(expandable_segments=True)``
=====  ============================================  =============================================

fewbit's additions, on at every level >= 1 unless ``activation_bits=None``: few-bit
activation derivatives (``Activations(bits=3)``: GELU, SiLU, Tanh, ... keep a 3-bit code of
their input; ReLU-like ones an exact 1-bit mask) and, in every ``Compress``, the lossless
compact saves (dropout 1-bit masks, max-pool argmax offsets, average pools saving nothing).
Adaptive bits (L3-L5) are described in :mod:`fewbit.prototype.adaptive`; offload and the
allocator settings act on CUDA only and are prototypes until measured there. L5's
defragmentation is PyTorch's ``expandable_segments`` allocator option: process-global, so
fewbit does not set it; the conversion report says what to export
(``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``), or pass
``Allocator(expandable_segments=True, set_process_allocator=True)`` to :func:`fewbit.apply`.

Configuration is scoped, never global: ``set_optimization_level(level)`` returns a
:class:`CompressionConfig` that is also a context manager; inside ``with`` it is the default of
:func:`QModule` / :func:`convert_compressed` called without a level. Outside any ``with`` the
default is L3, ActNN's default. (ActNN's global ``set_optimization_level`` followed by
``QModule(model)`` becomes ``with fewbit.set_optimization_level('L3'): fewbit.QModule(model)``
or ``fewbit.QModule(model, level='L3')``.)

Unlike ActNN's wrapper, :func:`QModule` converts in place and returns the same model, so
``state_dict`` keys keep no ``model.`` prefix, parameters stay the same objects (an optimizer
built before conversion stays valid) and the model's class is unchanged. Converting to a level
replaces the compressed layers of an earlier level (L0 removes them).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field, replace
from typing import Any, List, Optional, Tuple, Union

from torch import nn

from .apply import apply
from .configs import Activations, Allocator, Compress
from .handlers import HANDLERS
from .prototype.adaptive import (
    BIT_CHOICES,
    AdaptiveBitAllocator,
    allocate_bits,
    get_allocator,
)

__all__ = [
    "BIT_CHOICES",
    "LEVELS",
    "AdaptiveBitAllocator",
    "CompressionConfig",
    "LevelLike",
    "QModule",
    "allocate_bits",
    "convert_compressed",
    "current_config",
    "get_allocator",
    "level_configs",
    "parse_level",
    "set_optimization_level",
]

_L1_LAYERS = ("conv", "linear", "lossless")
_L3 = Compress(bits=2, adaptive=True)
_L4 = replace(_L3, offload=True)

#: Level name -> its configs at the default settings (without fewbit's ``Activations``).
LEVELS: dict[str, Tuple[Any, ...]] = {
    "L0": (),
    "L1": (Compress(bits=4, layers=_L1_LAYERS),),
    "L2": (Compress(bits=4),),
    "L3": (_L3,),
    "L3.1": (_L3, Allocator(empty_cache_threshold=0.2)),
    "L4": (_L4,),
    "L5": (_L4, Allocator(expandable_segments=True)),
}
_INT_LEVELS = {0: "L0", 1: "L1", 2: "L2", 3: "L3", 4: "L4", 5: "L5"}


def parse_level(level: Any) -> str:
    """The canonical level name (``'L0'``-``'L5'``, ``'L3.1'``) of ``level``: an int 0-5, a
    name in any case, or a :class:`CompressionConfig`; ValueError naming ``level`` otherwise."""
    if isinstance(level, CompressionConfig):
        return level.level
    if isinstance(level, int) and not isinstance(level, bool) and level in _INT_LEVELS:
        return _INT_LEVELS[level]
    if isinstance(level, str) and level.upper() in LEVELS:
        return level.upper()
    raise ValueError(f"level must be an int 0-5 or one of {list(LEVELS)}, got {level!r}")


def level_configs(level: Any, *, activation_bits: Optional[int] = 3,
                  avg_bits: Optional[float] = None, group_size: Optional[int] = None,
                  interval: Optional[int] = None) -> List[Any]:
    """The configs of ``level``: fewbit's ``Activations(activation_bits)`` (None: left out;
    not at L0) followed by the level's own, with ``avg_bits`` (adaptive budget),
    ``group_size`` and ``interval`` applied to its ``Compress`` when given."""
    name = parse_level(level)
    changes = {k: v for k, v in (("avg_bits", avg_bits), ("group_size", group_size),
                                 ("interval", interval)) if v is not None}
    out: List[Any] = []
    if name != "L0" and activation_bits is not None:
        out.append(Activations(bits=activation_bits))
    for config in LEVELS[name]:
        out.append(replace(config, **changes) if isinstance(config, Compress) else config)
    return out


@dataclass
class CompressionConfig:
    """One optimization level and its knobs; a context manager that makes it the default.

    ``level``: a name of :data:`LEVELS` (ints 0-5 accepted); ``group_size``: quantization group;
    ``interval``: training steps between re-allocations and ``avg_bits``: bit budget of the
    adaptive levels (L3-L5); ``activation_bits``: fewbit's few-bit activations (None: off).
    """

    level: Union[int, str] = "L3"
    group_size: int = 256
    interval: int = 100
    avg_bits: float = 2.0
    activation_bits: Optional[int] = 3
    _tokens: List[Any] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.level = parse_level(self.level)
        self.configs()  # validates every knob, with errors naming it

    def configs(self) -> List[Any]:
        """The configs this level stands for (what :func:`fewbit.apply` receives)."""
        return level_configs(self.level, activation_bits=self.activation_bits,
                             avg_bits=self.avg_bits, group_size=self.group_size,
                             interval=self.interval)

    def _compress(self) -> Optional[Compress]:
        found = [c for c in self.configs() if isinstance(c, Compress)]
        return found[0] if found else None

    @property
    def bits(self) -> int:
        """Quantization bits (the starting bits of the adaptive levels); 0 at L0."""
        c = self._compress()
        return c.bits if c is not None else 0

    @property
    def adaptive(self) -> bool:
        c = self._compress()
        return c is not None and c.adaptive

    @property
    def offload(self) -> bool:
        c = self._compress()
        return c is not None and c.offload

    def __enter__(self) -> CompressionConfig:
        self._tokens.append(_CONFIG.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _CONFIG.reset(self._tokens.pop())


_CONFIG: contextvars.ContextVar[Optional[CompressionConfig]] = contextvars.ContextVar(
    "fewbit_compression_config", default=None)

LevelLike = Union[int, str, CompressionConfig]


def current_config() -> CompressionConfig:
    """The config of the innermost ``with set_optimization_level(...)`` block, else L3."""
    cfg = _CONFIG.get()
    return cfg if cfg is not None else CompressionConfig()


def set_optimization_level(level: Union[int, str], *, group_size: int = 256,
                           interval: int = 100, avg_bits: float = 2.0,
                           activation_bits: Optional[int] = 3) -> CompressionConfig:
    """A :class:`CompressionConfig` for ``level``; use it with ``with`` to make it the default.

    Calling it without ``with`` changes nothing (no global state); pass the returned config as
    ``level=`` instead.
    """
    return CompressionConfig(level, group_size=group_size, interval=interval, avg_bits=avg_bits,
                             activation_bits=activation_bits)


_UNSET: Any = object()


def convert_compressed(model: nn.Module, level: Optional[LevelLike] = None, *,
                       group_size: Optional[int] = None, interval: Optional[int] = None,
                       activations: bool = True, attention: bool = True,
                       avg_bits: Optional[float] = None,
                       activation_bits: Optional[int] = _UNSET) -> nn.Module:
    """Convert ``model`` in place to ``level`` (see the table above) and return it.

    ``level=None`` uses :func:`current_config`; ``group_size``, ``interval``, ``avg_bits`` and
    ``activation_bits`` override the level's. ``activations=False`` leaves activations as they
    are; ``attention=False`` leaves Hugging Face attention exact. Compressed layers of an
    earlier conversion are undone first. If ``model`` itself is a convertible layer, the
    returned module is a new object (the root cannot be replaced in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if level is None:
        base = current_config()
    elif isinstance(level, CompressionConfig):
        base = level
    else:
        base = CompressionConfig(parse_level(level))
    cfg = CompressionConfig(
        base.level,
        group_size=base.group_size if group_size is None else group_size,
        interval=base.interval if interval is None else interval,
        avg_bits=base.avg_bits if avg_bits is None else avg_bits,
        activation_bits=base.activation_bits if activation_bits is _UNSET else activation_bits,
    )
    configs = [c for c in cfg.configs() if activations or not isinstance(c, Activations)]
    if not attention:
        configs = [replace(c, layers=tuple(g for g in c.layers if g != "attention"))
                   if isinstance(c, Compress) else c for c in configs]
    for kind in (Compress, Allocator):
        model = HANDLERS[kind].undo(model)
    return apply(model, *configs)


def QModule(model: nn.Module, level: Optional[LevelLike] = None, *,  # noqa: N802
            activation_bits: Optional[int] = _UNSET,
            avg_bits: Optional[float] = None) -> nn.Module:
    """ActNN's ``QModule``: converts ``model`` in place to ``level`` (see
    :func:`convert_compressed`), with fewbit's few-bit activations at ``activation_bits``
    (default 3; None: off) and the adaptive levels' budget ``avg_bits`` (default 2).

    Returns the same model object (no wrapper, no ``model.`` prefix in state_dict keys).
    """
    return convert_compressed(model, level, activation_bits=activation_bits, avg_bits=avg_bits)
