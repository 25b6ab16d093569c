"""torch.compile(fullgraph=True) of compressed layers (issue 11 item 2): Linear, LayerNorm,
convolutions, BatchNorm, GroupNorm, Softmax;
under a trace such a layer runs one autograd Function whose quantizer is the custom ops
``fewbit::quantize``/``dequantize`` instead of saved-tensor hooks (which a graph cannot hold),
so a model converted by ``QModule`` (L1-L3) compiles with no graph break, matches eager bit for bit
under the same seed (same seed draw, same codes, same backward ops) and keeps the quantized
input instead of the full-precision one."""

from __future__ import annotations

from typing import Callable, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import fewbit
import fewbit.levels
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


def _stats(model: nn.Module) -> List[Tuple[float, float, int, int]]:
    alloc = fewbit.levels.get_allocator(model)
    assert alloc is not None
    return [(s.grad_sq, s.range_sq, s.numel, s.steps)
            for s in (layer.fewbit_stats for layer in alloc.layers) if s is not None]


def test_adaptive_l3_fullgraph_matches_eager_and_reallocates() -> None:
    """L3 (adaptive bits, interval 1, budget 3 bits) compiles with no graph break. The statistics
    come from the traced backward through each layer's probe gradient, not from host reads
    in forward: after one step they equal eager's (same seed: same codes, same gradients;
    the range mean is summed in another order, fp32, over at most ROWS groups per layer: rel
    1e-5). Eager counts the step at the next forward and re-allocates there; compiled counts
    at the end of backward: either way the second forward runs the bits allocated from step
    1's statistics, so step 2 is bitwise eager's too."""
    # a 3-bit budget: 2-bit start, so the allocation (1, 2, 4 or 8 per layer) must change some
    eager_model = fewbit.QModule(_mlp(), level="L3", avg_bits=3.0)
    compiled_model = fewbit.QModule(_mlp(), level="L3", avg_bits=3.0)
    for m in (eager_model, compiled_model):
        alloc = fewbit.levels.get_allocator(m)
        assert alloc is not None
        alloc.interval = 1
    x = torch.randn(ROWS, IN, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    eager = _step(eager_model, eager_model, x)
    got = _step(compiled, compiled_model, x)
    assert torch.equal(got[0], eager[0])
    for g, r in zip(got[1], eager[1]):
        assert torch.equal(g, r)
    for (eg, er, en, es), (cg, cr, cn, cs) in zip(_stats(eager_model), _stats(compiled_model)):
        assert (cn, cs) == (en, es) == (cn, 1)
        assert cg == pytest.approx(eg, rel=1e-5) and cg > 0
        assert cr == pytest.approx(er, rel=1e-5) and cr > 0
    compiled_alloc = fewbit.levels.get_allocator(compiled_model)
    eager_alloc = fewbit.levels.get_allocator(eager_model)
    assert compiled_alloc is not None and eager_alloc is not None
    assert compiled_alloc.allocations == 1  # at the end of the first backward
    eager2 = _step(eager_model, eager_model, x)  # eager re-allocates before this forward
    assert eager_alloc.allocations == 1
    bits = [layer.bits for layer in eager_alloc.layers]
    assert [layer.bits for layer in compiled_alloc.layers] == bits
    assert bits != [2] * len(bits), "the allocation changed nothing: the test shows nothing"
    got2 = _step(compiled, compiled_model, x)  # new bits: recompiles, still one graph
    for g, r in zip(got2[1], eager2[1]):
        assert torch.equal(g, r)


def test_adaptive_probe_follows_the_layer() -> None:
    """The probe (not a parameter or buffer) moves with the layer, so a model converted on the
    meta device and materialised with ``to_empty`` still takes the traced path (which needs
    the probe on the input's device)."""
    with torch.device("meta"):
        model = fewbit.QModule(_mlp(), level="L3")
    alloc = fewbit.levels.get_allocator(model)
    assert alloc is not None
    assert all(layer.fewbit_stats.probe.device.type == "meta" for layer in alloc.layers)
    model.to_empty(device="cpu")
    for layer in alloc.layers:
        probe = layer.fewbit_stats.probe
        assert probe.device.type == "cpu" and probe.is_leaf and probe.requires_grad
        assert layer._traceable_training(torch.zeros(1, layer.weight.shape[-1]))


# --- convolutions, BatchNorm, GroupNorm, Softmax ------------------------------------------------

CLASSES = 10


def _cnn() -> nn.Module:
    """A small CNN: Conv2d, BatchNorm2d (training: batch statistics, running stats updated),
    ReLU, pooling, a grouped bias-free Conv2d, Linear (AvgPool2d here; MaxPool2d in
    :func:`_cnn_maxpool`)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, CLASSES),
    )  # fmt: skip


def _norm_softmax() -> nn.Module:
    """Conv1d, GroupNorm, Softmax (saves its output), Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Softmax(dim=-1), nn.Flatten(),
        nn.Linear(8 * 16, CLASSES),
    )  # fmt: skip


