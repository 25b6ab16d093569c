"""Native CPU group quantizer (fewbit.codecs.native, used by fewbit.codecs.quantize): the same
bytes (codes, lo, scale) and bitwise the same dequantized values as the eager torch path, for
every bit width, dtype, layout and special group; and a clean fallback without a compiler."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from fewbit.codecs import native
from fewbit.codecs import quantize as qmod

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SEED = torch.tensor([0x0123456789ABCDE], dtype=torch.int64)
KEY = qmod._seed_key(int(SEED.item()))


def test_seed_key_of_a_python_int_equals_the_tensor_version() -> None:
    """The native path hashes the seed as a Python int: the same key as the torch and
    Triton paths' tensor hash, for edge seeds and random ones over the whole 62-bit range."""
    gen = torch.Generator().manual_seed(5)
    edges = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62 - 1, 0x0123456789ABCDE]
    drawn = torch.randint(0, 2**62, (500,), generator=gen, dtype=torch.int64).tolist()
    for seed in edges + drawn:
        want = int(qmod._seed_key(torch.tensor([seed], dtype=torch.int64)).item())
        assert qmod._seed_key(seed) == want, seed
# (shape, group_size): whole groups, partial last groups per row, a row shorter than a group,
# odd sizes, 1-D tensors and groups of one element; groups whose start is a whole byte at
# some bit widths only (vector and scalar pack/unpack in one tensor)
LAYOUTS = [
    ((6, 512), 32),
    ((4, 136), 72),
    ((3, 1002), 128),
    ((3, 1001), 256),
    ((2, 3, 77), 32),
    ((2, 5000), 4096),
    ((1337,), 256),
    ((5, 9), 1),
]
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(autouse=True, params=[1, 3], ids=["1thread", "3threads"])
def _threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    """One OpenMP thread, or three splitting the groups inside the C calls (when the library
    is built with OpenMP; serial otherwise), whatever the machine has."""
    monkeypatch.setattr(qmod, "_OMP_MIN", 64)
    monkeypatch.delenv("FEWBIT_COMPILE", raising=False)
    monkeypatch.delenv("FEWBIT_NATIVE", raising=False)
    if native.library() is None:
        pytest.skip("no C compiler: the native codecs are unavailable (fallback tested below)")
    if request.param > 1 and not native.uses_openmp():
        pytest.skip("the native library is built without OpenMP here: one thread only")
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield
    torch.set_num_threads(before)


def _bits_of(t: Tensor) -> Tensor:
    return t.view(_INT_VIEW[t.element_size()]) if t.element_size() > 1 else t


def _special(shape: tuple[int, ...], dtype: torch.dtype, group_size: int) -> Tensor:
    """Rows of different scales plus a NaN group, an inf group, a -inf group, a constant group,
    an all-zero group, a group of subnormal float32 values, a group across the smallest
    normal float32 values and (float64) a group beyond the float32 range."""
    gen = torch.Generator().manual_seed(hash((shape, group_size)) % 2**31)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.logspace(-3, 3, shape[0], dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))
    flat = x.view(-1)
    n = flat.numel()
    # a range below 2**-126 (the smallest scale), unless a special group below takes its place
    t = int(0.6 * n) // group_size * group_size
    flat[t : t + group_size] = torch.linspace(0.0, 2.0**-130, group_size, dtype=torch.float64)
    # around the smallest normal float32: decoded values lo + code * scale can be subnormal
    # (before the single special values below, which win where they fall in this group; not
    # in float16, where these values are zeros of both signs: see the module docstring)
    s = int(0.2 * n) // group_size * group_size
    if dtype != torch.float16:
        tiny = torch.linspace(-1.5e-38, 1.4e-38, group_size, dtype=torch.float64)
        flat[s : s + group_size] = tiny
    for pos, value in ((0.1, float("nan")), (0.3, float("inf")), (0.5, float("-inf"))):
        flat[int(pos * n)] = value
    c = int(0.7 * n) // group_size * group_size
    flat[c : c + group_size] = 0.3  # constant (not a bfloat16 value)
    z = int(0.85 * n) // group_size * group_size
    flat[z : z + group_size] = 0.0
    if dtype == torch.float64:
        flat[int(0.9 * n)] = 1e39
    return x.to(dtype)


def _eager_quantize(x: Tensor, bits: int, gs: int, per_sample: bool, mp: pytest.MonkeyPatch):
    with mp.context() as m:
        m.setenv("FEWBIT_COMPILE", "0")
        return qmod._torch_quantize(x, SEED, bits, gs, per_sample)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "flat"])
