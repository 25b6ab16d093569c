"""Compressed layers: torch's forward bitwise, gradients within the bit-width error, bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewbit.codecs.quantize import quantized_nbytes
from fewbit.modules import activations as FA
from fewbit.modules import compressed as C

# (compressed class, torch class, constructor args, input shape)
CASES = [
    (C.Conv1d, nn.Conv1d, (3, 4, 3), (2, 3, 20)),
    (C.Conv2d, nn.Conv2d, (3, 4, 3), (2, 3, 10, 10)),
    (C.Conv3d, nn.Conv3d, (2, 3, 3), (2, 2, 6, 6, 6)),
    (C.ConvTranspose1d, nn.ConvTranspose1d, (3, 4, 3), (2, 3, 20)),
    (C.ConvTranspose2d, nn.ConvTranspose2d, (3, 4, 3), (2, 3, 10, 10)),
    (C.ConvTranspose3d, nn.ConvTranspose3d, (2, 3, 3), (2, 2, 6, 6, 6)),
    (C.Linear, nn.Linear, (16, 8), (4, 12, 16)),
    (C.BatchNorm1d, nn.BatchNorm1d, (6,), (8, 6, 30)),
    (C.BatchNorm2d, nn.BatchNorm2d, (4,), (4, 4, 10, 10)),
    (C.BatchNorm3d, nn.BatchNorm3d, (3,), (2, 3, 6, 6, 6)),
    (C.SyncBatchNorm, nn.SyncBatchNorm, (4,), (4, 4, 10, 10)),
    (C.LayerNorm, nn.LayerNorm, (32,), (4, 10, 32)),
    (C.GroupNorm, nn.GroupNorm, (2, 4), (4, 4, 10, 10)),
    (C.Softmax, nn.Softmax, (-1,), (4, 10, 32)),
]
IDS = [c[0].__name__ for c in CASES]


def _pair(cls, torch_cls, args, bits):
    ref = torch_cls(*args)
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial affine parameters for norms
            p.add_(torch.randn_like(p) * 0.1)
    layer = cls(*args, bits=bits)
    layer.load_state_dict(ref.state_dict())
    return layer, ref


def _grads(module, x, g):
    out = module(x)
    params = [p for p in module.parameters()]
    return out, torch.autograd.grad(out, [x, *params], g)


def _out_shape(cls, args, shape):
    with torch.no_grad():
        return cls(*args)(torch.zeros(shape)).shape


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("cls,torch_cls,args,shape", CASES, ids=IDS)
def test_forward_bitwise_and_gradient_error(cls, torch_cls, args, shape):
    x = torch.randn(shape, requires_grad=True)
    errs = {}
    for bits in (8, 2):
        layer, ref = _pair(cls, torch_cls, args, bits)
        assert isinstance(layer, torch_cls)
        assert list(layer.state_dict()) == list(ref.state_dict())
        g = torch.randn(_out_shape(cls, args, shape), generator=torch.Generator().manual_seed(1))
        out_ref, g_ref = _grads(ref, x, g)
        out, g_out = _grads(layer, x, g)
        assert torch.equal(out, out_ref)  # forward is torch's own
        errs[bits] = max(_rel(a, b) for a, b in zip(g_out, g_ref))
        if hasattr(ref, "running_mean"):
            assert torch.equal(layer.running_mean, ref.running_mean)
    # Gradients come from the dequantized activation: its per-element error is below one
    # step range/(2**bits - 1) of its group (range ~6 std for gaussian groups of 256), i.e.
    # ~2.4% of the std at 8 bits. Normalisation layers can amplify it a few times.
    assert errs[8] < 0.05
    assert errs[2] > errs[8]  # ordering: 2 bits is noisier


@pytest.mark.parametrize("cls,torch_cls,args,shape", CASES, ids=IDS)
@pytest.mark.parametrize("bits", [1, 4])
def test_saved_bytes_match_codec_formula(cls, torch_cls, args, shape, bits):
    layer, _ = _pair(cls, torch_cls, args, bits)
    x = torch.randn(shape, requires_grad=True)
    with C.SavedBytesMeter(exclude=list(layer.parameters()) + list(layer.buffers())) as meter:
        out = layer(x)
    # One quantized record: the input (the output for Softmax, same shape).
    assert meter.per_layer[id(layer)] == quantized_nbytes(out.shape if cls is C.Softmax
                                                          else x.shape, bits)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_eval_and_no_grad_run_plain_torch():
    layer, ref = _pair(C.Conv2d, nn.Conv2d, (3, 4, 3), 2)
    x = torch.randn(2, 3, 8, 8)
    with C.SavedBytesMeter() as meter, torch.no_grad():
        out = layer(x)
    assert torch.equal(out, ref(x)) and meter.total == 0


def test_channels_last_input():
    layer, ref = _pair(C.Conv2d, nn.Conv2d, (3, 4, 3), 8)
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last).requires_grad_()
    out = layer(x)
    assert torch.equal(out, ref(x))
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_lossless_modules_exact():
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    for mine, theirs in [(C.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)),
                         (C.AvgPool2d(3, 2, 1), nn.AvgPool2d(3, 2, 1)),
                         (C.MaxPool1d(3, 1, 1), nn.MaxPool1d(3, 1, 1)),
                         (C.AvgPool1d(2), nn.AvgPool1d(2))]:
        inp = x.flatten(2) if isinstance(mine, (C.MaxPool1d, C.AvgPool1d)) else x
        ref = theirs(inp)
        g = torch.randn_like(ref)
        out = mine(inp)
        assert isinstance(mine, type(theirs))
        assert torch.equal(out, ref)
        assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    drop = C.Dropout(0.4)
    torch.manual_seed(2)
    out = drop(x)
    # fewbit's own mask (not torch's draws: tests/functional/test_dropout.py), torch's
    # arithmetic on it: x * noise with noise = mask / (1 - p) in x's dtype
    torch.manual_seed(2)
    noise = (drop(torch.ones_like(x)) != 0).float().div_(1 - 0.4)
    assert torch.equal(out, x * noise)
    g = torch.randn_like(x)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], g * noise)
    drop.eval()
    assert drop(x) is x


def test_aliases_and_bad_arguments():
    assert C.QConv2d is C.Conv2d and C.QLinear is C.Linear and C.QSoftmax is C.Softmax
    assert C.QBatchNorm2d is C.BatchNorm2d and C.QMaxPool2d is C.MaxPool2d
    assert C.QReLU is FA.ReLU and C.QAvgPool2d is C.AvgPool2d and C.QDropout is C.Dropout
    with pytest.raises(ValueError, match="bits"):
        C.Linear(4, 4, bits=3)
    with pytest.raises(TypeError, match="bits"):
        C.Linear(4, 4, bits=2.0)
    with pytest.raises(ValueError, match="group_size"):
        C.Conv2d(1, 1, 1, group_size=0)
    assert "bits=4" in repr(C.Linear(4, 4, bits=4))


@pytest.mark.parametrize(
    "make", [lambda: C.QLinear(64, 32), lambda: C.QLayerNorm(64)], ids=["linear", "ln"]
)
def test_layer_does_not_keep_its_full_precision_input_alive(make) -> None:
    """Autograd keeps a layer's unpack hook with every record until backward; the hook's owner
    must not hold the input, or the quantization saves nothing in reality."""
    import gc
    import weakref

    layer = make()
    x = torch.randn(8, 64, requires_grad=True)
    h = x * 2.0  # an intermediate: only the layer could keep it alive
    ref = weakref.ref(h)
    y = layer(h)
    del h
    gc.collect()
    assert ref() is None
    y.sum().backward()
    assert x.grad is not None


# --- composition with autocast, torch.compile and the accounting (issue 11 items 2, 4) -------


@pytest.mark.parametrize("cls,torch_cls,args,shape", CASES, ids=IDS)
def test_autocast_follows_torch(cls, torch_cls, args, shape):
    """Forward dtype and values are torch's under autocast, backward runs, and the tensor the
    op saves (the autocast-cast input) is the one quantized."""
    layer, ref = _pair(cls, torch_cls, args, 8)
    x = torch.randn(shape, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        out_ref = ref(x)
        with C.SavedBytesMeter(exclude=list(layer.parameters()) + list(layer.buffers())) as m:
            out = layer(x)
    assert out.dtype == out_ref.dtype
    assert torch.equal(out, out_ref)
    saved = out if cls is C.Softmax else (x.to(torch.bfloat16) if cls in LOW else x)
    assert m.per_layer[id(layer)] == quantized_nbytes(saved.shape, 8)
    g = torch.randn_like(out_ref)
    (gx,) = torch.autograd.grad(out, x, g)
    (gref,) = torch.autograd.grad(out_ref, x, g)
    assert gx.dtype == torch.float32
    # bf16 arithmetic in both (2**-8 relative) plus the 8-bit saved input (< 2.4% of the
    # std per element, see above); normalisations amplify a few times.
    assert _rel(gx, gref) < 0.1


LOW = (C.Conv1d, C.Conv2d, C.Conv3d, C.ConvTranspose1d, C.ConvTranspose2d, C.ConvTranspose3d,
       C.Linear)


def test_llama_l2_trains_under_autocast():
    """Issue 11 item 4: a Llama with compressed layers and attention under bf16 autocast."""
    transformers = pytest.importorskip("transformers")
    import fewbit

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    fewbit.QModule(model, level="L2")
    assert any(isinstance(m, C.CompressedLayer) for m in model.modules())
    ids = torch.randint(0, 64, (2, 8))
    with torch.autocast("cpu", torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_compiled_mlp_matches_eager():
    """Issue 11 item 2: torch.compile of an MLP of compressed layers runs and matches eager,
    keeping the same bytes: the compiled Linear saves the same quantized record, as plain
    tensors of the graph (so the meter has no per-layer split for it)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(C.Linear(32, 64, bits=8), nn.GELU(), C.Linear(64, 32, bits=8))
    x = torch.randn(4, 32, requires_grad=True)
    compiled = torch.compile(mlp, backend="aot_eager")
    outs, grads, totals = [], [], []
    for fn in (mlp, compiled):
        with C.SavedBytesMeter(exclude=list(mlp.parameters())) as meter:
            out = fn(x)
        if fn is mlp:
            assert meter.per_layer[id(mlp[0])] == quantized_nbytes(x.shape, 8)
        totals.append(meter.total)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()]))
    torch.testing.assert_close(outs[1], outs[0])  # forward is torch's own
    # Independent 8-bit rounding noise in the two runs: < 2.4% of the std per element.
    assert max(_rel(a, b) for a, b in zip(grads[1], grads[0])) < 0.05
    assert totals[1] == totals[0]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), mlp(x))


def test_each_record_is_reported_once():
    """Issue 9 item 3: one accounting path; a layer's record reaches an observer once."""
    from fewbit.compress import observe_saved

    layer = C.Linear(64, 32, bits=4)
    x = torch.randn(8, 64, requires_grad=True)
    seen = []
    with observe_saved(lambda kept, nbytes: seen.append((kept, nbytes))):
        with C.SavedBytesMeter(exclude=list(layer.parameters())) as meter:
            layer(x)
    records = [n for kept, n in seen if not isinstance(kept, torch.Tensor)]
    assert records == [quantized_nbytes(x.shape, 4)]
    assert meter.total == meter.compressed_bytes == quantized_nbytes(x.shape, 4)
