"""The continuous activation functions that few-bit tables approximate.

Each entry maps a table name to torch's own forward function and its default
parameters, derived from the activation registry (one entry per table variant). The
forward pass of the few-bit ops calls exactly these functions (so outputs match torch
bit for bit), and the table builder differentiates the same functions in float64, so a
table is always made for the function that runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import Tensor

from .registry import table_definitions

__all__ = ["ActivationDef", "CONTINUOUS", "get_definition", "normalize_params"]

Params = Mapping[str, float]


@dataclass(frozen=True)
class ActivationDef:
    """A continuous activation: ``forward(x, params)`` and its default parameters."""

    name: str
    forward: Callable[[Tensor, Params], Tensor]
    defaults: Mapping[str, float] = field(default_factory=dict)


CONTINUOUS: dict[str, ActivationDef] = {
    name: ActivationDef(name, forward, defaults) for name, forward, defaults in table_definitions()
}
"""Every table of the activation registry (:mod:`fewbit.approx.registry`) by table name."""


def get_definition(name: str) -> ActivationDef:
    """The definition of a continuous activation by table name."""
    try:
        return CONTINUOUS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(CONTINUOUS)}"
        ) from None


def normalize_params(name: str, params: Mapping[str, float] | None = None) -> dict[str, float]:
    """Defaults of ``name`` overridden by ``params``, as floats; rejects unknown keys."""
    definition = get_definition(name)
    params = dict(params or {})
    unknown = set(params) - set(definition.defaults)
    if unknown:
        raise ValueError(f"{name} takes no parameter(s) {sorted(unknown)}")
    out = dict(definition.defaults)
    for key, value in params.items():
        out[key] = float(value)
    return out
