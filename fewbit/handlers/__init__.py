"""One handler per configuration class of :mod:`fewbit.configs`.

=====================  ===========================================  ===========================
config                 handler (module)                             owns
=====================  ===========================================  ===========================
Activations            :mod:`fewbit.handlers.activations`           few-bit activation modules
Sketch                 :mod:`fewbit.handlers.sketch`                RandomizedLinear/Conv1D
Compress               :mod:`fewbit.handlers.compress`              compressed layers, attention
Generic                :mod:`fewbit.handlers.generic`               root hooks (compress mode)
Offload                :mod:`fewbit.handlers.generic`               root hooks (save_on_cpu)
Checkpoint             :mod:`fewbit.handlers.checkpoint`            region forwards
Allocator              :mod:`fewbit.prototype.allocator`            root hook, allocator env
=====================  ===========================================  ===========================

A handler converts (``apply``), lists its modules (``report``) and undoes its own conversion
(``undo``); :func:`fewbit.apply`, :func:`fewbit.unapply` and :func:`fewbit.conversion_report`
only dispatch to them. Adding a kind: a frozen dataclass in :mod:`fewbit.configs`, a
:class:`Handler` subclass registered with :func:`register_handler`, an import here.
"""

from ..prototype import allocator  # registers the Allocator handler (a prototype)
from . import activations, checkpoint, compress, generic, sketch
from .base import HANDLERS, ConversionEntry, Handler, handler_for, register_handler

__all__ = [
    "HANDLERS",
    "ConversionEntry",
    "Handler",
    "activations",
    "allocator",
    "checkpoint",
    "compress",
    "generic",
    "handler_for",
    "register_handler",
    "sketch",
]
