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

Each function is a thin explicit signature over :func:`apply_activation` and its entry in
the activation registry (:mod:`fewbit.approx.registry`), which holds torch's op, the
arguments' defaults, the mask or table, and the fused-kernel id. Integer inputs are
accepted exactly where torch's op accepts them (relu returns integers; tanh and sigmoid
promote to float), and autocast casts inputs as it does for torch's op.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..approx import Table, get_table, normalize_params
from ..approx.registry import ACTIVATIONS, Activation
from ..codecs.bitpack import check_bits
from .fewbit_fn import (
    _SPECS,
    ActivationSpec,
    _forward_op,
    _register,
    _spec_key,
    apply_fewbit,
    check_floating,
    private_autograd,
)

__all__ = [
    "activation",
    "apply_activation",
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


def apply_activation(
    entry: Activation,
    input: Tensor,
    args: Mapping[str, Any] | None = None,
    bits: Optional[int] = None,
    table: TableLike | None = None,
) -> Tensor:
    """Run registry ``entry`` on ``input`` with torch's arguments ``args`` (defaults filled in).

    Floating inputs: torch's output; when a gradient is needed, saves a 1-bit mask (mask
    entries; ``bits`` accepted and ignored) or a ``bits``-bit code (table entries; default
    3; ``table`` replaces the optimal table). Integer inputs, where torch's op takes them:
    torch's op as is (nothing to save: integers have no gradient). Under autocast the input
    is first cast as autocast casts it for torch's op. Variants without a fused kernel run
    the PyTorch path on every device.
    """
    params = entry.params(args)
    if isinstance(input, Tensor) and entry.integer_inputs and _is_integer(input):
        return entry.forward(input, params)
    check_floating(input)
    check_bits(entry.default_bits if bits is None else bits)
    if table is not None and entry.is_mask:
        raise TypeError(f"{entry.name} saves an exact mask: it takes no table")
    custom = None if table is None else _as_table(table)
    if not (torch.is_grad_enabled() and input.requires_grad):
        return entry.forward(input, params)  # nothing to save: exactly torch's op, no extra work
    input = _autocast_input(input, entry, params)
    width = entry.default_bits if bits is None else bits
    if torch.compiler.is_compiling() and entry.variant(params).kernel is not None:
        # resolved outside the trace (tables, spec registration): no file I/O, no graph break
        table_items = None if custom is None else _table_items(custom)
        key = _traced_spec_key(entry.name, tuple(params.items()), width, table_items)
        return _forward_op(input, key)[0]
    return apply_fewbit(input, _make_spec(entry, params, width, custom))


def _table_items(table: Table) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
    return (tuple(table.boundaries), tuple(table.levels), bool(table.symmetric))


def _make_spec(
    entry: Activation, params: Mapping[str, Any], width: int, custom: Optional[Table]
) -> ActivationSpec:
    """The spec of ``entry`` with torch's arguments ``params`` (validated, defaults filled in):
    its mask, or ``custom`` / the optimal ``width``-bit table (loaded or built on first use)."""
    variant = entry.variant(params)
    kernel = variant.name if variant.kernel is not None else None
    numeric = entry.float_params(params)

    def forward(x: Tensor) -> Tensor:
        return entry.forward(x, params)

    if entry.mask is not None:
        mask = entry.mask
        return ActivationSpec(
            forward, lambda x: mask.inside(x, numeric), mask.levels(numeric), 1, kernel, numeric
        )
    chosen = custom
    if chosen is None:
        with private_autograd():  # a first use of new parameters builds a table
            chosen = get_table(variant.name, width, numeric)
    return ActivationSpec(
        forward,
        chosen.encode,
        chosen.levels,
        chosen.bits,
        kernel=kernel,
        params=normalize_params(variant.name, numeric),
        boundaries=chosen.boundaries,
        symmetric=chosen.symmetric,
    )


@torch.compiler.assume_constant_result
def _traced_spec_key(
    name: str,
    params: tuple[tuple[str, Any], ...],
    width: int,
    table: Optional[tuple[tuple[float, ...], tuple[float, ...], bool]],
) -> str:
    """The custom ops' key of an activation's spec, for torch.compile.

    Dynamo calls this for real while tracing and keeps the returned string as a constant of
    the graph (it is a function of the constant arguments only), so the table lookup (a file
    read at first use, or an optimisation for new parameters) and the spec registration run
    outside the traced code: no graph break, nothing of it in the graph. Costs the same as an
    eager call's lookup, once per trace.
    """
    custom = None if table is None else Table(*table)
    spec = _make_spec(ACTIVATIONS[name], dict(params), width, custom)
    key = _spec_key(spec)
    if key not in _SPECS:
        _register(key, spec)
    return key


def _is_integer(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def _autocast_input(x: Tensor, entry: Activation, params: Mapping[str, Any]) -> Tensor:
    """x cast to the dtype autocast gives torch's op (CUDA runs softplus in float32, say);
    x itself when autocast is off or keeps its dtype. The probe is torch's op on 0 elements."""
    kind = x.device.type
    if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return x  # autocast is off, or does not exist for this device (meta)
    with torch.no_grad():
        dtype = entry.forward(x.new_empty(0), params).dtype
    return x if dtype == x.dtype else x.to(dtype)


# --- piecewise-linear functions: exact 1-bit masks (bits accepted, 1..8, and ignored) ----------

_A = ACTIVATIONS


def relu(input: Tensor, inplace: bool = False, *, bits: Optional[int] = None) -> Tensor:
    """ReLU; saves a 1-bit mask (x > 0)."""
    return apply_activation(_A["relu"], input, {}, bits)


def leaky_relu(
    input: Tensor,
    negative_slope: float = 0.01,
    inplace: bool = False,
    *,
    bits: Optional[int] = None,
) -> Tensor:
    """LeakyReLU; saves a 1-bit mask (x > 0)."""
    return apply_activation(_A["leaky_relu"], input, {"negative_slope": negative_slope}, bits)


def threshold(
    input: Tensor,
    threshold: float,
    value: float,
    inplace: bool = False,
    *,
    bits: Optional[int] = None,
) -> Tensor:
    """Threshold; saves a 1-bit mask (x > threshold)."""
    return apply_activation(_A["threshold"], input, {"threshold": threshold, "value": value}, bits)


def hardsigmoid(input: Tensor, inplace: bool = False, *, bits: Optional[int] = None) -> Tensor:
    """Hardsigmoid; saves a 1-bit mask (-3 < x < 3), derivative 1/6 inside."""
    return apply_activation(_A["hardsigmoid"], input, {}, bits)


def hardtanh(
    input: Tensor,
    min_val: float = -1.0,
    max_val: float = 1.0,
    inplace: bool = False,
    *,
    bits: Optional[int] = None,
) -> Tensor:
    """Hardtanh; saves a 1-bit mask (min_val < x < max_val)."""
    return apply_activation(_A["hardtanh"], input, {"min_val": min_val, "max_val": max_val}, bits)


def relu6(input: Tensor, inplace: bool = False, *, bits: Optional[int] = None) -> Tensor:
    """ReLU6; saves a 1-bit mask (0 < x < 6)."""
    return apply_activation(_A["relu6"], input, {}, bits)


def hardshrink(input: Tensor, lambd: float = 0.5, *, bits: Optional[int] = None) -> Tensor:
    """Hardshrink; saves a 1-bit mask (|x| > lambd)."""
    return apply_activation(_A["hardshrink"], input, {"lambd": lambd}, bits)


def softshrink(input: Tensor, lambd: float = 0.5, *, bits: Optional[int] = None) -> Tensor:
    """Softshrink; saves a 1-bit mask (|x| > lambd)."""
    return apply_activation(_A["softshrink"], input, {"lambd": lambd}, bits)


# --- continuous functions: optimal few-bit derivative tables (bits default 3) ----------------


def celu(
    input: Tensor,
    alpha: float = 1.0,
    inplace: bool = False,
    *,
    bits: Optional[int] = None,
    table: TableLike | None = None,
) -> Tensor:
    """CELU; saves a ``bits``-bit code (table made for this alpha)."""
    return apply_activation(_A["celu"], input, {"alpha": alpha}, bits, table)


def elu(
    input: Tensor,
    alpha: float = 1.0,
    inplace: bool = False,
    *,
    bits: Optional[int] = None,
    table: TableLike | None = None,
) -> Tensor:
    """ELU; saves a ``bits``-bit code (table made for this alpha)."""
    return apply_activation(_A["elu"], input, {"alpha": alpha}, bits, table)


def gelu(
    input: Tensor,
    approximate: str = "none",
    *,
    bits: Optional[int] = None,
    table: TableLike | None = None,
) -> Tensor:
    """GELU (``approximate`` 'none' or 'tanh'); saves a ``bits``-bit code."""
    return apply_activation(_A["gelu"], input, {"approximate": approximate}, bits, table)


def hardswish(
    input: Tensor,
    inplace: bool = False,
    *,
    bits: Optional[int] = None,
    table: TableLike | None = None,
) -> Tensor:
    """Hardswish; saves a ``bits``-bit code."""
    return apply_activation(_A["hardswish"], input, {}, bits, table)


def logsigmoid(
    input: Tensor, *, bits: Optional[int] = None, table: TableLike | None = None
) -> Tensor:
    """LogSigmoid; saves a ``bits``-bit code."""
    return apply_activation(_A["logsigmoid"], input, {}, bits, table)


def mish(
    input: Tensor,
    inplace: bool = False,
    *,
    bits: Optional[int] = None,
    table: TableLike | None = None,
) -> Tensor:
    """Mish; saves a ``bits``-bit code."""
    return apply_activation(_A["mish"], input, {}, bits, table)


def selu(
    input: Tensor,
    inplace: bool = False,
    *,
    bits: Optional[int] = None,
    table: TableLike | None = None,
) -> Tensor:
    """SELU; saves a ``bits``-bit code."""
    return apply_activation(_A["selu"], input, {}, bits, table)


def sigmoid(input: Tensor, *, bits: Optional[int] = None, table: TableLike | None = None) -> Tensor:
    """Sigmoid; saves a ``bits``-bit code of |x| (the derivative is even)."""
    return apply_activation(_A["sigmoid"], input, {}, bits, table)


def silu(
    input: Tensor,
    inplace: bool = False,
    *,
    bits: Optional[int] = None,
    table: TableLike | None = None,
) -> Tensor:
    """SiLU / swish; saves a ``bits``-bit code."""
    return apply_activation(_A["silu"], input, {}, bits, table)


def softplus(
    input: Tensor,
    beta: float = 1.0,
    threshold: float = 20.0,
    *,
    bits: Optional[int] = None,
    table: TableLike | None = None,
) -> Tensor:
    """Softplus; saves a ``bits``-bit code (table made for this beta and threshold)."""
    args = {"beta": beta, "threshold": threshold}
    return apply_activation(_A["softplus"], input, args, bits, table)


def softsign(
    input: Tensor, *, bits: Optional[int] = None, table: TableLike | None = None
) -> Tensor:
    """Softsign; saves a ``bits``-bit code of |x| (the derivative is even)."""
    return apply_activation(_A["softsign"], input, {}, bits, table)


def tanh(input: Tensor, *, bits: Optional[int] = None, table: TableLike | None = None) -> Tensor:
    """Tanh; saves a ``bits``-bit code of |x| (the derivative is even)."""
    return apply_activation(_A["tanh"], input, {}, bits, table)


def tanhshrink(
    input: Tensor, *, bits: Optional[int] = None, table: TableLike | None = None
) -> Tensor:
    """Tanhshrink; saves a ``bits``-bit code of |x| (the derivative is even)."""
    return apply_activation(_A["tanhshrink"], input, {}, bits, table)
