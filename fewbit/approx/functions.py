"""The continuous activation functions that few-bit tables approximate.

Each entry maps a table name to torch's own forward function and its default
parameters. The forward pass of the few-bit ops calls exactly these functions
(so outputs match torch bit for bit), and the table builder differentiates the
same functions in float64, so a table is always made for the function that runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch.nn.functional as F
from torch import Tensor

__all__ = ["ActivationDef", "CONTINUOUS", "get_definition", "normalize_params"]

Params = Mapping[str, float]


@dataclass(frozen=True)
class ActivationDef:
    """A continuous activation: ``forward(x, params)`` and its default parameters."""

    name: str
    forward: Callable[[Tensor, Params], Tensor]
    defaults: Mapping[str, float] = field(default_factory=dict)


def _def(
    name: str, forward: Callable[[Tensor, Params], Tensor], **defaults: float
) -> ActivationDef:
    return ActivationDef(name, forward, dict(defaults))


CONTINUOUS: dict[str, ActivationDef] = {
    d.name: d
    for d in [
        _def("celu", lambda x, p: F.celu(x, alpha=p["alpha"]), alpha=1.0),
        _def("elu", lambda x, p: F.elu(x, alpha=p["alpha"]), alpha=1.0),
        _def("gelu", lambda x, p: F.gelu(x)),
        _def("gelu_tanh", lambda x, p: F.gelu(x, approximate="tanh")),
        _def("hardswish", lambda x, p: F.hardswish(x)),
        _def("logsigmoid", lambda x, p: F.logsigmoid(x)),
        _def("mish", lambda x, p: F.mish(x)),
        _def("selu", lambda x, p: F.selu(x)),
        _def("sigmoid", lambda x, p: x.sigmoid()),
        _def("silu", lambda x, p: F.silu(x)),
        _def(
            "softplus",
            lambda x, p: F.softplus(x, beta=p["beta"], threshold=p["threshold"]),
            beta=1.0,
            threshold=20.0,
        ),
        _def("softsign", lambda x, p: F.softsign(x)),
        _def("tanh", lambda x, p: x.tanh()),
        _def("tanhshrink", lambda x, p: F.tanhshrink(x)),
    ]
}


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
