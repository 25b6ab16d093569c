"""Few-bit activation modules: drop-in subclasses of the torch.nn activations.

Each class subclasses its torch.nn counterpart (same constructor arguments,
``isinstance`` checks, ``state_dict`` and repr) and adds a keyword ``bits``.
The forward output is torch's; backward stores only a packed code of the input
(see :mod:`fewbit.functional.activations` for what each one stores).
``inplace=True`` is accepted and ignored: the op is always out-of-place.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..codecs.bitpack import check_bits
from ..functional import activations as FA

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
    "FewBitActivationModule",
]


class FewBitActivationModule(nn.Module):
    """Base of every few-bit activation module: holds ``bits`` and shows it in the repr.

    Listed first among the bases, so its ``extra_repr`` extends the torch class's.
    """

    bits: int

    def _init_bits(self, bits: int) -> None:
        self.bits = check_bits(bits)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, bits={self.bits}" if base else f"bits={self.bits}"


# --- piecewise-linear: exact 1-bit masks --------------------------------------------------------


class ReLU(FewBitActivationModule, nn.ReLU):
    """ReLU saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    def __init__(self, inplace: bool = False, *, bits: int = 1) -> None:
        super().__init__(inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.relu(input)


class LeakyReLU(FewBitActivationModule, nn.LeakyReLU):
    """LeakyReLU saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    def __init__(
        self, negative_slope: float = 0.01, inplace: bool = False, *, bits: int = 1
    ) -> None:
        super().__init__(negative_slope, inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.leaky_relu(input, self.negative_slope)


class Threshold(FewBitActivationModule, nn.Threshold):
    """Threshold saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    def __init__(
        self, threshold: float, value: float, inplace: bool = False, *, bits: int = 1
    ) -> None:
        super().__init__(threshold, value, inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.threshold(input, self.threshold, self.value)


class Hardsigmoid(FewBitActivationModule, nn.Hardsigmoid):
    """Hardsigmoid saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    def __init__(self, inplace: bool = False, *, bits: int = 1) -> None:
        super().__init__(inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.hardsigmoid(input)


class Hardtanh(FewBitActivationModule, nn.Hardtanh):
    """Hardtanh saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    def __init__(
        self, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False, *, bits: int = 1
    ) -> None:
        super().__init__(min_val, max_val, inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.hardtanh(input, self.min_val, self.max_val)


class ReLU6(FewBitActivationModule, nn.ReLU6):
    """ReLU6 saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    def __init__(self, inplace: bool = False, *, bits: int = 1) -> None:
        super().__init__(inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.relu6(input)


class Hardshrink(FewBitActivationModule, nn.Hardshrink):
    """Hardshrink saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    def __init__(self, lambd: float = 0.5, *, bits: int = 1) -> None:
        super().__init__(lambd)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.hardshrink(input, self.lambd)


class Softshrink(FewBitActivationModule, nn.Softshrink):
    """Softshrink saving a 1-bit mask for backward (n/8 bytes; exact gradient)."""

    def __init__(self, lambd: float = 0.5, *, bits: int = 1) -> None:
        super().__init__(lambd)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.softshrink(input, self.lambd)


# --- continuous: optimal few-bit derivative tables ----------------------------------------------


class CELU(FewBitActivationModule, nn.CELU):
    """CELU saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, alpha: float = 1.0, inplace: bool = False, *, bits: int = 3) -> None:
        super().__init__(alpha, inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.celu(input, self.alpha, bits=self.bits)


class ELU(FewBitActivationModule, nn.ELU):
    """ELU saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, alpha: float = 1.0, inplace: bool = False, *, bits: int = 3) -> None:
        super().__init__(alpha, inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.elu(input, self.alpha, bits=self.bits)


class GELU(FewBitActivationModule, nn.GELU):
    """GELU saving a ``bits``-bit code for backward (n*bits/8 bytes; 3/32 of fp32 at 3 bits)."""

    def __init__(self, approximate: str = "none", *, bits: int = 3) -> None:
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        super().__init__(approximate)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.gelu(input, self.approximate, bits=self.bits)


class Hardswish(FewBitActivationModule, nn.Hardswish):
    """Hardswish saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, inplace: bool = False, *, bits: int = 3) -> None:
        super().__init__(inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.hardswish(input, bits=self.bits)


class LogSigmoid(FewBitActivationModule, nn.LogSigmoid):
    """LogSigmoid saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, *, bits: int = 3) -> None:
        super().__init__()
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.logsigmoid(input, bits=self.bits)


class Mish(FewBitActivationModule, nn.Mish):
    """Mish saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, inplace: bool = False, *, bits: int = 3) -> None:
        super().__init__(inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.mish(input, bits=self.bits)


class SELU(FewBitActivationModule, nn.SELU):
    """SELU saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, inplace: bool = False, *, bits: int = 3) -> None:
        super().__init__(inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.selu(input, bits=self.bits)


class Sigmoid(FewBitActivationModule, nn.Sigmoid):
    """Sigmoid saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, *, bits: int = 3) -> None:
        super().__init__()
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.sigmoid(input, bits=self.bits)


class SiLU(FewBitActivationModule, nn.SiLU):
    """SiLU saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, inplace: bool = False, *, bits: int = 3) -> None:
        super().__init__(inplace)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.silu(input, bits=self.bits)


class Softplus(FewBitActivationModule, nn.Softplus):
    """Softplus saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, beta: float = 1.0, threshold: float = 20.0, *, bits: int = 3) -> None:
        super().__init__(beta, threshold)
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.softplus(input, self.beta, self.threshold, bits=self.bits)


class Softsign(FewBitActivationModule, nn.Softsign):
    """Softsign saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, *, bits: int = 3) -> None:
        super().__init__()
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.softsign(input, bits=self.bits)


class Tanh(FewBitActivationModule, nn.Tanh):
    """Tanh saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, *, bits: int = 3) -> None:
        super().__init__()
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.tanh(input, bits=self.bits)


class Tanhshrink(FewBitActivationModule, nn.Tanhshrink):
    """Tanhshrink saving a ``bits``-bit code for backward (n*bits/8 bytes)."""

    def __init__(self, *, bits: int = 3) -> None:
        super().__init__()
        self._init_bits(bits)

    def forward(self, input: Tensor) -> Tensor:
        return FA.tanhshrink(input, bits=self.bits)
