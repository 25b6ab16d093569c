"""Logic of benchmarks/kernels.py that runs without a GPU: byte counts, units, CLI exit."""

import importlib.util
import pathlib
import sys

import pytest
import torch

PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
spec = importlib.util.spec_from_file_location("bench_kernels", PATH)
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_kernels"] = bench  # dataclasses look their module up
spec.loader.exec_module(bench)


def test_activation_byte_counts() -> None:
    # bf16 GELU at 3 bits: 2 + 2 + 3/8 per pass, 8.75 B in all; PyTorch 4 + 6 = 10 B
    ours = bench.fewbit_bytes("gelu", 2, 3)
    assert (ours.forward, ours.backward, ours.both) == (4.375, 4.375, 8.75)
    ref = bench.torch_bytes("gelu", 2)
    assert (ref.forward, ref.backward, ref.both) == (4.0, 6.0, 10.0)
    # fp32: 16.75 vs 20; the 1-bit relu mask: 8.125 per pass
    assert (
        bench.fewbit_bytes("silu", 4, 3).both == 16.75 and bench.torch_bytes("silu", 4).both == 20
    )
    assert bench.fewbit_bytes("relu", 4, 1).forward == 8.125


def test_pack_byte_counts_and_units() -> None:
    assert bench.fewbit_bytes("pack", 4, 2) == bench.Bytes(1.25, 1.25)
    # 2-bit bf16 group quantization, groups of 256: 2 + 2/8 + 4/256 B each way
    assert bench.fewbit_bytes("quantize", 2, 2) == bench.Bytes(2.265625, 2.265625)
    assert bench.bandwidth_gbs(2e9, 1000.0) == 2.0  # 2e9 bytes in 1 s
    assert bench.DEFAULT_SIZES == (1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28)


def test_format_table() -> None:
    row = bench.Row("gelu", "bfloat16", 1 << 20, 3, 1.0, 2.0, 1.5, 2.5, *([0.5] * 8))
    text = bench.format_table([row], 3000.0)
    assert "3000 GB/s" in text and "gelu" in text and "50.0%" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_no_gpu_exits_with_message(capsys: pytest.CaptureFixture) -> None:
    assert bench.main([]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
