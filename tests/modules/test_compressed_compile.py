"""torch.compile(fullgraph=True) of compressed Linear and LayerNorm layers (issue 11 item 2):
under a trace such a layer runs one autograd Function whose quantizer is the custom ops
``fewbit::quantize``/``dequantize`` instead of saved-tensor hooks (which a graph cannot hold),
so an MLP converted by ``QModule`` (L1, L2) compiles with no graph break, matches eager bit for bit
under the same seed (same seed draw, same codes, same backward ops) and keeps the quantized
input instead of the full-precision one."""

from __future__ import annotations

from typing import Callable, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import fewbit
from fewbit.modules.compressed import SavedBytesMeter

IN, HIDDEN, ROWS = 32, 256, 64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, IN), nn.LayerNorm(IN)
    )


def _step(forward: Callable[[Tensor], Tensor], model: nn.Module, x: Tensor
          ) -> Tuple[Tensor, List[Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(5)  # the quantizer's seeds come from the global RNG
    y = forward(x)
    (y * torch.linspace(-1.0, 1.0, IN)).square().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


def _saved_bytes(forward: Callable[[Tensor], Tensor], model: nn.Module, x: Tensor) -> int:
    """Bytes kept for backward (parameters excluded): SavedBytesMeter sees the eager layer's
    records through fewbit's observers and a compiled graph's saved tensors as plain ones."""
    with SavedBytesMeter(exclude=list(model.parameters())) as meter:
        forward(x.detach().requires_grad_(True))
    return meter.total


@pytest.mark.parametrize("level", ["L1", "L2"])
def test_qmodule_mlp_fullgraph_matches_eager_bitwise(level: str) -> None:
    """L1: 4-bit Linear layers (LayerNorm kept exact); L2: 4-bit Linear and LayerNorm."""
    model = fewbit.QModule(_mlp(), level=level)
    compressed = (nn.Linear, nn.LayerNorm) if level == "L2" else (nn.Linear,)
    assert all(isinstance(m, fewbit.modules.compressed.CompressedLayer)
               for m in model.modules() if isinstance(m, compressed))
    x = torch.randn(ROWS, IN, generator=torch.Generator().manual_seed(1))
    eager = _step(model, model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # raises on a break
    got = _step(compiled, model, x)
    assert torch.equal(got[0], eager[0]), "forward differs from eager"
    for g, r in zip(got[1], eager[1]):
        assert torch.equal(g, r), f"gradient differs from eager by {(g - r).abs().max():.3g}"
    # the quantizer really ran: the first layer's weight gradient is not the exact one
    exact = _mlp()
    _, exact_grads = _step(exact, exact, x)
    assert not torch.equal(got[1][0], exact_grads[0])
    # a fresh seed changes the codes, hence the gradient (stochastic rounding is not bypassed)
    torch.manual_seed(6)
    y = compiled(x.detach().requires_grad_(True))
    model.zero_grad(set_to_none=True)
    (y * torch.linspace(-1.0, 1.0, IN)).square().sum().backward()
    assert not torch.equal(model[0].weight.grad, got[1][0])


@pytest.mark.parametrize("kind", ["Linear", "LayerNorm"])
def test_compiled_layer_keeps_the_quantized_input(kind: str) -> None:
    """One compressed layer: eager and compiled keep the same bytes, the 4-bit record of the
    input (``ROWS * IN / 2`` bytes of codes plus per-group lo/scale; LayerNorm adds its
    per-row mean and rstd, ``2 * ROWS * 4`` bytes), far below the fp32 input
    (``ROWS * IN * 4`` bytes) that the torch layer keeps."""
    torch.manual_seed(0)
    C = fewbit.modules.compressed
    layer = C.Linear(IN, HIDDEN, bits=4) if kind == "Linear" else C.LayerNorm(IN, bits=4)
    x = torch.randn(ROWS, IN, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x.detach().requires_grad_(True))  # compile outside the measurement
    eager_bytes = _saved_bytes(layer, layer, x)
    compiled_bytes = _saved_bytes(compiled, layer, x)
    full = ROWS * IN * 4
    assert compiled_bytes == eager_bytes
    assert compiled_bytes < full / 4  # 4 bits = 1/8 of fp32, plus small group headers
