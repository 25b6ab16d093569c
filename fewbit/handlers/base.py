"""What every handler shares: the handler interface, the registry, report entries, and the
record of what a conversion replaced (so that it can be undone).

A handler converts a model for one configuration class (:mod:`fewbit.configs`), lists the
modules it owns for :func:`fewbit.conversion_report`, and undoes its own conversion. A module
that a handler put in place of another keeps the replaced module in its ``__dict__`` under
:data:`ORIGINAL` (not registered as a child: no state_dict keys, no extra parameters; it
shares the parameter objects, so it costs only the module object). :func:`restore` puts it
back with the current parameters, buffers and train/eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Type

from torch import nn

from ..util import map_module

__all__ = [
    "HANDLERS",
    "ORIGINAL",
    "ConversionEntry",
    "Handler",
    "handler_for",
    "register_handler",
    "remember",
    "restore",
    "restore_all",
    "swap_class",
]

#: ``__dict__`` key of the module a converted module replaced.
ORIGINAL = "_fewbit_original"


@dataclass(frozen=True)
class ConversionEntry:
    """One module: its dotted path, class names before/after (or why it was left), and the
    config kind that owns it (``''`` for modules no handler owns)."""

    path: str
    source: str
    target: str = ""
    detail: str = ""
    kind: str = ""


class Handler:
    """Converts, reports and undoes one configuration class. Subclasses set ``config_type``
    and ``kind`` and implement the three methods; :func:`register_handler` makes
    :func:`fewbit.apply` use them."""

    config_type: ClassVar[type]
    kind: ClassVar[str]

    def apply(self, model: nn.Module, config: Any) -> nn.Module:
        """Convert ``model`` in place; return the root (a new object only when the root
        itself was replaced)."""
        raise NotImplementedError

    def owns(self, module: nn.Module) -> bool:
        """True for the modules this handler's conversion produces."""
        raise NotImplementedError

    def describe(self, module: nn.Module) -> str:
        """A short description of an owned module's settings."""
        return module.extra_repr()

    def target_name(self, module: nn.Module) -> str:
        """The name an owned module is listed under (its class name by default)."""
        return type(module).__name__

    def report(self, model: nn.Module) -> List[ConversionEntry]:
        """One entry per owned module of ``model``."""
        return [ConversionEntry(path, _source_name(m), self.target_name(m), self.describe(m),
                                self.kind)
                for path, m in model.named_modules() if self.owns(m)]

    def undo(self, model: nn.Module) -> nn.Module:
        """Put back what :meth:`apply` replaced (modules built directly by the user as fewbit
        classes stay); return the root."""
        return restore_all(model, self.owns)


HANDLERS: Dict[type, Handler] = {}


def register_handler(handler: Handler) -> Handler:
    """Register ``handler`` for its ``config_type`` (replacing any earlier one); returns it."""
    if not isinstance(handler, Handler):
        raise TypeError(f"handler must be a fewbit.handlers.Handler, got {handler!r}")
    HANDLERS[handler.config_type] = handler
    return handler


def handler_for(config: Any) -> Handler:
    """The handler of ``config``'s class; TypeError naming the argument otherwise."""
    handler = HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(t.__name__ for t in HANDLERS))
        raise TypeError(f"configs must be fewbit configs ({known}) or level names, "
                        f"got {config!r}")
    return handler


def _source_name(module: nn.Module) -> str:
    original = module.__dict__.get(ORIGINAL)
    if isinstance(original, nn.Module):
        return type(original).__name__
    if original is not None:
        return "function"
    return type(module).__name__


def remember(new: nn.Module, old: Any) -> nn.Module:
    """Record on ``new`` that it replaces ``old`` (a module or a function attribute); a
    replaced module's own record is carried over, so undo reaches the first original."""
    if new is old:
        return new
    first = old.__dict__.get(ORIGINAL, old) if isinstance(old, nn.Module) else old
    new.__dict__[ORIGINAL] = first
    return new


def swap_class(module: nn.Module, cls: Type[nn.Module]) -> nn.Module:
    """An instance of ``cls`` sharing ``module``'s parameters, buffers, hooks and attributes
    (the same dicts), recorded as replacing ``module``."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for name, value in list(new.__dict__.items()):
        rebind = getattr(value, "rebind", None)
        if callable(rebind) and not isinstance(value, nn.Module):
            new.__dict__[name] = rebind(new)  # instance attributes bound to the old object
    return remember(new, module)


def restore(module: nn.Module) -> Any:
    """The original that ``module`` replaced, with ``module``'s current parameters, buffers
    and train/eval mode; ``module`` itself when it has no record."""
    original = module.__dict__.get(ORIGINAL)
    if original is None:
        return module
    if isinstance(original, nn.Module):
        for store in ("_parameters", "_buffers"):
            mine, theirs = getattr(module, store), getattr(original, store)
            for name in theirs:
                if name in mine:
                    theirs[name] = mine[name]
        original.train(module.training)
        original.__dict__.pop(ORIGINAL, None)
    return original


def restore_all(model: nn.Module, owned: Any) -> nn.Module:
    """Undo every recorded replacement of a module for which ``owned(module)`` is true, and
    of function attributes (``self.act = F.gelu``) replaced by such modules."""

    def undo(module: nn.Module) -> nn.Module:
        for name, child in list(module._modules.items()):
            if child is not None and owned(child) and ORIGINAL in child.__dict__ \
                    and not isinstance(child.__dict__[ORIGINAL], nn.Module):
                del module._modules[name]
                setattr(module, name, child.__dict__[ORIGINAL])
        if owned(module) and isinstance(module.__dict__.get(ORIGINAL), nn.Module):
            return restore(module)
        return module

    return map_module(model, undo)
