"""fewbit.convert / conversion_report on torch models and small Hugging Face models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewbit.convert import conversion_report, convert
from fewbit.modules import activations as fa
from fewbit.modules.linear import RandomizedConv1D, RandomizedLinear

transformers = pytest.importorskip("transformers")


def _torch_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.GELU(approximate="tanh"),
        nn.LeakyReLU(0.2),
        nn.Hardtanh(-2.0, 3.0),
        nn.Softplus(beta=2.0, threshold=10.0),
        nn.SiLU(),
        nn.ReLU(),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.PReLU(),
        nn.Linear(8, 3),
    )


def test_torch_activations_keep_their_arguments() -> None:
    model = convert(_torch_model())
    assert isinstance(model[1], fa.GELU) and model[1].approximate == "tanh" and model[1].bits == 3
    assert isinstance(model[2], fa.LeakyReLU) and model[2].negative_slope == 0.2
    assert model[2].bits == 1  # piecewise: exact 1-bit mask
    assert isinstance(model[3], fa.Hardtanh) and (model[3].min_val, model[3].max_val) == (-2, 3)
    assert isinstance(model[4], fa.Softplus) and (model[4].beta, model[4].threshold) == (2, 10)
    assert isinstance(model[5], fa.SiLU) and isinstance(model[6], fa.ReLU)
    assert isinstance(model[7][1], fa.Tanh)
    assert type(model[8]) is nn.PReLU  # has a parameter: not converted
    assert all(type(m) is nn.Linear for m in (model[0], model[7][0], model[9]))  # linear=None
    assert "bits=3" in repr(model[1])


def test_forward_unchanged_and_state_dict_round_trip() -> None:
    ref = _torch_model()
    before = copy.deepcopy(ref.state_dict())
    model = convert(copy.deepcopy(ref), linear=0.5, linear_exclude=None)
    x = torch.randn(4, 5, 6)
    assert torch.equal(model(x), ref(x))  # activations and linears: exact forwards
    assert list(model.state_dict()) == list(before)
    model.load_state_dict(before)  # a checkpoint from before loads after conversion
    ref.load_state_dict(model.state_dict())  # and the other way round
    assert sum(isinstance(m, RandomizedLinear) for m in model.modules()) == 3


def test_bits_overrides() -> None:
    model = convert(_torch_model(), bits=4)
    assert model[1].bits == 4 and model[5].bits == 4 and model[6].bits == 1
    model = convert(_torch_model(), bits={"GELU": 2, "SiLU": None, "ReLU": 1})
    assert model[1].bits == 2 and type(model[5]) is nn.SiLU and model[6].bits == 1
    assert model[7][1].bits == 3  # not in the dict: default
    with pytest.raises(TypeError, match="bits"):
        convert(_torch_model(), bits="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        convert(_torch_model(), bits=0)


def test_inplace_false_and_linear_arguments() -> None:
    ref = _torch_model()
    out = convert(ref, inplace=False, linear={"proj_dim": 4, "matmul": "rademacher"})
    assert out is not ref and type(ref[1]) is nn.GELU and type(ref[0]) is nn.Linear
    assert isinstance(out[0], RandomizedLinear) and out[0].proj_dim == 4
    assert out[0].matmul == "rademacher"
    with pytest.raises(ValueError, match="linear"):
        convert(_torch_model(), linear=1.5)
    with pytest.raises(TypeError, match="linear"):
        convert(_torch_model(), linear="0.2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        convert(lambda x: x)  # type: ignore[arg-type]


class _FunctionAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.act_fn = F.gelu  # a function, not a module (e.g. config.hidden_act = F.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.dense(x))


def test_function_attribute_is_reported_then_converted() -> None:
    model = _FunctionAttribute()
    report = conversion_report(model)
    assert [e.path for e in report.unconverted] == ["act_fn"]
    assert "function attribute" in report.unconverted[0].detail
    x = torch.randn(3, 4)
    ref = model(x)
    keys = list(model.state_dict())
    convert(model)
    assert isinstance(model.act_fn, fa.GELU) and torch.equal(model(x), ref)
    assert list(model.state_dict()) == keys


# ------------------------------------------------------------------- Hugging Face models


def _bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    return transformers.BertForSequenceClassification(config)


def _roberta() -> nn.Module:
    config = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=32,
                                        max_position_embeddings=40)
    return transformers.RobertaForSequenceClassification(config)


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=32, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


# name -> (builder, activation class expected, few-bit class, approximate, linears converted)
HF = {
    "bert": (_bert, "GELUActivation", fa.GELU, "none", 12),
    "roberta": (_roberta, "GELUActivation", fa.GELU, "none", 12),
    "gpt2": (_gpt2, "NewGELUActivation", fa.GELU, "tanh", 8),
    "llama": (_llama, "SiLUActivation", fa.SiLU, None, 14),
}


@pytest.mark.parametrize("name", list(HF))
def test_hf_models(name: str) -> None:
    build, source, target, approximate, n_linear = HF[name]
    model = build().eval()
    ids = torch.randint(3, 50, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    keys, state = list(model.state_dict()), copy.deepcopy(model.state_dict())
    params = {id(p) for p in model.parameters()}

    report = conversion_report(model)
    assert not report.converted
    assert {e.source for e in report.unconverted} >= {source}

    convert(model, linear=0.3)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    if name == "gpt2":
        # NewGELUActivation spells tanh-GELU out in Python; F.gelu(approximate='tanh') is the
        # same function rounded differently (~1 ulp of fp32 per element).
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out, ref)  # same kernels: bitwise
    assert list(model.state_dict()) == keys
    assert {id(p) for p in model.parameters()} == params  # the same Parameter objects
    model.load_state_dict(state)  # checkpoint from before conversion loads strictly

    report = conversion_report(model)
    counts = report.counts()
    linear_cls = "RandomizedConv1D" if name == "gpt2" else "RandomizedLinear"
    assert counts[target.__name__] == 2 and counts[linear_cls] == n_linear
    assert not [e for e in report.unconverted if e.source == source]
    acts = [m for m in model.modules() if isinstance(m, target)]
    if approximate is not None:
        assert all(m.approximate == approximate for m in acts)
    heads = [e.path for e in report.exact_linear]
    assert heads and all(("classifier" in p or "lm_head" in p or "pooler" in p) for p in heads)
    text = repr(model)
    assert "bits=3" in text and "proj_dim_ratio=0.3" in text
    model.train()
    model(input_ids=ids).logits.float().square().mean().backward()  # trains end to end


def test_hf_unsupported_activation_is_reported() -> None:
    from transformers.activations import ClippedGELUActivation, QuickGELUActivation

    model = nn.Sequential(nn.Linear(4, 4), QuickGELUActivation(),
                          ClippedGELUActivation(-1.0, 1.0))
    convert(model)
    assert type(model[1]) is QuickGELUActivation
    report = conversion_report(model)
    reasons = {e.source: e.detail for e in report.unconverted}
    assert "sigmoid(1.702x)" in reasons["QuickGELUActivation"]
    assert "ClippedGELUActivation" in reasons


def test_hf_gelu_variants_map_to_the_same_math() -> None:
    from transformers import activations as act

    model = nn.Sequential(act.GELUActivation(use_gelu_python=True), act.FastGELUActivation(),
                          act.GELUTanh(), act.AccurateGELUActivation(), act.MishActivation())
    x = torch.linspace(-6, 6, 101)
    refs = [m(x) for m in model]
    convert(model)
    approx = [getattr(m, "approximate", None) for m in model]
    assert approx == ["none", "tanh", "tanh", "tanh", None]
    assert isinstance(model[4], fa.Mish)
    for m, ref in zip(model, refs):
        assert torch.allclose(m(x), ref, rtol=1e-5, atol=1e-6)  # fp32 rounding of the formula


def test_linear_exclude_pattern() -> None:
    model = _bert()
    convert(model, linear=0.5, linear_exclude=r"attention")
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, RandomizedLinear)
    assert isinstance(model.classifier, RandomizedLinear)  # default head filter replaced


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes_kept(dtype: torch.dtype) -> None:
    ref = _torch_model().to(dtype)
    model = convert(copy.deepcopy(ref), linear=0.5, linear_exclude=None)
    assert all(p.dtype == dtype for p in model.parameters())
    x = torch.randn(3, 6, dtype=dtype)
    assert torch.equal(model(x), ref(x))


def test_conv1d_conversion_shares_parameters() -> None:
    model = _gpt2()
    conv = model.transformer.h[0].mlp.c_fc
    convert(model, linear=0.25)
    new = model.transformer.h[0].mlp.c_fc
    assert isinstance(new, RandomizedConv1D) and new.weight is conv.weight
    assert new.bias is conv.bias and new.proj_dim_ratio == 0.25


def test_default_keeps_cnn_head_named_fc_exact() -> None:
    """torchvision-style heads are called ``fc``: kept exact like classifier/lm_head."""
    from fewbit.models import resnet_small

    model = convert(resnet_small(), linear=0.2)
    assert type(model.fc) is nn.Linear
