"""Triton group quantizer (interpreter on CPU) against fewbit.codecs.quantize: same format."""

import importlib

import pytest
import torch

pytest.importorskip("triton")

from fewbit.kernels import force_kernels  # noqa: E402
from fewbit.kernels import quantize as kq  # noqa: E402

codec = importlib.import_module("fewbit.codecs.quantize")

CASES = [
    ((4, 3000), 256),  # per-sample rows, short last group in each row
    ((10001,), 256),  # one row, n not a multiple of 8
    ((3, 200), 40),  # group size not a power of two
    ((2, 3, 8), 8),
]


def torch_path(x: torch.Tensor, bits: int, group_size: int, noise: torch.Tensor):
    """The PyTorch path of the codec with the given noise (one float32 per element)."""
    packed, lo, scale = codec._torch_quantize(x, None, bits, group_size, True, noise=noise)
    return codec.QuantizedTensor(packed, lo, scale, x.shape, x.dtype, bits, group_size)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))  # NaN == NaN bitwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_same_format_given_same_noise(bits: int, dtype: torch.dtype) -> None:
    for shape, group_size in CASES:
        x = (torch.randn(shape) * 3 + 1).to(dtype)
        if shape == (4, 3000):
            x[1, 5] = float("nan")  # its group decodes to NaN
            x[2, 300] = float("inf")
            x[3, :256] = 0.25  # constant group: scale 0
        noise = torch.rand(shape)
        ref = torch_path(x, bits, group_size, noise)
        got = kq.quantize(x, bits, group_size, noise=noise)
        assert same_bits(got.lo, ref.lo) and got.lo.dtype == ref.lo.dtype
        assert same_bits(got.scale, ref.scale)
        assert torch.equal(got.packed, ref.packed)
        assert got.nbytes() == codec.quantized_nbytes(shape, bits, group_size)
        # dequantizers are interchangeable and agree bit for bit (NaN groups included)
        expect = codec.dequantize(ref)
        for out in (kq.dequantize(ref), kq.dequantize(got), codec.dequantize(got)):
            assert out.dtype == dtype and out.shape == x.shape
            assert torch.equal(out.nan_to_num(7.0), expect.nan_to_num(7.0))
            assert torch.equal(out.isnan(), expect.isnan())


def test_seeded_noise_is_unbiased() -> None:
    x = torch.randn(8, 4096)
    q = kq.quantize(x, 2, 256, seed=11)
    err = kq.dequantize(q) - x
    scale = q.scale.float().repeat_interleave(256).reshape(8, 4096)
    assert bool((err.abs() < scale).all())  # one draw errs by less than one step
    # E[err] = 0 and Var[err] <= scale^2 / 4 per element, independent draws: the mean of
    # err / scale over 32768 elements has std <= 0.5 / sqrt(32768) = 0.0028; allow 5 sigma.
    assert abs((err / scale).mean().item()) < 5 * 0.5 / 32768**0.5
    other = kq.quantize(x, 2, 256, seed=12)
    assert not torch.equal(other.packed, q.packed)  # the seed matters
    assert torch.equal(kq.quantize(x, 2, 256, seed=11).packed, q.packed)  # and is all that does


def test_layout_restrictions_and_errors() -> None:
    assert kq.supports((4, 3000), 256) and not kq.supports((3, 20), 8)  # 20 % 8 != 0
    assert not kq.supports((100,), 12) and kq.supports((3, 20), 8, per_sample=False)
    with pytest.raises(ValueError, match="group_size"):
        kq.quantize(torch.randn(3, 20), 2, 8)
    with pytest.raises(ValueError, match="bits"):
        kq.quantize(torch.randn(64), 3, 8)
    with pytest.raises(TypeError, match="x must be"):
        kq.quantize(torch.randn(64).double(), 2, 8)
    with pytest.raises(ValueError, match="noise"):
        kq.quantize(torch.randn(64), 2, 8, noise=torch.rand(63))
    q = kq.quantize(torch.empty(0, 5), 2, 8)
    assert q.packed.numel() == 0 and kq.dequantize(q).shape == (0, 5)


