"""fewbit: train PyTorch models in less memory.

Between forward and backward, fewbit keeps few-bit codes of activation inputs,
random sketches of linear-layer inputs, exact 1-bit masks and low-bit
quantizations instead of full tensors. Swap ``torch.nn`` for ``fewbit``, or
convert a model in place with one call::

    fewbit.apply(model, fewbit.Activations(bits=3), fewbit.Sketch(ratio=0.2))
    fewbit.apply(model, "L2")                 # ActNN's levels are named lists of configs

The older entry points (:func:`fewbit.convert`, :func:`fewbit.QModule`,
:func:`fewbit.util.map_module`) are aliases over the same handlers. The layers of the
package and what each may import: ``docs/architecture.md``.
"""

from . import (
    approx,
    checkpoint,
    codecs,
    configs,
    functional,
    handlers,
    levels,
    models,
    modules,
    profile,
    util,
)
from .apply import apply, unapply
from .compress import SavedTensorCompressor, compress
from .configs import Activations, Allocator, Checkpoint, Compress, Generic, Offload, Sketch
from .convert import ConversionReport, conversion_report, convert
from .levels import CompressionConfig, QModule, convert_compressed, set_optimization_level
from .modules.activations import *  # noqa: F403 - the few-bit activation classes
from .modules.compressed import (  # ActNN's names
    QAvgPool1d,
    QAvgPool2d,
    QAvgPool3d,
    QBatchNorm1d,
    QBatchNorm2d,
    QBatchNorm3d,
    QConv1d,
    QConv2d,
    QConv3d,
    QConvTranspose1d,
    QConvTranspose2d,
    QConvTranspose3d,
    QDropout,
    QGroupNorm,
    QLayerNorm,
    QLinear,
    QMaxPool1d,
    QMaxPool2d,
    QMaxPool3d,
    QReLU,
    QSoftmax,
    QSyncBatchNorm,
    SavedBytesMeter,
)
from .modules.linear import LinearCRS, LinearGRP, RandomizedConv1D, RandomizedLinear
from .profile import StepProfile, profile_step, saved_bytes

__version__ = "0.4.0"

#: The few-bit activation classes (``fewbit.GELU``, ...), from ``fewbit.modules.activations``.
_ACTIVATION_CLASSES = [
    name for name in modules.activations.__all__
    if isinstance(getattr(modules.activations, name), type)
    and issubclass(getattr(modules.activations, name), modules.activations.FewBitActivationModule)
    and name != "FewBitActivationModule"
]

__all__ = [
    # one entry point, its configs and what it dispatches to
    "apply",
    "unapply",
    "configs",
    "handlers",
    "Activations",
    "Allocator",
    "Checkpoint",
    "Compress",
    "Generic",
    "Offload",
    "Sketch",
    "ConversionReport",
    "conversion_report",
    # the published entry points (aliases over apply's handlers)
    "convert",
    "CompressionConfig",
    "QModule",
    "convert_compressed",
    "set_optimization_level",
    "compress",
    "SavedTensorCompressor",
    "checkpoint",
    # layers
    *_ACTIVATION_CLASSES,
    # ActNN's names of the compressed layers
    "QAvgPool1d", "QAvgPool2d", "QAvgPool3d", "QBatchNorm1d", "QBatchNorm2d", "QBatchNorm3d",
    "QConv1d", "QConv2d", "QConv3d", "QConvTranspose1d", "QConvTranspose2d", "QConvTranspose3d",
    "QDropout", "QGroupNorm", "QLayerNorm", "QLinear", "QMaxPool1d", "QMaxPool2d", "QMaxPool3d",
    "QReLU", "QSoftmax", "QSyncBatchNorm",
    "LinearCRS",
    "LinearGRP",
    "RandomizedConv1D",
    "RandomizedLinear",
    # measuring
    "SavedBytesMeter",
    "StepProfile",
    "profile_step",
    "saved_bytes",
    # subpackages
    "approx",
    "codecs",
    "functional",
    "levels",
    "models",
    "modules",
    "profile",
    "util",
]
