"""Every entry of the activation registry, end to end: functional form, module class, gradient,
conversion map, shipped tables, fused-kernel id, integer inputs and autocast.

Adding an activation to :mod:`fewbit.approx.registry` adds it to every test here; a missing
functional form, module class, export, table or kernel id fails one of them.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fewbit
import fewbit.functional as FB
import fewbit.modules as M
from fewbit.approx import get_table, store
from fewbit.approx import registry as R
from fewbit.approx.registry import ACTIVATIONS, Activation, Variant
from fewbit.codecs import pack
from fewbit.functional import activations as FA
from fewbit.modules.activations import conversion_map, few_bit_class

VARIANTS = [(e, v) for e in ACTIVATIONS.values() for v in e.variants]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _vid(item: tuple[Activation, Variant]) -> str:
    return item[1].name


def _kwargs(entry: Activation, variant: Variant) -> dict:
    """The entry's example arguments (non-default values) with the variant's selectors."""
    return {**entry.example, **variant.when}


def _inputs(entry: Activation, variant: Variant, dtype: torch.dtype) -> Tensor:
    """Random values plus, for masks, the kinks and their neighbours in ``dtype``."""
    base = (torch.randn(301, dtype=torch.float64) * 3).to(dtype)
    if entry.mask is None:
        return base
    params = entry.float_params(entry.params(_kwargs(entry, variant)))
    kinks = torch.tensor(entry.mask.kinks(params), dtype=torch.float64).to(dtype)
    inf = torch.full_like(kinks, float("inf"))
    return torch.cat([base, kinks, kinks.nextafter(inf), kinks.nextafter(-inf)])


def test_registry_lists_the_twenty_one_activations() -> None:
    assert len(ACTIVATIONS) == 21 and len(VARIANTS) == 22  # gelu: exact and tanh tables
    assert len({e.module for e in ACTIVATIONS.values()}) == 21


# --- functional form ---------------------------------------------------------------------------


@pytest.mark.parametrize("item", VARIANTS, ids=_vid)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_form_equals_torch_bitwise(item: tuple, dtype: torch.dtype) -> None:
    entry, variant = item
    fn = getattr(FB, entry.name)
    assert entry.name in FB.__all__
    kwargs = _kwargs(entry, variant)
    x = _inputs(entry, variant, dtype).requires_grad_(True)
    y = fn(x, **kwargs)
    ref = entry.torch_module(**kwargs)(x.detach())
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.equal(y.detach(), ref)
    assert y.grad_fn is not None and type(y.grad_fn).__name__.startswith("FewBit")


@pytest.mark.parametrize("item", VARIANTS, ids=_vid)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient(item: tuple, dtype: torch.dtype) -> None:
    """Masks: torch's gradient exactly (kinks included). Tables: grad * levels[code], with the
    shipped table of the variant, multiplied in float32 and rounded once (exact)."""
    entry, variant = item
    kwargs = _kwargs(entry, variant)
    x = _inputs(entry, variant, dtype)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    xa = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(getattr(FB, entry.name)(xa, **kwargs), xa, g)
    assert gx.dtype == dtype
    if entry.mask is not None:
        xb = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(entry.torch_module(**kwargs)(xb), xb, g)
        assert torch.equal(gx, ref)
        return
    numeric = entry.float_params(entry.params(kwargs))
    table = get_table(variant.name, 3, numeric)
    lut = torch.tensor(table.levels, dtype=torch.float32)
    assert torch.equal(gx, (g.float() * lut[table.encode(x).long()]).to(dtype))


@pytest.mark.parametrize("item", VARIANTS, ids=_vid)
def test_tables_shipped_for_every_table_variant(item: tuple) -> None:
    entry, variant = item
    data = store.load_data()
    for bits in range(1, 9):
        assert ((variant.name, bits) in data) != entry.is_mask


# --- module class ----------------------------------------------------------------------------


@pytest.mark.parametrize("item", VARIANTS, ids=_vid)
def test_module_subclasses_torch_with_same_constructor(item: tuple) -> None:
    entry, variant = item
    cls = few_bit_class(entry.name)
    assert cls.__name__ == entry.module and cls.activation_entry is entry
    assert issubclass(cls, entry.torch_module)
    assert getattr(fewbit, entry.module) is cls and getattr(M, entry.module) is cls
    kwargs = _kwargs(entry, variant)
    positional = [kwargs.get(a.name, a.default) for a in entry.args]
    if entry.inplace:
        positional.append(False)
    ours, ref = cls(*positional), entry.torch_module(*positional)  # torch's argument order
    for name in entry.module_attributes:
        assert getattr(ours, name) == getattr(ref, name)
    assert ours.bits == entry.default_bits
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = _inputs(entry, variant, torch.float32).requires_grad_(True)
    y = ours(x)
    assert torch.equal(y.detach(), ref(x.detach())) and y.grad_fn is not None


# --- conversion map --------------------------------------------------------------------------


@pytest.mark.parametrize("item", VARIANTS, ids=_vid)
def test_conversion_map_round_trip(item: tuple) -> None:
    """torch module -> few-bit module (same class family, same attributes, same forward) and
    back: the few-bit module is still an instance of the source class."""
    entry, variant = item
    cmap = conversion_map()
    source = entry.torch_module(**_kwargs(entry, variant))
    conversion = cmap.modules[entry.torch_module]
    new = conversion.target(**conversion.kwargs(source))
    assert type(new) is few_bit_class(entry.name) and isinstance(new, type(source))
    for name in entry.module_attributes:
        assert getattr(new, name) == getattr(source, name)
    x = _inputs(entry, variant, torch.float32)
    assert torch.equal(new(x), source(x))
    for fn in entry.functions:
        target = cmap.functions[fn].target
        assert target is few_bit_class(entry.name)
        assert torch.equal(target()(x), fn(x))


def test_conversion_map_covers_exactly_the_registry() -> None:
    cmap = conversion_map()
    assert set(cmap.modules) == {e.torch_module for e in ACTIVATIONS.values()}
    names = {n for e in ACTIVATIONS.values() for n in e.transformers}
    assert set(cmap.transformers) == names >= {"GELUActivation", "NewGELUActivation"}


def test_transformers_classes_compute_the_same_function() -> None:
    activations = pytest.importorskip("transformers.activations")
    x = torch.linspace(-8, 8, 2001)
    for name, conversion in conversion_map().transformers.items():
        cls = getattr(activations, name, None)
        if cls is None:  # renamed or removed in this transformers version
            continue
        new = conversion.target(**conversion.kwargs())
        # Written-out tanh-GELU formulas differ from F.gelu(approximate='tanh') by float32
        # rounding of the polynomial (a few ulp of values <= 8).
        assert torch.allclose(cls()(x), new(x), rtol=1e-5, atol=1e-6), name


# --- kernels ---------------------------------------------------------------------------------


def test_every_variant_states_its_kernel() -> None:
    """Each variant's kernel is an int id or None (PyTorch path), never left out."""
    assert inspect.signature(Variant).parameters["kernel"].default is inspect.Parameter.empty
    for entry, variant in VARIANTS:
        if variant.kernel is None:
            continue
        assert isinstance(variant.kernel, int)
        assert (variant.kernel < R.FIRST_TABLE_KERNEL) == entry.is_mask