# ---- noise: the codec's counter hash, the same bytes as the CPU paths ---------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_seeded_kernel_writes_the_cpu_bytes(bits: int, dtype: torch.dtype) -> None:
    """Same seed, same bytes: the kernel's in-kernel key and hash equal the eager torch path's
    (and so the native and fused paths', tested against eager elsewhere); a seed above 2**32
    uses both halves of the key."""
    seed = torch.tensor([2**40 + 977], dtype=torch.int64)
    for shape, group_size in CASES:
        x = (torch.randn(shape) * 3 + 1).to(dtype)
        if shape == (4, 3000):  # a NaN group; float32: a subnormal range (scale 2**-126)
            x[1, 5] = float("nan")
            if dtype == torch.float32:  # (the interpreter flushes bf16 subnormals it widens)
                x[0, :256] = torch.linspace(0.0, 2.0**-130, 256)
        got = kq.quantize(x, bits, group_size, seed=seed)
        packed, lo, scale = codec._torch_quantize(x, seed, bits, group_size, True)
        assert torch.equal(got.packed, packed)
        assert same_bits(got.lo, lo) and same_bits(got.scale, scale)
    other = kq.quantize(x, bits, group_size, seed=seed + 2**32)  # the high half matters too
    assert not torch.equal(other.packed, got.packed)


def test_seed_drawn_on_the_generators_device() -> None:
    x = torch.randn(4, 512)
    gen = torch.Generator().manual_seed(4)
    state = torch.get_rng_state()
    a = kq.quantize(x, 2, 128, generator=gen)
    b = kq.quantize(x, 2, 128, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.packed, b.packed)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    # the seed the codec draws (device= the generator's) keys the same noise
    seed = codec.draw_seed(torch.Generator().manual_seed(4), x.device)
    assert seed.dtype == torch.int64 and seed.shape == (1,)
    assert torch.equal(kq.quantize(x, 2, 128, seed=seed).packed, a.packed)
    with pytest.raises(ValueError, match="seed"):
        kq.quantize(x, 2, 128, seed=-1)


def test_group_size_above_cap_is_rejected_by_the_kernel() -> None:
    assert kq.supports((8192,), codec.MAX_GROUP_SIZE)
    assert not kq.supports((16384,), 2 * codec.MAX_GROUP_SIZE)
    with pytest.raises(ValueError, match="group_size"):
        kq.quantize(torch.randn(16384), 2, 2 * codec.MAX_GROUP_SIZE)


# ---- dispatch through the codec -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codec_dispatches_to_the_kernel_when_forced(dtype: torch.dtype) -> None:
    x = (torch.randn(4, 1024) * 2).to(dtype)
    with force_kernels(True):
        q = codec.quantize(x, 2, 256, generator=torch.Generator().manual_seed(9))
        y = codec.dequantize(q)
    seed = codec.draw_seed(torch.Generator().manual_seed(9), x.device)
    ref = kq.quantize(x, 2, 256, seed=seed)
    assert torch.equal(q.packed, ref.packed) and same_bits(q.lo, ref.lo)
    cpu_path = codec.quantize(x, 2, 256, generator=torch.Generator().manual_seed(9))
    assert torch.equal(cpu_path.packed, q.packed)  # one noise definition: the same codes
    # the dequantizers agree bit for bit
    with force_kernels(False):
        assert torch.equal(codec.dequantize(q), y) and y.dtype == dtype


