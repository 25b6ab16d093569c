"""Registry of benchmark configurations: a name, the `fewbit.apply` configs of the row, and the
baselines a user already has (activation checkpointing, offloading saved tensors).

Adding a row is one line::

    register(Config("gelu2", (Activations(bits=2),), "2-bit GELU"))

A row's ``configs`` are what ``fewbit.apply(model, *configs)`` takes (config dataclasses of
:mod:`fewbit.configs`, or level names such as ``"L2"``). ``checkpoint`` adds activation
checkpointing of every layer after them: ``"torch"`` (Hugging Face's own
``gradient_checkpointing_enable``, non-reentrant, or `torch.utils.checkpoint` on every residual
block of the CNN preset) or ``"fewbit"`` (`fewbit.checkpoint.checkpoint`: the same regions with
their inputs stored at 8 bits). ``offload`` runs forward inside
`torch.autograd.graph.save_on_cpu` (pinned host memory), a CUDA-only baseline
(``devices=("cuda",)``: on another device the bench says it does not apply).
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from fewbit.configs import Activations, Generic, Sketch

__all__ = [
    "Config",
    "CONFIGS",
    "DEFAULT_CONFIGS",
    "register",
    "get_config",
    "checkpoint_layers",
    "with_forward_context",
]

CHECKPOINTS = (None, "torch", "fewbit")


@dataclass(frozen=True)
class Config:
    """A benchmark row: ``apply(model)`` converts the model (in place) and returns it.

    ``configs``: passed to ``fewbit.apply``; ``checkpoint``: None, ``"torch"`` or ``"fewbit"``
    (every layer a checkpoint region, see `checkpoint_layers`); ``offload``: forward inside
    ``torch.autograd.graph.save_on_cpu(pin_memory=True)``; ``devices``: the device types on
    which the row means something (None: all)."""

    name: str
    configs: tuple[Any, ...] = ()
    description: str = ""
    checkpoint: Optional[str] = None
    offload: bool = False
    devices: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {self.checkpoint!r}")
        if not isinstance(self.configs, tuple):
            raise TypeError(f"configs must be a tuple, got {type(self.configs).__name__}")

    def applies_to(self, device: str) -> bool:
        """Whether this row runs on ``device`` (a device string such as 'cpu' or 'cuda:0')."""
        return self.devices is None or torch.device(device).type in self.devices

    def apply(self, model: nn.Module) -> nn.Module:
        """The model to train: ``fewbit.apply(model, *configs)``, then checkpointing, then
        offloading, as the row says."""
        if self.configs:
            from fewbit.apply import apply

            model = apply(model, *self.configs)
        if self.checkpoint is not None:
            model = checkpoint_layers(model, self.checkpoint)
        if self.offload:
            model = with_forward_context(
                model, lambda m: torch.autograd.graph.save_on_cpu(pin_memory=True)
            )
        return model


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


def _checkpoint_function(kind: str) -> Callable[..., Any]:
    """``fn(function, *args, **kwargs)`` running one checkpoint region of ``kind``."""
    if kind == "fewbit":
        from fewbit.checkpoint import checkpoint

        return checkpoint
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    return functools.partial(torch_checkpoint, use_reentrant=False)


def _checkpointed_forward(
    region: Callable[..., Any], forward: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    return region(forward, *args, **kwargs)


def checkpoint_layers(model: nn.Module, kind: str = "torch") -> nn.Module:
    """Activation checkpointing of every layer, in place.

    A Hugging Face model: each transformer layer is a region, through the model's own
    gradient-checkpointing switch (``"torch"``: non-reentrant `torch.utils.checkpoint`, what
    ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``
    does; ``"fewbit"``: `fewbit.checkpoint.checkpoint`, region inputs stored at 8 bits).
    Otherwise every residual block (`fewbit.models.BasicBlock`) is a region (its forward is
    replaced on the instance, so parameter names are unchanged). Only the layer inputs stay
    saved; backward runs each layer's forward again. ValueError when the model has neither."""
    if kind not in ("torch", "fewbit"):
        raise ValueError(f"kind must be 'torch' or 'fewbit', got {kind!r}")
    region = _checkpoint_function(kind)
    if getattr(model, "supports_gradient_checkpointing", False):
        if kind == "torch" and hasattr(model, "activation_checkpointing_enable"):
            # transformers >= 5 name of gradient_checkpointing_enable
            model.activation_checkpointing_enable({"use_reentrant": False})
        elif kind == "torch":
            model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            model._set_gradient_checkpointing(True, region)
        return model
    from fewbit.models import BasicBlock

    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    if not blocks:
        raise ValueError(
            "checkpoint_layers: model has no gradient_checkpointing_enable and no residual blocks"
        )
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, region, block.forward)  # type: ignore
    return model


CONFIGS: dict[str, Config] = {}


def register(config: Config) -> Config:
    """Add (or replace) a configuration in `CONFIGS` and return it."""
    CONFIGS[config.name] = config
    return config


_GELU3 = Activations(bits=3)
_RAND20 = Sketch(ratio=0.2)

register(Config("vanilla", (), "PyTorch as is"))
register(Config("gelu3", (_GELU3,), "3-bit activation derivatives"))
register(Config("rand20", (_RAND20,), "randomized linear layers keeping 20% of rows"))
register(Config("gelu3+rand20", (_GELU3, _RAND20), "3-bit activations and randomized linear 20%"))
register(
    Config("rand20-rademacher", (Sketch(0.2, kind="rademacher"),), "rand20, Rademacher sketch")
)
register(
    Config("rand20-gaussian", (Sketch(0.2, kind="gaussian"),), "rand20, Gaussian sketch")
)
register(
    Config("rand20-sampling", (Sketch(0.2, kind="sampling"),), "rand20, importance row sampling")
)
register(Config("L1", ("L1",), "ActNN level 1: 4-bit conv/linear, 3-bit activations"))
register(Config("L2", ("L2",), "ActNN level 2: 4-bit layers, 1-bit masks, 3-bit activations"))
register(Config("L3", ("L3",), "ActNN level 3: 2 bits on average, adaptive per layer"))
register(Config("compress2", (Generic(bits=2),), "generic mode: saved float tensors at 2 bits"))
register(
    Config(
        "gelu3+rand20+compress2",
        (_GELU3, _RAND20, Generic(bits=2)),
        "gelu3+rand20, the other saved tensors at 2 bits",
    )
)
register(Config("ckpt", (), "activation checkpointing of every layer (non-reentrant)", "torch"))
register(Config("ckpt+gelu3", (_GELU3,), "checkpointing and 3-bit activations", "torch"))
register(
    Config("fckpt", (), "fewbit.checkpoint of every layer: layer inputs at 8 bits", "fewbit")
)
register(
    Config("ckpt+L2", ("L2",), "fewbit.checkpoint of every layer (inputs at 8 bits), L2", "fewbit")
)
register(
    Config(
        "offload",
        (),
        "saved tensors to pinned host memory (torch.autograd.graph.save_on_cpu)",
        offload=True,
        devices=("cuda",),
    )
)


# The rows `fewbit bench` runs without --configs (a few minutes on 2 CPU cores for the default
# model, three lockstep timing rounds); `--configs all` adds rand20 and its sketch variants, L1,
# L3 (2 bits on average; its adaptive allocation first changes bits after 100 steps), fckpt and
# the generic mode on top of gelu3+rand20.
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
