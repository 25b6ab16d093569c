"""``fewbit.convert``: the published one-call conversion, an alias over the handlers of
:func:`fewbit.apply` (``Activations`` and ``Sketch``).

``fewbit.convert(model)`` swaps every supported activation module (torch.nn classes and the
Hugging Face ``transformers.activations`` classes with the same math) for its few-bit
subclass, and with ``linear=0.2`` every ``nn.Linear`` outside the heads for a
``RandomizedLinear(proj_dim_ratio=0.2)``. Parameters, buffers, devices, dtypes and
state_dict keys do not change, so checkpoints load before and after conversion.
``conversion_report(model)`` lists what is converted and what is left, with the reason.
``fewbit.apply(model, Activations(bits=3), Sketch(ratio=0.2))`` does the same as
``convert(model, bits=3, linear=0.2)``.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Mapping, Optional, Union

from torch import nn

from .apply import ConversionReport, conversion_report
from .configs import DEFAULT_LINEAR_EXCLUDE
from .handlers.activations import Bits, check_bits_argument, convert_activations
from .handlers.base import ConversionEntry
from .handlers.sketch import convert_linears

__all__ = [
    "DEFAULT_LINEAR_EXCLUDE",
    "ConversionEntry",
    "ConversionReport",
    "conversion_report",
    "convert",
]


def _linear_kwargs(linear: Any) -> dict[str, Any]:
    if linear is None or linear is False:
        return {}
    if linear is True:
        return {"proj_dim_ratio": None}
    if isinstance(linear, (int, float)):
        if not 0.0 < float(linear) <= 1.0:
            raise ValueError(f"linear must be a ratio in (0, 1], got {linear}")
        return {"proj_dim_ratio": float(linear)}
    if isinstance(linear, Mapping):
        return dict(linear)
    raise TypeError(f"linear must be None, a ratio, True or a dict of RandomizedLinear args, "
                    f"got {linear!r}")


def convert(
    model: nn.Module,
    *,
    bits: Bits = None,
    activations: bool = True,
    linear: Union[None, bool, float, Mapping[str, Any]] = None,
    linear_exclude: Optional[str] = DEFAULT_LINEAR_EXCLUDE,
    inplace: bool = True,
) -> nn.Module:
    """Replace supported activations by few-bit ones and, if ``linear`` is given, linear
    layers by :class:`RandomizedLinear`; returns the model (a deep copy if not ``inplace``).

    ``bits``: None (3 for continuous activations, 1 for piecewise ones), an int (continuous
    ones), or a dict keyed by source or few-bit class name (``{'GELU': 4, 'SiLU': None}``;
    None leaves that class as it is). ``linear``: a ``proj_dim_ratio`` (``0.2``), ``True``
    (default ratio) or a dict of ``RandomizedLinear`` arguments; ``linear_exclude``: regex
    searched in the dotted path of linears to keep exact (default: task heads). Each
    replacement is checked numerically to compute the same function before it is made.
    Parameters (same objects), buffers, devices, dtypes and state_dict keys are unchanged;
    :func:`fewbit.unapply` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_bits_argument(bits)
    if linear_exclude is not None:
        re.compile(linear_exclude)
    linear_kwargs = _linear_kwargs(linear)
    if not inplace:
        model = copy.deepcopy(model)
    if linear_kwargs:
        model = convert_linears(model, linear_kwargs, linear_exclude)
    if activations:
        model = convert_activations(model, bits)
    return model
