"""Activation checkpointing: compressed layers compose with it, and fewbit.checkpoint stores
its region inputs quantized (issue 11 item 6)."""

from __future__ import annotations

import gc
from typing import Any, Callable, List, Tuple

import pytest
import torch
import torch.utils.checkpoint as TC
from torch import Tensor, nn

from fewbit.checkpoint import checkpoint
from fewbit.codecs.quantize import quantized_nbytes
from fewbit.modules import compressed as C

N, D, H = 64, 256, 512  # batch, width, hidden width of the MLP blocks


def held_after(fn: Callable[[], Tensor]) -> Tuple[int, Tensor]:
    """Bytes allocated by ``fn`` and still allocated when it returns (its output included).

    Sums the allocation events (frees negative) recorded by torch.profiler: independent of
    saved-tensor hooks and of the allocator's caching.
    """
    from torch._C._profiler import _EventType

    gc.collect()
    keep: List[Tensor] = []
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        keep.append(fn())
    total = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            total += int(node.extra_fields.alloc_size)
        stack.extend(node.children)
    return total, keep[0]


def blocks(linear: type, n: int = 4, dropout: float = 0.0) -> List[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(linear(D, H), nn.GELU(), nn.Dropout(dropout), linear(H, D))
        for _ in range(n)
    ]


def run(mods: List[nn.Module], x: Tensor, ck: Any = None) -> Tensor:
    h = x
    for m in mods:
        h = m(h) if ck is None else ck(m, h)
    return h


def torch_ckpt(m: nn.Module, h: Tensor) -> Tensor:
    return TC.checkpoint(m, h, use_reentrant=False)


def grads(mods: List[nn.Module], x: Tensor, ck: Any, seed: int = 0) -> List[Tensor]:
    torch.manual_seed(seed)
    out = run(mods, x, ck)
    params = [p for m in mods for p in m.parameters()]
    return list(torch.autograd.grad(out.square().sum(), [x, *params]))


def rel(a: List[Tensor], b: List[Tensor]) -> float:
    return max(((u - v).norm() / v.norm()).item() for u, v in zip(a, b))


def test_compressed_layers_hold_nothing_extra_under_torch_checkpoint() -> None:
    """Inside a non-reentrant checkpoint region compressed layers run as plain torch: they
    must not hide their saved tensors from the checkpoint (which then keeps them)."""
    x = torch.randn(N, D, requires_grad=True)
    plain, mine = blocks(nn.Linear), blocks(C.Linear)
    plain_ckpt, _ = held_after(lambda: run(plain, x, torch_ckpt))
    mine_ckpt, out = held_after(lambda: run(mine, x, torch_ckpt))
    mine_held, _ = held_after(lambda: run(mine, x))
    # Under checkpointing only region inputs and the output are held, whatever the layers.
    assert mine_ckpt == plain_ckpt
    assert mine_ckpt < mine_held
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_fewbit_checkpoint_holds_quantized_region_inputs() -> None:
    x = torch.randn(N, D, requires_grad=True)
    mods = blocks(nn.Linear)
    torch_held, _ = held_after(lambda: run(mods, x, torch_ckpt))
    for bits in (8, 2):
        held, out = held_after(lambda b=bits: run(mods, x, lambda m, h: checkpoint(m, h, bits=b)))
        # Held: the output, and per region its input quantized plus the CPU RNG state.
        per_region = quantized_nbytes((N, D), bits) + torch.get_rng_state().numel()
        expected = out.numel() * out.element_size() + 4 * per_region
        assert held == expected
        assert held < torch_held


def test_gradients_match_torch_checkpoint_within_quantizer_bound() -> None:
    x = torch.randn(N, D, requires_grad=True)
    mods = blocks(nn.Linear, dropout=0.3)
    ref = grads(mods, x, torch_ckpt)
    errs = {}
    for bits in (8, 2):
        errs[bits] = rel(grads(mods, x, lambda m, h, b=bits: checkpoint(m, h, bits=b)), ref)
    # 8 bits: each region input element is off by < range/255 of its group of 256 gaussians
    # (range ~6 std: < 2.4% of the std, std of the error < 0.7%); four blocks of Lipschitz
    # ~1 layers keep it at that order. Dropout masks must be the same as torch's (the RNG
    # state is restored), or the error would be ~100%.
    assert errs[8] < 0.03
    assert errs[2] > errs[8]


def test_compressed_layers_inside_fewbit_checkpoint_stay_plain() -> None:
    x = torch.randn(N, D, requires_grad=True)
    plain_mods, mine_mods = blocks(nn.Linear), blocks(C.Linear)
    plain, _ = held_after(lambda: run(plain_mods, x, lambda m, h: checkpoint(m, h)))
    mine, _ = held_after(lambda: run(mine_mods, x, lambda m, h: checkpoint(m, h)))
    assert mine == plain


def test_fewbit_checkpoint_under_autocast_and_no_grad() -> None:
    x = torch.randn(N, D, requires_grad=True)
    mods = blocks(nn.Linear, n=2)
    with torch.autocast("cpu", torch.bfloat16):
        out = run(mods, x, lambda m, h: checkpoint(m, h))
        ref = run(mods, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)  # forward: computed from the exact input
    (g,) = torch.autograd.grad(out.float().square().sum(), x)
    (gref,) = torch.autograd.grad(ref.float().square().sum(), x)
    # bf16 arithmetic (2**-8 relative) and 8-bit region inputs (see above): a few percent.
    assert ((g - gref).norm() / gref.norm()).item() < 0.05
    with torch.no_grad():
        assert torch.equal(checkpoint(mods[0], x), mods[0](x))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bits"):
        checkpoint(nn.Linear(2, 2), torch.randn(2, 2), bits=3)
    with pytest.raises(TypeError, match="function"):
        checkpoint(5, torch.randn(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_numel"):
        checkpoint(nn.Linear(2, 2), torch.randn(2, 2), min_numel=-1)


def test_compressed_attention_inside_checkpoint_is_torch() -> None:
    """Inside a checkpoint region compressed SDPA is torch's op: no quantization work in the
    forward nor in the recompute, and nothing held (the region keeps nothing)."""
    import torch.nn.functional as F

    from fewbit.functional.attention import scaled_dot_product_attention as sdpa

    q, k, v = (torch.randn(2, 4, 32, 16, requires_grad=True) for _ in range(3))

    def region(fn: Any) -> Callable[[Tensor], Tensor]:
        return lambda x: fn(x, k, v).sin()

    ref, out_ref = held_after(lambda: TC.checkpoint(region(F.scaled_dot_product_attention), q,
                                                    use_reentrant=False))
    mine, out = held_after(lambda: TC.checkpoint(region(sdpa), q, use_reentrant=False))
    assert mine == ref
    assert torch.equal(out, out_ref)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, q, g)[0], torch.autograd.grad(out_ref, q, g)[0])


def test_hugging_face_recipe_matches_torch_checkpoint() -> None:
    """The documented recipe: every decoder layer of a transformers model a fewbit region."""
    import functools

    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    grads = []
    for func in (functools.partial(TC.checkpoint, use_reentrant=False),
                 functools.partial(checkpoint, bits=8)):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).train()
        model._set_gradient_checkpointing(True, func)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    # 8-bit hidden states at the layer boundaries (< range/255 per element): ~1% or less.
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 0.03
