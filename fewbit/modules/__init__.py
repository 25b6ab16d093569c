"""nn.Module drop-in replacements that store less for backward."""

from . import activations, compressed
from .activations import *  # noqa: F403 - exactly the names of activations.__all__
from .linear import LinearCRS, LinearGRP, RandomizedConv1D, RandomizedLinear

__all__ = [
    "compressed",
    "LinearCRS",
    "LinearGRP",
    "RandomizedConv1D",
    "RandomizedLinear",
    *activations.__all__,
]