def test_kernel_module_reads_ids_and_mask_params_from_registry() -> None:
    kernels = pytest.importorskip("fewbit.kernels.activations")
    assert kernels._IDS == R.kernel_ids()
    masks = {v.name for e, v in VARIANTS if e.is_mask and v.kernel is not None}
    assert set(kernels.MASKED) == masks


@pytest.mark.parametrize("item", [i for i in VARIANTS if i[1].kernel is not None], ids=_vid)
def test_kernel_id_computes_the_entry(item: tuple) -> None:
    """The fused kernel's branch for the variant's id computes torch's forward (within the
    kernels' few-ulp float32 formulas) and the same codes as the PyTorch path."""
    kernels = pytest.importorskip("fewbit.kernels.activations")
    entry, variant = item
    params = entry.params(_kwargs(entry, variant))
    numeric = entry.float_params(params)
    x = _inputs(entry, variant, torch.float32)
    if entry.mask is not None:
        y, packed = kernels.activation_forward(x, variant.name, numeric)
        codes, bits = entry.mask.inside(x, numeric).to(torch.uint8), 1
    else:
        table = get_table(variant.name, 3, numeric)
        y, packed = kernels.activation_forward(
            x, variant.name, numeric, table.boundaries, table.symmetric, 3
        )
        codes, bits = table.encode(x), 3
    ref = entry.forward(x, params)
    # float32 formulas with IEEE division: a few ulp of values of magnitude <= 10.
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(packed, pack(codes, bits))


