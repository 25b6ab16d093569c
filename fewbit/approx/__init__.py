"""Optimal piecewise-constant derivative tables for few-bit activations.

``get_table(name, bits, params)`` returns the table the backward pass uses:
shipped precomputed tables for default parameters, built (and cached) on demand
for others. ``python -m fewbit.approx`` regenerates the shipped data file.
:mod:`fewbit.approx.registry` lists every few-bit activation (``ACTIVATIONS``).
"""

from .functions import CONTINUOUS, ActivationDef, get_definition, normalize_params
from .registry import ACTIVATIONS, Activation, get_activation
from .store import get_table, weighted_rms_error
from .table import Table

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "CONTINUOUS",
    "ActivationDef",
    "Table",
    "get_activation",
    "get_definition",
    "get_table",
    "normalize_params",
    "weighted_rms_error",
]
