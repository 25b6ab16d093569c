"""Functional forms (autograd Functions) of fewbit's memory-saving ops."""

from . import activations
from .activations import *  # noqa: F403 - exactly the names of activations.__all__
from .compressed import (
    avg_pool1d,
    avg_pool2d,
    avg_pool3d,
    dropout,
    max_pool1d,
    max_pool2d,
    max_pool3d,
    scaled_dot_product_attention,
)
from .linear import linear_crs, linear_grp, linear_randomized

__all__ = [
    "linear_crs",
    "linear_grp",
    "linear_randomized",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "dropout",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "scaled_dot_product_attention",
    *activations.__all__,
]
