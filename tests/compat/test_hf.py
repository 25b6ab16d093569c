"""Compatibility matrix (issue 11), ecosystem columns: Hugging Face ``Trainer`` (two steps of a
tiny BERT built from a config, offline), PEFT LoRA (conversion after ``get_peft_model``), and,
for the level rows, autocast through Hugging Face attention (a tiny Llama whose attention
QModule routes through fewbit's compressed attention).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import fewbit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compat_rows as R  # noqa: E402

transformers = pytest.importorskip("transformers")

LEVELS = R.LEVEL_ROWS


def is_fewbit(module: nn.Module) -> bool:
    return type(module).__module__.startswith("fewbit")


# --- Hugging Face Trainer -----------------------------------------------------------------------


def tiny_bert() -> nn.Module:
    """2-layer BERT classifier from a config (no download); dropout off so that the first
    step's loss is a deterministic function of the weights and the batch."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def dataset() -> List[Dict[str, Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (8, 16), generator=g)
    labels = torch.randint(0, 2, (8,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(8)]


def train(model: nn.Module, tmp: str, generic: bool) -> Tuple[List[float], int]:
    """Two Trainer steps at batch 4; returns the logged losses and the number of tensors the
    generic mode compressed (0 without it)."""
    pytest.importorskip("accelerate")  # transformers' Trainer needs it (peft pulls it in)
    from transformers import Trainer, TrainingArguments

    compressed = [0]

    class CompressTrainer(Trainer):
        def training_step(self, model: nn.Module, inputs: Dict[str, Any],
                          num_items_in_batch: Optional[Any] = None) -> Tensor:
            with fewbit.compress(bits=2, model=model) as comp:
                loss = super().training_step(model, inputs, num_items_in_batch)
            compressed[0] += comp.stats.compressed
            return loss

    args = TrainingArguments(output_dir=tmp, max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                             disable_tqdm=True)
    cls = CompressTrainer if generic else Trainer
    trainer = cls(model=model, args=args, train_dataset=dataset())
    result = trainer.train()
    assert result.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, compressed[0]


@pytest.fixture(scope="module")
def trainer_reference(tmp_path_factory: pytest.TempPathFactory) -> List[float]:
    return train(tiny_bert(), str(tmp_path_factory.mktemp("ref")), generic=False)[0]


@pytest.mark.parametrize("row", R.ROWS)
def test_trainer(row: str, trainer_reference: List[float], tmp_path: Any) -> None:
    model = R.convert(row, tiny_bert())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses, compressed = train(model, str(tmp_path), generic=row == "generic")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # step 1 runs on the initial weights, and fewbit's forward is torch's: same loss up to the
    # Trainer's logging (rounded to 4 decimals) and fp32 reassociation in attention.
    assert losses[0] == pytest.approx(trainer_reference[0], abs=1e-4)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no parameter was updated"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if row == "generic":
        assert compressed > 0, "fewbit.compress compressed nothing inside Trainer"
    else:
        assert any(is_fewbit(m) for m in model.modules()), "the model lost its fewbit layers"


# --- PEFT LoRA ----------------------------------------------------------------------------------

LORA_R, LORA_ALPHA = 4, 8
TARGETS = ("up", "down")


def peft_model() -> nn.Module:
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(TARGETS),
                          lora_dropout=0.0, init_lora_weights=False)  # B != 0: A gets a gradient
    return peft.get_peft_model(R.base_model(), cfg)


def lora_grads(model: nn.Module, seed: int) -> Tuple[Tensor, Dict[str, Tensor]]:
    torch.manual_seed(seed)
    out, _ = R.step("exact", model, R.make_input())
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def merged_expectation(model: nn.Module, row: str) -> Dict[str, Tensor]:
    """LoRA gradients implied by the row on the merged model: with ``W' = W + s B A``,
    ``dL/dB = s dL/dW' A^T`` and ``dL/dA = s B^T dL/dW'`` (exact linear algebra)."""
    base = R.base_model()
    scale = LORA_ALPHA / LORA_R
    lora = {}
    with torch.no_grad():
        for t in TARGETS:
            layer = getattr(model.base_model.model, t)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            getattr(base, t).weight += scale * b @ a
            lora[t] = (a, b)
    conv = R.convert(row, base)
    torch.manual_seed(R.SEED)
    _, grads = R.step(row, conv, R.make_input())
    out = {}
    for t, (a, b) in lora.items():
        gw = grads[f"{t}.weight"]
        out[f"base_model.model.{t}.lora_A.default.weight"] = scale * b.T @ gw
        out[f"base_model.model.{t}.lora_B.default.weight"] = scale * gw @ a.T
    return out


