"""Native CPU codecs (fewbit.codecs.native): the same bytes and gradients as the eager torch
path for every bit width and dtype, and a clean fallback without a C compiler."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fewbit.functional as FB
import fewbit.functional.fewbit_fn as fn
from fewbit.codecs import native
from fewbit.codecs.bitpack import pack

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
N = 1003  # 8k + 3: the last group of 8 codes is partial (3 codes) in every chunk layout
CHUNK = 64  # several chunks (scan and encode) per tensor


@pytest.fixture(autouse=True, params=[1, 3], ids=["1thread", "3threads"])
def _small_chunks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks; one thread, or three OpenMP threads (each pass split into ranges that
    run in parallel; native.uses_openmp() builds only)."""
    monkeypatch.setattr(fn, "_CHUNK", CHUNK)
    monkeypatch.setattr(fn, "_PER_THREAD", 128)
    monkeypatch.setattr(torch, "get_num_threads", lambda: request.param)
    monkeypatch.delenv("FEWBIT_COMPILE", raising=False)
    monkeypatch.delenv("FEWBIT_NATIVE", raising=False)


def _needs_library() -> None:
    if native.library() is None:
        pytest.skip("no C compiler: the native codecs are unavailable (fallback tested below)")


def _spec(bits: int, symmetric: bool, short: bool, zero_level: bool) -> fn.ActivationSpec:
    """A boundary table: 2**bits - 1 boundaries (more than 15 from 5 bits: the bucketize path
    of the eager encoder), or 3 (``short``); levels with or without a zero level."""
    gen = torch.Generator().manual_seed(bits * 4 + 2 * symmetric + short)
    count = 3 if short else 2**bits - 1
    if bits == 1:
        count = 1
    points = torch.randn(count, generator=gen, dtype=torch.float64) * 2
    if symmetric:
        points = points.abs()
    bounds = tuple(sorted(set(points.tolist())))
    levels = (torch.rand(2**bits, generator=gen, dtype=torch.float64) * 1.5).tolist()
    if zero_level:
        levels[0] = 0.0
    return fn.ActivationSpec(
        forward=F.gelu,
        encode=lambda x: x,  # unused: boundary tables encode through fn._encode
        levels=tuple(levels),
        bits=bits,
        boundaries=bounds,
        symmetric=symmetric,
    )


