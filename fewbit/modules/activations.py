"""Few-bit activation modules: drop-in subclasses of the torch.nn activations.

Each class subclasses its torch.nn counterpart (same constructor arguments,
``isinstance`` checks, ``state_dict`` and repr) and adds a keyword ``bits``.
The forward output is torch's; backward stores only a packed code of the input
(see :mod:`fewbit.functional.activations` for what each one stores).
``inplace=True`` is accepted and ignored: the op is always out-of-place.

The classes are written out (explicit constructors, as torch's); what they compute comes
from their entry in the activation registry (:mod:`fewbit.approx.registry`), and so does
:func:`conversion_map` (torch.nn class, Hugging Face activation class or torch function ->
few-bit class), which :mod:`fewbit.convert` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

from torch import Tensor, nn

from ..approx.registry import ACTIVATIONS, Activation
from ..codecs.bitpack import check_bits
from ..functional.activations import apply_activation

__all__ = [
    "CELU",
    "ELU",
    "GELU",
    "Hardshrink",
    "Hardsigmoid",
    "Hardswish",
    "Hardtanh",
    "LeakyReLU",
    "LogSigmoid",
    "Mish",
    "ReLU",
    "ReLU6",
    "SELU",
    "Sigmoid",
    "SiLU",
    "Softplus",
    "Softshrink",
    "Softsign",
    "Tanh",
    "Tanhshrink",
    "Threshold",
    "Conversion",
    "ConversionMap",
    "FewBitActivationModule",
    "conversion_map",
    "few_bit_class",
]


class FewBitActivationModule(nn.Module):
    """Base of every few-bit activation module: its registry entry, ``bits`` and the forward.

    Listed first among the bases, so its ``forward`` and ``extra_repr`` come before the
    torch class's. ``forward`` runs the entry (:func:`fewbit.functional.apply_activation`)
    with the torch module's own attributes (``self.alpha``, ``self.approximate``, ...) as
    the arguments; ``bits`` None means the entry's default (3 for tables, 1 for masks).
    """

    activation_entry: ClassVar[Activation]
    bits: int

    def _init_fewbit(self, bits: Optional[int]) -> None:
        """Set ``bits`` and validate the torch attributes against the registry entry."""
        entry = self.activation_entry
        self.bits = check_bits(entry.default_bits if bits is None else bits)
        entry.params(self._activation_args())

    def _activation_args(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.activation_entry.arg_names}

    def forward(self, input: Tensor) -> Tensor:
        return apply_activation(self.activation_entry, input, self._activation_args(), self.bits)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, bits={self.bits}" if base else f"bits={self.bits}"


# --- piecewise-linear: exact 1-bit masks --------------------------------------------------------


class ReLU(FewBitActivationModule, nn.ReLU):
    """ReLU saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    activation_entry = ACTIVATIONS["relu"]

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = None) -> None:
        super().__init__(inplace)
        self._init_fewbit(bits)


class LeakyReLU(FewBitActivationModule, nn.LeakyReLU):
    """LeakyReLU saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    activation_entry = ACTIVATIONS["leaky_relu"]

    def __init__(
        self, negative_slope: float = 0.01, inplace: bool = False, *, bits: Optional[int] = None
    ) -> None:
        super().__init__(negative_slope, inplace)
        self._init_fewbit(bits)


class Threshold(FewBitActivationModule, nn.Threshold):
    """Threshold saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    activation_entry = ACTIVATIONS["threshold"]

    def __init__(
        self, threshold: float, value: float, inplace: bool = False, *, bits: Optional[int] = None
    ) -> None:
        super().__init__(threshold, value, inplace)
        self._init_fewbit(bits)


class Hardsigmoid(FewBitActivationModule, nn.Hardsigmoid):
    """Hardsigmoid saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    activation_entry = ACTIVATIONS["hardsigmoid"]

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = None) -> None:
        super().__init__(inplace)
        self._init_fewbit(bits)


class Hardtanh(FewBitActivationModule, nn.Hardtanh):
    """Hardtanh saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    activation_entry = ACTIVATIONS["hardtanh"]

    def __init__(
        self,
        min_val: float = -1.0,
        max_val: float = 1.0,
        inplace: bool = False,
        *,
        bits: Optional[int] = None,
    ) -> None:
        super().__init__(min_val, max_val, inplace)
        self._init_fewbit(bits)


class ReLU6(FewBitActivationModule, nn.ReLU6):
    """ReLU6 saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    activation_entry = ACTIVATIONS["relu6"]

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = None) -> None:
        super().__init__(inplace)
        self._init_fewbit(bits)


class Hardshrink(FewBitActivationModule, nn.Hardshrink):
    """Hardshrink saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    activation_entry = ACTIVATIONS["hardshrink"]

    def __init__(self, lambd: float = 0.5, *, bits: Optional[int] = None) -> None:
        super().__init__(lambd)
        self._init_fewbit(bits)


class Softshrink(FewBitActivationModule, nn.Softshrink):
    """Softshrink saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    activation_entry = ACTIVATIONS["softshrink"]

    def __init__(self, lambd: float = 0.5, *, bits: Optional[int] = None) -> None:
        super().__init__(lambd)
        self._init_fewbit(bits)


# --- continuous: optimal few-bit derivative tables ----------------------------------------------


class CELU(FewBitActivationModule, nn.CELU):
    """CELU saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["celu"]

    def __init__(
        self, alpha: float = 1.0, inplace: bool = False, *, bits: Optional[int] = None
    ) -> None:
        super().__init__(alpha, inplace)
        self._init_fewbit(bits)


