"""Rows of the compatibility matrix (issue 11): one tiny model per fewbit feature.

Imported by the matrix tests and run as part of ``dist_worker.py`` (a script), so it depends on
torch and fewbit only. Every row starts from the same seeded ``TinyBlock`` and converts it the way
a user would; ``generic`` converts nothing and runs forward and backward inside
``fewbit.compress(bits=2)`` instead.

Sizes: input (4, 16, 64) -> hidden 4*16*128 = 8192 elements, above the 4096-element
``min_numel`` of the generic mode, so every saved activation is really compressed.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, ContextManager, Dict, List, Tuple

import torch
from torch import Tensor, nn

import fewbit

LEVEL_ROWS: List[str] = ["L1", "L2", "L3", "L3.1", "L4", "L5"]
ROWS: List[str] = ["gelu3", "randomized", *LEVEL_ROWS, "generic"]
IN, HIDDEN, BATCH, SEQ = 64, 128, 4, 16


class TinyBlock(nn.Module):
    """A transformer block in miniature: self-attention (``nn.MultiheadAttention``, which no
    conversion touches, so only the generic mode compresses it) with a residual, then
    Linear -> GELU -> Linear -> LayerNorm (the layers the rows convert)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(IN, 4, batch_first=True, device=device)
        self.up = nn.Linear(IN, HIDDEN, device=device)
        self.act = nn.GELU()
        self.down = nn.Linear(HIDDEN, IN, device=device)
        self.norm = nn.LayerNorm(IN, device=device)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.norm(self.down(self.act(self.up(x))))


def base_model(seed: int = 0, device: torch.device | str | None = None) -> TinyBlock:
    """A freshly initialised TinyBlock (same weights for the same seed)."""
    torch.manual_seed(seed)
    return TinyBlock(device)


def make_input(seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, SEQ, IN, generator=g, dtype=dtype)


def convert(row: str, model: nn.Module) -> nn.Module:
    """Convert ``model`` (in place where fewbit does) for ``row``; returns the model to use."""
    if row == "gelu3":
        return fewbit.convert(model, bits=3)
    if row == "randomized":
        # ratio 0.5: k = N/2 = 32 of the 64 rows of each linear input are kept.
        return fewbit.convert(model, activations=False, linear=0.5)
    if row in LEVEL_ROWS:
        return fewbit.QModule(model, level=row)
    if row == "generic":
        return model
    raise ValueError(f"unknown row {row!r}")


def context(row: str, model: nn.Module) -> ContextManager[object]:
    """The context forward and backward run in (``fewbit.compress`` for the generic row)."""
    if row == "generic":
        return fewbit.compress(bits=2, model=model)
    return contextlib.nullcontext()


def converted_model(row: str, seed: int = 0) -> nn.Module:
    return convert(row, base_model(seed))


def loss_of(out: Tensor) -> Tensor:
    """A loss whose output gradient is not uniform (a plain sum would make it constant)."""
    w = torch.linspace(-1.0, 1.0, out.shape[-1], dtype=torch.float32)
    return (out.float() * w).square().sum()


def step(row: str, model: nn.Module, x: Tensor,
         forward: Callable[[Tensor], Tensor] | None = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One forward and backward in the row's context; returns the output and the gradients
    (keyed by parameter name, plus ``'input'`` when ``x`` requires grad)."""
    model.zero_grad(set_to_none=True)
    fwd = forward if forward is not None else model
    with context(row, model):
        out = fwd(x)
        loss_of(out).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if x.requires_grad and x.grad is not None:
        grads["input"] = x.grad.detach().clone()
    return out.detach(), grads


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def grads_at(row: str, model: nn.Module, inputs: List[Tensor], seed: int) -> Dict[str, Tensor]:
    """Mean over ``inputs`` of the gradients of one seeded step each (what data-parallel
    training averages over ranks that each hold one input)."""
    total: Dict[str, Tensor] = {}
    for x in inputs:
        torch.manual_seed(seed)
        _, grads = step(row, model, x)
        for n, g in grads.items():
            total[n] = total[n] + g if n in total else g
    return {n: g / len(inputs) for n, g in total.items()}


# --- references and tolerances shared by the matrix tests -----------------------------------------

# fp32 reassociation: 2**-24 per addition over sums of at most 256 terms.
FP32_REL = 256 * 2.0**-24
NOISE_FACTOR = 4.0
DRAWS = 4
SEED = 5


@functools.cache
def exact_step() -> Tuple[Tensor, Dict[str, Tensor]]:
    """Output and gradients of the unconverted model, no fewbit anywhere."""
    return step("exact", base_model(), fresh_input())


def exact(row: str) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The reference of ``row``: the same for every row (generic mode converts nothing)."""
    return exact_step()


@functools.cache
def eager_draws(row: str) -> Tuple[Dict[str, Tensor], Dict[str, float]]:
    """The eager converted model's gradient at ``SEED`` and the per-parameter RMS relative
    error against :func:`exact` over ``DRAWS`` seeds."""
    _, ref = exact(row)
    model = converted_model(row)
    sq: Dict[str, float] = {n: 0.0 for n in ref}
    at_seed: Dict[str, Tensor] = {}
    for seed in range(SEED, SEED + DRAWS):
        torch.manual_seed(seed)
        _, grads = step(row, model, fresh_input())
        if seed == SEED:
            at_seed = grads
        for n in ref:
            sq[n] += rel_err(grads[n], ref[n]) ** 2 / DRAWS
    return at_seed, {n: math.sqrt(v) for n, v in sq.items()}


def check_grads(row: str, grads: Dict[str, Tensor], extra: Dict[str, float] | None = None,
                ref: Dict[str, Tensor] | None = None) -> None:
    """Gradients of one cell against the row's eager behaviour (see the module docstring).

    ``ref``: the reference gradient (default: the exact fp32 one); ``extra``: per-parameter
    relative error the column itself adds (autocast's rounding; with it, ``gelu3`` is
    checked like the stochastic rows, its "RMS" being its deterministic error: rounding can
    move inputs across code boundaries, which changes the few-bit derivative by one level)."""
    _, exact_grads = exact(row)
    ref = exact_grads if ref is None else ref
    extra = extra or {}
    assert set(grads) == set(ref), f"gradients for {sorted(set(ref) ^ set(grads))} differ"
    for n, g in grads.items():
        assert g.dtype == ref[n].dtype, f"{n}: grad dtype {g.dtype}, torch gives {ref[n].dtype}"
        assert torch.isfinite(g).all(), f"{n}: non-finite gradient"
    fewbit_grads, rms = eager_draws(row)
    if row == "gelu3" and not extra:  # deterministic: the eager few-bit gradient itself
        for n, g in grads.items():
            err = rel_err(g, fewbit_grads[n])
            assert err <= FP32_REL, f"{n}: {err:.3g} off the eager few-bit gradient"
        return
    errs = {n: rel_err(g, ref[n]) for n, g in grads.items()}
    for n, err in errs.items():
        bound = NOISE_FACTOR * rms[n] + 2 * extra.get(n, 0.0) + FP32_REL
        assert err <= bound, f"{n}: relative error {err:.3g} > {bound:.3g} (rms {rms[n]:.3g})"
    assert max(errs.values()) > FP32_REL, "gradients are exact: fewbit did not run"




def fresh_input(dtype: torch.dtype = torch.float32) -> Tensor:
    return make_input(dtype=dtype).requires_grad_(True)
