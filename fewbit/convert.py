"""Convert a whole model in place: few-bit activations and, optionally, randomized linears.

``fewbit.convert(model)`` swaps every supported activation module (torch.nn classes and the
Hugging Face ``transformers.activations`` classes with the same math) for its few-bit
subclass, and with ``linear=0.2`` every ``nn.Linear`` outside the heads for a
``RandomizedLinear(proj_dim_ratio=0.2)``. Parameters, buffers, devices, dtypes and
state_dict keys do not change, so checkpoints load before and after conversion.
``conversion_report(model)`` lists what is converted and what is left, with the reason.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .modules import activations as fa
from .modules.linear import LinearCRS, RandomizedConv1D, RandomizedLinear
from .util import convert_linear, map_module

__all__ = [
    "DEFAULT_LINEAR_EXCLUDE",
    "ConversionEntry",
    "ConversionReport",
    "conversion_report",
    "convert",
]

#: Paths (dotted, ``re.search``) of linear layers kept exact by default: task heads.
DEFAULT_LINEAR_EXCLUDE = r"(^|\.)(classifier|pooler|lm_head|score|qa_outputs|cls|head|fc)(\.|$)"

Bits = Union[None, int, Mapping[str, Optional[int]]]
Plan = tuple[type[fa.FewBitActivationModule], dict[str, Any]]

# torch.nn class -> (few-bit class, constructor attributes copied from the module).
_PIECEWISE: dict[type[nn.Module], tuple[type[fa.FewBitActivationModule], tuple[str, ...]]] = {
    nn.ReLU: (fa.ReLU, ("inplace",)),
    nn.LeakyReLU: (fa.LeakyReLU, ("negative_slope", "inplace")),
    nn.Threshold: (fa.Threshold, ("threshold", "value", "inplace")),
    nn.Hardsigmoid: (fa.Hardsigmoid, ("inplace",)),
    nn.Hardtanh: (fa.Hardtanh, ("min_val", "max_val", "inplace")),
    nn.ReLU6: (fa.ReLU6, ("inplace",)),
    nn.Hardshrink: (fa.Hardshrink, ("lambd",)),
    nn.Softshrink: (fa.Softshrink, ("lambd",)),
}
_CONTINUOUS: dict[type[nn.Module], tuple[type[fa.FewBitActivationModule], tuple[str, ...]]] = {
    nn.CELU: (fa.CELU, ("alpha", "inplace")),
    nn.ELU: (fa.ELU, ("alpha", "inplace")),
    nn.GELU: (fa.GELU, ("approximate",)),
    nn.Hardswish: (fa.Hardswish, ("inplace",)),
    nn.LogSigmoid: (fa.LogSigmoid, ()),
    nn.Mish: (fa.Mish, ("inplace",)),
    nn.SELU: (fa.SELU, ("inplace",)),
    nn.Sigmoid: (fa.Sigmoid, ()),
    nn.SiLU: (fa.SiLU, ("inplace",)),
    nn.Softplus: (fa.Softplus, ("beta", "threshold")),
    nn.Softsign: (fa.Softsign, ()),
    nn.Tanh: (fa.Tanh, ()),
    nn.Tanhshrink: (fa.Tanhshrink, ()),
}
# transformers.activations class name -> few-bit class and arguments with the same math.
_HF: dict[str, Plan] = {
    "GELUActivation": (fa.GELU, {"approximate": "none"}),
    "NewGELUActivation": (fa.GELU, {"approximate": "tanh"}),
    "GELUTanh": (fa.GELU, {"approximate": "tanh"}),
    "PytorchGELUTanh": (fa.GELU, {"approximate": "tanh"}),
    "FastGELUActivation": (fa.GELU, {"approximate": "tanh"}),
    "AccurateGELUActivation": (fa.GELU, {"approximate": "tanh"}),
    "SiLUActivation": (fa.SiLU, {}),
    "MishActivation": (fa.Mish, {}),
}
_HF_UNSUPPORTED = {
    "QuickGELUActivation": "x*sigmoid(1.702x) differs from GELU; no few-bit table for it",
    "ClippedGELUActivation": "clipped GELU has no few-bit table",
    "LaplaceActivation": "no few-bit table for the Laplace activation",
    "ReLUSquaredActivation": "relu(x)**2 has no few-bit table",
    "SqrtSoftplusActivation": "sqrt(softplus(x)) has no few-bit table",
    "XIELUActivation": "has trainable parameters; no few-bit table",
    "LinearActivation": "identity: nothing is saved for backward",
}
# Plain functions stored as attributes (e.g. ``self.act_fn = F.gelu``).
_FUNCTIONS: dict[Callable[..., Any], Plan] = {
    F.gelu: (fa.GELU, {}),
    F.silu: (fa.SiLU, {}),
    F.mish: (fa.Mish, {}),
    F.relu: (fa.ReLU, {}),
    torch.relu: (fa.ReLU, {}),
    F.relu6: (fa.ReLU6, {}),
    F.elu: (fa.ELU, {}),
    F.selu: (fa.SELU, {}),
    torch.selu: (fa.SELU, {}),
    F.hardswish: (fa.Hardswish, {}),
    F.softplus: (fa.Softplus, {}),
    F.softsign: (fa.Softsign, {}),
    F.tanhshrink: (fa.Tanhshrink, {}),
    F.logsigmoid: (fa.LogSigmoid, {}),
    torch.tanh: (fa.Tanh, {}),
    F.tanh: (fa.Tanh, {}),
    torch.sigmoid: (fa.Sigmoid, {}),
    F.sigmoid: (fa.Sigmoid, {}),
}
_ACTIVATION_NAME = re.compile(r"(act|gelu|relu|silu|swish|sigmoid|tanh|mish|softplus|elu)", re.I)
_PROBE = torch.linspace(-12.0, 12.0, 4801)


@dataclass(frozen=True)
class ConversionEntry:
    """One module: its dotted path, class names before/after (or why it was left)."""

    path: str
    source: str
    target: str = ""
    detail: str = ""


@dataclass
class ConversionReport:
    """What :func:`conversion_report` found: few-bit modules (``converted``), activation-like
    modules left as they are with the reason (``unconverted``), exact linear layers."""

    converted: list[ConversionEntry] = field(default_factory=list)
    unconverted: list[ConversionEntry] = field(default_factory=list)
    exact_linear: list[ConversionEntry] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of converted modules per few-bit class name."""
        return dict(Counter(e.target for e in self.converted))

    def __str__(self) -> str:
        lines = [f"converted: {len(self.converted)} {self.counts()}"]
        lines += [f"  {e.path}: {e.detail}" for e in self.converted]
        lines.append(f"left unconverted: {len(self.unconverted)}")
        lines += [f"  {e.path} ({e.source}): {e.detail}" for e in self.unconverted]
        lines.append(f"exact linear layers: {len(self.exact_linear)}")
        lines += [f"  {e.path} ({e.source}): {e.detail}" for e in self.exact_linear]
        return "\n".join(lines)


