"""Compact saves (dropout, max/avg pooling) are exact; compressed attention is close."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from fewbit.codecs.bitpack import packed_nbytes
from fewbit.codecs.quantize import quantized_nbytes
from fewbit.functional import compressed as FC


def saved_bytes(fn, *args, **kwargs):
    """Output of fn and the bytes it saved for backward (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, sum(seen.values())


POOL_CASES = [
    dict(kernel_size=3, stride=1, padding=1),  # overlapping windows + padding
    dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True),
    dict(kernel_size=2),
    dict(kernel_size=1, stride=2),  # one-element window: nothing to store
]
SHAPES = {1: (2, 3, 19), 2: (2, 3, 11, 13), 3: (1, 2, 7, 8, 9)}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("case", range(len(POOL_CASES)))
def test_max_pool_exact(dims, case):
    kw = POOL_CASES[case]
    # Rounded values create ties, so the argmax choice must match torch's too.
    x = torch.randn(SHAPES[dims]).round(decimals=1).requires_grad_()
    ref = getattr(F, f"max_pool{dims}d")(x, **kw)
    g = torch.randn_like(ref)
    (gref,) = torch.autograd.grad(ref, x, g)
    out, nbytes = saved_bytes(getattr(FC, f"max_pool{dims}d"), x, **kw)
    (gout,) = torch.autograd.grad(out, x, g)
    assert torch.equal(out, ref)
    assert torch.equal(gout, gref)
    bits = math.ceil(math.log2(kw["kernel_size"] ** dims))  # 0 bits for a 1-element window
    assert nbytes == (out.numel() * bits + 7) // 8


def test_max_pool_channels_last_and_unbatched():
    x = torch.randn(2, 4, 9, 9).to(memory_format=torch.channels_last).requires_grad_()
    ref = F.max_pool2d(x, 3, 2, 1)
    g = torch.randn_like(ref)
    (gref,) = torch.autograd.grad(ref, x, g)
    out = FC.max_pool2d(x, 3, 2, 1)
    assert torch.equal(out, ref) and torch.equal(torch.autograd.grad(out, x, g)[0], gref)
    xu = torch.randn(3, 10, 10, requires_grad=True)
    ref = F.max_pool2d(xu, 2)
    out = FC.max_pool2d(xu, 2)
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(out, xu, g)[0], torch.autograd.grad(ref, xu, g)[0])


def test_max_pool_large_window_uses_wide_codes():
    x = torch.randn(2, 1, 600, requires_grad=True)  # window 300 > 256: 16-bit offsets
    ref = F.max_pool1d(x, 300, 100)
    g = torch.randn_like(ref)
    out, nbytes = saved_bytes(FC.max_pool1d, x, 300, 100)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    assert nbytes == 2 * out.numel()


def test_max_pool_return_indices_is_torch():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    out, idx = FC.max_pool2d(x, 2, return_indices=True)
    ref, ridx = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(out, ref) and torch.equal(idx, ridx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dropout_torch_arithmetic_on_its_mask(dtype):
    """Not torch's draws (a counter hash keyed from the generator, see
    tests/functional/test_dropout.py) but torch's arithmetic: out = x * noise and
    grad = g * noise with noise = mask / (1 - p) in the input dtype, bit for bit."""
    x = torch.randn(33, 17, dtype=dtype, requires_grad=True)
    torch.manual_seed(1)
    out, nbytes = saved_bytes(FC.dropout, x, 0.3)
    g = torch.randn_like(out)
    (gout,) = torch.autograd.grad(out, x, g)
    torch.manual_seed(1)
    mask = FC.dropout(torch.ones_like(x), 0.3) != 0  # same seed: same mask
    noise = mask.to(dtype).div_(1 - 0.3)
    assert torch.equal(out, x * noise) and torch.equal(gout, g * noise)
    assert nbytes == packed_nbytes(x.numel(), 1)  # 1 bit per element


def test_dropout_distribution_and_generator():
    x = torch.ones(20000, requires_grad=True)
    gen = torch.Generator().manual_seed(3)
    out = FC.dropout(x, 0.25, generator=gen)
    kept = (out != 0).float().mean().item()
    # Binomial: std of the kept fraction sqrt(p(1-p)/n) = 0.0031; allow 5 sigma.
    assert abs(kept - 0.75) < 5 * math.sqrt(0.25 * 0.75 / 20000)
    assert torch.all((out == 0) | (out == 1 / 0.75))
    out2 = FC.dropout(x, 0.25, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, out2)


def test_dropout_edge_cases():
    x = torch.randn(4, 5, requires_grad=True)
    assert FC.dropout(x, 0.5, training=False) is x
    assert FC.dropout(x, 0.0) is x
    y = FC.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.zeros_like(x))
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            FC.dropout(x, p)
    z = x.detach().clone().requires_grad_()
    w = z * 1.0
    torch.manual_seed(5)
    out = FC.dropout(w, 0.5, inplace=True)
    assert out is w
    torch.manual_seed(5)
    ref = FC.dropout(z * 1.0, 0.5)  # same seed: the out-of-place result
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_avg_pool_exact_and_saves_nothing(dims):
    x = torch.randn(SHAPES[dims], requires_grad=True)
    kw = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    ref = getattr(F, f"avg_pool{dims}d")(x, **kw)
    g = torch.randn_like(ref)
    (gref,) = torch.autograd.grad(ref, x, g)
    out, nbytes = saved_bytes(getattr(FC, f"avg_pool{dims}d"), x, **kw)
    assert torch.equal(out, ref)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], gref)
    assert nbytes == 0


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
def test_attention_close_to_torch(mask):
    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    kw = {}
    if mask == "bool":
        kw["attn_mask"] = torch.rand(2, 1, 16, 16) > 0.3
    elif mask == "float":
        kw["attn_mask"] = torch.randn(1, 3, 16, 16, requires_grad=True)
    elif mask == "causal":
        kw["is_causal"] = True
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    g = torch.randn_like(ref)
    inputs = (q, k, v) + ((kw["attn_mask"],) if mask == "float" else ())
    gref = torch.autograd.grad(ref, inputs, g)
    errs = {}
    for bits in (8, 2):
        out, nbytes = saved_bytes(FC.scaled_dot_product_attention, q, k, v, bits=bits, **kw)
        # Output is computed exactly (only saved tensors are quantized): float rounding only.
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(out, inputs, g)
        errs[bits] = max(_rel(a, b) for a, b in zip(grads, gref))
        expected = 3 * quantized_nbytes(q.shape, bits) + quantized_nbytes((2, 3, 16, 16), bits)
        assert nbytes == expected
    # 8 bits: each saved operand is within range/255 per element (group ranges of gaussians
    # are ~6 std, so ~2.5% relative per element); products keep that order. 2 bits is worse.
    assert errs[8] < 0.05
    assert errs[2] > errs[8]


