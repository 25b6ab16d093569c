"""The activation registry: one entry per few-bit activation, the source of everything else.

From each :class:`Activation` entry fewbit derives the functional form's behaviour
(:mod:`fewbit.functional.activations`), the module class's behaviour
(:mod:`fewbit.modules.activations`), the conversion map (torch.nn classes, Hugging Face
``transformers.activations`` classes and plain torch functions -> few-bit class), the fused
kernels' ids and parameters (:mod:`fewbit.kernels.activations`), the derivative tables that
``python -m fewbit.approx`` generates (:data:`fewbit.approx.CONTINUOUS`) and the tests' lists.

An entry is either

* a **mask** activation (piecewise linear): backward stores an exact 1-bit mask
  (``ceil(n/8)`` bytes) and the derivative is ``levels[mask]``; or
* a **table** activation (continuous): backward stores a ``bits``-bit code of the input and
  the derivative is the level of an optimal piecewise-constant table, one table per
  :class:`Variant` (e.g. GELU's exact and tanh forms).

Every variant states its fused-kernel id explicitly: ``kernel=None`` means the fused kernels
do not know it and it always runs the PyTorch path (on every device). The registry is plain
data built once at import; it holds no state and imports nothing from fewbit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "FIRST_TABLE_KERNEL",
    "REQUIRED",
    "Activation",
    "Arg",
    "Mask",
    "Variant",
    "get_activation",
    "kernel_ids",
    "kernel_mask_params",
    "table_definitions",
]

Params = Mapping[str, Any]

#: Fused-kernel ids below this use an exact 1-bit mask; ids from it on use a boundary table.
FIRST_TABLE_KERNEL = 10


class _Required:
    """Marker of an argument without a default (torch's ``Threshold(threshold, value)``)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Arg:
    """One argument of the torch op and module, in torch's order (``inplace`` excluded).

    ``default`` is torch's default (:data:`REQUIRED` when torch has none). Numeric
    arguments are the activation's parameters (mask levels, table parameters, kernel
    arguments); a string argument selects a :class:`Variant`.
    """

    name: str
    default: Any = REQUIRED


@dataclass(frozen=True)
class Variant:
    """One computation an activation selects by its string arguments (``when``).

    ``name`` is the table name (and the name the fused kernels know); ``kernel`` is the id
    of its branch in the fused Triton kernels, or ``None``: no kernel, always the PyTorch
    path. There is no default: every variant says which it is.
    """

    name: str
    kernel: Optional[int]
    when: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Mask:
    """An exact 1-bit derivative: ``levels[1]`` where ``inside(x, p)``, else ``levels[0]``.

    ``kinks(p)`` are the points where the derivative jumps (where the tests probe torch's
    comparison convention).
    """

    inside: Callable[[Tensor, Params], Tensor]
    levels: Callable[[Params], tuple[float, float]]
    kinks: Callable[[Params], tuple[float, ...]]


@dataclass(frozen=True)
class Activation:
    """A few-bit activation: torch's op, its module, arguments, derivative and kernels.

    ``forward(x, p)`` is torch's own call (so outputs equal torch's bit for bit), with
    ``p`` every argument by name. ``mask`` is set for mask activations and ``None`` for
    table ones. ``inplace``: torch's module and op take ``inplace`` (accepted, ignored).
    ``integer_inputs``: torch's op accepts integer tensors (fewbit then calls it as is:
    no gradient exists for them). ``functions``: torch functions that a model may store as
    attributes (``self.act = F.gelu``) and the converter replaces. ``transformers``:
    ``transformers.activations`` class name -> arguments of the same math. ``example``:
    non-default arguments for tests and documentation (required ones included).
    """

    name: str
    module: str
    torch_module: type[nn.Module]
    forward: Callable[[Tensor, Params], Tensor]
    variants: tuple[Variant, ...]
    args: tuple[Arg, ...] = ()
    mask: Optional[Mask] = None
    inplace: bool = False
    integer_inputs: bool = False
    functions: tuple[Callable[..., Any], ...] = ()
    transformers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    example: Mapping[str, Any] = field(default_factory=dict)
    check: Optional[Callable[[Params], None]] = None

    @property
    def is_mask(self) -> bool:
        """True for an exact 1-bit mask activation, False for a table one."""
        return self.mask is not None

    @property
    def default_bits(self) -> int:
        """1 for masks (already exact), 3 for tables."""
        return 1 if self.is_mask else 3

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @property
    def numeric_args(self) -> tuple[Arg, ...]:
        """The parameters: arguments that select no variant."""
        selectors = {k for v in self.variants for k in v.when}
        return tuple(a for a in self.args if a.name not in selectors)

    @property
    def module_attributes(self) -> tuple[str, ...]:
        """Attributes of the torch module that are its constructor arguments."""
        return self.arg_names + (("inplace",) if self.inplace else ())

    def params(self, given: Params | None = None) -> dict[str, Any]:
        """Every argument by name: ``given`` over torch's defaults, validated.

        Raises TypeError for an unknown or missing argument, ValueError for a bad value
        (naming the argument).
        """
        given = dict(given or {})
        unknown = set(given) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.name} takes no argument(s) {sorted(unknown)}")
        out = {a.name: given.get(a.name, a.default) for a in self.args}
        missing = [k for k, v in out.items() if v is REQUIRED]
        if missing:
            raise TypeError(f"{self.name} needs argument(s) {missing}")
        self.variant(out)
        if self.check is not None:
            self.check(out)
        return out

    def float_params(self, params: Params) -> dict[str, float]:
        """The numeric parameters of ``params`` as floats (for masks, tables and kernels)."""
        return {a.name: float(params[a.name]) for a in self.numeric_args}

    def variant(self, params: Params) -> Variant:
        """The variant selected by the string arguments in ``params``."""
        for v in self.variants:
            if all(params.get(k) == value for k, value in v.when.items()):
                return v
        keys = sorted({k for v in self.variants for k in v.when})
        choices = [", ".join(repr(v.when.get(k)) for k in keys) for v in self.variants]
        got = ", ".join(repr(params.get(k)) for k in keys)
        raise ValueError(f"{', '.join(keys)} must be one of {' | '.join(choices)}; got {got}")