@pytest.mark.parametrize("shape,group_size", LAYOUTS, ids=str)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_gives_the_eager_bytes_and_values(
    dtype: torch.dtype,
    bits: int,
    shape: tuple[int, ...],
    group_size: int,
    per_sample: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = _special(shape, dtype, group_size)
    got = qmod._native_quantize(x, KEY, bits, group_size, per_sample)
    assert got is not None
    want = _eager_quantize(x, bits, group_size, per_sample, monkeypatch)
    for a, b in zip(got, want):  # packed, lo, scale: every bit, NaN patterns included
        assert a.dtype == b.dtype and torch.equal(_bits_of(a), _bits_of(b))
    # the portable vector code (run where AVX-512 is missing) writes the same bytes
    portable = qmod._native_quantize(x, KEY, bits, group_size, per_sample, True)
    assert portable is not None
    for a, b in zip(portable, want):
        assert torch.equal(_bits_of(a), _bits_of(b))
    args = (list(shape), dtype, bits, group_size, per_sample)
    y = qmod._native_dequantize(*want, *args)
    assert y is not None
    with monkeypatch.context() as m:
        m.setenv("FEWBIT_COMPILE", "0")
        y0 = qmod._torch_dequantize(*want, *args)
    assert y.dtype == dtype and y.shape == y0.shape
    assert torch.equal(_bits_of(y), _bits_of(y0))
    assert y.isnan().any()  # the NaN group decodes to NaN: the comparison covered it
    # the portable vector code (where AVX512-BF16 is missing) decodes to the same bits
    y1 = qmod._native_dequantize(*want, *args, portable=True)
    assert y1 is not None and torch.equal(_bits_of(y1), _bits_of(y0))


def test_public_api_runs_native_with_the_eager_result(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("_native_quantize", "_native_dequantize"):
        real = getattr(qmod, name)

        def spy(*args, _real=real, _name=name):  # noqa: ANN002, ANN202
            out = _real(*args)
            calls.append(_name if out is not None else "none")
            return out

        monkeypatch.setattr(qmod, name, spy)
    x = _special((4, 700), torch.float32, 256).t()  # not contiguous: saved stride restored
    q = qmod.quantize(x, 2, generator=torch.Generator().manual_seed(3))
    y = qmod.dequantize(q)
    assert calls == ["_native_quantize", "_native_dequantize"]
    monkeypatch.setenv("FEWBIT_NATIVE", "0")
    monkeypatch.setenv("FEWBIT_COMPILE", "0")
    q0 = qmod.quantize(x, 2, generator=torch.Generator().manual_seed(3))
    y0 = qmod.dequantize(q0)
    assert calls[2:] == ["none", "none"]  # the environment switch forces the torch path
    for a, b in zip(q.tensors(), q0.tensors()):
        assert torch.equal(_bits_of(a), _bits_of(b))
    assert y.stride() == x.stride() and torch.equal(_bits_of(y), _bits_of(y0))


def test_empty_and_tiny_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    for shape in [(0,), (0, 5), (1,), (3,), (2, 1)]:
        x = torch.randn(shape)
        got = qmod._native_quantize(x, KEY, 4, 256, True)
        assert got is not None
        want = _eager_quantize(x, 4, 256, True, monkeypatch)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.equal(_bits_of(a), _bits_of(b))


def test_missing_compiler_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path,  # noqa: ANN001
) -> None:
    x = _special((3, 1001), torch.float32, 256)
    want = _eager_quantize(x, 2, 256, True, monkeypatch)
    monkeypatch.setenv("FEWBIT_CACHE_DIR", str(tmp_path))  # no cached library to load
    monkeypatch.setenv("FEWBIT_COMPILE", "0")  # nor the compiled (fused) torch codec
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native, "COMPILER", "fewbit-no-such-compiler")
    native._load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert qmod._native_quantize(x, KEY, 2, 256, True) is None
            monkeypatch.delenv("FEWBIT_COMPILE")
            packed, lo, scale = torch.ops.fewbit.quantize(x, SEED, 2, 256, True)
            y = torch.ops.fewbit.dequantize(packed, lo, scale, [3, 1001], x.dtype, 2, 256, True)
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1 and "native CPU codecs" in str(runtime[0].message)
        for a, b in zip((packed, lo, scale), want):
            assert torch.equal(_bits_of(a), _bits_of(b))
        assert y.shape == x.shape and torch.equal(y.isnan(), qmod.dequantize(
            qmod.QuantizedTensor(*want, x.shape, x.dtype, 2, 256)).isnan())  # fmt: skip
    finally:
        native._load.cache_clear()  # later tests build (or load) the real library again
