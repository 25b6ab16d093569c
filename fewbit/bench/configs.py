"""Registry of benchmark configurations: a name and a function that converts a model.

Adding a row is one line::

    register(Config("gelu2", lambda m: _convert(m, bits=2, linear=None), "2-bit GELU"))
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

__all__ = [
    "Config",
    "CONFIGS",
    "DEFAULT_CONFIGS",
    "register",
    "get_config",
    "with_generic_compress",
]

Apply = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class Config:
    """A benchmark row: ``apply(model)`` returns the model to train (may modify in place)."""

    name: str
    apply: Apply
    description: str = ""


def _convert(model: nn.Module, **kwargs: Any) -> nn.Module:
    from fewbit.convert import convert  # imported late: only the converted rows need it

    return convert(model, **kwargs)


def _vanilla(model: nn.Module) -> nn.Module:
    return model


def _gelu3(model: nn.Module) -> nn.Module:
    return _convert(model, bits=3, linear=None)


def _rand20(model: nn.Module) -> nn.Module:
    return _convert(model, activations=False, linear=0.2)


def _rand20_variant(matmul: str) -> Apply:
    def apply(model: nn.Module) -> nn.Module:
        return _convert(model, activations=False, linear={"proj_dim_ratio": 0.2, "matmul": matmul})

    return apply


def _gelu3_rand20(model: nn.Module) -> nn.Module:
    return _convert(model, bits=3, linear=0.2)


def _level(level: int) -> Apply:
    def apply(model: nn.Module) -> nn.Module:
        from fewbit.levels import convert_compressed

        return convert_compressed(model, level=level)

    return apply


def with_generic_compress(model: nn.Module, bits: int = 2) -> nn.Module:
    """Make every forward of ``model`` run inside ``fewbit.compress(bits=...)`` (the generic
    saved-tensor mode): every floating saved tensor that is not a parameter or buffer of the
    model, and not already compact, is quantized. Root forward hooks, so parameter names and
    the model's class are unchanged; the context is closed even when forward raises."""
    from fewbit.compress import compress

    open_contexts: list[ExitStack] = []

    def enter(module: nn.Module, args: Any) -> None:
        stack = ExitStack()
        stack.enter_context(compress(bits=bits, model=module))
        open_contexts.append(stack)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        open_contexts.pop().close()

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
    return model


def _generic2(model: nn.Module) -> nn.Module:
    return with_generic_compress(model, bits=2)


def _gelu3_rand20_generic2(model: nn.Module) -> nn.Module:
    return with_generic_compress(_convert(model, bits=3, linear=0.2), bits=2)


CONFIGS: dict[str, Config] = {}


def register(config: Config) -> Config:
    """Add (or replace) a configuration in `CONFIGS` and return it."""
    CONFIGS[config.name] = config
    return config


register(Config("vanilla", _vanilla, "PyTorch as is"))
register(Config("gelu3", _gelu3, "3-bit activation derivatives (fewbit.convert, linear=None)"))
register(Config("rand20", _rand20, "randomized linear layers keeping 20% of rows"))
register(Config("gelu3+rand20", _gelu3_rand20, "3-bit activations and randomized linear 20%"))
register(Config("rand20-rademacher", _rand20_variant("rademacher"), "rand20, Rademacher sketch"))
register(Config("rand20-sampling", _rand20_variant("sampling"), "rand20, importance row sampling"))
register(
    Config("L1", _level(1), "ActNN-style level 1: 4-bit layers, 1-bit masks, 3-bit activations")
)
register(
    Config("L2", _level(2), "ActNN-style level 2: 2-bit layers, 1-bit masks, 3-bit activations")
)
register(Config("L3", _level(3), "level 3: 2 bits on average, adaptive per layer"))
register(Config("compress2", _generic2, "generic mode: every saved float tensor at 2 bits"))
register(
    Config("gelu3+rand20+compress2", _gelu3_rand20_generic2, "both rows above, the rest at 2 bits")
)


# The rows `fewbit bench` runs without --configs (about 2 minutes on 2 CPU cores for the default
# model); `--configs all` adds L3 (equal to L2 until its first re-allocation, after 100 steps)
# and the generic mode on top of gelu3+rand20.
DEFAULT_CONFIGS = ("vanilla", "gelu3", "rand20", "gelu3+rand20", "L1", "L2", "compress2")


def get_config(name: str) -> Config:
    """The registered configuration ``name``; ValueError listing the known names otherwise."""
    try:
        return CONFIGS[name]
    except KeyError:
        known = ", ".join(CONFIGS)
        raise ValueError(f"unknown configuration {name!r}; known: {known}") from None
