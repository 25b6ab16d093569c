"""torch.compile(fullgraph=True) of few-bit activations, modules and functional forms (issue 11
item 2): the table lookup and spec registration run outside the trace, so a model compiles with
no graph break from fewbit even when the trace is the first use of an activation, and matches
eager bit for bit (the custom ops run the same code as eager)."""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch
from torch import Tensor, nn

import fewbit
import fewbit.functional as FB


class _Functional(nn.Module):
    """Linear -> functional few-bit activations -> Linear. ``elu(alpha=0.37, bits=2)`` and the
    custom tanh table are used nowhere else, so the trace is their first use (the table is
    optimised and the spec registered while dynamo traces)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        h = FB.silu(h) + FB.elu(h, alpha=0.37, bits=2) + FB.relu(h)
        h = h + FB.tanh(h, table=([-0.4137, 0.2913, 1.1719], [0.1, 0.7, 0.9, 0.3]))
        return self.b(h)


def _step(forward: Callable[[Tensor], Tensor], model: nn.Module, x: Tensor
          ) -> Tuple[Tensor, List[Tensor]]:
    x = x.detach().requires_grad_(True)
    y = forward(x)
    weights = torch.linspace(-1.0, 1.0, y.shape[-1])  # a non-uniform output gradient
    grads = torch.autograd.grad((y * weights).square().sum(), [x, *model.parameters()])
    return y.detach(), list(grads)


def _compiled_then_eager(model: nn.Module, backend: str
                         ) -> Tuple[Tuple[Tensor, List[Tensor]], Tuple[Tensor, List[Tensor]]]:
    """(compiled step, eager step) on the same input; compiled first, so the trace is the
    first use of the model's activations. fullgraph=True raises on any graph break."""
    torch._dynamo.reset()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    return _step(compiled, model, x), _step(model, model, x)


def _assert_identical(got: Tuple[Tensor, List[Tensor]], ref: Tuple[Tensor, List[Tensor]]) -> None:
    assert torch.equal(got[0], ref[0]), "forward differs from eager"
    for g, r in zip(got[1], ref[1]):
        assert torch.equal(g, r), f"gradient differs from eager by {(g - r).abs().max():.3g}"


def test_module_fullgraph_aot_eager_matches_eager_bitwise() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), fewbit.GELU(bits=4), nn.Linear(16, 8))
    got, ref = _compiled_then_eager(model, "aot_eager")
    _assert_identical(got, ref)
    # the few-bit backward really ran: the input gradient is not torch's exact GELU one
    exact = nn.Sequential(model[0], nn.GELU(), model[2])
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))  # the same input
    _, exact_grads = _step(exact, exact, x)
    assert not torch.equal(got[1][0], exact_grads[0])


def test_functional_fullgraph_aot_eager_matches_eager_bitwise() -> None:
    torch.manual_seed(0)
    model = _Functional()
    got, ref = _compiled_then_eager(model, "aot_eager")
    _assert_identical(got, ref)


def test_module_fullgraph_inductor_matches_eager() -> None:
    """Default backend: the activation is the same custom op; Inductor's fused Linear kernels may
    sum in another order, so outputs and gradients agree within fp32 reassociation (a few ulp
    of the largest magnitude: rtol 1e-5, atol 1e-5 * max)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), fewbit.SiLU(), nn.Linear(16, 8))
    got, ref = _compiled_then_eager(model, "inductor")
    for g, r in zip([got[0], *got[1]], [ref[0], *ref[1]]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())