def _special(dtype: torch.dtype, spec: fn.ActivationSpec) -> Tensor:
    """Random values plus NaN (both signs), +-inf, +-0, subnormals, the rounded boundaries,
    their negatives and their neighbours in dtype (at most N/2 of those), at scattered
    positions."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(N, generator=gen, dtype=torch.float64) * 2).to(dtype)
    info = torch.finfo(dtype)
    bounds = fn.table_tensor(tuple(spec.boundaries), dtype, torch.device("cpu"))
    inf = torch.tensor([math.inf], dtype=dtype)
    near = torch.cat([torch.nextafter(bounds, inf), torch.nextafter(bounds, -inf)])
    extra = [math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, info.tiny, -info.tiny]
    edges = torch.cat([bounds, -bounds, near])
    edges = edges[torch.randperm(edges.numel(), generator=gen)[: N // 2]]  # 8 bits: 1020 edges
    tiny = [info.smallest_normal / 4, -info.smallest_normal / 8]
    values = torch.cat([torch.tensor(extra + tiny, dtype=dtype), edges])
    where = torch.randperm(N, generator=gen)[: values.numel()]
    x[where] = values
    return x


def _eager(monkeypatch: pytest.MonkeyPatch, fn_call):  # noqa: ANN001, ANN202
    with monkeypatch.context() as m:
        m.setenv("FEWBIT_NATIVE", "0")
        return fn_call()


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equal, except that any NaN matches any NaN (payloads differ between torch's
    own scalar and vector conversions)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a[~nan_a].view(int_dtype), b[~nan_b].view(int_dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_encode_and_scan_bytes_match_eager(
    bits: int, dtype: torch.dtype, symmetric: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs_library()
    for short in [False, True] if bits >= 5 else [False]:
        spec = _spec(bits, symmetric, short, zero_level=True)
        x = _special(dtype, spec)
        got = fn._native_encode_and_scan(x, spec)
        assert got is not None
        packed, side = got
        want_packed = _eager(monkeypatch, lambda x=x, spec=spec: fn._encode_and_pack(x, spec))
        want_side = fn.nonfinite_slots(x, CHUNK)
        assert torch.equal(packed, want_packed), (bits, dtype, symmetric, short)
        assert torch.equal(side, want_side), (bits, dtype, symmetric, short)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("zero_level", [True, False], ids=["zero", "nozero"])
def test_backward_matches_eager(
    bits: int, dtype: torch.dtype, zero_level: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grad * levels[code] bit for bit (NaN as NaN), with NaN/inf/huge incoming gradients
    (fp16 overflow after the multiply) and one chunk whose slots overflow (NaN levels)."""
    _needs_library()
    spec = _spec(bits, False, False, zero_level)
    x = _special(dtype, spec)
    x[CHUNK * 3 : CHUNK * 3 + 20] = math.nan  # 20 > 8 slots of a 64-element chunk
    gen = torch.Generator().manual_seed(bits)
    grad = (torch.randn(N, generator=gen, dtype=torch.float64) * 3).to(dtype)
    grad[::97] = torch.finfo(dtype).max
    grad[5::89] = math.inf
    grad[7::83] = math.nan
    packed, side = fn._native_encode_and_scan(x, spec)  # type: ignore[misc]
    got = fn._grad_times_levels(grad, packed, side, CHUNK, spec)
    want = _eager(monkeypatch, lambda: fn._grad_times_levels(grad, packed, side, CHUNK, spec))
    assert _same_bits(got[:N], want[:N]), (bits, dtype)
    assert torch.isnan(got[CHUNK * 3 : CHUNK * 4]).all()  # overflowed chunk: never finite


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activation_end_to_end_matches_eager(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs_library()
    x = torch.randn(3, N, dtype=dtype)
    x[0, 5], x[1, 9], x[2, 11] = math.nan, math.inf, -math.inf
    g = torch.randn(3, N, dtype=dtype)

    def run() -> tuple[Tensor, Tensor]:
        leaf = x.clone().requires_grad_(True)
        y = FB.gelu(leaf, bits=3)
        (gx,) = torch.autograd.grad(y, leaf, g)
        return y, gx

    y, gx = run()
    y0, gx0 = _eager(monkeypatch, run)
    assert _same_bits(y, y0) and _same_bits(gx, gx0)


def test_missing_compiler_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:  # noqa: ANN001
    spec = _spec(3, False, False, zero_level=True)
    x = _special(torch.float32, spec)
    want = _eager(monkeypatch, lambda: fn._encode_and_pack(x, spec))
    monkeypatch.setenv("FEWBIT_CACHE_DIR", str(tmp_path))  # no cached library to load
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native, "COMPILER", "fewbit-no-such-compiler")
    native._load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.library() is None
            assert fn._native_encode_and_scan(x, spec) is None
            leaf = x.clone().requires_grad_(True)
            y = FB.gelu(leaf, bits=3)
            y.backward(torch.ones_like(y))
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1 and "native CPU codecs" in str(runtime[0].message)
        assert torch.equal(fn._forward_and_pack(x, spec)[1], want)
    finally:
        native._load.cache_clear()  # later tests build (or load) the real library again


