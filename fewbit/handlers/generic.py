"""The saved-tensor mode over a whole model: the :class:`Generic` handler.

A forward pre-hook on the root enters ``fewbit.compress(bits, ..., model=root)`` and a forward
hook (``always_call=True``: also when forward raises) leaves it, so everything autograd saves
during the model's forward is quantized (see :mod:`fewbit.compress` for what passes through).
The hooks are instances of module-level classes, so the model still pickles and deep-copies;
parameter names, state_dict keys and the model's class are unchanged. Applying again replaces
the settings; undo removes the hooks.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Any, Dict, List

from torch import nn

from ..compress import compress
from ..configs import Generic
from .base import ConversionEntry, Handler, register_handler

__all__ = ["GenericEnter", "GenericHandler", "GenericLeave", "generic_settings"]


class GenericEnter:
    """Forward pre-hook: opens the compress context of one forward call. Open contexts are kept
    per thread (saved-tensor hooks are thread-local; ``nn.DataParallel`` replicas share this
    hook) on a stack, so re-entrant forwards of the root nest."""

    def __init__(self, config: Generic) -> None:
        self.config = config
        self.open: Dict[int, List[ExitStack]] = {}

    def __call__(self, module: nn.Module, args: Any) -> None:
        stack = ExitStack()
        c = self.config
        stack.enter_context(compress(c.bits, group_size=c.group_size, min_numel=c.min_numel,
                                     model=module, offload=c.offload))
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


def generic_settings(model: nn.Module) -> List[Generic]:
    """The :class:`Generic` configs whose hooks are on ``model`` (at most one after apply)."""
    return [h.config for h in model._forward_pre_hooks.values() if isinstance(h, GenericEnter)]


def _remove(model: nn.Module) -> None:
    for hooks, cls in ((model._forward_pre_hooks, GenericEnter),
                       (model._forward_hooks, GenericLeave)):
        for key in [k for k, h in hooks.items() if isinstance(h, cls)]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)


class GenericHandler(Handler):
    """:class:`fewbit.configs.Generic`: root hooks entering :func:`fewbit.compress`."""

    config_type = Generic
    kind = "generic"

    def apply(self, model: nn.Module, config: Generic) -> nn.Module:
        _remove(model)
        enter = GenericEnter(config)
        model.register_forward_pre_hook(enter)
        model.register_forward_hook(GenericLeave(enter), always_call=True)
        return model

    def owns(self, module: nn.Module) -> bool:
        return False  # no module is replaced: the hooks are on the root

    def report(self, model: nn.Module) -> List[ConversionEntry]:
        return [ConversionEntry("", type(model).__name__, "generic saved-tensor mode",
                                f"bits={c.bits}, group_size={c.group_size}, "
                                f"min_numel={c.min_numel}", self.kind)
                for c in generic_settings(model)]

    def undo(self, model: nn.Module) -> nn.Module:
        _remove(model)
        return model


register_handler(GenericHandler())