class ELU(FewBitActivationModule, nn.ELU):
    """ELU saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["elu"]

    def __init__(
        self, alpha: float = 1.0, inplace: bool = False, *, bits: Optional[int] = None
    ) -> None:
        super().__init__(alpha, inplace)
        self._init_fewbit(bits)


class GELU(FewBitActivationModule, nn.GELU):
    """GELU saving a ``bits``-bit code for backward (n*bits/8 bytes; 3/32 of fp32 at 3 bits)."""

    activation_entry = ACTIVATIONS["gelu"]

    def __init__(self, approximate: str = "none", *, bits: Optional[int] = None) -> None:
        super().__init__(approximate)
        self._init_fewbit(bits)


class Hardswish(FewBitActivationModule, nn.Hardswish):
    """Hardswish saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["hardswish"]

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = None) -> None:
        super().__init__(inplace)
        self._init_fewbit(bits)


class LogSigmoid(FewBitActivationModule, nn.LogSigmoid):
    """LogSigmoid saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["logsigmoid"]

    def __init__(self, *, bits: Optional[int] = None) -> None:
        super().__init__()
        self._init_fewbit(bits)


class Mish(FewBitActivationModule, nn.Mish):
    """Mish saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["mish"]

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = None) -> None:
        super().__init__(inplace)
        self._init_fewbit(bits)


class SELU(FewBitActivationModule, nn.SELU):
    """SELU saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["selu"]

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = None) -> None:
        super().__init__(inplace)
        self._init_fewbit(bits)


class Sigmoid(FewBitActivationModule, nn.Sigmoid):
    """Sigmoid saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["sigmoid"]

    def __init__(self, *, bits: Optional[int] = None) -> None:
        super().__init__()
        self._init_fewbit(bits)


class SiLU(FewBitActivationModule, nn.SiLU):
    """SiLU saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["silu"]

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = None) -> None:
        super().__init__(inplace)
        self._init_fewbit(bits)


class Softplus(FewBitActivationModule, nn.Softplus):
    """Softplus saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["softplus"]

    def __init__(
        self, beta: float = 1.0, threshold: float = 20.0, *, bits: Optional[int] = None
    ) -> None:
        super().__init__(beta, threshold)
        self._init_fewbit(bits)


class Softsign(FewBitActivationModule, nn.Softsign):
    """Softsign saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["softsign"]

    def __init__(self, *, bits: Optional[int] = None) -> None:
        super().__init__()
        self._init_fewbit(bits)


class Tanh(FewBitActivationModule, nn.Tanh):
    """Tanh saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["tanh"]

    def __init__(self, *, bits: Optional[int] = None) -> None:
        super().__init__()
        self._init_fewbit(bits)


class Tanhshrink(FewBitActivationModule, nn.Tanhshrink):
    """Tanhshrink saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    activation_entry = ACTIVATIONS["tanhshrink"]

    def __init__(self, *, bits: Optional[int] = None) -> None:
        super().__init__()
        self._init_fewbit(bits)


# --- the conversion map, from the registry --------------------------------------------------------

_CLASSES: dict[str, type[FewBitActivationModule]] = {
    cls.activation_entry.name: cls
    for cls in (
        ReLU, LeakyReLU, Threshold, Hardsigmoid, Hardtanh, ReLU6, Hardshrink, Softshrink,
        CELU, ELU, GELU, Hardswish, LogSigmoid, Mish, SELU, Sigmoid, SiLU, Softplus, Softsign,
        Tanh, Tanhshrink,
    )
}  # fmt: skip


@dataclass(frozen=True)
class Conversion:
    """How to build the few-bit module replacing a source: ``target(**kwargs, bits=...)``
    with ``kwargs`` = the source module's ``attributes`` plus the fixed ``arguments``."""

    target: type[FewBitActivationModule]
    attributes: tuple[str, ...] = ()
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def kwargs(self, source: Any = None) -> dict[str, Any]:
        """Constructor arguments (without ``bits``) for replacing ``source``."""
        out = {name: getattr(source, name) for name in self.attributes}
        out.update(self.arguments)
        return out


@dataclass(frozen=True)
class ConversionMap:
    """Sources fewbit converts: torch.nn classes (exact class, not subclasses), Hugging Face
    ``transformers.activations`` class names, and torch functions stored as attributes."""

    modules: Mapping[type[nn.Module], Conversion]
    transformers: Mapping[str, Conversion]
    functions: Mapping[Callable[..., Any], Conversion]


def few_bit_class(name: str) -> type[FewBitActivationModule]:
    """The few-bit module class of registry entry ``name`` (e.g. ``'gelu'`` -> GELU)."""
    try:
        return _CLASSES[name]
    except KeyError:
        raise ValueError(f"no few-bit module for activation {name!r}") from None


def conversion_map() -> ConversionMap:
    """The conversion map derived from the activation registry (a fresh object per call)."""
    modules: dict[type[nn.Module], Conversion] = {}
    transformers: dict[str, Conversion] = {}
    functions: dict[Callable[..., Any], Conversion] = {}
    for entry in ACTIVATIONS.values():
        target = _CLASSES[entry.name]
        modules[entry.torch_module] = Conversion(target, entry.module_attributes)
        for name, args in entry.transformers.items():
            transformers[name] = Conversion(target, (), dict(args))
        for fn in entry.functions:
            functions[fn] = Conversion(target)
    return ConversionMap(modules, transformers, functions)
