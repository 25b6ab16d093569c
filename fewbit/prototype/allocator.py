"""CUDA caching-allocator settings of ActNN's levels L3.1 and L5 (prototype: CUDA only, not
yet measured on a GPU). The :class:`fewbit.configs.Allocator` handler.

``empty_cache_threshold`` (L3.1): a forward pre-hook on the root calls
``torch.cuda.empty_cache()`` before a training forward when
``(reserved - allocated) / reserved`` of the current CUDA device exceeds the threshold
(ActNN frees the cache under the same rule to fight fragmentation). Costs one query of the
allocator's statistics per step; nothing on CPU.

``expandable_segments`` (L5, ActNN's defragmentation): PyTorch's allocator option
``expandable_segments:True`` grows segments instead of allocating new ones. It applies to the
whole process, so it is set only with ``set_process_allocator=True``; otherwise
:func:`recommended_environment` (and the conversion report) say what to export before CUDA
initializes: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import torch
from torch import nn

from ..configs import Allocator
from ..handlers.base import ConversionEntry, Handler, register_handler

__all__ = ["AllocatorHandler", "EmptyCacheHook", "recommended_environment"]

_ENV = "PYTORCH_CUDA_ALLOC_CONF"


def recommended_environment(config: Allocator) -> Dict[str, str]:
    """Environment variables to set before CUDA initializes for ``config`` (may be empty)."""
    return {_ENV: "expandable_segments:True"} if config.expandable_segments else {}


class EmptyCacheHook:
    """Forward pre-hook releasing cached CUDA blocks when they exceed ``threshold`` of the
    reserved memory (training forwards only)."""

    def __init__(self, config: Allocator) -> None:
        self.config = config

    def __call__(self, module: nn.Module, args: Any) -> None:
        threshold = self.config.empty_cache_threshold
        if threshold is None or not module.training or not torch.cuda.is_initialized():
            return
        reserved = torch.cuda.memory_reserved()
        if reserved and (reserved - torch.cuda.memory_allocated()) / reserved > threshold:
            torch.cuda.empty_cache()


def _hooks(model: nn.Module) -> List[Any]:
    return [k for k, h in model._forward_pre_hooks.items() if isinstance(h, EmptyCacheHook)]


def _set_process_allocator() -> None:
    """expandable_segments for this process: via the environment before CUDA starts, else
    through the allocator's runtime setting."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        return
    current = os.environ.get(_ENV, "")
    if "expandable_segments" not in current:
        os.environ[_ENV] = ",".join(p for p in (current, "expandable_segments:True") if p)


class AllocatorHandler(Handler):
    """:class:`fewbit.configs.Allocator`: a root hook for the cache threshold, and the
    process allocator setting only when asked."""

    config_type = Allocator
    kind = "allocator"

    def apply(self, model: nn.Module, config: Allocator) -> nn.Module:
        self.undo(model)
        if config.empty_cache_threshold is not None:
            model.register_forward_pre_hook(EmptyCacheHook(config))
        if config.expandable_segments and config.set_process_allocator:
            _set_process_allocator()
        model.__dict__["_fewbit_allocator_config"] = config
        return model

    def owns(self, module: nn.Module) -> bool:
        return False

    def report(self, model: nn.Module) -> List[ConversionEntry]:
        config = model.__dict__.get("_fewbit_allocator_config")
        if not isinstance(config, Allocator):
            return []
        env = recommended_environment(config)
        detail = f"empty_cache_threshold={config.empty_cache_threshold}"
        if env and not config.set_process_allocator:
            detail += "; set " + ", ".join(f"{k}={v}" for k, v in env.items()) + \
                " before CUDA initializes (not set by fewbit)"
        elif env:
            detail += "; expandable_segments set for this process"
        return [ConversionEntry("", type(model).__name__, "allocator settings", detail,
                                self.kind)]

    def undo(self, model: nn.Module) -> nn.Module:
        for key in _hooks(model):
            del model._forward_pre_hooks[key]
        model.__dict__.pop("_fewbit_allocator_config", None)
        return model


register_handler(AllocatorHandler())