def test_forced_dispatch_falls_back_for_layouts_the_kernel_lacks() -> None:
    x = torch.randn(3, 20)  # rows of 20 elements: groups of 8 do not start on byte boundaries
    assert not kq.supports(x.shape, 8)
    gen = torch.Generator().manual_seed(2)
    with force_kernels(True):
        q = codec.quantize(x, 2, 8, generator=gen)
        y = codec.dequantize(q)
    ref = codec.quantize(x, 2, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(q.packed, ref.packed) and torch.equal(y, codec.dequantize(ref))


@pytest.mark.cuda
def test_cuda_generator_draws_the_seed_on_its_device() -> None:
    x = torch.randn(4, 512, device="cuda")
    a = codec.quantize(x, 2, generator=torch.Generator(device="cuda").manual_seed(1))
    b = codec.quantize(x, 2, generator=torch.Generator(device="cuda").manual_seed(1))
    assert torch.equal(a.packed, b.packed) and a.packed.is_cuda
    assert torch.equal(codec.dequantize(a).cpu(), codec.dequantize(a.to("cpu")))


@pytest.mark.parametrize("shape,group", [((3, 200), 64), ((2, 1024), 256), ((4104,), 128)])
def test_seeded_codes_use_the_documented_noise(shape: tuple, group: int) -> None:
    """In-kernel noise (keys from each group's first element) equals the codec's documented
    noise ``(mix32((e + key) mod 2**32) >> 8) * 2**-24`` of every element e, partial groups and
    several rows included: same bytes as quantizing with that noise passed explicitly."""
    x = torch.randn(shape) * 3
    seed = torch.tensor([1234], dtype=torch.int64)
    q = kq.quantize(x, 2, group, seed=seed)
    noise = codec._uniform(codec._block_key(codec._seed_key(seed), 0), 1, x.numel(), x.numel(),
                           x.device)  # fmt: skip
    assert bool(((noise >= 0) & (noise < 1)).all())
    ref = kq.quantize(x, 2, group, noise=noise)
    assert torch.equal(q.packed, ref.packed) and same_bits(q.lo, ref.lo)
    assert same_bits(q.scale, ref.scale)


# ---- rows of whole power-of-two groups: the mask-free kernel ---------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 8])
def test_whole_group_kernel_matches_the_cpu_bytes(bits: int, dtype: torch.dtype) -> None:
    """Rows of whole power-of-two groups take ``_quantize_whole_kernel`` (NaN-propagating
    min/max instead of a non-finite pass): same bytes as the torch path, given noise and seeded,
    with NaN, +inf, -inf, inf-and-NaN, constant and (float32) subnormal groups."""
    shape, group = (3, 1024), 256
    assert kq._whole(shape[1], group) and not kq._whole(3000, group)
    assert not kq._whole(960, 192)  # padded to 256: the masked kernel
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    x[0, 5] = float("nan")
    x[0, 300] = float("inf")
    x[0, 600] = -float("inf")
    x[0, 800], x[0, 801] = float("inf"), float("nan")
    x[1, :256] = 0.25  # constant group: scale 0
    x[1, 256:512] = float("inf")  # lo = inf
    if dtype == torch.float32:  # (the interpreter flushes bf16 subnormals it widens)
        x[2, :256] = torch.linspace(0.0, 2.0**-130, 256)
    noise = torch.rand(shape)
    ref = torch_path(x, bits, group, noise)
    got = kq.quantize(x, bits, group, noise=noise)
    assert torch.equal(got.packed, ref.packed)
    assert same_bits(got.lo, ref.lo) and same_bits(got.scale, ref.scale)
    assert int(got.lo.float().isnan().sum()) == 5  # the four bad groups of row 0, +inf group
    seed = torch.tensor([2**40 + 5], dtype=torch.int64)
    got = kq.quantize(x, bits, group, seed=seed)
    packed, lo, scale = codec._torch_quantize(x, seed, bits, group, True)
    assert torch.equal(got.packed, packed)
    assert same_bits(got.lo, lo) and same_bits(got.scale, scale)


@pytest.mark.parametrize("itemsize", [2, 4])
def test_whole_kernel_chunks_hold_whole_runs_of_codes(itemsize: int) -> None:
    """The [A, NG, G // A] tile: chunks divide the group and hold whole runs of 8 codes."""
    g = 8
    while g <= codec.MAX_GROUP_SIZE:
        a = kq._chunks(g, itemsize)
        assert a >= 1 and g % a == 0 and (g // a) % 8 == 0, (g, a)
        g *= 2
