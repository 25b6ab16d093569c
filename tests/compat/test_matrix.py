"""Compatibility matrix (issue 11), single-process columns: torch.compile (default and
fullgraph), autocast (bf16, fp16), activation checkpointing (non-reentrant, reentrant) and
meta-device init, for every row of ``compat_rows.ROWS``.

What each cell asserts:

* forward: fewbit's forward is torch's, so the output equals the unconverted model's
  bit for bit where the same kernels run (eager, checkpoint, meta, autocast) and within fp32
  reassociation (``FP32_REL``) under torch.compile, whose fused kernels sum in another order;
* gradients: dtype and finiteness as torch's, and close to the exact (unconverted) gradient.
  ``gelu3`` is deterministic, so its gradient must equal the eager few-bit gradient within
  ``FP32_REL``. The other rows are stochastic (random sketches, stochastic rounding): each
  parameter's relative error must stay below ``NOISE_FACTOR`` times the RMS relative error of
  ``DRAWS`` eager draws of the same row (a fresh draw has the same error distribution; the
  squared error is a sum of many independent rounding errors, so it concentrates around its
  mean, and Markov's inequality alone bounds the chance of exceeding 4x RMS by 1/16), and at
  least one parameter's error must exceed ``FP32_REL`` (fewbit really ran).
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Tuple

import pytest
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compat_rows as R  # noqa: E402

FP32_REL, SEED = R.FP32_REL, R.SEED
exact, eager_draws, check_grads, fresh_input = R.exact, R.eager_draws, R.check_grads, R.fresh_input


def xfail(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


def cells(known: Dict[str, str]) -> List[object]:
    """``ROWS`` as pytest params; rows in ``known`` are strict xfails with that reason."""
    return [pytest.param(r, marks=xfail(known[r])) if r in known else r for r in R.ROWS]


def check_forward_exact(out: Tensor, ref: Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.equal(out, ref), f"forward differs by {(out - ref).abs().max().item():.3g}"


# --- torch.compile ------------------------------------------------------------------------------

COMPILE_DEFAULT_XFAIL: Dict[str, str] = {}
FULLGRAPH_XFAIL: Dict[str, str] = {}


def run_compiled(row: str, fullgraph: bool) -> None:
    torch._dynamo.reset()
    model = R.converted_model(row)
    compiled = torch.compile(model, fullgraph=fullgraph)
    torch.manual_seed(SEED)
    out, grads = R.step(row, model, fresh_input(), forward=compiled)
    ref_out, _ = exact(row)
    # fused kernels reassociate fp32 sums: relative FP32_REL of the output's scale.
    torch.testing.assert_close(out, ref_out, rtol=FP32_REL,
                               atol=FP32_REL * ref_out.abs().max().item())
    check_grads(row, grads)


@pytest.mark.parametrize("row", cells(COMPILE_DEFAULT_XFAIL))
def test_compile_default(row: str) -> None:
    run_compiled(row, fullgraph=False)


@pytest.mark.parametrize("row", cells(FULLGRAPH_XFAIL))
def test_compile_fullgraph(row: str) -> None:
    run_compiled(row, fullgraph=True)


# --- autocast -----------------------------------------------------------------------------------

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_step(row: str, model: torch.nn.Module, dtype: torch.dtype
                  ) -> Tuple[Tensor, Dict[str, Tensor]]:
    with torch.autocast("cpu", dtype=dtype):
        torch.manual_seed(SEED)
        return R.step(row, model, fresh_input())


@pytest.mark.parametrize("row", R.ROWS)
@pytest.mark.parametrize("amp", list(AUTOCAST_DTYPES))
def test_autocast(row: str, amp: str) -> None:
    dtype = AUTOCAST_DTYPES[amp]
    ref_out, ref_grads = autocast_step("exact", R.base_model(), dtype)
    out, grads = autocast_step(row, R.converted_model(row), dtype)
    check_forward_exact(out, ref_out)
    # autocast's own rounding: how far torch's autocast gradient is from torch's fp32 one.
    _, fp32_grads = exact(row)
    rounding = {n: R.rel_err(g, fp32_grads[n]) for n, g in ref_grads.items()}
    check_grads(row, grads, extra=rounding, ref=ref_grads)


# --- activation checkpointing -------------------------------------------------------------------


@pytest.mark.parametrize("row", R.ROWS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpoint(row: str, reentrant: bool) -> None:
    model = R.converted_model(row)

    def forward(x: Tensor) -> Tensor:
        return checkpoint(model, x, use_reentrant=reentrant)

    torch.manual_seed(SEED)
    out, grads = R.step(row, model, fresh_input(), forward=forward)
    check_forward_exact(out, exact(row)[0])
    check_grads(row, grads)


# --- meta-device init ---------------------------------------------------------------------------


def meta_shapes(row: str, model: torch.nn.Module) -> None:
    """Forward and backward on meta tensors: shapes propagate, nothing is computed."""
    x = torch.empty(R.BATCH, R.SEQ, R.IN, device="meta", requires_grad=True)
    with R.context(row, model):
        out = model(x)
        assert out.device.type == "meta" and out.shape == (R.BATCH, R.SEQ, R.IN)
        out.sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, n
    with torch.no_grad():
        assert model(x).shape == out.shape
    model.zero_grad(set_to_none=True)


META_XFAIL: Dict[str, str] = {}


@pytest.mark.parametrize("row", cells(META_XFAIL))
def test_meta_init(row: str) -> None:
    with torch.device("meta"):
        model = R.convert(row, R.TinyBlock())
    meta_shapes(row, model)
    model.to_empty(device="cpu")
    model.load_state_dict(R.base_model().state_dict())
    torch.manual_seed(SEED)
    out, grads = R.step(row, model, fresh_input())
    check_forward_exact(out, exact(row)[0])
    # same weights, same seed, same code path as the model converted on the CPU: same draws.
    fewbit_grads, _ = eager_draws(row)
    for n, g in grads.items():
        assert torch.equal(g, fewbit_grads[n]), f"{n} differs from the CPU-converted model"