def _step_out(forward: Callable[[Tensor], Tensor], model: nn.Module, x: Tensor
              ) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Output, gradients (parameters, input) and buffers after one training step."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(5)
    y = forward(x)
    weights = torch.linspace(-1.0, 1.0, y.shape[-1])
    (y * weights).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    return y.detach(), grads, [b.clone() for b in model.buffers()]


MODELS = {"cnn": (_cnn, (4, 3, 8, 8)), "norm_softmax": (_norm_softmax, (4, 4, 16))}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("level", ["L2", "L3"])
def test_qmodule_conv_norm_softmax_fullgraph_matches_eager_bitwise(name: str, level: str) -> None:
    """Conv2d/Conv1d, BatchNorm2d, GroupNorm and Softmax trace as autograd Functions: the
    converted model compiles with no graph break and one step is bitwise eager's (same seed
    draws, same codes, same aten backward ops): output, every gradient, BatchNorm's running
    statistics; at L3 the statistics folded from the probes equal eager's (rel 1e-5: the
    range mean is summed in another order in fp32 over at most a few hundred groups)."""
    build, shape = MODELS[name]
    eager_model = fewbit.QModule(build(), level=level)
    compiled_model = fewbit.QModule(build(), level=level)
    layers = [m for m in eager_model.modules()
              if isinstance(m, fewbit.modules.compressed.CompressedLayer)]
    assert len(layers) >= 4
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    eager = _step_out(eager_model, eager_model, x)
    got = _step_out(compiled, compiled_model, x)
    assert torch.equal(got[0], eager[0]), "forward differs from eager"
    for g, r in zip(got[1], eager[1]):
        assert torch.equal(g, r), f"gradient differs from eager by {(g - r).abs().max():.3g}"
    for g, r in zip(got[2], eager[2]):
        assert torch.equal(g, r), "buffers (running statistics) differ from eager"
    # the quantizer ran: the first layer's weight gradient is not the exact one
    exact = build()
    exact_grads = _step_out(exact, exact, x)[1]
    assert not torch.equal(got[1][0], exact_grads[0])
    if level == "L3":
        for (eg, er, en, es), (cg, cr, cn, cs) in zip(_stats(eager_model),
                                                      _stats(compiled_model)):
            assert (cn, cs) == (en, es) == (cn, 1)
            assert cg == pytest.approx(eg, rel=1e-5) and cg > 0
            assert cr == pytest.approx(er, rel=1e-5) and cr > 0


