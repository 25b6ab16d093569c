"""ActNN-style compressed layers: the conversion and the :class:`Compress` handler.

Exact-type ``torch.nn`` layers of the chosen groups become their compressed subclasses
(:mod:`fewbit.modules.compressed`) by a class swap: the new module shares the old one's
parameter, buffer and hook dictionaries, so state_dict keys, BatchNorm running statistics,
eval outputs and optimizer references are unchanged. Already compressed layers get the new
settings. Hugging Face attention is routed by :mod:`fewbit.integrations.transformers`.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from torch import nn

from ..configs import Compress
from ..integrations.transformers import route_attention, routed_attention, unroute_attention
from ..modules import compressed as C
from ..prototype.adaptive import attach_allocator, detach_allocator, get_allocator
from ..util import map_module
from .base import ConversionEntry, Handler, register_handler, restore_all, swap_class

__all__ = ["GROUPS", "CompressHandler", "convert_compressed_layers"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm,
         nn.GroupNorm)

#: Group name -> the torch.nn classes it converts (exact type match).
GROUPS: Dict[str, Tuple[type, ...]] = {
    "conv": _CONV,
    "linear": (nn.Linear,),
    "norm": _NORM,
    "softmax": (nn.Softmax,),
    "attention": (),
    "lossless": tuple(src for src, _ in C.LOSSLESS),
}


def _targets(config: Compress) -> Tuple[Dict[type, type], Dict[type, type]]:
    wanted = {cls for group in config.layers for cls in GROUPS[group]}
    quantized = {src: dst for src, dst in C.QUANTIZED if src in wanted}
    lossless = {src: dst for src, dst in C.LOSSLESS if src in wanted}
    return quantized, lossless


def convert_compressed_layers(model: nn.Module, config: Compress) -> nn.Module:
    """Convert the layers of ``config.layers`` in place at ``config.bits``; returns the root."""
    quantized, lossless = _targets(config)
    wanted = set(quantized.values())

    def replace(module: nn.Module) -> nn.Module:
        if isinstance(module, C.CompressedLayer):
            if type(module) in wanted:
                module.set_compression(config.bits, config.group_size, config.offload)
            return module
        dst = quantized.get(type(module))
        if dst is not None:
            new = swap_class(module, dst)
            assert isinstance(new, C.CompressedLayer)
            new._init_compression(config.bits, config.group_size, config.offload)
            return new
        dst = lossless.get(type(module))
        return swap_class(module, dst) if dst is not None else module

    return map_module(model, replace)


_OWNED = tuple(dst for _, dst in C.LOSSLESS) + (C.CompressedLayer,)


class CompressHandler(Handler):
    """:class:`fewbit.configs.Compress`: compressed layers, attention routing and (adaptive)
    the bit allocator."""

    config_type = Compress
    kind = "compress"

    def apply(self, model: nn.Module, config: Compress) -> nn.Module:
        detach_allocator(model)
        root = convert_compressed_layers(model, config)
        if "attention" in config.layers:
            route_attention(root, config.bits, config.group_size)
        if config.adaptive:
            attach_allocator(root, config.avg_bits, config.interval)
        return root

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, _OWNED)

    def target_name(self, module: nn.Module) -> str:
        return "Q" + type(module).__name__  # ActNN's names: QLinear, QConv2d, QDropout, ...

    def describe(self, module: nn.Module) -> str:
        if isinstance(module, C.CompressedLayer):
            text = f"bits={module.bits}, group_size={module.group_size}"
            return text + (", offload=True" if module.offload else "")
        return "lossless compact save"

    def report(self, model: nn.Module) -> List[ConversionEntry]:
        entries = super().report(model)
        for path, module, settings in routed_attention(model):
            entries.append(ConversionEntry(
                path, type(module).__name__, "compressed attention",
                f"bits={settings.bits}, group_size={settings.group_size}, "
                f"original={settings.original}", self.kind))
        alloc = get_allocator(model)
        if alloc is not None:
            entries.append(ConversionEntry(
                "", type(model).__name__, "AdaptiveBitAllocator",
                f"avg_bits={alloc.avg_bits}, interval={alloc.interval}, "
                f"layers={len(alloc.layers)}", self.kind))
        return entries

    def undo(self, model: nn.Module) -> nn.Module:
        detach_allocator(model)
        unroute_attention(model)
        for module in model.modules():
            if isinstance(module, C.CompressedLayer):
                module.fewbit_stats = None
        return restore_all(model, self.owns)


register_handler(CompressHandler())