def _is_hf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _plan(module: nn.Module) -> Union[Plan, str]:
    """The few-bit class and constructor arguments replacing ``module``, or the reason why
    there is none. Subclasses of torch classes are not converted (they may override forward)."""
    cls = type(module)
    table = _PIECEWISE if cls in _PIECEWISE else _CONTINUOUS
    if cls in table:
        target, attrs = table[cls]
        return target, {name: getattr(module, name) for name in attrs}
    if _is_hf(module) and cls.__name__ in _HF:
        target, kwargs = _HF[cls.__name__]
        return target, dict(kwargs)
    if _is_hf(module) and cls.__name__ in _HF_UNSUPPORTED:
        return _HF_UNSUPPORTED[cls.__name__]
    return "no few-bit equivalent"


def _is_continuous(target: type[fa.FewBitActivationModule]) -> bool:
    return all(target is not t for t, _ in _PIECEWISE.values())


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


def _check_args(bits: Bits, linear: Any, linear_exclude: Optional[str]) -> dict[str, Any]:
    if not (bits is None or isinstance(bits, Mapping)
            or (isinstance(bits, int) and not isinstance(bits, bool))):
        raise TypeError(f"bits must be None, an int or a dict of class name -> bits, got {bits!r}")
    if linear_exclude is not None:
        re.compile(linear_exclude)
    if linear is None or linear is False:
        return {}
    if linear is True:
        return {"proj_dim_ratio": None}
    if isinstance(linear, (int, float)):
        if not 0.0 < float(linear) <= 1.0:
            raise ValueError(f"linear must be a ratio in (0, 1], got {linear}")
        return {"proj_dim_ratio": float(linear)}
    if isinstance(linear, Mapping):
        return dict(linear)
    raise TypeError(f"linear must be None, a ratio, True or a dict of RandomizedLinear args, "
                    f"got {linear!r}")


