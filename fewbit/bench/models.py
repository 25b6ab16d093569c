"""Benchmark models: RoBERTa-architecture classifiers built from configs (no download).

Presets:

* ``roberta-small`` (default): 4 layers, hidden 256, 4 heads, intermediate 1024, batch 16,
  sequence 128. The vocabulary is cut to 8192 tokens so that, as in the published
  batch-128 roberta-base setting, activations rather than the embedding's parameters and
  AdamW state dominate the peak. The whole default benchmark (4 child processes) takes
  about a minute on two idle CPU cores.
* ``roberta-base-mrpc``: roberta-base (12 layers, hidden 768), batch 128, sequence 128,
  two labels: the published FewBit setting (GLUE MRPC, fp32, one GPU).
* ``tiny``: 2 layers, hidden 64, for tests.

A path to a Hugging Face config JSON (with ``model_type``) is accepted instead of a name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["ModelSpec", "PRESETS", "resolve_spec", "build_model", "make_batch"]


@dataclass(frozen=True)
class ModelSpec:
    """A model architecture (Hugging Face config fields) and its default batch shape."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    batch: int = 8
    seq: int = 128
    model_type: str = "roberta"
    description: str = ""


_ROBERTA_COMMON: dict[str, Any] = {
    "vocab_size": 50265,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "layer_norm_eps": 1e-5,
    "num_labels": 2,
}

PRESETS: dict[str, ModelSpec] = {
    "roberta-small": ModelSpec(
        "roberta-small",
        {
            **_ROBERTA_COMMON,
            "vocab_size": 8192,
            "num_hidden_layers": 4,
            "hidden_size": 256,
            "num_attention_heads": 4,
            "intermediate_size": 1024,
        },
        batch=16,
        seq=128,
        description="RoBERTa architecture, 4 layers, hidden 256, vocab 8192 (default)",
    ),
    "roberta-base-mrpc": ModelSpec(
        "roberta-base-mrpc",
        {
            **_ROBERTA_COMMON,
            "num_hidden_layers": 12,
            "hidden_size": 768,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
        },
        batch=128,
        seq=128,
        description="roberta-base, GLUE MRPC shape (published FewBit setting)",
    ),
    "resnet-small": ModelSpec(
        "resnet-small",
        {"num_labels": 10, "width": 32, "blocks": 2},
        batch=64,
        seq=32,
        model_type="fewbit-resnet",
        description="CIFAR-style ResNet (fewbit.models), 32x32 images ('seq' is the image side)",
    ),
    "tiny": ModelSpec(
        "tiny",
        {
            **_ROBERTA_COMMON,
            "vocab_size": 1000,
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 2,
            "intermediate_size": 256,
        },
        batch=4,
        seq=32,
        description="RoBERTa architecture, 2 layers, hidden 64 (tests)",
    ),
}


def resolve_spec(model: str, batch: Optional[int] = None, seq: Optional[int] = None) -> ModelSpec:
    """A preset name or a config JSON path, with optional batch/sequence overrides."""
    if model in PRESETS:
        spec = PRESETS[model]
    elif os.path.isfile(model):
        with open(model) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise ValueError(f"model config {model!r} must be a JSON object with 'model_type'")
        spec = ModelSpec(os.path.basename(model), cfg, model_type=str(cfg["model_type"]))
    else:
        known = ", ".join(PRESETS)
        raise ValueError(f"model must be a preset ({known}) or a config JSON path, got {model!r}")
    if batch is not None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        spec = replace(spec, batch=batch)
    if seq is not None:
        if seq < 1:
            raise ValueError(f"seq must be >= 1, got {seq}")
        spec = replace(spec, seq=seq)
    return spec


@dataclass
class ClassifierOutput:
    """What the image classifier returns: the cross-entropy loss and the logits."""

    loss: torch.Tensor
    logits: torch.Tensor


class ImageClassifier(nn.Module):
    """Wraps a CNN so that ``model(pixel_values=..., labels=...)`` returns ``.loss``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> ClassifierOutput:
        logits = self.net(pixel_values)
        return ClassifierOutput(nn.functional.cross_entropy(logits, labels), logits)


def build_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """A freshly initialised classifier (weights depend only on ``seed``)."""
    if spec.model_type == "fewbit-resnet":
        from fewbit.models import resnet_small

        torch.manual_seed(seed)
        cfg = spec.config
        net = resnet_small(
            int(cfg["num_labels"]), width=int(cfg["width"]), blocks=int(cfg["blocks"])
        )
        return ImageClassifier(net).train()
    from transformers import AutoConfig, AutoModelForSequenceClassification

    fields = {k: v for k, v in spec.config.items() if k != "model_type"}
    config = AutoConfig.for_model(spec.model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.train()
    return model


def make_batch(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (avoiding special ids 0-2), full attention mask and labels; for the
    CNN, random images of side ``spec.seq`` and labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = int(spec.config.get("num_labels", 2))
    if spec.model_type == "fewbit-resnet":
        side = spec.seq
        return {
            "pixel_values": torch.randn(spec.batch, 3, side, side, generator=gen),
            "labels": torch.randint(0, labels, (spec.batch,), generator=gen),
        }
    vocab = int(spec.config.get("vocab_size", 1000))
    ids = torch.randint(3, vocab, (spec.batch, spec.seq), generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, labels, (spec.batch,), generator=gen),
    }