def _one_layer(kind: str) -> Tuple[nn.Module, Tuple[int, ...]]:
    C = fewbit.modules.compressed
    layers = {
        "Conv1d": (lambda: C.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, bits=4), (2, 4, 17)),
        "Conv2d": (lambda: C.Conv2d(4, 6, 3, padding=1, bits=4), (2, 4, 9, 9)),
        "Conv3d": (lambda: C.Conv3d(4, 6, 3, padding=(1, 0, 1), groups=2, bits=4), (2, 4, 5, 5, 5)),
        "ConvTranspose1d": (lambda: C.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1,
                                                      bits=4), (2, 4, 9)),
        "ConvTranspose2d": (lambda: C.ConvTranspose2d(4, 6, 3, stride=2, padding=1,
                                                      output_padding=1, groups=2, bits=4),
                            (2, 4, 5, 5)),
        "ConvTranspose3d": (lambda: C.ConvTranspose3d(4, 2, 2, dilation=2, bias=False, bits=4),
                            (2, 4, 3, 3, 3)),
        "BatchNorm1d": (lambda: C.BatchNorm1d(4, bits=4), (8, 4, 6)),
        "BatchNorm2d": (lambda: C.BatchNorm2d(4, bits=4), (8, 4, 6, 6)),
        "BatchNorm3d": (lambda: C.BatchNorm3d(4, affine=False, bits=4), (2, 4, 3, 3, 3)),
        "GroupNorm": (lambda: C.GroupNorm(2, 4, bits=4), (2, 4, 5, 5)),
        "Softmax": (lambda: C.Softmax(dim=1, bits=4), (8, 64)),
    }
    build, shape = layers[kind]
    torch.manual_seed(0)
    return build(), shape


@pytest.mark.parametrize("kind", ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
                                  "ConvTranspose2d", "ConvTranspose3d", "BatchNorm1d",
                                  "BatchNorm2d", "BatchNorm3d", "GroupNorm", "Softmax"])
def test_compiled_layer_matches_eager_and_keeps_the_same_bytes(kind: str) -> None:
    """One 4-bit layer (strides, dilation, groups, output_padding, no bias, no affine):
    compiled with fullgraph, one step is bitwise eager's (output, gradients, buffers) and
    keeps the same bytes, far below the fp32 activation the torch layer keeps (4 bits = 1/8
    of fp32 plus per-group lo/scale; norms add their exact per-channel/group statistics)."""
    layer, shape = _one_layer(kind)
    twin = _one_layer(kind)[0]  # own buffers: BatchNorm's running statistics move each step
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    eager = _step_out(layer, layer, x)
    got = _step_out(compiled, twin, x)
    assert torch.equal(got[0], eager[0])
    for g, r in zip(got[1] + got[2], eager[1] + eager[2]):
        assert torch.equal(g, r)
    eager_bytes = _saved_bytes(layer, layer, x)
    compiled_bytes = _saved_bytes(compiled, twin, x)
    assert compiled_bytes == eager_bytes
    saved = eager[0] if kind == "Softmax" else x  # Softmax keeps its output
    assert compiled_bytes < saved.numel() * 4 / 2


# --- autocast -----------------------------------------------------------------------------------


