"""Few-bit activations: the conversion and the :class:`Activations` handler.

The conversion map (torch.nn classes, ``transformers.activations`` class names and torch
functions -> few-bit class) is derived from the activation registry
(:func:`fewbit.modules.activations.conversion_map`).

Every supported activation module (torch.nn classes and the Hugging Face
``transformers.activations`` classes with the same math) and every ``self.act = F.gelu``-style
function attribute becomes its few-bit subclass. Each replacement is checked numerically to
compute the same function before it is made; parameters, buffers, devices, dtypes and
state_dict keys do not change.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from ..codecs.bitpack import check_bits
from ..configs import Activations
from ..modules import activations as fa
from ..util import map_module
from .base import ORIGINAL, ConversionEntry, Handler, register_handler, remember

__all__ = [
    "ActivationsHandler",
    "Bits",
    "convert_activations",
    "function_attributes",
    "is_activation_like",
    "is_hf",
    "plan_for",
]

Bits = Union[None, int, Mapping[str, Optional[int]]]
Plan = tuple[type[fa.FewBitActivationModule], dict[str, Any]]

#: Sources and targets, derived from the activation registry (:mod:`fewbit.approx.registry`).
_MAP = fa.conversion_map()
# transformers.activations classes fewbit leaves alone, and why (shown by conversion_report).
_HF_UNSUPPORTED = {
    "QuickGELUActivation": "x*sigmoid(1.702x) differs from GELU; no few-bit table for it",
    "ClippedGELUActivation": "clipped GELU has no few-bit table",
    "LaplaceActivation": "no few-bit table for the Laplace activation",
    "ReLUSquaredActivation": "relu(x)**2 has no few-bit table",
    "SqrtSoftplusActivation": "sqrt(softplus(x)) has no few-bit table",
    "XIELUActivation": "has trainable parameters; no few-bit table",
    "LinearActivation": "identity: nothing is saved for backward",
}
_ACTIVATION_NAME = re.compile(r"(act|gelu|relu|silu|swish|sigmoid|tanh|mish|softplus|elu)", re.I)
_PROBE = torch.linspace(-12.0, 12.0, 4801)


def is_hf(module: nn.Module) -> bool:
    """True for classes defined in ``transformers``."""
    return type(module).__module__.startswith("transformers.")


def plan_for(module: nn.Module) -> Union[Plan, str]:
    """The few-bit class and constructor arguments replacing ``module``, or the reason why
    there is none. Subclasses of torch classes are not converted (they may override forward)."""
    cls = type(module)
    conversion = _MAP.modules.get(cls)
    if conversion is None and is_hf(module):
        conversion = _MAP.transformers.get(cls.__name__)
    if conversion is not None:
        return conversion.target, conversion.kwargs(module)
    if is_hf(module) and cls.__name__ in _HF_UNSUPPORTED:
        return _HF_UNSUPPORTED[cls.__name__]
    return "no few-bit equivalent"


def _is_continuous(target: type[fa.FewBitActivationModule]) -> bool:
    return not target.activation_entry.is_mask


def _bits_for(source: str, target: type[fa.FewBitActivationModule], bits: Bits) -> Optional[int]:
    """Bit width for a module of class ``source`` becoming ``target``; None means skip."""
    if isinstance(bits, Mapping):
        for key in (source, target.__name__):
            if key in bits:
                return bits[key]
    elif isinstance(bits, int) and _is_continuous(target):
        return bits
    return 3 if _is_continuous(target) else 1


def _torch_forward(new: fa.FewBitActivationModule, x: torch.Tensor) -> torch.Tensor:
    """The forward of the torch.nn class a few-bit module subclasses (its output is, by
    design, the few-bit module's output)."""
    for base in type(new).__mro__[1:]:
        if base.__module__.startswith("torch.nn.") and base is not nn.Module:
            return base.forward(new, x)
    return new(x)


def _same_forward(original: Callable[[torch.Tensor], torch.Tensor],
                  new: fa.FewBitActivationModule) -> bool:
    """Numerical check on [-12, 12] that both compute the same function, up to float32
    rounding (rtol 1e-5, atol 1e-6: tanh-GELU written out differs from F.gelu by ~1e-7)."""
    with torch.no_grad():
        try:
            a = original(_PROBE.clone())
        except Exception:  # noqa: BLE001 - anything the original cannot run on a probe
            return False
        b = _torch_forward(new, _PROBE.clone())
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def _build(plan: Plan, source: str, bits: Bits,
           original: Callable[..., Any]) -> Optional[nn.Module]:
    target, kwargs = plan
    width = _bits_for(source, target, bits)
    if width is None:
        return None
    new = target(**kwargs, bits=width)
    return new if _same_forward(original, new) else None


def check_bits_argument(bits: Bits) -> None:
    """TypeError naming ``bits`` unless it is None, an int or a mapping."""
    if not (bits is None or isinstance(bits, Mapping)
            or (isinstance(bits, int) and not isinstance(bits, bool))):
        raise TypeError(f"bits must be None, an int or a dict of class name -> bits, got {bits!r}")


def function_attributes(module: nn.Module) -> list[tuple[str, Plan]]:
    """``(name, plan)`` of the convertible plain-function attributes of ``module``."""
    found = []
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, nn.Module) or not callable(value):
            continue
        try:
            conversion = _MAP.functions.get(value)
        except TypeError:  # unhashable callable
            conversion = None
        if conversion is not None:
            found.append((name, (conversion.target, conversion.kwargs())))
    return found