def test_variant_without_kernel_runs_the_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry whose variant has kernel=None hands the op core no kernel name (PyTorch path
    on every device) and still computes torch's output and the table gradient."""
    entry = dataclasses.replace(ACTIVATIONS["tanh"], variants=(Variant("tanh", None),))
    seen = []
    real = FA.apply_fewbit

    def spy(x: Tensor, spec: object) -> Tensor:
        seen.append(spec)
        return real(x, spec)

    monkeypatch.setattr(FA, "apply_fewbit", spy)
    x = torch.randn(50, requires_grad=True)
    y = FA.apply_activation(entry, x)
    assert seen[0].kernel is None and torch.equal(y.detach(), torch.tanh(x.detach()))
    (gx,) = torch.autograd.grad(y.sum(), x)
    table = get_table("tanh", 3)
    assert torch.equal(gx, torch.tensor(table.levels)[table.encode(x.detach()).long()])


def _mask_entry(**changes: object) -> Activation:
    return dataclasses.replace(ACTIVATIONS["relu"], **changes)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ((ACTIVATIONS["relu"], ACTIVATIONS["relu"]), "twice"),
        ((_mask_entry(variants=(Variant("relu", 12),)),), "not a mask kernel id"),
        ((_mask_entry(variants=(Variant("relu", True),)),), "int id or None"),
        ((dataclasses.replace(ACTIVATIONS["gelu"], variants=(Variant("g", 3),)),), "table"),
        ((_mask_entry(variants=()),), "at least one variant"),
        ((_mask_entry(example={"slope": 1.0}),), "unknown arguments"),
    ],
)
def test_validation_rejects_inconsistent_entries(entries: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        R._validate(entries)


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="approximate"):
        FB.gelu(torch.randn(3), approximate="fast")
    with pytest.raises(TypeError, match="threshold"):
        R.get_activation("threshold").params({})
    with pytest.raises(ValueError, match="unknown activation"):
        R.get_activation("swish")


# --- integer inputs (issue 11 item 10) and autocast --------------------------------------------


@pytest.mark.parametrize("entry", list(ACTIVATIONS.values()), ids=lambda e: e.name)
def test_integer_inputs_flag_matches_torch(entry: Activation) -> None:
    """``integer_inputs`` is True exactly where torch's module accepts an int64 tensor, and the
    few-bit module then returns torch's output and dtype (relu: int64; tanh: float32)."""
    kwargs = _kwargs(entry, entry.variants[0])
    x = torch.tensor([-3, -1, 0, 1, 2, 7])
    try:
        ref = entry.torch_module(**kwargs)(x)
    except (RuntimeError, NotImplementedError):
        assert not entry.integer_inputs
        with pytest.raises(TypeError, match="input"):
            few_bit_class(entry.name)(**kwargs)(x)
        return
    assert entry.integer_inputs
    y = few_bit_class(entry.name)(**kwargs)(x)
    assert y.dtype == ref.dtype and torch.equal(y, ref)


@pytest.mark.parametrize("item", VARIANTS, ids=_vid)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bf16_autocast_on_cpu_matches_torch(item: tuple, dtype: torch.dtype) -> None:
    entry, variant = item
    kwargs = _kwargs(entry, variant)
    x = _inputs(entry, variant, dtype).requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16):
        y = few_bit_class(entry.name)(**kwargs)(x)
        ref = entry.torch_module(**kwargs)(x.detach())
    assert y.dtype == ref.dtype and torch.equal(y.detach(), ref)
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    assert gx.dtype == dtype


def test_autocast_casts_the_input_as_for_torch_op() -> None:
    """An op autocast runs in lower precision (CPU: prelu in bf16) gets its input cast first:
    output dtype and gradient equal torch's (levels 0.25 and 1 multiply exactly)."""
    weight = torch.tensor([0.25])
    entry = dataclasses.replace(
        ACTIVATIONS["relu"],
        name="prelu_test",
        forward=lambda x, p: F.prelu(x, weight.to(x.dtype)),
        mask=R.Mask(lambda x, p: x > 0, lambda p: (0.25, 1.0), lambda p: (0.0,)),
        variants=(Variant("prelu_test", None),),
    )
    x = torch.randn(64, requires_grad=True)
    g = torch.randn(64)
    with torch.autocast("cpu", torch.bfloat16):
        y = FA.apply_activation(entry, x)
        ref = F.prelu(x, weight)
    assert ref.dtype == torch.bfloat16 and y.dtype == ref.dtype
    assert torch.equal(y.detach(), ref.detach())
    (gx,) = torch.autograd.grad(y, x, g.bfloat16())
    (gr,) = torch.autograd.grad(ref, x, g.bfloat16())
    assert gx.dtype == torch.float32 and torch.equal(gx, gr)