PEFT_ROWS = [r for r in R.ROWS if r != "generic"]


@pytest.mark.parametrize("row", PEFT_ROWS)
def test_peft_lora(row: str) -> None:
    ref_out, ref_grads = lora_grads(peft_model(), R.SEED)
    model = R.convert(row, peft_model())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(ref_grads), "conversion changed which parameters train"
    inner = model.base_model.model
    if row == "gelu3":
        assert is_fewbit(inner.act)
    else:
        assert all(is_fewbit(getattr(inner, t).base_layer) for t in TARGETS)
    out, grads = lora_grads(model, R.SEED)
    assert torch.equal(out, ref_out), "forward differs from the unconverted PEFT model"
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, f"{n}: frozen/trainable grad mismatch"
    for n, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n
    if row == "gelu3":  # deterministic: equals the merged model's few-bit gradient mapped
        expected = merged_expectation(model, row)
        for n, g in grads.items():
            err = R.rel_err(g, expected[n])
            assert err <= R.FP32_REL, f"{n}: {err:.3g} off the merged few-bit gradient"
        return
    # stochastic rows: this draw is within 4x the RMS error of DRAWS other seeds' draws
    # (same argument as compat_rows.check_grads), and fewbit changed the gradient.
    sq = dict.fromkeys(grads, 0.0)
    for seed in range(R.SEED + 1, R.SEED + 1 + R.DRAWS):
        _, other = lora_grads(model, seed)
        for n in grads:
            sq[n] += R.rel_err(other[n], ref_grads[n]) ** 2 / R.DRAWS
    errs = {n: R.rel_err(g, ref_grads[n]) for n, g in grads.items()}
    for n, err in errs.items():
        bound = R.NOISE_FACTOR * sq[n] ** 0.5 + R.FP32_REL
        assert err <= bound, f"{n}: {err:.3g} > {bound:.3g}"
    assert max(errs.values()) > R.FP32_REL, "gradients are exact: fewbit did not run"


def test_peft_lora_generic() -> None:
    """Generic mode around a PEFT model: frozen base weights are not compressed (``model=``
    skips them), LoRA gradients finite and within the row's noise of the unconverted ones."""
    ref_out, ref_grads = lora_grads(peft_model(), R.SEED)
    model = peft_model()
    torch.manual_seed(R.SEED)
    out, _ = R.step("generic", model, R.make_input())
    assert torch.equal(out, ref_out)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(ref_grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert max(R.rel_err(g, ref_grads[n]) for n, g in grads.items()) > R.FP32_REL


# --- autocast through Hugging Face attention (level rows) --------------------------------------


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def llama_step(model: nn.Module, dtype: torch.dtype) -> Tuple[Tensor, Dict[str, Tensor]]:
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(R.SEED)
    with torch.autocast("cpu", dtype=dtype):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("row", LEVELS)
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_hf_attention(row: str, amp: str) -> None:
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    ref_loss, ref_grads = llama_step(tiny_llama(), dtype)
    loss, grads = llama_step(fewbit.QModule(tiny_llama(), level=row), dtype)
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    # the loss is a mean of log-softmaxes after one block computed in `dtype`; the compressed
    # attention rounds in another order: a few `dtype` roundings (eps each), 8 eps in all.
    assert loss.dtype == ref_loss.dtype
    assert abs(loss.item() - ref_loss.item()) <= 8 * eps * abs(ref_loss.item())
    for n, g in grads.items():
        assert g is not None and g.dtype == ref_grads[n].dtype, n
        assert torch.isfinite(g).all(), n
