"""Saved-tensor modes over a whole model: the :class:`Generic` and :class:`Offload` handlers.

A forward pre-hook on the root enters the mode's context and a forward hook
(``always_call=True``: also when forward raises) leaves it, so everything autograd saves
during the model's forward goes through the mode: ``Generic`` enters
``fewbit.compress(bits, ..., model=root)`` (quantized; see :mod:`fewbit.compress` for what
passes through), ``Offload`` enters ``torch.autograd.graph.save_on_cpu`` (exact copies in CPU
memory). The hooks are instances of module-level classes, so the model still pickles and
deep-copies; parameter names, state_dict keys and the model's class are unchanged. Only one mode
is active at a time (saved-tensor hooks do not nest): applying a mode replaces the current one;
undo removes the hooks.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Any, ContextManager, Dict, List, Union

import torch
from torch import nn

from ..compress import compress
from ..configs import Generic, Offload
from .base import ConversionEntry, Handler, register_handler

__all__ = ["GenericEnter", "GenericHandler", "GenericLeave", "OffloadHandler", "generic_settings"]

Mode = Union[Generic, Offload]


def _context(config: Mode, module: nn.Module) -> ContextManager[Any]:
    if isinstance(config, Offload):
        return torch.autograd.graph.save_on_cpu(pin_memory=config.pin_memory)
    return compress(config.bits, group_size=config.group_size, min_numel=config.min_numel,
                    model=module, offload=config.offload)


class GenericEnter:
    """Forward pre-hook: opens the compress context of one forward call. Open contexts are kept
    per thread (saved-tensor hooks are thread-local; ``nn.DataParallel`` replicas share this
    hook) on a stack, so re-entrant forwards of the root nest."""

    def __init__(self, config: Mode) -> None:
        self.config = config
        self.open: Dict[int, List[ExitStack]] = {}

    def __call__(self, module: nn.Module, args: Any) -> None:
        stack = ExitStack()
        stack.enter_context(_context(self.config, module))
        self.open.setdefault(threading.get_ident(), []).append(stack)

    def close_one(self) -> None:
        """Close the innermost context opened by this thread."""
        stacks = self.open.get(threading.get_ident())
        if stacks:
            stacks.pop().close()
            if not stacks:
                del self.open[threading.get_ident()]

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "open": {}}  # an open context does not travel


class GenericLeave:
    """Forward hook: closes the context its :class:`GenericEnter` opened."""

    def __init__(self, enter: GenericEnter) -> None:
        self.enter = enter

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.enter.close_one()


def generic_settings(model: nn.Module) -> List[Mode]:
    """The saved-tensor mode configs whose hooks are on ``model`` (at most one after apply)."""
    return [h.config for h in model._forward_pre_hooks.values() if isinstance(h, GenericEnter)]


def _remove(model: nn.Module, kind: type) -> None:
    """Remove the hooks of the mode configs of class ``kind`` (``object``: every mode)."""
    enters = [k for k, h in model._forward_pre_hooks.items()
              if isinstance(h, GenericEnter) and isinstance(h.config, kind)]
    leaves = [k for k, h in model._forward_hooks.items()
              if isinstance(h, GenericLeave) and isinstance(h.enter.config, kind)]
    for key in enters:
        del model._forward_pre_hooks[key]
    for key in leaves:
        del model._forward_hooks[key]
        model._forward_hooks_always_called.pop(key, None)


class GenericHandler(Handler):
    """:class:`fewbit.configs.Generic`: root hooks entering :func:`fewbit.compress`."""

    config_type: Any = Generic
    kind = "generic"

    def apply(self, model: nn.Module, config: Mode) -> nn.Module:
        _remove(model, object)  # one saved-tensor mode at a time
        enter = GenericEnter(config)
        model.register_forward_pre_hook(enter)
        model.register_forward_hook(GenericLeave(enter), always_call=True)
        return model

    def owns(self, module: nn.Module) -> bool:
        return False  # no module is replaced: the hooks are on the root

    def describe_config(self, config: Any) -> str:
        return (f"bits={config.bits}, group_size={config.group_size}, "
                f"min_numel={config.min_numel}")

    def report(self, model: nn.Module) -> List[ConversionEntry]:
        return [ConversionEntry("", type(model).__name__, f"{self.kind} saved-tensor mode",
                                self.describe_config(c), self.kind)
                for c in generic_settings(model) if isinstance(c, self.config_type)]

    def undo(self, model: nn.Module) -> nn.Module:
        _remove(model, self.config_type)
        return model


class OffloadHandler(GenericHandler):
    """:class:`fewbit.configs.Offload`: root hooks entering ``save_on_cpu`` (prototype)."""

    config_type = Offload
    kind = "offload"

    def describe_config(self, config: Any) -> str:
        return f"save_on_cpu(pin_memory={config.pin_memory})"


register_handler(GenericHandler())
register_handler(OffloadHandler())
