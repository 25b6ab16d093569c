"""RandomizedLinear / LinearGRP / LinearCRS / RandomizedConv1D as nn.Linear drop-ins."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewbit.modules.linear import LinearCRS, LinearGRP, RandomizedConv1D, RandomizedLinear
from fewbit.util import memory_usage_hooks


def test_is_a_linear_with_the_same_state() -> None:
    torch.manual_seed(0)
    ref = nn.Linear(12, 5)
    torch.manual_seed(0)
    m = RandomizedLinear(12, 5, proj_dim_ratio=0.25)
    assert isinstance(m, nn.Linear) and LinearGRP is RandomizedLinear
    assert list(m.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    assert torch.equal(m.weight, ref.weight)  # same initialisation as nn.Linear
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 12)
    assert torch.equal(m(x), ref(x))


def test_published_constructor_signature() -> None:
    gen = torch.Generator().manual_seed(0)
    m = RandomizedLinear(8, 4, True, "cpu", torch.float64, 0.3, None, 2, 50, "rademacher", gen)
    assert m.weight.dtype == torch.float64 and m.matmul == "rademacher"
    assert (m.proj_dim_ratio, m.proj_dim_min, m.proj_dim_max) == (0.3, 2, 50)
    assert m.generator is gen
    text = repr(m)
    assert "proj_dim_ratio=0.3" in text and "matmul='rademacher'" in text
    assert "proj_dim=7" in repr(RandomizedLinear(8, 4, bias=False, proj_dim=7))
    assert "proj_dim_ratio=0.5" in repr(RandomizedLinear(8, 4))  # documented default


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"proj_dim": 0}, ValueError, "proj_dim"),
        ({"proj_dim_ratio": -0.1}, ValueError, "proj_dim_ratio"),
        ({"proj_dim_ratio": 2}, ValueError, "proj_dim_ratio"),
        ({"proj_dim_min": 9, "proj_dim_max": 3}, ValueError, "proj_dim_min"),
        ({"matmul": "dft"}, ValueError, "matmul"),
        ({"generator": "cpu"}, TypeError, "generator"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        RandomizedLinear(4, 4, **kwargs)


@pytest.mark.parametrize("matmul", ["gaussian", "rademacher", "countsketch", "sampling"])
def test_module_saves_the_sketch_only(matmul: str) -> None:
    m = RandomizedLinear(32, 16, proj_dim_ratio=0.25, matmul=matmul)
    x = torch.randn(8, 16, 32)  # N = 128 -> k = 32
    with memory_usage_hooks(exclude=m.parameters()) as usage:
        y = m(x)
    extra = 8 * 32 if matmul == "sampling" else 8  # int64 indices, else the int64 seed key
    assert usage.unique == 32 * 32 * 4 + extra  # vs 128 * 32 * 4 for nn.Linear
    y.square().mean().backward()
    assert m.weight.grad is not None and m.bias is not None and m.bias.grad is not None


def test_training_step_matches_linear_when_exact() -> None:
    torch.manual_seed(1)
    ref = nn.Linear(6, 3)
    m = RandomizedLinear(6, 3, proj_dim=1000)  # k clamps to N: exact gradient
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 5, 6)
    ref(x).square().sum().backward()
    m(x).square().sum().backward()
    assert torch.allclose(m.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(m.bias.grad, ref.bias.grad)


def test_generator_module_reproducible_and_private() -> None:
    def run() -> torch.Tensor:
        torch.manual_seed(0)
        m = RandomizedLinear(8, 4, proj_dim=2, generator=torch.Generator().manual_seed(5))
        state = torch.get_rng_state()
        m(torch.ones(10, 8)).sum().backward()
        assert torch.equal(state, torch.get_rng_state())
        assert m.weight.grad is not None
        return m.weight.grad

    assert torch.equal(run(), run())


def test_crs_module() -> None:
    m = LinearCRS(10, 4)
    assert isinstance(m, nn.Linear) and m.proj_dim == 5  # default in_features // 2
    assert "proj_dim=5" in repr(m)
    x = torch.randn(7, 10)
    assert torch.equal(m(x), F.linear(x, m.weight, m.bias))
    with memory_usage_hooks(exclude=m.parameters()) as usage:
        y = m(x)
    assert usage.unique <= 7 * 5 * 4 + 5 * 8  # <= proj_dim columns + their int64 indices
    y.sum().backward()
    assert LinearCRS(10, 4, proj_dim=3).proj_dim == 3
    with pytest.raises(ValueError, match="proj_dim"):
        LinearCRS(10, 4, proj_dim=0)


def test_conv1d_matches_transformers() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    ref = Conv1D(6, 10)
    m = RandomizedConv1D(6, 10, proj_dim_ratio=0.5)
    assert list(m.state_dict()) == list(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 10, requires_grad=True)
    assert torch.equal(m(x), ref(x))
    g = torch.randn(3, 5, 6)
    got = torch.autograd.grad(m(x), [x, m.bias], g)
    want = torch.autograd.grad(ref(x), [x, ref.bias], g)
    assert torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert torch.allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
    assert "nf=6, nx=10" in repr(m)