def test_qmodule_mlp_fullgraph_under_autocast_matches_eager_bitwise() -> None:
    """Under ``torch.autocast("cpu", torch.bfloat16)`` the traced Functions cast as autocast
    does (Linear: input, weight and bias to bf16; LayerNorm: nothing on the CPU) and run with
    autocast off: no graph break, and one step is bitwise eager's (output in torch's dtype,
    every gradient in its parameter's dtype)."""
    eager_model = fewbit.QModule(_mlp(), level="L2")
    compiled_model = fewbit.QModule(_mlp(), level="L2")
    x = torch.randn(ROWS, IN, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")

    def in_autocast(model: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def forward(t: Tensor) -> Tensor:
            with torch.autocast("cpu", torch.bfloat16):
                return model(t)
        return forward

    eager = _step(in_autocast(eager_model), eager_model, x)
    got = _step(in_autocast(compiled), compiled_model, x)
    with torch.autocast("cpu", torch.bfloat16):
        reference = _mlp()(x)
    assert got[0].dtype == eager[0].dtype == reference.dtype == torch.bfloat16
    assert torch.equal(got[0], eager[0]), "forward differs from eager"
    for g, r, p in zip(got[1], eager[1], list(compiled_model.parameters()) + [x]):
        assert g.dtype == r.dtype == p.dtype
        assert torch.equal(g, r), f"gradient differs from eager by {(g - r).abs().max():.3g}"
    # the quantizer ran: the first layer's weight gradient is not autocast's exact one
    exact = _mlp()
    _, exact_grads = _step(in_autocast(exact), exact, x)
    assert not torch.equal(got[1][0], exact_grads[0])


# --- max pooling --------------------------------------------------------------------------------


def _cnn_maxpool() -> nn.Module:
    """Conv2d, BatchNorm2d, ReLU, MaxPool2d (overlapping 3x3 windows, stride 2, padding 1: 4-bit
    offsets), Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, CLASSES),
    )  # fmt: skip


def test_qmodule_cnn_with_maxpool_fullgraph_matches_eager_bitwise() -> None:
    """fewbit's MaxPool2d saves its packed window offsets as plain tensors and its kernel
    policy does not read the force_kernels ContextVar while tracing: the L2 CNN compiles with
    no graph break and one step is bitwise eager's; eager and compiled keep the same bytes."""
    eager_model = fewbit.QModule(_cnn_maxpool(), level="L2")
    compiled_model = fewbit.QModule(_cnn_maxpool(), level="L2")
    assert isinstance(compiled_model[3], fewbit.modules.compressed.MaxPool2d)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    eager = _step_out(eager_model, eager_model, x)
    got = _step_out(compiled, compiled_model, x)
    assert torch.equal(got[0], eager[0]), "forward differs from eager"
    for g, r in zip(got[1] + got[2], eager[1] + eager[2]):
        assert torch.equal(g, r), "gradients or buffers differ from eager"
    exact = _cnn_maxpool()
    assert not torch.equal(got[1][0], _step_out(exact, exact, x)[1][0])  # the quantizer ran
    assert _saved_bytes(compiled, compiled_model, x) == _saved_bytes(eager_model, eager_model, x)


def test_compiled_maxpool_matches_torch_and_keeps_packed_offsets() -> None:
    """One fewbit MaxPool2d compiled with fullgraph: output and input gradient bitwise
    torch's (the offsets are lossless), and what it keeps is the 4-bit offsets of a 3x3
    window, ``ceil(numel_out * 4 / 8)`` bytes, in eager and compiled alike."""
    pool = fewbit.modules.compressed.MaxPool2d(3, stride=2, padding=1)
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    outs = []
    for forward in (compiled, nn.MaxPool2d(3, stride=2, padding=1)):
        xi = x.clone().requires_grad_(True)
        y = forward(xi)
        (y * torch.linspace(-1.0, 1.0, y.shape[-1])).square().sum().backward()
        outs.append((y.detach(), xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    expected = (2 * 4 * 5 * 5 * 4 + 7) // 8
    assert _saved_bytes(compiled, pool, x) == _saved_bytes(pool, pool, x) == expected


def test_kernel_policy_traces_from_the_device_alone() -> None:
    """``use_kernel`` under torch.compile(fullgraph=True): no graph break, and the
    force_kernels override (a ContextVar dynamo cannot trace) is not read: the device decides
    (a CPU tensor: the torch path), while eager inside the block still follows the override."""
    from fewbit.kernels import force_kernels, use_kernel

    def tagged(t: Tensor) -> Tensor:
        return t + 1 if use_kernel(t) else t - 1

    x = torch.zeros(4)
    torch._dynamo.reset()
    compiled = torch.compile(tagged, fullgraph=True, backend="eager")
    with force_kernels(True):
        assert torch.equal(tagged(x), x + 1)
        assert torch.equal(compiled(x), x - 1)
