"""Every public name of fewbit 0.1.0 still imports and works (issue 9: the published names stay
as aliases over the new machinery). Each is exercised briefly; none warns of deprecation,
since none is replaced (``fewbit.apply`` is an addition: the old entry points are its aliases).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit
import fewbit.functional as FF
import fewbit.modules as FM
import fewbit.util as FU

# The __all__ lists of fewbit 0.1.0 (before issue 9).
TOP = [
    "CELU", "ELU", "GELU", "Hardshrink", "Hardsigmoid", "Hardswish", "Hardtanh", "LeakyReLU",
    "LogSigmoid", "Mish", "ReLU", "ReLU6", "SELU", "Sigmoid", "SiLU", "Softplus", "Softshrink",
    "Softsign", "Tanh", "Tanhshrink", "Threshold", "QAvgPool1d", "QAvgPool2d", "QAvgPool3d",
    "QBatchNorm1d", "QBatchNorm2d", "QBatchNorm3d", "QConv1d", "QConv2d", "QConv3d",
    "QConvTranspose1d", "QConvTranspose2d", "QConvTranspose3d", "QDropout", "QGroupNorm",
    "QLayerNorm", "QLinear", "QMaxPool1d", "QMaxPool2d", "QMaxPool3d", "QReLU", "QSoftmax",
    "QSyncBatchNorm", "SavedBytesMeter", "SavedTensorCompressor", "compress",
    "CompressionConfig", "QModule", "convert_compressed", "set_optimization_level", "levels",
    "models", "ConversionReport", "conversion_report", "convert", "LinearCRS", "LinearGRP",
    "RandomizedConv1D", "RandomizedLinear", "util", "StepProfile", "profile", "profile_step",
    "saved_bytes", "approx", "codecs", "functional", "modules",
]  # fmt: skip
UTIL = ["HookedMemoryUsage", "convert_linear", "estimate_memory_usage", "map_module",
        "memory_usage_hooks", "saved_tensors_of", "teniter", "traverse"]
FUNCTIONAL = [
    "linear_crs", "linear_grp", "linear_randomized", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "dropout", "max_pool1d", "max_pool2d", "max_pool3d", "scaled_dot_product_attention",
    "activation", "celu", "elu", "gelu", "hardshrink", "hardsigmoid", "hardswish", "hardtanh",
    "leaky_relu", "logsigmoid", "mish", "relu", "relu6", "selu", "sigmoid", "silu", "softplus",
    "softshrink", "softsign", "tanh", "tanhshrink", "threshold",
]  # fmt: skip
MODULES = [
    "compressed", "LinearCRS", "LinearGRP", "RandomizedConv1D", "RandomizedLinear", "CELU",
    "ELU", "GELU", "FewBitActivationModule", "Hardshrink", "Hardsigmoid", "Hardswish",
    "Hardtanh", "LeakyReLU", "LogSigmoid", "Mish", "ReLU", "ReLU6", "SELU", "Sigmoid", "SiLU",
    "Softplus", "Softshrink", "Softsign", "Tanh", "Tanhshrink", "Threshold",
]  # fmt: skip

ACTIVATIONS = TOP[:21]
_ARGS = {"Threshold": (0.1, 0.0)}


@pytest.fixture(autouse=True)
def _no_fewbit_deprecation():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ours = [w for w in caught if issubclass(w.category, DeprecationWarning)
            and "fewbit" in str(w.filename)]
    assert ours == []


@pytest.mark.parametrize("module, names", [(fewbit, TOP), (FU, UTIL), (FF, FUNCTIONAL),
                                           (FM, MODULES)])
def test_names_import_and_stay_exported(module, names) -> None:
    for name in names:
        assert hasattr(module, name), name
        assert name in module.__all__, name


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_modules(name: str) -> None:
    args = _ARGS.get(name, ())
    ours, ref = getattr(fewbit, name)(*args), getattr(nn, name)(*args)
    assert isinstance(ours, getattr(nn, name)) and getattr(FM, name) is getattr(fewbit, name)
    x = torch.randn(64, requires_grad=True)
    y = ours(x)
    assert torch.equal(y, ref(x))
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


_COMPRESSED = {
    "QConv1d": (lambda: nn.Conv1d(2, 3, 3), (2, 2, 8)),
    "QConv2d": (lambda: nn.Conv2d(2, 3, 3), (2, 2, 6, 6)),
    "QConv3d": (lambda: nn.Conv3d(2, 3, 3), (2, 2, 4, 4, 4)),
    "QConvTranspose1d": (lambda: nn.ConvTranspose1d(2, 3, 3), (2, 2, 8)),
    "QConvTranspose2d": (lambda: nn.ConvTranspose2d(2, 3, 3), (2, 2, 6, 6)),
    "QConvTranspose3d": (lambda: nn.ConvTranspose3d(2, 3, 3), (2, 2, 4, 4, 4)),
    "QLinear": (lambda: nn.Linear(8, 3), (4, 8)),
    "QBatchNorm1d": (lambda: nn.BatchNorm1d(3), (4, 3)),
    "QBatchNorm2d": (lambda: nn.BatchNorm2d(3), (2, 3, 4, 4)),
    "QBatchNorm3d": (lambda: nn.BatchNorm3d(3), (2, 3, 2, 2, 2)),
    "QLayerNorm": (lambda: nn.LayerNorm(8), (4, 8)),
    "QGroupNorm": (lambda: nn.GroupNorm(2, 4), (2, 4, 3)),
    "QSoftmax": (lambda: nn.Softmax(-1), (4, 8)),
    "QDropout": (lambda: nn.Dropout(0.0), (4, 8)),
    "QMaxPool1d": (lambda: nn.MaxPool1d(2), (2, 3, 8)),
    "QMaxPool2d": (lambda: nn.MaxPool2d(2), (2, 3, 4, 4)),
    "QMaxPool3d": (lambda: nn.MaxPool3d(2), (2, 3, 4, 4, 4)),
    "QAvgPool1d": (lambda: nn.AvgPool1d(2), (2, 3, 8)),
    "QAvgPool2d": (lambda: nn.AvgPool2d(2), (2, 3, 4, 4)),
    "QAvgPool3d": (lambda: nn.AvgPool3d(2), (2, 3, 4, 4, 4)),
    "QReLU": (lambda: nn.ReLU(), (4, 8)),
}


@pytest.mark.parametrize("name", sorted(_COMPRESSED))
def test_compressed_layers(name: str) -> None:
    build, shape = _COMPRESSED[name]
    torch.manual_seed(0)
    ref = build()
    cls = getattr(fewbit, name)
    if name == "QReLU":  # ActNN's name for the few-bit ReLU (1-bit mask)
        layer = cls()
    else:
        layer = cls.__new__(cls)
        layer.__dict__.update(ref.__dict__)  # the same parameters, as QModule builds them
    if hasattr(layer, "_init_compression"):
        layer._init_compression(4, 256)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, ref(x))
    y.float().sum().backward()
    assert x.grad is not None


def test_qsyncbatchnorm_is_a_syncbatchnorm() -> None:
    assert issubclass(fewbit.QSyncBatchNorm, nn.SyncBatchNorm)


def test_entry_points() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))
    x = torch.randn(4, 8)
    converted = fewbit.convert(model, linear=0.5, linear_exclude=None, inplace=False)
    assert isinstance(converted[0], fewbit.RandomizedLinear) and type(model[0]) is nn.Linear
    report = fewbit.conversion_report(converted)
    assert isinstance(report, fewbit.ConversionReport) and len(report.converted) == 3
    q = fewbit.QModule(nn.Sequential(nn.Linear(8, 16)), level="L2")
    assert isinstance(q[0], fewbit.QLinear)
    with fewbit.set_optimization_level("L1") as cfg:
        assert isinstance(cfg, fewbit.CompressionConfig)
        assert fewbit.convert_compressed(nn.Sequential(nn.Linear(8, 2)))[0].bits == 4
    assert fewbit.levels.parse_level(2) == "L2"
    net = fewbit.models.resnet_small(width=4)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    meter_model = nn.Linear(8, 8)
    with fewbit.SavedBytesMeter(exclude=meter_model.parameters()) as meter:
        meter_model(x).sum()
    assert meter.total == 4 * 8 * 4  # the input, fp32
    w = torch.randn(8, 8, requires_grad=True)
    big = torch.randn(4096, 8)
    with fewbit.compress(bits=2) as comp:
        assert isinstance(comp, fewbit.SavedTensorCompressor)
        (big @ w).sum().backward()
    assert comp.stats.compressed >= 1
    assert fewbit.saved_bytes(lambda t: torch.tanh(t), torch.randn(16, requires_grad=True)) > 0
    prof = fewbit.profile_step(nn.Linear(8, 2), x, steps=1, warmup=0)
    assert isinstance(prof, fewbit.StepProfile) and prof.saved_bytes > 0
    assert fewbit.profile.profile_step is fewbit.profile_step
    assert fewbit.approx.get_table("gelu", 3) is not None
    assert fewbit.codecs.packed_nbytes(10, 3) == 4


@pytest.mark.parametrize("cls", ["RandomizedLinear", "LinearGRP", "LinearCRS"])
def test_randomized_linears(cls: str) -> None:
    layer = getattr(fewbit, cls)(8, 4)
    assert isinstance(layer, nn.Linear) and getattr(FM, cls) is getattr(fewbit, cls)
    x = torch.randn(16, 8)
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    assert layer.weight.grad is not None


def test_randomized_conv1d() -> None:
    layer = fewbit.RandomizedConv1D(4, 8)
    x = torch.randn(2, 5, 8)
    y = layer(x)
    assert torch.allclose(y, x @ layer.weight + layer.bias)
    y.sum().backward()
    assert layer.weight.grad is not None


def test_util_functions() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 1))
    xs = torch.randn(3, 8).requires_grad_()
    ys = model(xs)
    assert FU.estimate_memory_usage(ys) == 260
    assert len(list(FU.teniter(ys))) == 5
    seen: list[bool] = []
    FU.traverse(ys, lambda node, t, saved: seen.append(saved))
    assert True in seen and False in seen
    assert any(True for n in [ys.grad_fn] for _ in FU.saved_tensors_of(n))
    with FU.memory_usage_hooks() as usage:
        model(xs)
    assert isinstance(usage, FU.HookedMemoryUsage) and usage.forward
    new = FU.map_module(model, lambda m: FU.convert_linear(m, fewbit.RandomizedLinear))
    assert isinstance(new[0], fewbit.RandomizedLinear)


_POOL_SHAPES = {"1d": (2, 3, 8), "2d": (2, 3, 4, 4), "3d": (2, 3, 4, 4, 4)}


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_functional(name: str) -> None:
    fn = getattr(FF, name)
    torch.manual_seed(0)
    if name.startswith(("max_pool", "avg_pool")):
        x = torch.randn(*_POOL_SHAPES[name[-2:]], requires_grad=True)
        y = fn(x, 2)
        assert torch.equal(y, getattr(F, name)(x, 2))
    elif name.startswith("linear_"):
        x, w = torch.randn(16, 8), torch.randn(4, 8, requires_grad=True)
        y = fn(x, w, None)
        assert torch.equal(y, F.linear(x, w))
    elif name == "dropout":
        x = torch.randn(64, requires_grad=True)
        y = fn(x, 0.5)
        assert ((y == 0) | (y == 2 * x)).all()
    elif name == "scaled_dot_product_attention":
        x = torch.randn(1, 2, 4, 8, requires_grad=True)
        y = fn(x, x, x)
        assert torch.allclose(y, F.scaled_dot_product_attention(x, x, x), atol=1e-6)
    elif name == "activation":
        x = torch.randn(64, requires_grad=True)
        y = fn(x, torch.tanh, fewbit.approx.get_table("tanh", 3))
        assert torch.equal(y, torch.tanh(x))
    else:
        x = torch.randn(64, requires_grad=True)
        args = (0.1, 0.0) if name == "threshold" else ()
        y = fn(x, *args)
        ref = getattr(F, name, None) or getattr(torch, name)
        assert torch.equal(y, ref(x, *args))
    y.sum().backward()
    assert x.grad is not None or w.grad is not None


def test_new_names_are_exported() -> None:
    for name in ("apply", "unapply", "Activations", "Sketch", "Compress", "Generic",
                 "Checkpoint", "Allocator", "Offload", "configs", "handlers"):
        assert name in fewbit.__all__ and hasattr(fewbit, name)
