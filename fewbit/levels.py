"""ActNN-style optimization levels and in-place conversion to compressed layers.

Levels (int ``0``-``4`` or ``'L0'``-``'L4'``):

====  ===========================================================================================
L0    no compression: the model is returned unchanged.
L1    4-bit quantized saved activations (conv, linear, norms, softmax, attention) + lossless
      compact saves (ReLU/Dropout 1-bit masks, max-pool argmax offsets, avg-pool nothing) +
      few-bit activations (``fewbit.convert``: GELU/SiLU... 3-bit derivative codes).
L2    as L1 with 2-bit quantization.
L3    as L2 with adaptive per-layer bits in {1, 2, 4, 8}, 2 bits on average (numel-weighted).
L4    as L3, and quantized records of CUDA tensors are offloaded to pinned CPU memory and
      prefetched during backward (``SavedTensorCompressor(offload=True)``).
====  ===========================================================================================

Adaptive bits (L3/L4). While the model trains, each quantizing layer ``l`` keeps running
averages (EMA, momentum 0.9) of ``S_l = mean(grad_output**2)`` (a tensor hook on its output)
and ``R_l**2 = mean over quantization groups of range**2`` of its saved activation (read off
the quantizer's per-group scales, no extra pass), and ``N_l`` its element count. Stochastic
rounding at ``b`` bits adds variance ``<= step**2 / 4`` per element with
``step = R / (2**b - 1)``, which reaches the weight/input gradients through the output
gradient, so the gradient variance added by layer ``l`` is modelled as
``V_l(b) = S_l * N_l * R_l**2 / (2**b - 1)**2``. Every ``interval`` training steps (forward
calls of the root module in training mode) :func:`allocate_bits` minimises ``sum_l V_l(b_l)``
subject to ``sum_l N_l b_l <= avg_bits * sum_l N_l`` greedily: all layers start at 1 bit and
the upgrade (to the next of 1, 2, 4, 8) with the largest variance reduction per extra bit is
applied while it fits the budget. No extra forward or backward pass is run. Until the first
allocation all layers use 2 bits.

Configuration is scoped, never global: ``set_optimization_level(level)`` returns a
:class:`CompressionConfig` that is also a context manager; inside ``with`` it is the default of
:func:`QModule` / :func:`convert_compressed` called without a level. Outside any ``with`` the
default is L2. (ActNN's global ``set_optimization_level`` followed by ``QModule(model)``
must become ``with fewbit.set_optimization_level('L3'): model = fewbit.QModule(model)`` or
``fewbit.QModule(model, level='L3')``.)

Unlike ActNN's wrapper, :func:`QModule` converts in place and returns the same model, so
``state_dict`` keys keep no ``model.`` prefix, parameters stay the same objects (an optimizer
built before conversion stays valid) and the model's class is unchanged.
"""

from __future__ import annotations

import contextvars
import math
import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .codecs.quantize import check_group_size
from .functional.compressed import scaled_dot_product_attention
from .modules.compressed import LOSSLESS, QUANTIZED, CompressedLayer, LayerStats

__all__ = [
    "AdaptiveBitAllocator",
    "CompressionConfig",
    "LevelLike",
    "QModule",
    "allocate_bits",
    "convert_compressed",
    "current_config",
    "get_allocator",
    "parse_level",
    "set_optimization_level",
]

BIT_CHOICES = (1, 2, 4, 8)
_ALLOCATOR_ATTR = "_fewbit_allocator"


def parse_level(level: Any) -> int:
    """``0``-``4`` or ``'L0'``-``'L4'`` (any case) -> int; anything else raises ValueError."""
    if isinstance(level, CompressionConfig):
        return level.level
    if isinstance(level, int) and not isinstance(level, bool) and 0 <= level <= 4:
        return level
    if isinstance(level, str) and len(level) == 2 and level[0] in "lL" and level[1] in "01234":
        return int(level[1])
    raise ValueError(f"level must be an int 0-4 or a string 'L0'-'L4', got {level!r}")


