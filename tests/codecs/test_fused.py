"""Fused (torch.compile) CPU quantizer: same bytes as the eager codec, env switch, fallback.

Compiles are shared across bit widths (dynamic sizes and bits): one encoder and one decoder
per dtype; Inductor caches them on disk for later runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fewbit.codecs import fused as fused_mod
from fewbit.codecs import quantize as qmod

SEED = torch.tensor([0x123456789ABCDEF], dtype=torch.int64)


def both_paths(x: torch.Tensor, bits: int, monkeypatch: pytest.MonkeyPatch):
    """(fused, eager) results of the PyTorch path: packed, lo, scale, decoded."""
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("FEWBIT_COMPILE", flag)
        packed, lo, scale = qmod._torch_quantize(x, SEED, bits, 256, True)
        y = qmod._torch_dequantize(packed, lo, scale, x.shape, x.dtype, bits, 256, True)
        out.append((packed, lo, scale, y))
    return out


@pytest.mark.parametrize(
    "dtype,bit_widths",
    [(torch.float32, (1, 2, 4, 8)), (torch.bfloat16, (2,)), (torch.float16, (4,))],
    ids=str,
)
def test_fused_codec_gives_the_eager_bytes(
    dtype: torch.dtype, bit_widths: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = (torch.randn(4, 2 * qmod._FUSED_MIN // 4 + 256 * 4) * 3).to(dtype)
    assert qmod._use_fused(x, x.numel(), x[0].numel(), 256)
    x[1, 7] = float("nan")  # a NaN group, an inf group, a constant group
    x[2, 300] = float("inf")
    x[3, :256] = 0.5
    for bits in bit_widths:
        (p, lo, sc, y), (p0, lo0, sc0, y0) = both_paths(x, bits, monkeypatch)
        assert torch.equal(p, p0) and p.numel() == (x.numel() * bits + 7) // 8
        assert torch.equal(lo.view(torch.int16), lo0.view(torch.int16))  # NaN bits too
        assert torch.equal(sc.view(torch.int16), sc0.view(torch.int16))
        assert torch.equal(y.nan_to_num(7.0), y0.nan_to_num(7.0)) and y.dtype == dtype
        assert torch.equal(y.isnan(), y0.isnan())
    assert qmod._encode_fused.compiled is not None and not qmod._encode_fused.failed
    assert qmod._decode_fused.compiled is not None and not qmod._decode_fused.failed


def test_env_switch_forces_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def double(t: torch.Tensor) -> torch.Tensor:
        calls.append(torch.compiler.is_compiling())
        return t * 2

    f = fused_mod.fused(double)
    monkeypatch.setenv("FEWBIT_COMPILE", "0")
    assert not fused_mod.compile_enabled()
    assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))
    assert f.compiled is None and calls == [False]  # ran eagerly, nothing compiled


def test_compile_failure_warns_once_then_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setenv("FEWBIT_COMPILE", "1")
    monkeypatch.setattr(fused_mod.torch, "compile", broken)
    f = fused_mod.fused(lambda t: t + 1)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert torch.equal(f(torch.zeros(2)), torch.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(f(torch.zeros(2)), torch.ones(2))
    assert f.failed


def test_non_cpu_tensors_are_never_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEWBIT_COMPILE", "1")
    f = fused_mod.fused(lambda t: t + 1)
    assert f(torch.zeros(2, device="meta")).device.type == "meta"
    assert f.compiled is None