def _convert_function_attributes(module: nn.Module, bits: Bits) -> None:
    """``self.act = F.gelu``-style attributes become few-bit modules (new children without
    state, so state_dict keys do not change)."""
    for name, plan in function_attributes(module):
        original = getattr(module, name)
        new = _build(plan, plan[0].__name__, bits, original)
        if new is not None:
            new.train(module.training)
            delattr(module, name)
            setattr(module, name, remember(new, original))


def is_activation_like(module: nn.Module) -> bool:
    """Known activation classes, or childless modules whose class name looks like one."""
    if not isinstance(plan_for(module), str) or isinstance(module, fa.FewBitActivationModule):
        return True
    if any(True for _ in module.children()):
        return False
    cls = type(module)
    return cls.__module__.startswith("torch.nn.modules.activation") or (
        is_hf(module) and cls.__module__.endswith("activations")
    ) or bool(_ACTIVATION_NAME.search(cls.__name__))


def _update_bits(module: fa.FewBitActivationModule, bits: Bits) -> None:
    """New bits for a module an earlier conversion made (one the user built is left as is)."""
    original = module.__dict__.get(ORIGINAL)
    if original is None:
        return
    source = type(original).__name__ if isinstance(original, nn.Module) else type(module).__name__
    width = _bits_for(source, type(module), bits)
    if width is not None:
        module.bits = check_bits(width)


def convert_activations(model: nn.Module, bits: Bits = None) -> nn.Module:
    """Swap supported activation modules and function attributes of ``model`` for few-bit
    ones in place (see :func:`fewbit.convert` for ``bits``); returns the root."""
    check_bits_argument(bits)

    def replace(module: nn.Module) -> nn.Module:
        if not is_activation_like(module):
            _convert_function_attributes(module, bits)
        if isinstance(module, fa.FewBitActivationModule):
            _update_bits(module, bits)
            return module
        plan = plan_for(module)
        if isinstance(plan, str):
            return module
        new = _build(plan, type(module).__name__, bits, module)
        if new is None:
            return module
        new.train(module.training)
        return remember(new, module)

    return map_module(model, replace)


class ActivationsHandler(Handler):
    """:class:`fewbit.configs.Activations`: few-bit activation modules."""

    config_type = Activations
    kind = "activations"

    def apply(self, model: nn.Module, config: Activations) -> nn.Module:
        return convert_activations(model, config.bits_argument())

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, fa.FewBitActivationModule)

    def unconverted(self, model: nn.Module) -> list[ConversionEntry]:
        """Activation-like modules and function attributes left as they are, with why."""
        out = []
        for path, module in model.named_modules():
            if self.owns(module):
                continue
            source = type(module).__name__
            attributes = [] if is_activation_like(module) else function_attributes(module)
            for name, plan in attributes:
                out.append(ConversionEntry(
                    f"{path}.{name}" if path else name, "function", plan[0].__name__,
                    "function attribute, not a module; convert() replaces it", self.kind))
            plan = plan_for(module)
            if not isinstance(plan, str):
                out.append(ConversionEntry(path, source, plan[0].__name__,
                                           "supported; left as is by the options", self.kind))
            elif is_activation_like(module) and not isinstance(module, nn.Linear):
                out.append(ConversionEntry(path, source, "", plan, self.kind))
        return out


register_handler(ActivationsHandler())
