"""Randomized linear layers: the conversion and the :class:`Sketch` handler.

Every ``nn.Linear`` (exact type or subclass) and transformers ``Conv1D`` outside the excluded
paths becomes a :class:`fewbit.RandomizedLinear` / :class:`fewbit.RandomizedConv1D` sharing
its parameter objects (an optimizer built before stays valid, state_dict keys unchanged).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from torch import nn

from ..configs import Sketch
from ..modules.compressed import CompressedLayer
from ..modules.linear import LinearCRS, RandomizedConv1D, RandomizedLinear
from ..util import convert_linear, map_module
from .activations import is_hf
from .base import ORIGINAL, Handler, register_handler, remember

__all__ = ["SketchHandler", "convert_linears", "is_conv1d"]

_OWNED = (RandomizedLinear, RandomizedConv1D, LinearCRS)


def is_conv1d(module: nn.Module) -> bool:
    """True for the transformers GPT-2 ``Conv1D``."""
    return type(module).__name__ == "Conv1D" and is_hf(module)


def _convert_conv1d(module: nn.Module, kwargs: Mapping[str, Any]) -> nn.Module:
    """A transformers ``Conv1D`` as :class:`RandomizedConv1D` sharing its parameters."""
    weight, bias = module.weight, module.bias
    if not isinstance(weight, nn.Parameter) or not isinstance(bias, nn.Parameter):
        return module
    layer = RandomizedConv1D(int(module.nf), int(module.nx), device="meta", dtype=weight.dtype,
                             **kwargs)
    layer.weight, layer.bias = weight, bias
    layer.train(module.training)
    return layer


def convert_linears(model: nn.Module, kwargs: Mapping[str, Any],
                    exclude: Optional[str]) -> nn.Module:
    """Swap linear layers (and ``Conv1D``) whose dotted path ``exclude`` does not match for
    randomized ones built with ``kwargs`` (``RandomizedLinear`` arguments); returns the root."""
    pattern = re.compile(exclude) if exclude is not None else None

    def replace(module: nn.Module, path: str) -> nn.Module:
        if isinstance(module, _OWNED + (CompressedLayer,)) or not (
                isinstance(module, nn.Linear) or is_conv1d(module)):
            return module  # already randomized, or compressed by Compress
        dotted = path.strip("/").replace("/", ".")
        if pattern is not None and pattern.search(dotted):
            return module
        if is_conv1d(module):
            return remember(_convert_conv1d(module, kwargs), module)
        return remember(convert_linear(module, RandomizedLinear, **kwargs), module)

    return map_module(model, replace)


class SketchHandler(Handler):
    """:class:`fewbit.configs.Sketch`: randomized linear layers."""

    config_type = Sketch
    kind = "sketch"

    def apply(self, model: nn.Module, config: Sketch) -> nn.Module:
        kwargs = {"proj_dim_ratio": float(config.ratio), "matmul": config.kind}
        for module in model.modules():
            # Layers an earlier conversion made take the new settings (user-built ones stay).
            if isinstance(module, (RandomizedLinear, RandomizedConv1D)) \
                    and ORIGINAL in module.__dict__:
                module.proj_dim_ratio, module.proj_dim = kwargs["proj_dim_ratio"], None
                module.matmul = config.kind
        return convert_linears(model, kwargs, config.exclude)

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, _OWNED)

    def describe(self, module: nn.Module) -> str:
        if isinstance(module, RandomizedLinear):
            return module.extra_repr().split(", ", 3)[-1]
        if isinstance(module, RandomizedConv1D):
            return module.extra_repr().split(", ", 2)[-1]
        if isinstance(module, LinearCRS):
            return f"proj_dim={module.proj_dim}"
        return ""


register_handler(SketchHandler())
