"""Registry of benchmark configurations: a name and a function that converts a model.

Adding a row is one line::

    register(Config("gelu2", lambda m: _convert(m, bits=2, linear=None), "2-bit GELU"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

__all__ = ["Config", "CONFIGS", "register", "get_config"]

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


def _gelu3_rand20(model: nn.Module) -> nn.Module:
    return _convert(model, bits=3, linear=0.2)


CONFIGS: dict[str, Config] = {}


def register(config: Config) -> Config:
    """Add (or replace) a configuration in `CONFIGS` and return it."""
    CONFIGS[config.name] = config
    return config


register(Config("vanilla", _vanilla, "PyTorch as is"))
register(Config("gelu3", _gelu3, "3-bit activation derivatives (fewbit.convert, linear=None)"))
register(Config("rand20", _rand20, "randomized linear layers keeping 20% of rows"))
register(Config("gelu3+rand20", _gelu3_rand20, "3-bit activations and randomized linear 20%"))


def get_config(name: str) -> Config:
    """The registered configuration ``name``; ValueError listing the known names otherwise."""
    try:
        return CONFIGS[name]
    except KeyError:
        known = ", ".join(CONFIGS)
        raise ValueError(f"unknown configuration {name!r}; known: {known}") from None
