"""fewbit.util: map_module, convert_linear and the memory helpers."""

import pytest
import torch
from torch import nn

from fewbit.modules.linear import RandomizedLinear
from fewbit.util import (
    convert_linear,
    estimate_memory_usage,
    map_module,
    memory_usage_hooks,
    teniter,
    traverse,
)


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Sequential(nn.Linear(16, 16, bias=False), nn.Tanh()),
        nn.Linear(16, 2),
    )


def test_published_readme_example_verbatim() -> None:
    old_model = _model()
    params = list(old_model.parameters())
    # --- README (published FewBit), verbatim ---
    from fewbit import RandomizedLinear  # noqa: F401  (needs the export in fewbit/__init__.py)
    from fewbit.util import convert_linear, map_module

    converter = lambda x: convert_linear(x, RandomizedLinear, proj_dim_ratio=0.1)  # noqa: E731
    new_model = map_module(old_model, converter)  # In-place model construction.
    # ---
    assert new_model is old_model
    linears = [m for m in new_model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and all(isinstance(m, RandomizedLinear) for m in linears)
    assert all(m.proj_dim_ratio == 0.1 for m in linears)
    assert all(a is b for a, b in zip(params, new_model.parameters()))


def test_convert_linear_shares_parameters_and_optimizer_state() -> None:
    lin = nn.Linear(4, 3).double()
    lin.eval()
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    lin(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    new = convert_linear(lin, RandomizedLinear, proj_dim=2)
    assert isinstance(new, RandomizedLinear) and not new.training
    assert new.weight is lin.weight and new.bias is lin.bias
    assert new.weight.dtype == torch.float64 and new.proj_dim == 2
    before = new.weight.detach().clone()
    opt.zero_grad()
    new(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    opt.step()  # the optimizer still holds (and updates) the very same Parameter
    assert not torch.equal(before, new.weight)
    no_bias = convert_linear(nn.Linear(4, 3, bias=False), RandomizedLinear)
    assert isinstance(no_bias, RandomizedLinear) and no_bias.bias is None


def test_convert_linear_leaves_others_and_checks_ctor() -> None:
    relu = nn.ReLU()
    assert convert_linear(relu, RandomizedLinear) is relu
    already = RandomizedLinear(3, 3)
    assert convert_linear(already, RandomizedLinear) is already
    with pytest.raises(TypeError, match="ctor"):
        convert_linear(nn.Linear(2, 2), lambda **kw: nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ctor"):
        convert_linear(nn.Linear(2, 2), int)  # type: ignore[arg-type]


def test_map_module_paths_patterns_and_arity() -> None:
    model = _model()
    seen: list[str] = []

    def visit(module: nn.Module, path: str) -> nn.Module:
        seen.append(path)
        return module

    map_module(model, visit)
    assert seen == ["/0", "/1", "/2/0", "/2/1", "/2", "/3", "/"]  # children first, root last
    seen.clear()
    map_module(model, visit, patt=r"^/2/")  # published slashed spelling
    assert seen == ["/2/0", "/2/1"]
    seen.clear()
    map_module(model, visit, patt=r"^2\.")  # dotted spelling, as in named_modules
    assert seen == ["/2/0", "/2/1"]
    one_arg: list[str] = []
    map_module(model, lambda m: one_arg.append(type(m).__name__) or m, patt=r"^/3$")
    assert one_arg == ["Linear"]


def test_map_module_replaces_and_keeps_sharing() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    map_module(model, lambda m: convert_linear(m, RandomizedLinear))
    assert isinstance(model[0], RandomizedLinear) and model[0] is model[2]
    root = map_module(nn.Linear(2, 2), lambda m: convert_linear(m, RandomizedLinear))
    assert isinstance(root, RandomizedLinear)  # the root itself may be replaced
    with pytest.raises(TypeError, match="func must return an nn.Module"):
        map_module(model, lambda m: None)  # type: ignore[arg-type, return-value]


def test_memory_usage_hooks_counts_saved_tensors() -> None:
    lin = nn.Linear(8, 16)
    x = torch.randn(10, 8)
    with memory_usage_hooks(exclude=lin.parameters()) as usage:
        y = torch.relu(lin(x))
    # nn.Linear saves its input (10x8 fp32), ReLU its output (10x16 fp32); weight excluded.
    assert usage.unique == (10 * 8 + 10 * 16) * 4
    assert usage.forward is not None and usage.forward >= usage.unique
    y.sum().backward()
    assert usage.backward is not None and usage.value == usage.backward


def test_traverse_teniter_estimate() -> None:
    w = torch.randn(16, 8, requires_grad=True)
    x = torch.randn(10, 8)
    y = torch.relu(x @ w.t())
    met: list[bool] = []
    traverse(y, lambda node, t, saved: met.append(saved))
    assert True in met and False in met  # saved tensors and the leaf w
    saved = list(teniter(y, include_ordinary=False, include_saved=True))
    assert any(t.shape == (10, 16) for t in saved)  # relu's result
    leaves = list(teniter(y))
    assert any(t is w for t in leaves)
    assert estimate_memory_usage(y, saved_only=True) == sum(
        t.numel() * t.element_size() for t in saved)
    # Issue 11 item 9: without saved_only the published function counts the leaves only
    # (here w); this test used to assert leaves + saved tensors.
    assert estimate_memory_usage(y) == 16 * 8 * 4


def test_estimate_memory_usage_matches_published_fewbit() -> None:
    # The published FewBit's own test case: input and parameters, 4 bytes each.
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 1))
    xs = torch.randn(3, 8).requires_grad_()
    assert estimate_memory_usage(model(xs)) == 4 * (3 * 8 + 4 * 8 + 4 + 1 * 4 + 1) == 260
    # Without a gradient for the input only the parameters are leaves.
    assert estimate_memory_usage(model(torch.randn(3, 8))) == 4 * (4 * 8 + 4 + 4 + 1)
    # saved_only: a ReLU between the layers adds its (3, 4) output, as published.
    relu = nn.Sequential(model[0], nn.ReLU(), model[1])
    diff = estimate_memory_usage(relu(xs), True) - estimate_memory_usage(model(xs), True)
    assert diff == 3 * 4 * 4
