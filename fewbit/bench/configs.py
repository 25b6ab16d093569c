"""Registry of benchmark configurations: a name and a function that converts a model.

Adding a row is one line::

    register(Config("gelu2", lambda m: _convert(m, bits=2, linear=None), "2-bit GELU"))

Besides fewbit's own rows there are the baselines a user already has: ``ckpt`` (activation
checkpointing of every transformer layer, or every residual block of the CNN preset) and
``offload`` (`torch.autograd.graph.save_on_cpu`, CUDA only: ``Config.devices``).
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = [
    "Config",
    "CONFIGS",
    "DEFAULT_CONFIGS",
    "register",
    "get_config",
    "with_generic_compress",
    "with_forward_context",
    "checkpoint_layers",
]

Apply = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class Config:
    """A benchmark row: ``apply(model)`` returns the model to train (may modify in place).

    ``devices``: the device types on which the row means something (None: all); on another
    device the bench prints why it does not apply instead of a number."""

    name: str
    apply: Apply
    description: str = ""
    devices: Optional[tuple[str, ...]] = None

    def applies_to(self, device: str) -> bool:
        """Whether this row runs on ``device`` (a device string such as 'cpu' or 'cuda:0')."""
        return self.devices is None or torch.device(device).type in self.devices


def _convert(model: nn.Module, **kwargs: Any) -> nn.Module:
    from fewbit.convert import convert  # imported late: only the converted rows need it

    return convert(model, **kwargs)


def _vanilla(model: nn.Module) -> nn.Module:
    return model


def _gelu3(model: nn.Module) -> nn.Module:
    return _convert(model, bits=3, linear=None)


def _rand20(model: nn.Module) -> nn.Module:
    return _convert(model, activations=False, linear=0.2)


def _rand20_variant(matmul: str) -> Apply:
    def apply(model: nn.Module) -> nn.Module:
        return _convert(model, activations=False, linear={"proj_dim_ratio": 0.2, "matmul": matmul})

    return apply


def _gelu3_rand20(model: nn.Module) -> nn.Module:
    return _convert(model, bits=3, linear=0.2)


def _level(level: int) -> Apply:
    def apply(model: nn.Module) -> nn.Module:
        from fewbit.levels import convert_compressed

        return convert_compressed(model, level=level)

    return apply


def with_forward_context(
    model: nn.Module, context: Callable[[nn.Module], AbstractContextManager[Any]]
) -> nn.Module:
    """Make every forward of ``model`` run inside ``context(model)``. Root forward hooks, so
    parameter names and the model's class are unchanged; the context is closed even when
    forward raises."""
    open_contexts: list[ExitStack] = []

    def enter(module: nn.Module, args: Any) -> None:
        stack = ExitStack()
        stack.enter_context(context(module))
        open_contexts.append(stack)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        open_contexts.pop().close()

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
    return model


def with_generic_compress(model: nn.Module, bits: int = 2) -> nn.Module:
    """Every forward of ``model`` inside ``fewbit.compress(bits=...)`` (the generic
    saved-tensor mode): every floating saved tensor that is not a parameter or buffer of the
    model, and not already compact, is quantized."""
    from fewbit.compress import compress

    return with_forward_context(model, lambda m: compress(bits=bits, model=m))


def _checkpointed_forward(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_layers(model: nn.Module) -> nn.Module:
    """Activation checkpointing of every layer: a Hugging Face model's own
    ``gradient_checkpointing_enable`` (non-reentrant; ``activation_checkpointing_enable`` in
    transformers 5) on each transformer layer; otherwise
    every residual block (`fewbit.models.BasicBlock`) recomputes its forward in backward
    (`torch.utils.checkpoint`, non-reentrant; the block's forward is replaced on the
    instance, so parameter names are unchanged). Only the layer inputs stay saved; backward
    runs each layer's forward again. ValueError when the model has neither."""
    if getattr(model, "supports_gradient_checkpointing", False):
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model
    from fewbit.models import BasicBlock

    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    if not blocks:
        raise ValueError(
            "checkpoint_layers: model has no gradient_checkpointing_enable and no residual blocks"
        )
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, block.forward)  # type: ignore
    return model


def _ckpt(model: nn.Module) -> nn.Module:
    return checkpoint_layers(model)


def _ckpt_gelu3(model: nn.Module) -> nn.Module:
    return checkpoint_layers(_gelu3(model))


def _ckpt_level(level: int) -> Apply:
    def apply(model: nn.Module) -> nn.Module:
        return checkpoint_layers(_level(level)(model))

    return apply


def _offload(model: nn.Module) -> nn.Module:
    return with_forward_context(model, lambda m: torch.autograd.graph.save_on_cpu(pin_memory=True))


def _generic2(model: nn.Module) -> nn.Module:
    return with_generic_compress(model, bits=2)


def _gelu3_rand20_generic2(model: nn.Module) -> nn.Module:
    return with_generic_compress(_convert(model, bits=3, linear=0.2), bits=2)


CONFIGS: dict[str, Config] = {}


def register(config: Config) -> Config:
    """Add (or replace) a configuration in `CONFIGS` and return it."""
    CONFIGS[config.name] = config
    return config


register(Config("vanilla", _vanilla, "PyTorch as is"))
register(Config("gelu3", _gelu3, "3-bit activation derivatives (fewbit.convert, linear=None)"))
register(Config("rand20", _rand20, "randomized linear layers keeping 20% of rows"))
register(Config("gelu3+rand20", _gelu3_rand20, "3-bit activations and randomized linear 20%"))
register(Config("rand20-rademacher", _rand20_variant("rademacher"), "rand20, Rademacher sketch"))
register(Config("rand20-sampling", _rand20_variant("sampling"), "rand20, importance row sampling"))
register(
    Config("L1", _level(1), "ActNN-style level 1: 4-bit layers, 1-bit masks, 3-bit activations")
)
register(
    Config("L2", _level(2), "ActNN-style level 2: 2-bit layers, 1-bit masks, 3-bit activations")
)
register(Config("L3", _level(3), "level 3: 2 bits on average, adaptive per layer"))
register(Config("compress2", _generic2, "generic mode: every saved float tensor at 2 bits"))
register(
    Config("gelu3+rand20+compress2", _gelu3_rand20_generic2, "both rows above, the rest at 2 bits")
)
register(Config("ckpt", _ckpt, "activation checkpointing of every layer (non-reentrant)"))
register(Config("ckpt+gelu3", _ckpt_gelu3, "checkpointing and 3-bit activations"))
register(Config("ckpt+L2", _ckpt_level(2), "checkpointing and level L2 inside each layer"))
register(
    Config(
        "offload",
        _offload,
        "saved tensors to pinned host memory (torch.autograd.graph.save_on_cpu)",
        devices=("cuda",),
    )
)


# The rows `fewbit bench` runs without --configs (a few minutes on 2 CPU cores for the default
# model, three interleaved rounds); `--configs all` adds rand20 and its sketch variants, L1,
# L3 (equal to L2 until its first re-allocation, after 100 steps) and the generic mode on top
# of gelu3+rand20.
DEFAULT_CONFIGS = (
    "vanilla",
    "ckpt",
    "offload",
    "gelu3",
    "ckpt+gelu3",
    "gelu3+rand20",
    "L2",
    "ckpt+L2",
    "compress2",
)


def get_config(name: str) -> Config:
    """The registered configuration ``name``; ValueError listing the known names otherwise."""
    try:
        return CONFIGS[name]
    except KeyError:
        known = ", ".join(CONFIGS)
        raise ValueError(f"unknown configuration {name!r}; known: {known}") from None