def convert(
    model: nn.Module,
    *,
    bits: Bits = None,
    activations: bool = True,
    linear: Union[None, bool, float, Mapping[str, Any]] = None,
    linear_exclude: Optional[str] = DEFAULT_LINEAR_EXCLUDE,
    inplace: bool = True,
) -> nn.Module:
    """Replace supported activations by few-bit ones and, if ``linear`` is given, linear
    layers by :class:`RandomizedLinear`; returns the model (a deep copy if not ``inplace``).

    ``bits``: None (3 for continuous activations, 1 for piecewise ones), an int (continuous
    ones), or a dict keyed by source or few-bit class name (``{'GELU': 4, 'SiLU': None}``;
    None leaves that class as it is). ``linear``: a ``proj_dim_ratio`` (``0.2``), ``True``
    (default ratio) or a dict of ``RandomizedLinear`` arguments; ``linear_exclude``: regex
    searched in the dotted path of linears to keep exact (default: task heads). Each
    replacement is checked numerically to compute the same function before it is made.
    Parameters (same objects), buffers, devices, dtypes and state_dict keys are unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    linear_kwargs = _check_args(bits, linear, linear_exclude)
    if not inplace:
        model = copy.deepcopy(model)
    exclude = re.compile(linear_exclude) if linear_exclude is not None else None

    def replace(module: nn.Module, path: str) -> nn.Module:
        dotted = path.strip("/").replace("/", ".")
        if activations and not _is_activation_like(module):
            _convert_function_attributes(module, bits)
        if linear_kwargs and (isinstance(module, nn.Linear) or _is_conv1d(module)):
            if exclude is not None and exclude.search(dotted):
                return module
            if _is_conv1d(module):
                return _convert_conv1d(module, linear_kwargs)
            return convert_linear(module, RandomizedLinear, **linear_kwargs)
        if not activations or isinstance(module, fa.FewBitActivationModule):
            return module
        plan = _plan(module)
        if isinstance(plan, str):
            return module
        new = _build(plan, type(module).__name__, bits, module)
        if new is None:
            return module
        new.train(module.training)
        return new

    return map_module(model, replace)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and _is_hf(module)


def _convert_conv1d(module: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    """A transformers ``Conv1D`` as :class:`RandomizedConv1D` sharing its parameters."""
    weight, bias = module.weight, module.bias
    if not isinstance(weight, nn.Parameter) or not isinstance(bias, nn.Parameter):
        return module
    layer = RandomizedConv1D(int(module.nf), int(module.nx), device="meta", dtype=weight.dtype,
                             **kwargs)
    layer.weight, layer.bias = weight, bias
    layer.train(module.training)
    return layer


def _function_attributes(module: nn.Module) -> list[tuple[str, Plan]]:
    found = []
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, nn.Module) or not callable(value):
            continue
        try:
            plan = _FUNCTIONS.get(value)
        except TypeError:  # unhashable callable
            plan = None
        if plan is not None:
            found.append((name, plan))
    return found


def _convert_function_attributes(module: nn.Module, bits: Bits) -> None:
    """``self.act = F.gelu``-style attributes become few-bit modules (new children without
    state, so state_dict keys do not change)."""
    for name, plan in _function_attributes(module):
        new = _build(plan, plan[0].__name__, bits, getattr(module, name))
        if new is not None:
            new.train(module.training)
            delattr(module, name)
            setattr(module, name, new)


def _describe(module: nn.Module) -> str:
    if isinstance(module, fa.FewBitActivationModule):
        return module.extra_repr()
    if isinstance(module, RandomizedLinear):
        return module.extra_repr().split(", ", 3)[-1]
    if isinstance(module, RandomizedConv1D):
        return module.extra_repr().split(", ", 2)[-1]
    if isinstance(module, LinearCRS):
        return f"proj_dim={module.proj_dim}"
    return ""


def conversion_report(model: nn.Module) -> ConversionReport:
    """Inspect ``model``: few-bit modules, activation-like modules left with the reason
    (also ``self.act = F.gelu``-style function attributes), and exact linear layers."""
    report = ConversionReport()
    for path, module in model.named_modules():
        source = type(module).__name__
        if isinstance(module, (fa.FewBitActivationModule, RandomizedLinear, LinearCRS,
                               RandomizedConv1D)):
            report.converted.append(ConversionEntry(path, source, source, _describe(module)))
            continue
        attributes = [] if _is_activation_like(module) else _function_attributes(module)
        for name, plan in attributes:
            attr_path = f"{path}.{name}" if path else name
            report.unconverted.append(ConversionEntry(
                attr_path, "function", plan[0].__name__,
                "function attribute, not a module; convert() replaces it"))
        if isinstance(module, nn.Linear):
            report.exact_linear.append(ConversionEntry(path, source, "", "exact nn.Linear"))
            continue
        if _is_conv1d(module):
            report.exact_linear.append(ConversionEntry(path, source, "", "exact Conv1D"))
            continue
        plan = _plan(module)
        if not isinstance(plan, str):
            report.unconverted.append(ConversionEntry(
                path, source, plan[0].__name__, "supported; left as is by the options"))
        elif _is_activation_like(module):
            report.unconverted.append(ConversionEntry(path, source, "", plan))
    return report


def _is_activation_like(module: nn.Module) -> bool:
    """Known activation classes, or childless modules whose class name looks like one."""
    if not isinstance(_plan(module), str) or isinstance(module, fa.FewBitActivationModule):
        return True
    if any(True for _ in module.children()):
        return False
    cls = type(module)
    return cls.__module__.startswith("torch.nn.modules.activation") or (
        _is_hf(module) and cls.__module__.endswith("activations")
    ) or bool(_ACTIVATION_NAME.search(cls.__name__))
