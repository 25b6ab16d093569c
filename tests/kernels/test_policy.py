"""The one kernel-vs-PyTorch policy (fewbit.kernels.use_kernel) and its scoped override."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fewbit import kernels
from fewbit.codecs import BitPacker, MaskPacker
from fewbit.codecs import bitpack as ref
from fewbit.kernels import force_kernels, use_kernel
from fewbit.kernels.launch import device_guard

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def test_cpu_tensors_use_the_torch_path() -> None:
    assert not use_kernel(torch.zeros(3)) and not use_kernel("cpu") and not use_kernel(None)
    assert kernels.available(torch.zeros(3)) == use_kernel(torch.zeros(3))


def test_disable_env_var_wins_without_an_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEWBIT_DISABLE_TRITON", "1")
    assert not use_kernel(torch.device("cuda")) and not kernels.available("cuda")


@needs_triton
def test_force_kernels_is_scoped_and_nests() -> None:
    x = torch.zeros(3)
    with force_kernels(True):
        assert use_kernel(x) and kernels.available(x)
        with force_kernels(False):
            assert not use_kernel(x)
        assert use_kernel(x)
    assert not use_kernel(x)  # restored on exit
    with pytest.raises(ValueError):
        with force_kernels(True):
            raise ValueError("inside")
    assert not use_kernel(x)  # restored after an exception too
    with pytest.raises(TypeError, match="enabled"):
        with force_kernels("yes"):  # type: ignore[arg-type]
            pass


@needs_triton
@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_bit_packer_forced_to_the_kernel_stores_the_same_bytes(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (5, 2001), dtype=torch.uint8)
    with force_kernels(True):
        enc = BitPacker(bits).encode(codes)
        back = enc.decode()
    assert torch.equal(enc.packed, ref.pack(codes, bits)) and torch.equal(back, codes)
    mask = codes > 0
    with force_kernels(True):
        m = MaskPacker().encode(mask)
    assert torch.equal(m.packed, ref.pack(mask.to(torch.uint8), 1))
    assert torch.equal(m.decode(), mask)


def test_device_guard_is_a_no_op_on_cpu() -> None:
    with device_guard(torch.zeros(1)):
        pass


@pytest.mark.cuda
def test_device_guard_selects_the_tensors_gpu() -> None:
    t = torch.zeros(1, device=f"cuda:{torch.cuda.device_count() - 1}")
    with device_guard(t):
        assert torch.cuda.current_device() == t.device.index