# --- helpers for the entries --------------------------------------------------------------------


def _widened(x: Tensor) -> Tensor:
    """x in float32 when it is fp16/bf16: torch's threshold and hardtanh backward compare
    half-precision inputs against the parameter in float (hardshrink/softshrink compare in
    the input's dtype)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _unit(p: Params) -> tuple[float, float]:
    return (0.0, 1.0)


# torch's hardsigmoid backward multiplies by the float32 constant 1.0f/6.0f in every dtype.
_ONE_SIXTH_F32 = float(torch.tensor(1.0 / 6.0, dtype=torch.float32).item())


def _check_hardtanh(p: Params) -> None:
    if float(p["min_val"]) > float(p["max_val"]):
        raise ValueError(
            f"max_val ({float(p['max_val'])}) cannot be lower than min_val ({float(p['min_val'])})"
        )


def _check_softshrink(p: Params) -> None:
    if float(p["lambd"]) < 0:
        raise ValueError(f"lambd must be >= 0, got {float(p['lambd'])}")


def _shrink(x: Tensor, p: Params) -> Tensor:
    lam = float(p["lambd"])
    return (x < -lam) | (x > lam)


def _hardtanh_inside(x: Tensor, p: Params) -> Tensor:
    wide = _widened(x)
    return (wide > float(p["min_val"])) & (wide < float(p["max_val"]))


def _table(
    name: str,
    module: str,
    torch_module: type[nn.Module],
    forward: Callable[[Tensor, Params], Tensor],
    kernel: Optional[int],
    **options: Any,
) -> Activation:
    """An activation with one variant named after it: a table one, or a mask one when
    ``options`` holds ``mask``."""
    return Activation(name, module, torch_module, forward, (Variant(name, kernel),), **options)


def _mask(
    name: str, module: str, torch_module: type[nn.Module], forward: Any, kernel: Optional[int],
    mask: Mask, **options: Any,
) -> Activation:  # fmt: skip
    """A mask activation with one variant named after it."""
    return _table(name, module, torch_module, forward, kernel, mask=mask, **options)


# --- the entries ----------------------------------------------------------------------------------

_ENTRIES: tuple[Activation, ...] = (
    # Piecewise linear: exact 1-bit masks. Parameters not representable in fp16/bf16 in the
    # examples make the tests check torch's comparison convention at the kinks.
    _mask(
        "relu", "ReLU", nn.ReLU, lambda x, p: F.relu(x), 0,
        Mask(lambda x, p: x > 0, _unit, lambda p: (0.0,)),
        inplace=True, integer_inputs=True, functions=(F.relu, torch.relu),
    ),
    _mask(
        "leaky_relu", "LeakyReLU", nn.LeakyReLU,
        lambda x, p: F.leaky_relu(x, p["negative_slope"]), 1,
        Mask(lambda x, p: x > 0, lambda p: (float(p["negative_slope"]), 1.0), lambda p: (0.0,)),
        args=(Arg("negative_slope", 0.01),), inplace=True, example={"negative_slope": 0.3},
    ),
    _mask(
        "threshold", "Threshold", nn.Threshold,
        lambda x, p: F.threshold(x, p["threshold"], p["value"]), 2,
        Mask(
            lambda x, p: _widened(x) > float(p["threshold"]),
            _unit,
            lambda p: (float(p["threshold"]),),
        ),
        args=(Arg("threshold"), Arg("value")), inplace=True, integer_inputs=True,
        example={"threshold": 0.3, "value": -2.0},
    ),
    _mask(
        "hardsigmoid", "Hardsigmoid", nn.Hardsigmoid, lambda x, p: F.hardsigmoid(x), 3,
        Mask(
            lambda x, p: (x > -3.0) & (x < 3.0),
            lambda p: (0.0, _ONE_SIXTH_F32),
            lambda p: (-3.0, 3.0),
        ),
        inplace=True,
    ),
    _mask(
        "hardtanh", "Hardtanh", nn.Hardtanh,
        lambda x, p: F.hardtanh(x, p["min_val"], p["max_val"]), 4,
        Mask(_hardtanh_inside, _unit, lambda p: (float(p["min_val"]), float(p["max_val"]))),
        args=(Arg("min_val", -1.0), Arg("max_val", 1.0)), inplace=True, integer_inputs=True,
        example={"min_val": -0.3, "max_val": 0.7}, check=_check_hardtanh,
    ),
    _mask(
        "relu6", "ReLU6", nn.ReLU6, lambda x, p: F.relu6(x), 4,  # the hardtanh kernel on [0, 6]
        Mask(lambda x, p: (x > 0.0) & (x < 6.0), _unit, lambda p: (0.0, 6.0)),
        inplace=True, integer_inputs=True, functions=(F.relu6,),
    ),
    _mask(
        "hardshrink", "Hardshrink", nn.Hardshrink, lambda x, p: F.hardshrink(x, p["lambd"]), 5,
        Mask(_shrink, _unit, lambda p: (-float(p["lambd"]), float(p["lambd"]))),
        args=(Arg("lambd", 0.5),), example={"lambd": 0.3},
    ),
    _mask(
        "softshrink", "Softshrink", nn.Softshrink, lambda x, p: F.softshrink(x, p["lambd"]), 6,
        Mask(_shrink, _unit, lambda p: (-float(p["lambd"]), float(p["lambd"]))),
        args=(Arg("lambd", 0.5),), example={"lambd": 0.3}, check=_check_softshrink,
    ),
    # Continuous: optimal few-bit derivative tables (kernel ids 10..21).
    _table(
        "celu", "CELU", nn.CELU, lambda x, p: F.celu(x, alpha=p["alpha"]), 10,
        args=(Arg("alpha", 1.0),), inplace=True,
    ),
    _table(
        "elu", "ELU", nn.ELU, lambda x, p: F.elu(x, alpha=p["alpha"]), 10,
        args=(Arg("alpha", 1.0),), inplace=True, functions=(F.elu,),
    ),
    Activation(
        "gelu", "GELU", nn.GELU, lambda x, p: F.gelu(x, approximate=p["approximate"]),
        (
            Variant("gelu", 11, {"approximate": "none"}),
            Variant("gelu_tanh", 12, {"approximate": "tanh"}),
        ),
        args=(Arg("approximate", "none"),),
        functions=(F.gelu,),
        transformers={
            "GELUActivation": {"approximate": "none"},
            "NewGELUActivation": {"approximate": "tanh"},
            "GELUTanh": {"approximate": "tanh"},
            "PytorchGELUTanh": {"approximate": "tanh"},
            "FastGELUActivation": {"approximate": "tanh"},
            "AccurateGELUActivation": {"approximate": "tanh"},
        },
    ),
    _table(
        "hardswish", "Hardswish", nn.Hardswish, lambda x, p: F.hardswish(x), 13,
        inplace=True, functions=(F.hardswish,),
    ),
    _table(
        "logsigmoid", "LogSigmoid", nn.LogSigmoid, lambda x, p: F.logsigmoid(x), 14,
        functions=(F.logsigmoid,),
    ),
    _table(
        "mish", "Mish", nn.Mish, lambda x, p: F.mish(x), 15,
        inplace=True, functions=(F.mish,), transformers={"MishActivation": {}},
    ),
    _table(
        "selu", "SELU", nn.SELU, lambda x, p: F.selu(x), 10,
        inplace=True, functions=(F.selu, torch.selu),
    ),
    _table(
        "sigmoid", "Sigmoid", nn.Sigmoid, lambda x, p: torch.sigmoid(x), 16,
        integer_inputs=True, functions=(torch.sigmoid, F.sigmoid),
    ),
    _table(
        "silu", "SiLU", nn.SiLU, lambda x, p: F.silu(x), 17,
        inplace=True, functions=(F.silu,), transformers={"SiLUActivation": {}},
    ),
    _table(
        "softplus", "Softplus", nn.Softplus,
        lambda x, p: F.softplus(x, beta=p["beta"], threshold=p["threshold"]), 18,
        args=(Arg("beta", 1.0), Arg("threshold", 20.0)), functions=(F.softplus,),
    ),
    _table(
        "softsign", "Softsign", nn.Softsign, lambda x, p: F.softsign(x), 19,
        integer_inputs=True, functions=(F.softsign,),
    ),
    _table(
        "tanh", "Tanh", nn.Tanh, lambda x, p: torch.tanh(x), 20,
        integer_inputs=True, functions=(torch.tanh, F.tanh),
    ),
    _table(
        "tanhshrink", "Tanhshrink", nn.Tanhshrink, lambda x, p: F.tanhshrink(x), 21,
        integer_inputs=True, functions=(F.tanhshrink,),
    ),
)  # fmt: skip


def _validate(entries: tuple[Activation, ...]) -> dict[str, Activation]:
    """The entries by name, after checking that they are consistent (raises ValueError)."""
    out: dict[str, Activation] = {}
    variant_names: set[str] = set()
    modules: set[str] = set()
    for e in entries:
        if e.name in out or e.module in modules:
            raise ValueError(f"activation {e.name!r} / class {e.module!r} registered twice")
        if not e.variants:
            raise ValueError(f"{e.name}: at least one variant is needed")
        if e.is_mask and len(e.variants) != 1:
            raise ValueError(f"{e.name}: a mask activation has exactly one variant")
        if not e.is_mask and any(a.default is REQUIRED for a in e.numeric_args):
            raise ValueError(f"{e.name}: a table parameter needs a default (tables ship for it)")
        for v in e.variants:
            _validate_variant(e, v, variant_names)
        if set(e.example) - set(e.arg_names):
            raise ValueError(f"{e.name}: example names unknown arguments")
        for args in e.transformers.values():
            e.params(args)  # raises for unknown or bad arguments
        e.params(e.example)
        out[e.name] = e
        modules.add(e.module)
    return out


def _validate_variant(e: Activation, v: Variant, seen: set[str]) -> None:
    if v.name in seen:
        raise ValueError(f"variant {v.name!r} registered twice")
    seen.add(v.name)
    if set(v.when) - set(e.arg_names):
        raise ValueError(f"{e.name}: variant {v.name!r} selects on unknown arguments")
    if v.kernel is None:
        return
    if not isinstance(v.kernel, int) or isinstance(v.kernel, bool):
        raise ValueError(f"{e.name}: kernel must be an int id or None, got {v.kernel!r}")
    if e.is_mask != (0 <= v.kernel < FIRST_TABLE_KERNEL) or v.kernel < 0:
        kind = "mask" if e.is_mask else "table"
        raise ValueError(f"{e.name}: kernel id {v.kernel} is not a {kind} kernel id")


ACTIVATIONS: Mapping[str, Activation] = _validate(_ENTRIES)
"""Every few-bit activation by functional name (``fewbit.functional.<name>``)."""


def get_activation(name: str) -> Activation:
    """The registry entry of activation ``name`` (its functional name, e.g. ``'gelu'``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


def kernel_ids() -> dict[str, int]:
    """Variant name -> fused-kernel id, for every variant that has a kernel."""
    return {
        v.name: v.kernel for e in ACTIVATIONS.values() for v in e.variants if v.kernel is not None
    }


def kernel_mask_params() -> dict[str, dict[str, float]]:
    """Mask variants with a kernel -> their parameters with defaults (nan: required)."""
    out: dict[str, dict[str, float]] = {}
    for e in ACTIVATIONS.values():
        v = e.variants[0]
        if e.is_mask and v.kernel is not None:
            out[v.name] = {
                a.name: float("nan") if a.default is REQUIRED else float(a.default)
                for a in e.numeric_args
            }
    return out


def table_definitions() -> list[tuple[str, Callable[[Tensor, Params], Tensor], dict[str, float]]]:
    """(table name, forward(x, numeric params), default numeric params) of every table variant,
    sorted by table name: what :mod:`fewbit.approx` builds tables for."""
    out = []
    for e in ACTIVATIONS.values():
        if e.is_mask:
            continue
        defaults = {a.name: float(a.default) for a in e.numeric_args}
        for v in e.variants:
            out.append((v.name, _fixed_forward(e, v), defaults))
    return sorted(out, key=lambda item: item[0])


def _fixed_forward(e: Activation, v: Variant) -> Callable[[Tensor, Params], Tensor]:
    """e's forward with v's selecting arguments fixed."""
    fixed = dict(v.when)

    def forward(x: Tensor, p: Params) -> Tensor:
        return e.forward(x, {**p, **fixed})

    return forward