@dataclass
class CompressionConfig:
    """One optimization level and its knobs; a context manager that makes it the default.

    ``bits``: quantization bits of L1/L2 (the starting and average bits of L3/L4);
    ``adaptive``: per-layer bits (L3, L4); ``offload``: CPU offload (L4);
    ``interval``: training steps between re-allocations; ``avg_bits``: budget of L3/L4.
    """

    level: Union[int, str] = 2
    group_size: int = 256
    interval: int = 100
    avg_bits: float = 2.0
    _tokens: List[Any] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.level = parse_level(self.level)
        check_group_size(self.group_size)
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) \
                or self.interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {self.interval!r}")
        if not isinstance(self.avg_bits, (int, float)) or not 1 <= self.avg_bits <= 8:
            raise ValueError(f"avg_bits must be a number in [1, 8], got {self.avg_bits!r}")

    @property
    def bits(self) -> int:
        return 4 if self.level == 1 else 2

    @property
    def adaptive(self) -> bool:
        return int(self.level) >= 3

    @property
    def offload(self) -> bool:
        return self.level == 4

    def __enter__(self) -> CompressionConfig:
        self._tokens.append(_CONFIG.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _CONFIG.reset(self._tokens.pop())


_CONFIG: contextvars.ContextVar[Optional[CompressionConfig]] = contextvars.ContextVar(
    "fewbit_compression_config", default=None)

LevelLike = Union[int, str, CompressionConfig]


def current_config() -> CompressionConfig:
    """The config of the innermost ``with set_optimization_level(...)`` block, else L2."""
    cfg = _CONFIG.get()
    return cfg if cfg is not None else CompressionConfig()


def set_optimization_level(level: Union[int, str], *, group_size: int = 256,
                           interval: int = 100) -> CompressionConfig:
    """A :class:`CompressionConfig` for ``level``; use it with ``with`` to make it the default.

    Calling it without ``with`` changes nothing (no global state); pass the returned config as
    ``level=`` instead.
    """
    return CompressionConfig(level, group_size=group_size, interval=interval)


def _as_config(level: Optional[LevelLike], group_size: Optional[int],
               interval: Optional[int]) -> CompressionConfig:
    if level is None:
        base = current_config()
    elif isinstance(level, CompressionConfig):
        base = level
    else:
        base = CompressionConfig(parse_level(level))
    return CompressionConfig(
        base.level,
        group_size=base.group_size if group_size is None else group_size,
        interval=base.interval if interval is None else interval,
        avg_bits=base.avg_bits,
    )


# --- bit allocation -----------------------------------------------------------------------------


def allocate_bits(weights: Sequence[float], numels: Sequence[int], avg_bits: float = 2.0,
                  choices: Sequence[int] = BIT_CHOICES) -> List[int]:
    """Greedy bits per layer minimising ``sum w_l / (2**b_l - 1)**2`` with mean bits <= avg.

    ``weights[l] = S_l * N_l * R_l**2`` (see the module docstring), ``numels[l] = N_l``; the
    budget is ``avg_bits * sum(numels)`` bits. Starts from ``choices[0]`` everywhere and
    applies the best variance reduction per extra bit that fits, until none does.
    """
    if len(weights) != len(numels):
        raise ValueError("weights and numels must have the same length")
    choices = sorted(choices)
    bits = [choices[0]] * len(weights)
    budget = avg_bits * sum(numels) - sum(n * b for n, b in zip(numels, bits))
    while True:
        best: Optional[Tuple[float, int, int]] = None
        for i, (w, n) in enumerate(zip(weights, numels)):
            pos = choices.index(bits[i])
            if pos + 1 == len(choices) or w <= 0 or n <= 0:
                continue
            nb = choices[pos + 1]
            cost = n * (nb - bits[i])
            if cost > budget + 1e-9:
                continue
            gain = w * (1 / ((1 << bits[i]) - 1) ** 2 - 1 / ((1 << nb) - 1) ** 2)
            if best is None or gain / cost > best[0]:
                best = (gain / cost, i, nb)
        if best is None:
            return bits
        _, i, nb = best
        budget -= numels[i] * (nb - bits[i])
        bits[i] = nb


class AdaptiveBitAllocator:
    """Collects :class:`LayerStats` on ``layers`` and re-allocates their bits every
    ``interval`` training steps (see the module docstring). ``step()`` counts one step;
    :func:`convert_compressed` calls it from a forward pre-hook on the root module.
    """

    def __init__(self, layers: Sequence[CompressedLayer], avg_bits: float = 2.0,
                 interval: int = 100, choices: Sequence[int] = BIT_CHOICES) -> None:
        self.layers = list(layers)
        self.avg_bits = float(avg_bits)
        self.interval = int(interval)
        self.choices = tuple(choices)
        self.steps = 0
        self.allocations = 0
        self._handle: Optional[Any] = None
        for layer in self.layers:
            layer.fewbit_stats = LayerStats()

    def attach(self, root: nn.Module) -> None:
        """Count the training forwards of ``root`` as steps."""
        self._handle = root.register_forward_pre_hook(self._pre_hook)

    def detach(self) -> None:
        """Stop counting and collecting statistics."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for layer in self.layers:
            layer.fewbit_stats = None

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self.step()

    def step(self) -> None:
        """One training step; re-allocates when ``steps`` is a multiple of ``interval``."""
        self.steps += 1
        if self.steps % self.interval == 0:
            self.reallocate()

    def sensitivities(self) -> List[float]:
        """``S_l * N_l * R_l**2`` per layer (0 for layers without statistics yet)."""
        out = []
        for layer in self.layers:
            s = layer.fewbit_stats
            ok = s is not None and s.steps > 0 and s.numel > 0 and math.isfinite(s.grad_sq)
            out.append(s.grad_sq * s.numel * s.range_sq if ok and s is not None else 0.0)
        return out

    def reallocate(self) -> List[int]:
        """Set each watched layer's ``bits`` from the current statistics; returns them.

        Layers that have not yet seen a forward and a backward keep their bits and are left
        out of the budget.
        """
        ready = [i for i, layer in enumerate(self.layers)
                 if layer.fewbit_stats is not None and layer.fewbit_stats.steps > 0
                 and layer.fewbit_stats.numel > 0]
        if not ready:
            return [layer.bits for layer in self.layers]
        sens = self.sensitivities()
        numels = [self.layers[i].fewbit_stats.numel for i in ready]  # type: ignore[union-attr]
        bits = allocate_bits([sens[i] for i in ready], numels, self.avg_bits, self.choices)
        for i, b in zip(ready, bits):
            self.layers[i].bits = b
        self.allocations += 1
        return [layer.bits for layer in self.layers]


def get_allocator(model: nn.Module) -> Optional[AdaptiveBitAllocator]:
    """The allocator :func:`convert_compressed` attached to ``model`` (L3/L4), else None."""
    alloc = model.__dict__.get(_ALLOCATOR_ATTR)
    return alloc if isinstance(alloc, AdaptiveBitAllocator) else None


# --- conversion ---------------------------------------------------------------------------------


def _swap(module: nn.Module, cls: type) -> nn.Module:
    """An instance of ``cls`` sharing ``module``'s parameters, buffers, hooks and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def _convert_one(module: nn.Module, cfg: CompressionConfig) -> nn.Module:
    if isinstance(module, CompressedLayer):
        module.set_compression(cfg.bits, cfg.group_size, cfg.offload)
        return module
    for src, dst in QUANTIZED:
        if type(module) is src:
            new = _swap(module, dst)
            assert isinstance(new, CompressedLayer)
            new._init_compression(cfg.bits, cfg.group_size, cfg.offload)
            return new
    for src, dst in LOSSLESS:
        if type(module) is src:
            return _swap(module, dst)
    return module


def _convert_tree(module: nn.Module, cfg: CompressionConfig) -> None:
    for name, child in list(module.named_children()):
        new = _convert_one(child, cfg)
        if new is not child:
            setattr(module, name, new)
        _convert_tree(new, cfg)


def convert_compressed(model: nn.Module, level: Optional[LevelLike] = None, *,
                       group_size: Optional[int] = None, interval: Optional[int] = None,
                       activations: bool = True, attention: bool = True) -> nn.Module:
    """Convert ``model`` in place to compressed layers at ``level`` and return it.

    Exact-type ``torch.nn`` layers are replaced by their compressed subclasses sharing the same
    parameter and buffer objects (state_dict keys, BatchNorm running statistics and eval
    outputs unchanged); already compressed layers get the new level's settings.
    ``activations``: also run :func:`fewbit.convert.convert` (few-bit ReLU/GELU/...).
    ``attention``: Hugging Face ``transformers`` attention (``sdpa`` or ``eager``) is routed
    through :func:`fewbit.functional.compressed.scaled_dot_product_attention` in training.
    ``level=None`` uses :func:`current_config`. If ``model`` itself is a convertible layer,
    the returned module is a new object (the root cannot be replaced in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cfg = _as_config(level, group_size, interval)
    old = get_allocator(model)
    if old is not None:
        old.detach()
        del model.__dict__[_ALLOCATOR_ATTR]
    if cfg.level == 0:
        return model
    if activations:
        from .convert import convert

        convert(model)
    root = _convert_one(model, cfg)
    _convert_tree(root, cfg)
    if attention:
        _convert_hf_attention(root, cfg)
    if cfg.adaptive:
        layers = [m for m in root.modules() if isinstance(m, CompressedLayer)]
        alloc = AdaptiveBitAllocator(layers, cfg.avg_bits, cfg.interval)
        alloc.attach(root)
        root.__dict__[_ALLOCATOR_ATTR] = alloc
    return root


def QModule(model: nn.Module, level: Optional[LevelLike] = None) -> nn.Module:  # noqa: N802
    """ActNN's ``QModule``: converts ``model`` in place (see :func:`convert_compressed`).

    Returns the same model object (no wrapper, no ``model.`` prefix in state_dict keys).
    """
    return convert_compressed(model, level)


# --- Hugging Face transformers attention ----------------------------------------------------------


@dataclass
class _AttentionSettings:
    bits: int
    group_size: int
    original: str


_ATTN_SETTINGS = "fewbit_attention"
_PREFIX = "fewbit_"


def _fewbit_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs: Any) -> Tuple[Tensor, None]:
    """transformers attention interface: compressed attention in training, else the original."""
    settings = getattr(module, _ATTN_SETTINGS, None)
    original = settings.original if isinstance(settings, _AttentionSettings) else "sdpa"
    if not (module.training and torch.is_grad_enabled()) or kwargs.get("output_attentions"):
        return _original_attention(original, module)(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs)
    bits = settings.bits if isinstance(settings, _AttentionSettings) else 2
    group_size = settings.group_size if isinstance(settings, _AttentionSettings) else 256
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1 and attention_mask is None
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :, : key.shape[-2]]
    out = scaled_dot_product_attention(query, key, value, mask, dropout, causal, scaling,
                                       bits=bits, group_size=group_size)
    return out.transpose(1, 2).contiguous(), None


def _original_attention(name: str, module: nn.Module) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"no eager_attention_forward for {type(module).__name__}")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def _register_hf(original: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _fewbit_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _convert_hf_attention(model: nn.Module, cfg: CompressionConfig) -> None:
    """Route transformers attention modules (sdpa/eager) through compressed attention."""
    if "transformers" not in sys.modules:
        return
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if not isinstance(impl, str) or isinstance(module, CompressedLayer):
            continue
        if impl.startswith(_PREFIX):
            impl = impl[len(_PREFIX):]
        if impl not in ("sdpa", "eager") or not type(module).__name__.endswith("Attention"):
            continue
        if not hasattr(module, "is_causal") and not hasattr(module, "scaling"):
            continue
        setattr(module, _ATTN_SETTINGS, _AttentionSettings(cfg.bits, cfg.group_size, impl))
        configs[id(config)] = (config, impl)
    for config, impl in configs.values():
        config._attn_implementation = _register_hf(impl)