@pytest.mark.parametrize("variable", ["FEWBIT_COMPILE", "FEWBIT_NATIVE"])
def test_environment_forces_eager(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(3, False, False, zero_level=True)
    x = _special(torch.float32, spec)
    monkeypatch.setenv(variable, "0")
    assert native.library() is None
    assert fn._native_encode_and_scan(x, spec) is None
    side = fn.nonfinite_slots(x, CHUNK)
    lut = torch.ones(8)
    packed = torch.zeros(fn.packed_nbytes(N, 3), dtype=torch.uint8)
    assert fn._native_grad_times_levels(x, packed, side, CHUNK, lut, spec) is None


def test_non_contiguous_and_other_dtypes_take_the_eager_path() -> None:
    spec = _spec(3, False, False, zero_level=True)
    x = torch.randn(64, 2)[:, 0]
    assert fn._native_encode_and_scan(x, spec) is None
    assert fn._native_encode_and_scan(torch.randn(64).to(torch.complex64), spec) is None


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9])
def test_tiny_tensors_match_eager(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_library()
    spec = _spec(3, False, False, zero_level=True)
    x = torch.randn(n)
    g = torch.randn(n)
    packed, side = fn._native_encode_and_scan(x, spec)  # type: ignore[misc]
    assert torch.equal(packed, _eager(monkeypatch, lambda: fn._encode_and_pack(x, spec)))
    assert torch.equal(side, fn.nonfinite_slots(x, CHUNK))
    got = fn._grad_times_levels(g, packed, side, CHUNK, spec)[:n]
    want = _eager(monkeypatch, lambda: fn._grad_times_levels(g, packed, side, CHUNK, spec))
    assert _same_bits(got, want[:n])


MASKS = [
    ("relu", {}),
    ("leaky_relu", {}),
    ("hardtanh", {"min_val": -0.7, "max_val": 0.3}),
    ("relu6", {}),
    ("hardshrink", {"lambd": 0.1}),
    ("softshrink", {"lambd": 0.1}),
    ("threshold", {"threshold": 0.2, "value": 0.0}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,kwargs", MASKS, ids=[m[0] for m in MASKS])
def test_masks_match_eager(
    name: str, kwargs: dict, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1-bit masks (computed by torch, packed natively): same bytes, side store and
    gradient as the torch path, with non-finite and kink inputs."""
    _needs_library()
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(N, generator=gen, dtype=torch.float64) * 4).to(dtype)
    kinks = [0.0, -0.0, 6.0, -0.7, 0.3, 0.1, -0.1, 0.2, math.nan, math.inf, -math.inf]
    x[torch.randperm(N, generator=gen)[: len(kinks)]] = torch.tensor(kinks, dtype=dtype)
    g = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype)
    f = getattr(FB, name)

    def run() -> tuple[Tensor, Tensor]:
        leaf = x.clone().requires_grad_(True)
        y = f(leaf, **kwargs)
        (gx,) = torch.autograd.grad(y, leaf, g)
        return y, gx

    leaf = x.clone().requires_grad_(True)
    spec = f(leaf, **kwargs).grad_fn.spec
    got = fn._native_mask_and_scan(x, spec)
    assert got is not None
    assert torch.equal(got[0], _eager(monkeypatch, lambda: fn._encode_and_pack(x, spec)))
    assert torch.equal(got[1], fn.nonfinite_slots(x, CHUNK))
    y, gx = run()
    y0, gx0 = _eager(monkeypatch, run)
    assert _same_bits(y, y0) and _same_bits(gx, gx0)


def _table_spec(bounds: tuple[float, ...], bits: int, symmetric: bool = False) -> fn.ActivationSpec:
    levels = tuple(float(v) for v in torch.linspace(-0.5, 1.5, 2**bits, dtype=torch.float64))
    return fn.ActivationSpec(
        forward=F.gelu,
        encode=lambda x: x,  # unused: boundary tables encode through fn._encode
        levels=levels,
        bits=bits,
        boundaries=bounds,
        symmetric=symmetric,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count", [2, 5, 6, 11, 13])
def test_boundary_counts_between_the_unrolled_sizes_match_eager(
    count: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tables whose length is not 1, 3, 7 or 15 (the encoder pads them with keys no element
    exceeds), with +0 and -0 among the boundaries (keyed as +0), on chunks of several
    512-element blocks: the same bytes and side store as the torch path."""
    _needs_library()
    monkeypatch.setattr(fn, "_CHUNK", 1024)  # 2 encoder blocks per chunk
    gen = torch.Generator().manual_seed(count)
    points = (torch.randn(count - 2, generator=gen, dtype=torch.float64) * 2).tolist()
    bounds = tuple(sorted(points + [0.0, -0.0], key=float))
    spec = _table_spec(bounds, bits=4 if count > 7 else 3)
    n = 5003
    x = (torch.randn(n, generator=gen, dtype=torch.float64) * 2).to(dtype)
    x[::37] = 0.0
    x[5::37] = -0.0
    x[7::401] = math.nan
    x[9::503] = -math.inf
    got = fn._native_encode_and_scan(x, spec)
    assert got is not None
    want = _eager(monkeypatch, lambda: fn._encode_and_pack(x, spec))
    assert torch.equal(got[0], want)
    assert torch.equal(got[1], fn.nonfinite_slots(x, 1024))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [1, 3, 4, 6])
def test_native_passes_write_only_their_own_bytes(bits: int, dtype: torch.dtype) -> None:
    """The encoder's 8-byte stores and the decoder's 8-element steps stay inside the range
    they were given: bytes past a stream of n codes and elements outside [start, stop) of
    the output keep their sentinel (ranges of one call run in parallel threads)."""
    _needs_library()
    lib = native.library()
    n = 8 * 301 + 5
    width, _, inf_bits = fn._NATIVE_FORMATS[dtype]
    spec = _spec(bits, False, True, zero_level=False)
    keys = fn._boundary_keys(tuple(spec.boundaries), dtype)
    x = torch.randn(n, dtype=dtype)
    packed = torch.full((fn.packed_nbytes(n, bits) + 16,), 0xA5, dtype=torch.uint8)
    counts = torch.zeros(n // 64 + 1, dtype=torch.int64)
    encode = getattr(lib, f"fewbit_encode_pack_{width}")
    encode(x.data_ptr(), n, inf_bits, 0, keys.data_ptr(), keys.numel(), 0, bits,
           packed.data_ptr(), 64, counts.data_ptr(), 3)  # fmt: skip
    assert (packed[fn.packed_nbytes(n, bits) :] == 0xA5).all()
    lut = torch.linspace(0.1, 1.0, 2**bits)
    grad = torch.randn(n, dtype=dtype)
    out = torch.full((n,), 7.0, dtype=dtype)
    start, stop = 8 * 37, n - 3
    decode = getattr(lib, fn._NATIVE_DECODE[dtype])
    decode(packed.data_ptr(), n, bits, grad[start:].data_ptr(), out[start:].data_ptr(), start,
           stop, lut.data_ptr(), 0, 3)  # fmt: skip
    assert (out[:start] == 7).all() and (out[stop:] == 7).all()
    assert not (out[start:stop] == 7).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_rounds_every_16_bit_gradient_as_torch(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 16-bit pattern as the incoming gradient, times levels that round (1/3, 0.7),
    underflow to subnormals and zero (2^-12, 2^-30) and overflow (6e4): the vector
    decoder's branch-free conversions give torch's bits (NaN as NaN)."""
    _needs_library()
    levels = (0.0, 1 / 3, 0.7, 1.0, 2.0**-12, 2.0**-30, 6e4, -1.5)
    spec = fn.ActivationSpec(
        forward=F.gelu, encode=lambda x: x, levels=levels, bits=3, boundaries=(0.0,) * 7
    )
    grad = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    n = grad.numel() * 8
    grad = grad.repeat_interleave(8)  # each pattern with each of the 8 codes
    codes = torch.arange(8, dtype=torch.uint8).repeat(n // 8)
    packed = pack(codes, 3)
    side = fn.nonfinite_slots(torch.zeros(n, dtype=dtype), CHUNK)
    got = fn._grad_times_levels(grad, packed, side, CHUNK, spec)[:n]
    want = _eager(monkeypatch, lambda: fn._grad_times_levels(grad, packed, side, CHUNK, spec))
    assert _same_bits(got, want[:n])


class _HintRecorder:
    """Stands in for the native library: records fewbit_advise_hugepages calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def fewbit_advise_hugepages(self, ptr: int, nbytes: int) -> None:
        self.calls.append((ptr, nbytes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_fresh_buffer_hints_huge_pages_only_from_the_threshold(dtype: torch.dtype) -> None:
    size = torch.empty(0, dtype=dtype).element_size()
    limit = native.HUGE_PAGE_MIN_BYTES // size
    for numel, hinted in ((limit - 1, False), (limit, True), (17, False)):
        lib = _HintRecorder()
        out = native.fresh_buffer(lib, numel, dtype)  # type: ignore[arg-type]
        assert out.shape == (numel,) and out.dtype == dtype and out.device.type == "cpu"
        expected = [(out.data_ptr(), numel * size)] if hinted else []
        assert lib.calls == expected


def test_fresh_buffer_through_the_library_is_writable() -> None:
    lib = native.library()
    if lib is None:
        pytest.skip("no native library (no C compiler)")
    out = native.fresh_buffer(lib, native.HUGE_PAGE_MIN_BYTES // 4 + 5, torch.float32)
    out.fill_(2.5)  # the hint changes no contents or semantics: every element writable
    assert bool((out == 2.5).all())
