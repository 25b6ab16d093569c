"""Few-bit activation modules: drop-in subclasses of the torch.nn activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fewbit
import fewbit.modules as M
from fewbit.approx.registry import ACTIVATIONS
from fewbit.functional.fewbit_fn import side_store_nbytes

# One case per registry variant with its example arguments, plus non-default parameters of the
# table activations (their tables are built on demand).
PAIRS = [
    (M.activations.few_bit_class(e.name), e.torch_module, {**e.example, **v.when})
    for e in ACTIVATIONS.values()
    for v in e.variants
] + [
    (M.CELU, nn.CELU, {"alpha": 1.5}),
    (M.ELU, nn.ELU, {"alpha": 2.0}),
    (M.Softplus, nn.Softplus, {"beta": 2.0, "threshold": 10.0}),
]


def test_pairs_cover_the_registry() -> None:
    assert {p[0] for p in PAIRS} == {getattr(M, e.module) for e in ACTIVATIONS.values()}
    assert len(PAIRS) == 25  # 21 activations, GELU twice, three non-default parameter sets


def _id(p: tuple) -> str:
    return p[0].__name__ + "".join(f"-{v}" for v in p[2].values())


@pytest.mark.parametrize("pair", PAIRS, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_is_drop_in(pair: tuple, dtype: torch.dtype) -> None:
    ours_cls, torch_cls, kwargs = pair
    ours, ref = ours_cls(**kwargs), torch_cls(**kwargs)
    assert isinstance(ours, torch_cls)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert "bits=" in repr(ours) and repr(ref)[:-1].split("(", 1)[1] in repr(ours)
    x = torch.randn(4, 33, dtype=dtype, requires_grad=True)
    y = ours(x)
    assert torch.equal(y.detach(), ref(x.detach()))
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype


@pytest.mark.parametrize("pair", PAIRS, ids=_id)
def test_inplace_accepted_and_ignored(pair: tuple) -> None:
    ours_cls, torch_cls, kwargs = pair
    if "inplace" not in torch_cls.__init__.__code__.co_varnames:
        pytest.skip("torch's module takes no inplace")
    m = ours_cls(**kwargs, inplace=True)
    x = torch.randn(10)
    before = x.clone()
    m(x)
    assert torch.equal(x, before)


def test_exported_from_top_level() -> None:
    for ours_cls, _, _ in PAIRS:
        assert getattr(fewbit, ours_cls.__name__) is ours_cls


def test_default_bits() -> None:
    assert fewbit.GELU().bits == 3 and fewbit.ReLU().bits == 1
    assert fewbit.GELU(bits=2).bits == 2


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        fewbit.GELU(bits=bits)
    with pytest.raises(ValueError, match="bits"):
        fewbit.ReLU(bits=bits)


def test_gelu_rejects_positional_bits_clearly() -> None:
    with pytest.raises(ValueError, match="approximate"):
        fewbit.GELU(3)  # type: ignore[arg-type]


def test_bits_used_by_forward() -> None:
    """A module's bits reach the saved code: 2-bit GELU stores n*2/8 bytes."""
    sizes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.untyped_storage().nbytes())
        return t

    x = torch.randn(64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fewbit.GELU(bits=2)(x)
    # the 2-bit code, then the fixed-size non-finite side store (its size depends on n only)
    assert sizes[0] == 64 * 2 // 8
    assert sum(sizes) == 64 * 2 // 8 + side_store_nbytes(64)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_inputs_follow_torch(dtype: torch.dtype) -> None:
    """fewbit.ReLU keeps integers, Tanh and Sigmoid promote to float, as torch.nn does."""
    x = torch.tensor([-2, 0, 3, 5]).to(dtype)
    for ours, ref in [(fewbit.ReLU(), nn.ReLU()), (fewbit.Tanh(), nn.Tanh()),
                      (fewbit.Sigmoid(), nn.Sigmoid()), (fewbit.ReLU6(), nn.ReLU6())]:
        y, r = ours(x), ref(x)
        assert y.dtype == r.dtype and torch.equal(y, r)


def test_bf16_autocast_output_dtype_equals_torch() -> None:
    x = torch.randn(8, 16, requires_grad=True)
    lin = nn.Linear(16, 16)
    with torch.autocast("cpu", torch.bfloat16):
        h = lin(x)  # bf16 under autocast
        y, r = fewbit.GELU()(h), nn.GELU()(h.detach())
        y32, r32 = fewbit.SiLU()(x), nn.SiLU()(x.detach())
    assert y.dtype == r.dtype == torch.bfloat16 and torch.equal(y.detach(), r)
    assert y32.dtype == r32.dtype == torch.float32 and torch.equal(y32.detach(), r32)
    (y.float().sum() + y32.sum()).backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