def test_attention_dropout_uses_one_bit_mask():
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    gen = torch.Generator().manual_seed(0)
    out, nbytes = saved_bytes(FC.scaled_dot_product_attention, q, k, v, dropout_p=0.5,
                              bits=8, generator=gen)
    # Reference: the mask fewbit's dropout draws from the same seed (its two hash keys come
    # first from the generator), explicit math in float64.
    drop = importlib.import_module("fewbit.functional.dropout")
    k0, k1 = torch.randint(0, 1 << 32, (2,), dtype=torch.int64,
                           generator=torch.Generator().manual_seed(0)).tolist()
    keep = drop.keep_mask(0, 128, k0, k1, drop.keep_threshold(0.5)).view(1, 2, 8, 8)
    keep = keep.to(torch.float64)
    assert 0 < keep.sum() < 128
    p = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1)
    ref = (p * keep / 0.5) @ v
    torch.testing.assert_close(out, ref)
    assert nbytes == (3 * quantized_nbytes(q.shape, 8) + quantized_nbytes(p.shape, 8)
                      + packed_nbytes(p.numel(), 1))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    gref = torch.autograd.grad(ref, (q, k, v), g)
    assert max(_rel(a, b) for a, b in zip(grads, gref)) < 0.05  # 8-bit bound as above


def test_attention_no_grad_is_torch_and_bad_args():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    assert torch.equal(FC.scaled_dot_product_attention(q, k, v),
                       F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="bits"):
        FC.scaled_dot_product_attention(q, k, v, bits=3)
    with pytest.raises(ValueError, match="dropout_p"):
        FC.scaled_dot_product_attention(q, k, v, dropout_p=2.0)


def test_attention_zero_keys_is_torch():
    """Issue 11 item 10: no keys gives torch's result (zeros), not an IndexError."""
    q = torch.randn(2, 3, 4, 8, requires_grad=True)
    k, v = (torch.randn(2, 3, 0, 8, requires_grad=True) for _ in range(2))
    out = FC.scaled_dot_product_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, ref) and out.shape == (2, 3, 4, 8)
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_follows_autocast(dtype):
    """Issue 11 item 4: fp32 q/k/v under autocast: output in the autocast dtype as torch's op,
    backward runs and gives fp32 gradients close to torch's."""
    q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
    mask = torch.randn(16, 16)
    with torch.autocast("cpu", dtype):
        ref = F.scaled_dot_product_attention(q, k, v, mask)
        out = FC.scaled_dot_product_attention(q, k, v, mask, bits=8)
    assert out.dtype == ref.dtype == dtype
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g)
    gref = torch.autograd.grad(ref, (q, k, v), g)
    assert all(a.dtype == torch.float32 for a in grads)
    # Both compute in `dtype` (8 mantissa bits for bf16: 2**-8 relative per operation); on
    # top, 8-bit saved operands add < range/255 per element (about 2.5%, see above).
    assert max(_rel(a, b) for a, b in zip(grads, gref)) < 0.08
