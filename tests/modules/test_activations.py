"""Few-bit activation modules: drop-in subclasses of the torch.nn activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fewbit
import fewbit.modules as M

PAIRS = [
    (M.ReLU, nn.ReLU, {}),
    (M.LeakyReLU, nn.LeakyReLU, {"negative_slope": 0.1}),
    (M.Threshold, nn.Threshold, {"threshold": 0.1, "value": 20.0}),
    (M.Hardsigmoid, nn.Hardsigmoid, {}),
    (M.Hardtanh, nn.Hardtanh, {"min_val": -2.0, "max_val": 2.0}),
    (M.ReLU6, nn.ReLU6, {}),
    (M.Hardshrink, nn.Hardshrink, {"lambd": 0.3}),
    (M.Softshrink, nn.Softshrink, {"lambd": 0.3}),
    (M.CELU, nn.CELU, {"alpha": 1.5}),
    (M.ELU, nn.ELU, {"alpha": 2.0}),
    (M.GELU, nn.GELU, {}),
    (M.GELU, nn.GELU, {"approximate": "tanh"}),
    (M.Hardswish, nn.Hardswish, {}),
    (M.LogSigmoid, nn.LogSigmoid, {}),
    (M.Mish, nn.Mish, {}),
    (M.SELU, nn.SELU, {}),
    (M.Sigmoid, nn.Sigmoid, {}),
    (M.SiLU, nn.SiLU, {}),
    (M.Softplus, nn.Softplus, {"beta": 2.0, "threshold": 10.0}),
    (M.Softsign, nn.Softsign, {}),
    (M.Tanh, nn.Tanh, {}),
    (M.Tanhshrink, nn.Tanhshrink, {}),
]


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
    assert sum(sizes) == 64 * 2 // 8
