"""One entry point: ``fewbit.apply(model, *configs)``, its undo and its report.

::

    import fewbit
    from fewbit import Activations, Sketch, Compress, Generic

    fewbit.apply(model, Activations(bits=3), Sketch(ratio=0.2))   # in place, returns model
    fewbit.apply(model, "L2")                                     # a level: a list of configs
    print(fewbit.conversion_report(model))                        # what each handler did
    fewbit.unapply(model)                                         # back to torch.nn layers

Each config is handled by the handler registered for its class (:mod:`fewbit.handlers`), in
the order given. Conversion is in place: parameters stay the same objects (an optimizer built
before stays valid), state_dict keys and the model's class do not change. The returned module
is ``model`` itself, except when ``model`` is itself a single convertible layer (a root cannot
be replaced in place): then use the returned object.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, List

from torch import nn

from .handlers import HANDLERS, ConversionEntry, handler_for
from .handlers.activations import ActivationsHandler
from .handlers.sketch import is_conv1d

__all__ = ["ConversionReport", "apply", "conversion_report", "expand_configs", "unapply"]


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def expand_configs(configs: Iterable[Any]) -> List[Any]:
    """Configs with level names (``'L2'``, ``'L3.1'``, ...) replaced by their config lists;
    TypeError naming ``configs`` for anything that is neither."""
    out: List[Any] = []
    for config in configs:
        if isinstance(config, str):
            from .levels import level_configs  # levels is defined on top of this module

            out.extend(level_configs(config))
        elif isinstance(config, (list, tuple)):
            out.extend(expand_configs(config))
        else:
            handler_for(config)
            out.append(config)
    return out


def apply(model: nn.Module, *configs: Any) -> nn.Module:
    """Convert ``model`` in place with each config (or level name) in turn; returns it.

    See :mod:`fewbit.configs` for the configs and :mod:`fewbit.levels` for level names.
    Applying a config of a kind already applied updates the settings of what that kind owns.
    """
    _check_model(model)
    root = model
    for config in expand_configs(configs):
        root = handler_for(config).apply(root, config)
    return root


def unapply(model: nn.Module) -> nn.Module:
    """Undo every handler's conversion of ``model`` (in place; returns the root): replaced
    modules and function attributes get their originals back with the current parameters,
    hooks and routing are removed. fewbit layers built directly by the user stay."""
    _check_model(model)
    root = model
    for handler in reversed(list(HANDLERS.values())):
        root = handler.undo(root)
    return root


@dataclass
class ConversionReport:
    """What :func:`conversion_report` found.

    ``converted``: one entry per module (or root hook) a handler owns, with its kind and
    settings; ``unconverted``: activation-like modules and function attributes left as they
    are, with the reason; ``exact_linear``: linear layers (``nn.Linear``, ``Conv1D``) no handler
    changed."""

    converted: list[ConversionEntry] = field(default_factory=list)
    unconverted: list[ConversionEntry] = field(default_factory=list)
    exact_linear: list[ConversionEntry] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of converted modules per class (target) name."""
        return dict(Counter(e.target for e in self.converted))

    def kinds(self) -> dict[str, int]:
        """Number of converted entries per config kind."""
        return dict(Counter(e.kind for e in self.converted))

    def __str__(self) -> str:
        lines = [f"converted: {len(self.converted)} {self.counts()}"]
        lines += [f"  {e.path or '<root>'} [{e.kind}]: {e.detail}" for e in self.converted]
        lines.append(f"left unconverted: {len(self.unconverted)}")
        lines += [f"  {e.path} ({e.source}): {e.detail}" for e in self.unconverted]
        lines.append(f"exact linear layers: {len(self.exact_linear)}")
        lines += [f"  {e.path} ({e.source}): {e.detail}" for e in self.exact_linear]
        return "\n".join(lines)


def conversion_report(model: nn.Module) -> ConversionReport:
    """Ask every handler what it owns in ``model``; list activation-like modules left as they
    are (with why) and linear layers that stay exact."""
    _check_model(model)
    report = ConversionReport()
    owned: set[str] = set()
    for handler in HANDLERS.values():
        entries = handler.report(model)
        report.converted.extend(entries)
        owned.update(e.path for e in entries if e.path)
    activations = HANDLERS.get(ActivationsHandler.config_type)
    if isinstance(activations, ActivationsHandler):
        report.unconverted = [e for e in activations.unconverted(model) if e.path not in owned]
    for path, module in model.named_modules():
        if path in owned:
            continue
        if isinstance(module, nn.Linear):
            detail = "exact nn.Linear" if type(module) is nn.Linear else \
                f"exact {type(module).__name__} (an nn.Linear subclass fewbit did not convert)"
            report.exact_linear.append(ConversionEntry(path, type(module).__name__, "", detail))
        elif is_conv1d(module):
            report.exact_linear.append(ConversionEntry(path, type(module).__name__, "",
                                                       "exact Conv1D"))
    return report