def test_module_bits_default_comes_from_the_registry() -> None:
    for entry in ACTIVATIONS.values():
        kwargs = _kwargs(entry, entry.variants[0])
        assert few_bit_class(entry.name)(**kwargs).bits == entry.default_bits
        assert few_bit_class(entry.name)(**kwargs, bits=2).bits == 2


def test_nn_subclass_not_converted_is_not_in_map() -> None:
    """The map is keyed by exact torch classes; a user subclass is not listed."""

    class MyGELU(nn.GELU):
        pass

    assert MyGELU not in conversion_map().modules


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_follows_torch_op_policy() -> None:
    """CUDA autocast runs softplus in float32: the few-bit op (kernel path) does the same."""
    x = torch.randn(4096, device="cuda", dtype=torch.float16, requires_grad=True)
    with torch.autocast("cuda", torch.float16):
        y = fewbit.Softplus()(x)
        ref = nn.Softplus()(x.detach())
    assert y.dtype == ref.dtype == torch.float32
    # Kernel path: float32 formulas within a few ulp of torch's.
    assert torch.allclose(y.detach(), ref, rtol=1e-5, atol=1e-6)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.dtype == torch.float16


@pytest.mark.parametrize("entry", list(ACTIVATIONS.values()), ids=lambda e: e.name)
def test_meta_tensors_propagate_shapes(entry: Activation) -> None:
    """Without a gradient, meta inputs give torch's meta output (autocast on or off: autocast
    has no meta backend, so the dtype probe must not ask it)."""
    kwargs = _kwargs(entry, entry.variants[0])
    x = torch.empty(3, 5, device="meta", dtype=torch.bfloat16)
    for cast in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=cast):
            y = few_bit_class(entry.name)(**kwargs)(x)
        ref = entry.torch_module(**kwargs)(x)
        assert y.device.type == "meta" and y.shape == ref.shape and y.dtype == ref.dtype


@pytest.mark.parametrize("item", VARIANTS, ids=_vid)
def test_without_grad_only_torch_op_runs(item: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """No gradient needed (no_grad, or an input that does not require it): the op core and
    the table lookup are never reached; the output is torch's (issue 11 item 1)."""
    entry, variant = item

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("reached the few-bit path without a gradient")

    monkeypatch.setattr(FA, "apply_fewbit", fail)
    monkeypatch.setattr(FA, "get_table", fail)
    kwargs = _kwargs(entry, variant)
    x = _inputs(entry, variant, torch.float32)
    ref = entry.torch_module(**kwargs)(x)
    assert torch.equal(getattr(FB, entry.name)(x, **kwargs), ref)
    with torch.no_grad():
        y = few_bit_class(entry.name)(**kwargs)(x.clone().requires_grad_(True))
    assert torch.equal(y, ref) and y.grad_fn is None


def test_every_module_class_and_function_is_registered() -> None:
    """A few-bit class or functional form written without a registry entry is caught."""
    from fewbit.modules import activations as MA

    classes = {
        c for c in vars(MA).values()
        if isinstance(c, type) and issubclass(c, MA.FewBitActivationModule)
    } - {MA.FewBitActivationModule}  # fmt: skip
    assert classes == {few_bit_class(name) for name in ACTIVATIONS}
    functions = set(FA.__all__) - {"activation", "apply_activation"}
    assert functions == set(ACTIVATIONS)


def test_modules_pickle_and_deepcopy() -> None:
    import copy
    import pickle

    m = nn.Sequential(fewbit.GELU(approximate="tanh", bits=2), fewbit.LeakyReLU(0.2))
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert clone[0].bits == 2 and clone[0].approximate == "tanh"
        assert clone[0].activation_entry is ACTIVATIONS["gelu"]
        x = torch.randn(10)
        assert torch.equal(clone(x), m(x))
