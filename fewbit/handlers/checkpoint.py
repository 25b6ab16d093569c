"""Checkpoint regions with compressed inputs: the :class:`Checkpoint` handler.

Each region module gets an instance attribute ``forward`` (a :class:`CheckpointForward`)
that runs the class's own ``forward`` inside :func:`fewbit.checkpoint.checkpoint` while
training with grad enabled, and plainly otherwise. Nothing else changes: parameters,
state_dict keys and the class stay; undo deletes the attribute.
"""

from __future__ import annotations

import functools
import re
from typing import Any, List

import torch
from torch import nn

from ..checkpoint import checkpoint
from ..configs import Checkpoint
from ..util import map_module
from .base import Handler, register_handler

__all__ = ["CheckpointForward", "CheckpointHandler", "default_regions"]


class CheckpointForward:
    """The ``forward`` of one region: ``type(module).forward`` under
    :func:`fewbit.checkpoint.checkpoint` with the config's settings."""

    def __init__(self, module: nn.Module, config: Checkpoint) -> None:
        self.module = module
        self.config = config

    def rebind(self, module: nn.Module) -> CheckpointForward:
        """The same region forward for ``module`` (after a class swap)."""
        return CheckpointForward(module, self.config)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        forward = functools.partial(type(module).forward, module)
        if not (module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        c = self.config
        return checkpoint(forward, *args, bits=c.bits, group_size=c.group_size,
                          min_numel=c.min_numel, **kwargs)


def _is_block(module: nn.Module) -> bool:
    return any(True for _ in module.children())


def _holds_blocks(module: nn.Module) -> bool:
    children = list(module.children())
    if isinstance(module, nn.ModuleList):
        return True
    return (isinstance(module, nn.Sequential) and len(children) >= 2
            and len({type(c) for c in children}) == 1)


def default_regions(model: nn.Module) -> List[str]:
    """Dotted paths of the blocks of every ``nn.ModuleList`` and of every ``nn.Sequential``
    of two or more modules of one class (outermost first; nothing inside a chosen block)."""
    found: List[str] = []

    def visit(module: nn.Module, path: str) -> None:
        blocks = _holds_blocks(module)
        for name, child in module.named_children():
            dotted = f"{path}.{name}" if path else name
            if blocks and _is_block(child):
                found.append(dotted)
            else:
                visit(child, dotted)

    visit(model, "")
    return found


def _is_region(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), CheckpointForward)


class CheckpointHandler(Handler):
    """:class:`fewbit.configs.Checkpoint`: region forwards under compressed checkpointing."""

    config_type = Checkpoint
    kind = "checkpoint"

    def apply(self, model: nn.Module, config: Checkpoint) -> nn.Module:
        self.undo(model)
        if config.regions is None:
            chosen = set(default_regions(model))
        else:
            pattern = re.compile(config.regions)
            chosen = {p for p, _ in model.named_modules() if p and pattern.search(p)}
        for path, module in model.named_modules():
            if path in chosen:
                module.__dict__["forward"] = CheckpointForward(module, config)
        return model

    def owns(self, module: nn.Module) -> bool:
        return _is_region(module)

    def target_name(self, module: nn.Module) -> str:
        return "checkpoint region"

    def describe(self, module: nn.Module) -> str:
        c = module.__dict__["forward"].config
        return f"inputs at bits={c.bits}, group_size={c.group_size}, min_numel={c.min_numel}"

    def undo(self, model: nn.Module) -> nn.Module:
        def remove(module: nn.Module) -> nn.Module:
            if _is_region(module):
                del module.__dict__["forward"]
            return module

        return map_module(model, remove)


register_handler(CheckpointHandler())
