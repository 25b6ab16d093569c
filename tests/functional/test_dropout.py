"""fewbit's dropout on the CPU: the keep-mask is a counter hash of the element index keyed by
two integers drawn from torch's generator; one C pass per direction (csrc/dropout.c), the
same bytes as the eager torch-op path; torch's arithmetic given the mask."""

from __future__ import annotations

import importlib
import math
from typing import Callable, List, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import fewbit.checkpoint
from fewbit.codecs.bitpack import packed_nbytes, unpack
from fewbit.codecs.native import library
from fewbit.modules.compressed import Dropout

D = importlib.import_module("fewbit.functional.dropout")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
_M32 = 0xFFFFFFFF

needs_native = pytest.mark.skipif(library() is None, reason="no native codec library")


def _mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x7FEB352D) & _M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def _keep_reference(e: int, k0: int, k1: int, thr: int) -> bool:
    """The documented mask, in Python integers."""
    lo, hi = e & _M32, e >> 32
    h = _mix32(_mix32((lo + k0) & _M32) ^ k1 ^ _mix32(hi))
    return (h >> 8) >= thr


def _run(x: Tensor, p: float, g: Tensor, seed: int, **kw) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """Output, input gradient and the tensors saved for backward of one dropout call."""
    saved: List[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = D.dropout(x, p, **kw)
    (gx,) = torch.autograd.grad(out, x, g)
    return out.detach(), gx, saved


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().view(torch.uint8)


def test_keep_mask_is_the_documented_hash() -> None:
    """The torch-op hash equals the definition, also across the 2**32-element boundary where
    the high half of the index enters the key."""
    k0, k1, thr = 0x12345678, 0x9ABCDEF0, D.keep_threshold(0.3)
    assert thr == round(0.3 * 2**24)
    for start, stop in [(0, 200), (2**32 - 100, 2**32 + 100), (5 * 2**32 + 7, 5 * 2**32 + 50)]:
        got = D.keep_mask(start, stop, k0, k1, thr).tolist()
        assert got == [_keep_reference(e, k0, k1, thr) for e in range(start, stop)]
    # the high half matters: the run after 2**32 is not a copy of the first one
    first = D.keep_mask(0, 4096, k0, k1, thr)
    second = D.keep_mask(2**32, 2**32 + 4096, k0, k1, thr)
    assert not torch.equal(first, second)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 65, 1001])
def test_native_and_eager_same_bytes(monkeypatch, dtype: torch.dtype, n: int) -> None:
    """C and torch-op paths: the same output, saved mask and gradient bytes (sizes not a
    multiple of 8 or of the 64-element block included)."""
    x = torch.randn(n, dtype=torch.float64).to(dtype)
    g = torch.randn(n, dtype=torch.float64).to(dtype)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("FEWBIT_COMPILE", flag)
        results.append(_run(x, 0.3, g, seed=11))
    (out_c, g_c, saved_c), (out_e, g_e, saved_e) = results
    assert len(saved_c) == len(saved_e) == 1
    assert saved_c[0].dtype == torch.uint8 and saved_c[0].numel() == packed_nbytes(n, 1)
    assert torch.equal(saved_c[0], saved_e[0])
    assert torch.equal(_bits(out_c), _bits(out_e))
    assert torch.equal(_bits(g_c), _bits(g_e))


@needs_native
def test_large_tensor_same_bytes_any_thread_count(monkeypatch) -> None:
    """Past the parallel threshold (2**16) and over many 16K-element chunks: bytes equal
    for 1 and 2 threads and equal to the eager path."""
    n = 300_001
    x, g = torch.randn(n), torch.randn(n)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(_run(x, 0.2, g, seed=4))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("FEWBIT_COMPILE", "0")
    runs.append(_run(x, 0.2, g, seed=4))
    for out, gx, saved in runs[1:]:
        assert torch.equal(_bits(out), _bits(runs[0][0]))
        assert torch.equal(_bits(gx), _bits(runs[0][1]))
        assert torch.equal(saved[0], runs[0][2][0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_arithmetic_on_the_saved_mask(dtype: torch.dtype) -> None:
    """out = x * noise and grad = g * noise with torch's noise = mask.to(dtype).div_(1 - p),
    bit for bit (the mask read back from the saved bytes); the mask is the hash of the keys
    drawn from the seeded generator."""
    x = torch.randn(33, 17, dtype=torch.float64).to(dtype)
    g = torch.randn(33, 17, dtype=torch.float64).to(dtype)
    out, gx, saved = _run(x, 0.3, g, seed=1)
    mask = unpack(saved[0], 1, x.numel()).view(x.shape)
    noise = mask.to(dtype).div_(1 - 0.3)
    assert torch.equal(_bits(out), _bits(x * noise))
    assert torch.equal(_bits(gx), _bits(g * noise))
    torch.manual_seed(1)
    k0, k1 = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    expected = D.keep_mask(0, x.numel(), k0, k1, D.keep_threshold(0.3)).view(x.shape)
    assert torch.equal(mask.bool(), expected)


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_and_signed_zero_as_torch(monkeypatch, dtype: torch.dtype, native: str) -> None:
    """Dropped elements are x * 0 as in torch (-0 for negative x, NaN for NaN/inf x), and so
    are dropped gradients. Compared with torch's x * noise: NaN at the same places, every
    other bit pattern equal (torch's own bf16 NaN bits depend on the element's position)."""
    monkeypatch.setenv("FEWBIT_COMPILE", native)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.5, 1e-40])
    x = specials.repeat(40).to(dtype)
    g = specials.flip(0).repeat(40).to(dtype)
    out, gx, saved = _run(x, 0.5, g, seed=2)
    mask = unpack(saved[0], 1, x.numel())
    assert 0 < int(mask.sum()) < x.numel()  # both kept and dropped elements were checked
    noise = mask.to(dtype).div_(0.5)
    for got, want in ((out, x * noise), (gx, g * noise)):
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan()
        assert torch.equal(_bits(got[finite]), _bits(want[finite]))


