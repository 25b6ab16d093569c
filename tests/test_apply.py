"""fewbit.apply: configs, handlers (convert, report, undo), levels as config lists, the generic
mode, shared Hugging Face configs (issue 11 item 5), PEFT models and argument errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit
from fewbit import Activations, Compress, Generic, Sketch
from fewbit.modules import compressed as C
from fewbit.modules.activations import FewBitActivationModule


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Dropout(0.1),
                         nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


class _FunctionAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


def test_configs_are_frozen_typed_and_exported() -> None:
    import fewbit.configs as configs

    assert fewbit.Activations is configs.Activations and fewbit.Generic is configs.Generic
    c = Compress(bits=4, layers=("linear", "conv"))
    assert c.layers == ("conv", "linear")  # canonical order
    assert hash(c) == hash(Compress(bits=4, layers=("conv", "linear")))
    with pytest.raises(AttributeError):
        c.bits = 2  # type: ignore[misc]
    assert Activations(classes={"GELU": 4}).classes == (("GELU", 4),)
    for bad, name in ((lambda: Compress(bits=3), "bits"), (lambda: Sketch(ratio=0), "ratio"),
                      (lambda: Sketch(kind="dct"), "kind"), (lambda: Generic(bits=5), "bits"),
                      (lambda: Compress(layers=("rnn",)), "layers"),
                      (lambda: Compress(group_size=0), "group_size"),
                      (lambda: Activations(bits=9), "bits")):
        with pytest.raises(ValueError, match=name):
            bad()


def test_apply_in_place_keeps_parameters_state_and_eval_outputs() -> None:
    model = _mlp()
    params = list(model.parameters())
    keys = list(model.state_dict())
    x = torch.randn(8, 16)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    out = fewbit.apply(model, Activations(bits=3), Compress(bits=4))
    assert out is model
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert isinstance(model[0], C.Linear) and model[0].bits == 4
    assert isinstance(model[1], FewBitActivationModule) and model[1].bits == 3
    assert isinstance(model[3], C.Dropout)


def test_report_asks_the_handlers() -> None:
    model = fewbit.apply(_mlp(), Activations(), Compress(bits=2, layers=("linear",)))
    report = fewbit.conversion_report(model)
    kinds = {e.path: e.kind for e in report.converted}
    # A compressed Linear is reported by the compress handler, never as an exact nn.Linear.
    assert kinds["0"] == kinds["4"] == kinds["6"] == "compress"
    assert kinds["1"] == kinds["5"] == "activations"
    assert report.exact_linear == []
    assert report.counts()["QLinear"] == 3
    assert "[compress]" in str(report)
    sketched = fewbit.apply(_mlp(), Sketch(ratio=0.5, exclude=r"^6$"))
    report = fewbit.conversion_report(sketched)
    assert [e.path for e in report.exact_linear] == ["6"]
    assert {e.path for e in report.converted if e.kind == "sketch"} == {"0", "4"}
    assert "proj_dim_ratio=0.5" in str(report)


def test_unapply_restores_torch_layers_and_function_attributes() -> None:
    model = nn.Sequential(_mlp(), _FunctionAct())
    keys = list(model.state_dict())
    params = list(model.parameters())
    classes = [type(m) for m in model.modules()]
    fewbit.apply(model, Activations(), Sketch(ratio=0.5), Generic())
    assert isinstance(model[1].act, FewBitActivationModule)
    assert isinstance(model[0][0], fewbit.RandomizedLinear)
    model.eval()
    fewbit.unapply(model)
    assert [type(m) for m in model.modules()] == classes
    assert model[1].act is F.silu
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert list(model.state_dict()) == keys
    assert not model[0][0].training  # the mode set after conversion is kept
    assert not model._forward_pre_hooks and not model._forward_hooks
    fewbit.apply(model, "L2")
    fewbit.unapply(model)
    assert [type(m) for m in model.modules()] == classes


def test_apply_equals_convert_and_qmodule() -> None:
    a = fewbit.apply(_mlp(), Activations(bits=2), Sketch(ratio=0.2))
    b = fewbit.convert(_mlp(), bits=2, linear=0.2)
    assert repr(a) == repr(b)
    c = fewbit.apply(_mlp(), "L2")
    d = fewbit.QModule(_mlp(), "L2")
    assert repr(c) == repr(d)
    e = fewbit.apply(_mlp(), *fewbit.levels.level_configs("L2"))
    assert repr(c) == repr(e)


def test_root_layer_is_returned() -> None:
    layer = nn.Linear(4, 4)
    out = fewbit.apply(layer, Compress())
    assert isinstance(out, C.Linear) and out is not layer and out.weight is layer.weight


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_generic_mode_is_compress_around_forward() -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 8))
    x = torch.randn(64, 64)
    torch.manual_seed(1)
    with fewbit.compress(2, model=model):
        expected = _grads(model, x)
    fewbit.apply(model, Generic(bits=2))
    fewbit.apply(model, Generic(bits=2))  # applying again replaces, never stacks hooks
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    torch.manual_seed(1)
    got = _grads(model, x)
    # Same seed, same tensors packed in the same order: the same stochastic rounding.
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    exact = _grads(fewbit.unapply(copy.deepcopy(model)), x)
    assert not all(torch.equal(a, b) for a, b in zip(got, exact))  # it did quantize
    clone = pickle.loads(pickle.dumps(model))
    assert [e.kind for e in fewbit.conversion_report(clone).converted] == ["generic"]
    torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(_grads(clone, x), expected))


def test_generic_mode_closes_its_context_when_forward_raises() -> None:
    model = fewbit.apply(nn.Sequential(nn.Linear(4, 4)), Generic())
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))
    enter = next(iter(model._forward_pre_hooks.values()))
    assert enter.open == {}


@pytest.mark.parametrize("call", [fewbit.apply, fewbit.unapply, fewbit.conversion_report,
                                  fewbit.convert, fewbit.QModule])
def test_model_argument_must_be_a_module(call) -> None:
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        call(5)


def test_configs_argument_is_checked() -> None:
    with pytest.raises(TypeError, match="configs"):
        fewbit.apply(nn.Linear(2, 2), 5)
    with pytest.raises(ValueError, match="level"):
        fewbit.apply(nn.Linear(2, 2), "L9")


# --- Hugging Face: shared configs (issue 11 item 5) and PEFT ----------------------------------


def _llama_config(transformers):
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        attn_implementation="sdpa")


def _lm_grads(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_conversion_does_not_touch_a_shared_config() -> None:
    transformers = pytest.importorskip("transformers")
    config = _llama_config(transformers)
    torch.manual_seed(0)
    converted = transformers.LlamaForCausalLM(config)
    other = transformers.LlamaForCausalLM(config)  # built from the same config object
    reference = copy.deepcopy(other)
    ids = torch.randint(0, 64, (2, 16))
    fewbit.QModule(converted, "L2")
    assert config._attn_implementation == "sdpa" and converted.config is config
    attn = converted.model.layers[0].self_attn
    assert attn.config._attn_implementation == "fewbit_sdpa"
    assert other.model.layers[0].self_attn.config is config
    # The unconverted model trains exactly as before (it used to get 2-bit attention).
    got, want = _lm_grads(other, ids), _lm_grads(reference, ids)
    assert all(torch.equal(got[k], want[k]) for k in want)
    report = fewbit.conversion_report(converted)
    assert any(e.target == "compressed attention" for e in report.converted)
    fewbit.unapply(converted)
    assert attn.config is config


def test_peft_model_converts_and_trains() -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_llama_config(transformers))
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           lora_dropout=0.0, init_lora_weights=False)  # B != 0
    model = peft.get_peft_model(base, lora)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 16))
    fewbit.apply(model, "L2")
    report = fewbit.conversion_report(model)
    paths = {e.path for e in report.converted if e.kind == "compress"}
    assert any(p.endswith("q_proj.lora_A.default") for p in paths)
    assert any(p.endswith("q_proj.base_layer") for p in paths)
    got, want = _lm_grads(model, ids), _lm_grads(reference, ids)
    assert set(got) == set(want) and all("lora_" in k for k in got)  # only adapters train
    for k in want:
        # 4-bit saved activations (L2): each saved element is off by less than one step
        # range/15 of its group, unbiased; on this model one step's adapter gradients are
        # 0.25-0.4 off in relative norm (the same without PEFT): 0.6 leaves room for the seed.
        err = (got[k] - want[k]).norm() / want[k].norm()
        assert err < 0.6, (k, float(err))
    model.eval()
    with torch.no_grad():  # eval: original attention, exact layers
        assert torch.equal(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)


# --- Checkpoint ------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


def test_checkpoint_regions_are_the_blocks() -> None:
    from fewbit.handlers.checkpoint import default_regions

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Sequential(_Block(), _Block(), _Block()),
                          nn.Linear(32, 2))
    assert default_regions(model) == ["1.0", "1.1", "1.2"]
    reference = copy.deepcopy(model)
    x = torch.randn(64, 16)
    fewbit.apply(model, fewbit.Checkpoint(bits=8))
    report = fewbit.conversion_report(model)
    assert [e.path for e in report.converted if e.kind == "checkpoint"] == ["1.0", "1.1", "1.2"]
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))  # forward exact
    got, want = _grads(model, x), _grads(reference, x)
    for g, w in zip(got, want):
        # 8-bit region inputs: each off by < range/255 of its group, unbiased; the gradients
        # through two tanh blocks stay within a few percent of torch's.
        assert (g - w).norm() / w.norm() < 0.05
    clone = pickle.loads(pickle.dumps(model))
    assert [e.kind for e in fewbit.conversion_report(clone).converted] == ["checkpoint"] * 3
    fewbit.apply(model, fewbit.Compress(bits=4))  # class swaps keep regions bound correctly
    assert model[1][0].__dict__["forward"].module is model[1][0]
    _grads(model, x)
    fewbit.unapply(model)
    assert "forward" not in model[1][0].__dict__ and type(model[0]) is nn.Linear


def test_checkpoint_on_a_transformers_model() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config(transformers))
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 16))
    fewbit.apply(model, fewbit.Checkpoint(bits=8))
    regions = [e.path for e in fewbit.conversion_report(model).converted]
    assert regions == ["model.layers.0"]
    got, want = _lm_grads(model, ids), _lm_grads(reference, ids)
    assert set(got) == set(want)
    for k in want:  # 8-bit hidden states at the layer boundary (see the test above)
        assert (got[k] - want[k]).norm() / want[k].norm() < 0.05, k


def test_allocator_sets_the_process_allocator_only_when_asked(monkeypatch) -> None:
    import os

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # restored (unset) after the test
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    model = nn.Sequential(nn.Linear(4, 4))
    fewbit.apply(model, fewbit.Allocator(expandable_segments=True))
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA already started: the runtime setting is used instead of the env")
    fewbit.apply(model, fewbit.Allocator(expandable_segments=True, set_process_allocator=True))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "set for this process" in str(fewbit.conversion_report(model))
    fewbit.unapply(model)
    assert fewbit.conversion_report(model).converted == []


def test_sketch_leaves_compressed_linears() -> None:
    model = fewbit.apply(_mlp(), Compress(bits=4, layers=("linear",)), Sketch(ratio=0.5))
    assert all(isinstance(model[i], C.Linear) for i in (0, 4, 6))
    assert not any(isinstance(m, fewbit.RandomizedLinear) for m in model.modules())


def test_applying_again_updates_the_settings() -> None:
    model = fewbit.apply(_mlp(), Activations(bits=3), Compress(bits=4))
    user_gelu = fewbit.GELU(bits=5)
    model.append(user_gelu)
    fewbit.apply(model, Activations(bits=2), Compress(bits=2))
    assert model[1].bits == 2 and model[0].bits == 2 and model[2].bits == 2
    assert model[5].bits == 1  # ReLU: exact 1-bit mask whatever the continuous bits
    assert user_gelu.bits == 5  # built by the user, not by a conversion: left as it is
    sketched = fewbit.apply(_mlp(), Sketch(ratio=0.5))
    fewbit.apply(sketched, Sketch(ratio=0.25, kind="gaussian"))
    assert sketched[0].proj_dim_ratio == 0.25 and sketched[0].matmul == "gaussian"


def test_trainer_recipe(tmp_path) -> None:
    """The recipe of fewbit/integrations/transformers.py: apply, then Trainer; the saved
    checkpoint has the keys of the unconverted model."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config(transformers))
    keys = set(model.state_dict())
    fewbit.apply(model, "L2")
    ids = torch.randint(0, 64, (8, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
        use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    trainer.save_model(str(tmp_path / "out"))
    saved = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert set(saved.state_dict()) == keys
    assert torch.equal(saved.lm_head.weight, model.lm_head.weight)


def test_offload_mode_is_exact_and_replaces_generic() -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 8))
    x = torch.randn(32, 64)
    exact = _grads(model, x)
    fewbit.apply(model, Generic(bits=2), fewbit.Offload(pin_memory=False))
    assert [e.kind for e in fewbit.conversion_report(model).converted] == ["offload"]
    assert len(model._forward_pre_hooks) == 1  # one saved-tensor mode at a time
    got = _grads(model, x)
    assert all(torch.equal(a, b) for a, b in zip(got, exact))  # copies, not approximations
    fewbit.unapply(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
