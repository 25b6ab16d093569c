"""Hugging Face ``transformers`` specifics: compressed attention routing, and the recipe for
``Trainer`` / TRL / PEFT.

Attention. ``fewbit.apply(model, Compress(...))`` (levels L2-L5) routes the attention
modules of a transformers model (``sdpa`` or ``eager`` implementation) through
:func:`fewbit.functional.compressed.scaled_dot_product_attention` while training (q, k, v and
the probabilities saved quantized), and through the original function otherwise (eval,
no_grad, ``output_attentions``). Only the converted model changes: each routed attention
module gets its own copy of the model config (one copy per distinct config object) whose
attention implementation names fewbit's function; the model's ``config`` object, and every
other model built from it, are left untouched. Masks are still built for the original
implementation (fewbit's registered mask function is the original's). Undo restores the
modules' original config object. A later ``model.set_attn_implementation(...)`` does not reach
the routed modules: convert after choosing the implementation.

Recipe (``Trainer``, TRL's ``SFTTrainer``, PEFT)::

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa")
    model = peft.get_peft_model(model, lora_config)      # optional: convert AFTER PEFT wraps
    fewbit.apply(model, "L2")                            # or any configs; in place
    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()

Conversion keeps parameter objects and state_dict keys, so ``save_pretrained`` /
``save_model`` write the same checkpoint as without fewbit (PEFT adapters included), and an
optimizer built before conversion stays valid. Convert after ``get_peft_model``: PEFT wraps
``nn.Linear`` layers, and converting first would hide them from its ``target_modules``
matching. ``gradient_checkpointing=True`` composes with fewbit (see the checkpointing notes of
the README). Evaluation and generation run the original attention and exact activations.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..functional.compressed import scaled_dot_product_attention

__all__ = ["AttentionSettings", "route_attention", "routed_attention", "unroute_attention"]

#: ``__dict__`` key of a routed attention module's :class:`AttentionSettings`.
SETTINGS = "fewbit_attention"
_PREFIX = "fewbit_"


@dataclass
class AttentionSettings:
    """What a routed attention module stores: quantization ``bits`` and ``group_size``, the
    original implementation name, and the config object it used before routing."""

    bits: int
    group_size: int
    original: str
    config: Any = None


def _fewbit_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs: Any) -> Tuple[Tensor, None]:
    """transformers attention interface: compressed attention in training, else the original."""
    settings = module.__dict__.get(SETTINGS)
    original = settings.original if isinstance(settings, AttentionSettings) else "sdpa"
    if not (module.training and torch.is_grad_enabled()) or kwargs.get("output_attentions"):
        return _original_attention(original, module)(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs)
    bits = settings.bits if isinstance(settings, AttentionSettings) else 2
    group_size = settings.group_size if isinstance(settings, AttentionSettings) else 256
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1 and attention_mask is None
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :, : key.shape[-2]]
    out = scaled_dot_product_attention(query, key, value, mask, dropout, causal, scaling,
                                       bits=bits, group_size=group_size)
    return out.transpose(1, 2).contiguous(), None


def _original_attention(name: str, module: nn.Module) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"no eager_attention_forward for {type(module).__name__}")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def _register(original: str) -> str:
    """Register fewbit's attention (and the original's mask function) under
    ``fewbit_<original>`` in transformers' registries (idempotent); returns the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _fewbit_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _is_attention(module: nn.Module) -> Optional[str]:
    """The implementation name of a routable transformers attention module, else None."""
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if not isinstance(impl, str) or not type(module).__name__.endswith("Attention"):
        return None
    if not hasattr(module, "is_causal") and not hasattr(module, "scaling"):
        return None
    return impl if impl in ("sdpa", "eager") else None


def route_attention(model: nn.Module, bits: int, group_size: int) -> int:
    """Route the attention modules of ``model`` through compressed attention (see the module
    docstring); already routed ones get the new settings. Returns how many are routed."""
    if "transformers" not in sys.modules:
        return 0
    copies: dict[int, Any] = {}
    count = 0
    for module in model.modules():
        settings = module.__dict__.get(SETTINGS)
        if isinstance(settings, AttentionSettings):
            settings.bits, settings.group_size = bits, group_size
            count += 1
            continue
        impl = _is_attention(module)
        if impl is None:
            continue
        config = module.config
        if id(config) not in copies:
            private = copy.copy(config)
            # Set the stored name directly: the property setter would also rewrite sub-configs
            # that the copy still shares with the original.
            private.__dict__["_attn_implementation_internal"] = _register(impl)
            copies[id(config)] = private
        module.__dict__[SETTINGS] = AttentionSettings(bits, group_size, impl, config)
        module.config = copies[id(config)]
        count += 1
    return count


def routed_attention(model: nn.Module) -> List[Tuple[str, nn.Module, AttentionSettings]]:
    """``(path, module, settings)`` of every routed attention module of ``model``."""
    return [(path, m, m.__dict__[SETTINGS]) for path, m in model.named_modules()
            if isinstance(m.__dict__.get(SETTINGS), AttentionSettings)]


def unroute_attention(model: nn.Module) -> None:
    """Give every routed attention module its original config back."""
    for _, module, settings in routed_attention(model):
        if settings.config is not None:
            module.config = settings.config
        del module.__dict__[SETTINGS]