@pytest.mark.parametrize("p", [0.3, 1 / 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_value_as_torch(dtype: torch.dtype, p: float) -> None:
    """All 65536 bit patterns of bf16/fp16 as inputs and gradients (subnormals, the largest
    finite values whose scaled product overflows, NaN payloads): out and grad equal torch's
    x * noise and g * noise (NaN at the same places, every other bit pattern equal). With
    p = 1/3 the scale is 1.5, so x * 1.5 lands exactly halfway between two 16-bit values
    for many x: the ties-to-even rounding is checked too."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    g = x.flip(0)
    out, gx, saved = _run(x, p, g, seed=8)
    noise = unpack(saved[0], 1, x.numel()).to(dtype).div_(1 - p)
    for got, want in ((out, x * noise), (gx, g * noise)):
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan()
        assert torch.equal(_bits(got[finite]), _bits(want[finite]))


def test_keep_fraction_and_independence() -> None:
    """Over n = 2**20 elements the kept fraction is 1 - p within 5 binomial sigmas
    (sqrt(p(1-p)/n) <= 0.0005); neighbours and two calls are independent: the fraction of
    pairs both kept is (1 - p)**2 within 5 sigmas of that Bernoulli((1-p)**2) mean."""
    n = 1 << 20
    x = torch.ones(n)
    for p in (0.1, 0.5, 0.9):
        gen = torch.Generator().manual_seed(7)
        a = D.dropout(x, p, generator=gen) != 0
        b = D.dropout(x, p, generator=gen) != 0
        q = 1 - p
        assert abs(a.double().mean().item() - q) < 5 * math.sqrt(p * q / n)
        both_sigma = math.sqrt(q * q * (1 - q * q) / n)
        assert abs((a & b).double().mean().item() - q * q) < 5 * both_sigma
        assert abs((a[1:] & a[:-1]).double().mean().item() - q * q) < 5 * both_sigma


def test_seed_generator_and_keys_reproduce() -> None:
    x = torch.randn(1000)
    torch.manual_seed(9)
    a = D.dropout(x, 0.4)
    b = D.dropout(x, 0.4)
    torch.manual_seed(9)
    assert torch.equal(D.dropout(x, 0.4), a)
    assert not torch.equal(a, b)  # a new draw per call
    gen_out = D.dropout(x, 0.4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(gen_out, a)  # same draws from an equally seeded generator


def _grads(fn: Callable[[Tensor], Tensor], x: Tensor, w: Tensor) -> List[Tensor]:
    torch.manual_seed(3)
    out = fn(x)
    return list(torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (x, w)))


def test_checkpoint_recompute_draws_the_same_mask() -> None:
    """torch.utils.checkpoint and fewbit.checkpoint restore the RNG state for the recompute:
    the recomputed mask is the forward's, so gradients equal the un-checkpointed ones bit for
    bit (region inputs kept exact: min_numel above their size)."""
    x = torch.randn(16, 64, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)

    def region(h: Tensor) -> Tensor:
        return D.dropout(h @ w, 0.5) @ w

    ref = _grads(region, x, w)
    torch_ckpt = _grads(lambda h: torch_checkpoint(region, h, use_reentrant=False), x, w)
    mine = _grads(lambda h: fewbit.checkpoint.checkpoint(region, h, min_numel=10**9), x, w)
    for got in (torch_ckpt, mine):
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_inplace_and_non_contiguous() -> None:
    x = torch.randn(24, 10)
    torch.manual_seed(5)
    ref = D.dropout(x, 0.5)
    w = x.clone()
    torch.manual_seed(5)
    out = D.dropout(w, 0.5, inplace=True)
    assert out is w and torch.equal(out, ref)
    # dense, column-major: the mask follows memory order, the output keeps the strides
    xt = x.t().contiguous()
    torch.manual_seed(5)
    ref_t = D.dropout(xt, 0.5)
    torch.manual_seed(5)
    out_t = D.dropout(xt.t(), 0.5)
    assert out_t.stride() == xt.t().stride() and torch.equal(out_t, ref_t.t())
    z = xt.clone().t()
    torch.manual_seed(5)
    assert torch.equal(D.dropout(z, 0.5, inplace=True), ref_t.t()) and torch.equal(z, ref_t.t())
    # not dense (every other column): a contiguous copy, logical order
    wide = torch.randn(24, 20)
    torch.manual_seed(5)
    ref_s = D.dropout(wide[:, ::2].contiguous(), 0.5)
    torch.manual_seed(5)
    assert torch.equal(D.dropout(wide[:, ::2], 0.5), ref_s)
    leaf = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    y = D.dropout(leaf * 1.0, 0.5, inplace=True)
    (gx,) = torch.autograd.grad(y.sum(), leaf)
    assert torch.equal(gx, (ref != 0).float() / 0.5)


@pytest.mark.parametrize("native", ["1", "0"])
def test_channels_last_keeps_layout_and_torch_arithmetic(monkeypatch, native: str) -> None:
    """A channels-last input gives a channels-last output and gradient (as torch's dropout);
    mask bit e is the e-th element in memory; values are torch's x * noise / g * noise."""
    monkeypatch.setenv("FEWBIT_COMPILE", native)
    x = torch.randn(2, 3, 5, 4).to(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 5, 4).to(memory_format=torch.channels_last)
    out, gx, saved = _run(x, 0.3, g, seed=6)
    cl = torch.channels_last
    assert out.is_contiguous(memory_format=cl) and gx.is_contiguous(memory_format=cl)
    nhwc = unpack(saved[0], 1, x.numel()).view(2, 5, 4, 3)  # memory order
    noise = nhwc.permute(0, 3, 1, 2).to(x.dtype).div_(1 - 0.3)
    assert torch.equal(out, x * noise) and torch.equal(gx, g * noise)


def test_custom_ops_pass_opcheck() -> None:
    x = torch.randn(5, 13)
    keys = torch.tensor([3, 2**32 - 1])
    torch.library.opcheck(D._forward_op, (x, keys, 0.25))
    _, packed = D._forward_op(x, keys, 0.25)
    torch.library.opcheck(D._backward_op, (torch.randn(5, 13), packed, 0.25))


def test_compiled_model_matches_eager() -> None:
    """torch.compile(fullgraph=True) of a model with fewbit Dropout (aot_eager: the key draw
    runs on the default generator as in eager): same output and gradients as eager."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), Dropout(0.3), nn.Linear(64, 8))
    x = torch.randn(16, 8)

    def step(fn: Callable[[Tensor], Tensor]) -> List[Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        y = fn(x)
        y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    torch._dynamo.reset()
    got = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert all(torch.equal(a, b) for a, b in zip(got, eager))
    model.eval()
    assert not torch.equal(model(x), eager[0])  # dropout did drop in training mode


def test_compiled_inplace_matches_eager() -> None:
    """inplace=True under torch.compile(fullgraph=True): computed out of place and copied
    into the input (a traced Function cannot return a dirty input); same values and
    gradients as eager."""
    x = torch.randn(16, 40, requires_grad=True)

    def f(h: Tensor) -> Tensor:
        h = h * 2
        return D.dropout(h, 0.5, inplace=True) + 1

    torch.manual_seed(1)
    ref = f(x)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    torch._dynamo.reset()
    torch.manual_seed(1)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, ref) and torch.equal(gx, gref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drawn_noise_of_other_devices_matches_its_packed_mask(dtype: torch.dtype) -> None:
    """The path of devices without the hashed pass (CUDA), run on CPU tensors: the noise is
    torch's bernoulli(1 - p) / (1 - p) from the generator, and the packed mask decodes back to
    the same noise (as backward and the compressed attention rebuild it)."""
    x = torch.randn(7, 33).to(dtype)
    noise, mask = D._drawn_noise(x, 0.3, torch.Generator().manual_seed(1))
    ref = torch.empty_like(x).bernoulli_(0.7, generator=torch.Generator().manual_seed(1))
    ref.div_(0.7)
    assert torch.equal(noise, ref)
    assert torch.equal(D._mask_noise(mask, 0.3, dtype), ref)
