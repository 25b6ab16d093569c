"""Few-bit activation functions: drop-in replacements for torch.nn.functional.

Every function returns exactly torch's output (same dtype, shape, device) and is
out-of-place; ``inplace`` arguments are accepted for compatibility and ignored.

Stored for backward (when a gradient is needed):

* piecewise-linear functions (relu, leaky_relu, threshold, hardsigmoid,
  hardtanh, relu6, hardshrink, softshrink): an exact 1-bit mask,
  ``ceil(n/8)`` bytes; the gradient equals torch's, including at the kinks.
  ``bits`` is accepted (1..8) and ignored: one bit is already exact.
* continuous functions: a ``bits``-bit code (default 3), ``ceil(n*bits/8)``
  bytes; the gradient is ``grad * q(x)`` with q the optimal piecewise-constant
  derivative table of :mod:`fewbit.approx` (or a custom ``table``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..approx import Table, get_definition, get_table, normalize_params
from ..codecs.bitpack import check_bits
from .fewbit_fn import ActivationSpec, apply_fewbit, check_floating, private_autograd

__all__ = [
    "activation",
    "celu",
    "elu",
    "gelu",
    "hardshrink",
    "hardsigmoid",
    "hardswish",
    "hardtanh",
    "leaky_relu",
    "logsigmoid",
    "mish",
    "relu",
    "relu6",
    "selu",
    "sigmoid",
    "silu",
    "softplus",
    "softshrink",
    "softsign",
    "tanh",
    "tanhshrink",
    "threshold",
]

TableLike = Union[Table, Tuple[Sequence[float], Sequence[float]]]


def _as_table(table: TableLike) -> Table:
    if isinstance(table, Table):
        return table
    try:
        boundaries, levels = table
    except (TypeError, ValueError):
        raise TypeError(
            "table must be a fewbit.approx.Table or a (boundaries, levels) pair"
        ) from None
    return Table(tuple(boundaries), tuple(levels))


def activation(input: Tensor, forward: Callable[[Tensor], Tensor], table: TableLike) -> Tensor:
    """Apply ``forward`` and approximate its derivative by a custom ``table`` in backward.

    ``table`` is a :class:`fewbit.approx.Table` or a ``(boundaries, levels)`` pair
    (2**b levels, 2**b - 1 strictly increasing boundaries). Stores ``ceil(n*b/8)`` bytes.
    """
    check_floating(input)
    table = _as_table(table)
    return apply_fewbit(input, ActivationSpec(forward, table.encode, table.levels, table.bits))


def _continuous(
    input: Tensor,
    name: str,
    bits: int,
    table: TableLike | None,
    params: Mapping[str, float] | None = None,
) -> Tensor:
    check_floating(input)
    check_bits(bits)
    full = normalize_params(name, params)
    definition = get_definition(name)

    def forward(x: Tensor) -> Tensor:
        return definition.forward(x, full)

    if table is None:
        with private_autograd():  # a first use of new parameters builds a table
            chosen = get_table(name, bits, full)
    else:
        chosen = _as_table(table)
    spec = ActivationSpec(
        forward,
        chosen.encode,
        chosen.levels,
        chosen.bits,
        kernel=name,
        params=full,
        boundaries=chosen.boundaries,
        symmetric=chosen.symmetric,
    )
    return apply_fewbit(input, spec)


def _masked(
    input: Tensor,
    forward: Callable[[Tensor], Tensor],
    mask: Callable[[Tensor], Tensor],
    levels: tuple[float, float],
    bits: int,
    kernel: str,
    params: Mapping[str, float] | None = None,
) -> Tensor:
    """Exact 1-bit save: the derivative is levels[1] where mask(x), else levels[0]."""
    check_floating(input)
    check_bits(bits)
    spec = ActivationSpec(forward, mask, levels, 1, kernel=kernel, params=dict(params or {}))
    return apply_fewbit(input, spec)


# --- piecewise-linear functions: exact 1-bit masks -------------------------------------------


def _widened(x: Tensor) -> Tensor:
    """x in float32 when it is fp16/bf16: torch's threshold and hardtanh backward compare
    half-precision inputs against the parameter in float (hardshrink/softshrink compare in
    the input's dtype)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def relu(input: Tensor, inplace: bool = False, *, bits: int = 1) -> Tensor:
    """ReLU; saves a 1-bit mask (x > 0)."""
    return _masked(input, F.relu, lambda x: x > 0, (0.0, 1.0), bits, "relu")


def leaky_relu(
    input: Tensor, negative_slope: float = 0.01, inplace: bool = False, *, bits: int = 1
) -> Tensor:
    """LeakyReLU; saves a 1-bit mask (x > 0)."""
    slope = float(negative_slope)
    params = {"negative_slope": slope}
    return _masked(
        input,
        lambda x: F.leaky_relu(x, slope),
        lambda x: x > 0,
        (slope, 1.0),
        bits,
        "leaky_relu",
        params,
    )


def threshold(
    input: Tensor, threshold: float, value: float, inplace: bool = False, *, bits: int = 1
) -> Tensor:
    """Threshold; saves a 1-bit mask (x > threshold)."""
    th, val = float(threshold), float(value)
    return _masked(
        input,
        lambda x: F.threshold(x, th, val),
        lambda x: _widened(x) > th,
        (0.0, 1.0),
        bits,
        "threshold",
        {"threshold": th, "value": val},
    )


# torch's hardsigmoid backward multiplies by the float32 constant 1.0f/6.0f in every dtype.
_ONE_SIXTH_F32 = float(torch.tensor(1.0 / 6.0, dtype=torch.float32).item())


def hardsigmoid(input: Tensor, inplace: bool = False, *, bits: int = 1) -> Tensor:
    """Hardsigmoid; saves a 1-bit mask (-3 < x < 3), derivative 1/6 inside."""
    return _masked(
        input,
        F.hardsigmoid,
        lambda x: (x > -3.0) & (x < 3.0),
        (0.0, _ONE_SIXTH_F32),
        bits,
        "hardsigmoid",
    )


def hardtanh(
    input: Tensor,
    min_val: float = -1.0,
    max_val: float = 1.0,
    inplace: bool = False,
    *,
    bits: int = 1,
) -> Tensor:
    """Hardtanh; saves a 1-bit mask (min_val < x < max_val)."""
    lo, hi = float(min_val), float(max_val)
    if lo > hi:
        raise ValueError(f"max_val ({hi}) cannot be lower than min_val ({lo})")

    def inside(x: Tensor) -> Tensor:
        wide = _widened(x)
        return (wide > lo) & (wide < hi)

    params = {"min_val": lo, "max_val": hi}
    return _masked(
        input, lambda x: F.hardtanh(x, lo, hi), inside, (0.0, 1.0), bits, "hardtanh", params
    )


def relu6(input: Tensor, inplace: bool = False, *, bits: int = 1) -> Tensor:
    """ReLU6; saves a 1-bit mask (0 < x < 6)."""
    return _masked(input, F.relu6, lambda x: (x > 0.0) & (x < 6.0), (0.0, 1.0), bits, "relu6")


def _shrink_mask(lambd: float) -> Callable[[Tensor], Tensor]:
    return lambda x: (x < -lambd) | (x > lambd)


def hardshrink(input: Tensor, lambd: float = 0.5, *, bits: int = 1) -> Tensor:
    """Hardshrink; saves a 1-bit mask (|x| > lambd)."""
    lam = float(lambd)
    return _masked(
        input,
        lambda x: F.hardshrink(x, lam),
        _shrink_mask(lam),
        (0.0, 1.0),
        bits,
        "hardshrink",
        {"lambd": lam},
    )


def softshrink(input: Tensor, lambd: float = 0.5, *, bits: int = 1) -> Tensor:
    """Softshrink; saves a 1-bit mask (|x| > lambd)."""
    lam = float(lambd)
    if lam < 0:
        raise ValueError(f"lambd must be >= 0, got {lam}")
    return _masked(
        input,
        lambda x: F.softshrink(x, lam),
        _shrink_mask(lam),
        (0.0, 1.0),
        bits,
        "softshrink",
        {"lambd": lam},
    )


# --- continuous functions: optimal few-bit derivative tables ---------------------------------


def celu(
    input: Tensor,
    alpha: float = 1.0,
    inplace: bool = False,
    *,
    bits: int = 3,
    table: TableLike | None = None,
) -> Tensor:
    """CELU; saves a ``bits``-bit code (table made for this alpha)."""
    return _continuous(input, "celu", bits, table, {"alpha": alpha})


def elu(
    input: Tensor,
    alpha: float = 1.0,
    inplace: bool = False,
    *,
    bits: int = 3,
    table: TableLike | None = None,
) -> Tensor:
    """ELU; saves a ``bits``-bit code (table made for this alpha)."""
    return _continuous(input, "elu", bits, table, {"alpha": alpha})


def gelu(
    input: Tensor, approximate: str = "none", *, bits: int = 3, table: TableLike | None = None
) -> Tensor:
    """GELU (``approximate`` 'none' or 'tanh'); saves a ``bits``-bit code."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    name = "gelu" if approximate == "none" else "gelu_tanh"
    return _continuous(input, name, bits, table)


def hardswish(
    input: Tensor, inplace: bool = False, *, bits: int = 3, table: TableLike | None = None
) -> Tensor:
    """Hardswish; saves a ``bits``-bit code."""
    return _continuous(input, "hardswish", bits, table)


def logsigmoid(input: Tensor, *, bits: int = 3, table: TableLike | None = None) -> Tensor:
    """LogSigmoid; saves a ``bits``-bit code."""
    return _continuous(input, "logsigmoid", bits, table)


def mish(
    input: Tensor, inplace: bool = False, *, bits: int = 3, table: TableLike | None = None
) -> Tensor:
    """Mish; saves a ``bits``-bit code."""
    return _continuous(input, "mish", bits, table)


def selu(
    input: Tensor, inplace: bool = False, *, bits: int = 3, table: TableLike | None = None
) -> Tensor:
    """SELU; saves a ``bits``-bit code."""
    return _continuous(input, "selu", bits, table)


def sigmoid(input: Tensor, *, bits: int = 3, table: TableLike | None = None) -> Tensor:
    """Sigmoid; saves a ``bits``-bit code of |x| (the derivative is even)."""
    return _continuous(input, "sigmoid", bits, table)


def silu(
    input: Tensor, inplace: bool = False, *, bits: int = 3, table: TableLike | None = None
) -> Tensor:
    """SiLU / swish; saves a ``bits``-bit code."""
    return _continuous(input, "silu", bits, table)


def softplus(
    input: Tensor,
    beta: float = 1.0,
    threshold: float = 20.0,
    *,
    bits: int = 3,
    table: TableLike | None = None,
) -> Tensor:
    """Softplus; saves a ``bits``-bit code (table made for this beta and threshold)."""
    return _continuous(input, "softplus", bits, table, {"beta": beta, "threshold": threshold})


def softsign(input: Tensor, *, bits: int = 3, table: TableLike | None = None) -> Tensor:
    """Softsign; saves a ``bits``-bit code of |x| (the derivative is even)."""
    return _continuous(input, "softsign", bits, table)


def tanh(input: Tensor, *, bits: int = 3, table: TableLike | None = None) -> Tensor:
    """Tanh; saves a ``bits``-bit code of |x| (the derivative is even)."""
    return _continuous(input, "tanh", bits, table)


def tanhshrink(input: Tensor, *, bits: int = 3, table: TableLike | None = None) -> Tensor:
    """Tanhshrink; saves a ``bits``-bit code of |x| (the derivative is even)."""
    return _continuous(input, "tanhshrink", bits, table)
