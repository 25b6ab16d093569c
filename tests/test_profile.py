"""Tests of fewbit.profile: exact saved-byte accounting on hand-countable models, peak
memory (profiler method against the independent VmHWM method), StepProfile output."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from fewbit.codecs.bitpack import pack, packed_nbytes, unpack
from fewbit.functional.fewbit_fn import side_store_nbytes
from fewbit.profile import (
    SavedTensorLog,
    StepProfile,
    held_bytes,
    profile_step,
    saved_by_node,
    saved_bytes,
)

N, IN, HID, OUT = 64, 32, 128, 16  # batch, widths; fp32 -> 4 bytes per element
FP32 = 4


def _sum_loss(out: torch.Tensor, batch: object) -> torch.Tensor:
    return out.sum()  # SumBackward saves no tensor, so only the model's saves count


def _mlp(act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, HID), act, nn.Linear(HID, OUT))


def test_linear_gelu_linear_saved_bytes_by_op_and_module() -> None:
    model = _mlp(nn.GELU())
    x = torch.randn(N, IN)
    # Linear 0 saves its input x; GELU saves its input (Linear 0's output); Linear 2 saves
    # its input (GELU's output). Weights are parameters and do not count.
    assert saved_bytes(model, x) == N * IN * FP32 + 2 * N * HID * FP32
    prof = profile_step(model, x, loss_fn=_sum_loss, steps=1)
    assert prof.saved_bytes == N * IN * FP32 + 2 * N * HID * FP32
    assert prof.saved_by_op == {
        "AddmmBackward0": N * IN * FP32 + N * HID * FP32,
        "GeluBackward0": N * HID * FP32,
    }
    assert prof.saved_by_module == {"1": N * HID * FP32, "2": N * HID * FP32, "0": N * IN * FP32}
    assert prof.saved_by_module_type == {"Linear": N * (IN + HID) * FP32, "GELU": N * HID * FP32}


def test_relu_output_shared_with_next_linear_counts_once() -> None:
    model = _mlp(nn.ReLU())
    x = torch.randn(N, IN)
    prof = profile_step(model, x, loss_fn=_sum_loss, steps=1)
    # ReLU saves its output and Linear 2 saves the same storage as its input: one copy,
    # attributed to ReLU (created first in the forward pass).
    assert prof.saved_by_op == {"ReluBackward0": N * HID * FP32, "AddmmBackward0": N * IN * FP32}
    assert prof.saved_bytes == N * (IN + HID) * FP32


def test_parameters_and_buffers_are_excluded_and_views_deduplicated() -> None:
    w = nn.Parameter(torch.randn(IN, HID))
    x = torch.randn(N, IN, requires_grad=True)

    def fn() -> torch.Tensor:
        y = x @ w  # saves x and w (a parameter: excluded)
        return y[:, :10] * y[:, 10:20]  # saves two views of y: one storage, counted once

    assert saved_bytes(fn, exclude=[w]) == N * IN * FP32 + N * HID * FP32
    assert saved_bytes(fn) == N * IN * FP32 + N * HID * FP32 + IN * HID * FP32


class _Packed(torch.autograd.Function):
    """x -> relu(x), saving only a 1-bit packed mask (custom Function node)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.n = x.numel()
        ctx.shape = x.shape
        ctx.save_for_backward(pack(x > 0, 1))
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        return grad * unpack(packed, 1, ctx.n).view(ctx.shape)


def test_custom_function_saves_are_attributed_to_its_node() -> None:
    x = torch.randn(N, HID, requires_grad=True)
    log = SavedTensorLog()
    with log.record():
        y = _Packed.apply(x)
    assert log.total == packed_nbytes(N * HID, 1) == N * HID // 8
    assert saved_by_node([y.grad_fn], log) == {"_PackedBackward": N * HID // 8}


def test_fewbit_gelu_saves_three_bits_per_element() -> None:
    import fewbit

    x = torch.randn(N, HID, requires_grad=True)
    assert saved_bytes(nn.GELU(), x) == N * HID * FP32
    # the 3-bit code plus the fixed-size non-finite side store (size depends on n only)
    stored = math.ceil(N * HID * 3 / 8) + side_store_nbytes(N * HID)
    assert saved_bytes(fewbit.GELU(bits=3), x) == stored
    model = nn.Sequential(nn.Linear(IN, HID), fewbit.GELU(bits=3), nn.Linear(HID, OUT))
    prof = profile_step(model, torch.randn(N, IN), loss_fn=_sum_loss, steps=1)
    assert prof.saved_by_module["1"] == stored
    assert prof.saved_bytes == N * IN * FP32 + N * HID * FP32 + stored


def test_held_bytes_counts_parameters_adamw_state_and_batch() -> None:
    model = _mlp(nn.GELU())
    x = torch.randn(N, IN)
    opt = torch.optim.AdamW(model.parameters())
    prof = profile_step(model, x, loss_fn=_sum_loss, optimizer=opt, steps=1)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    # parameters + exp_avg + exp_avg_sq (fp32 each) + one fp32 `step` scalar per parameter
    # tensor + the batch; gradients are freed (zero_grad(set_to_none=True)).
    expected = 3 * n_params * FP32 + n_tensors * FP32 + N * IN * FP32
    assert held_bytes(model, x, opt) == expected
    assert prof.held_bytes == expected
    # the step's peak holds at least the saved activations and the gradients
    assert prof.peak_bytes >= prof.saved_bytes + n_params * FP32
    assert prof.peak_total_bytes == prof.held_bytes + prof.peak_bytes


def test_step_profile_output(tmp_path: os.PathLike[str]) -> None:
    prof = profile_step(_mlp(nn.GELU()), torch.randn(N, IN), steps=2)
    assert isinstance(prof, StepProfile)
    assert len(prof.step_times_s) == 2 and prof.step_time_s > 0
    d = prof.to_dict()
    assert d["saved_bytes"] == prof.saved_bytes == sum(d["saved_by_op"].values())
    assert sum(d["saved_by_module"].values()) == prof.saved_bytes
    path = os.path.join(tmp_path, "p.json")
    prof.to_json(path)
    with open(path) as f:
        assert json.load(f)["peak_total_bytes"] == prof.peak_total_bytes
    text = prof.table(top=2)
    assert "GeluBackward0" in text and "saved for backward" in text and "more)" in text


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": self.lin(x)}


def test_profile_step_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="steps"):
        profile_step(_mlp(nn.GELU()), torch.randn(N, IN), steps=0)
    with pytest.raises(ValueError, match="no parameters"):
        profile_step(nn.GELU(), torch.randn(N, IN))
    with pytest.raises(TypeError, match="loss_fn"):
        profile_step(_DictOut(), torch.randn(N, IN))  # no .loss/.logits, not a tensor


_PEAK_CHILD = textwrap.dedent(
    """
    import json, torch
    from torch import nn
    from fewbit.profile import TrainStep, default_loss, cpu_profiler_peak, rss_step_peak
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))
    x = torch.randn(4096, 512)
    opt = torch.optim.AdamW(model.parameters())
    step = TrainStep(model, x, default_loss, opt, None)
    step()  # warm-up: optimizer state exists before the measured steps
    print(json.dumps({"profiler": cpu_profiler_peak(step), "rss": rss_step_peak(step)}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_cpu_profiler_peak_matches_vmhwm_in_child() -> None:
    from fewbit.bench.memory import child_env

    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD], env=child_env(rss=True),
                         capture_output=True, text=True, timeout=300, check=True)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    # saved: x (8 MiB) + GELU input (32 MiB) + GELU output (32 MiB) = 72 MiB, and the step
    # allocates more (output, gradients), so both methods see well above 72 MiB.
    assert peaks["profiler"] > 72 * 2**20
    # Two independent methods (allocator events vs resident pages with mmap'd tensors):
    # malloc bookkeeping and small heap allocations are far below 5% of ~100 MiB.
    assert abs(peaks["profiler"] - peaks["rss"]) <= 0.05 * peaks["rss"]


@pytest.mark.cuda
def test_cuda_peak_and_saved_bytes() -> None:
    model = _mlp(nn.GELU()).cuda()
    x = torch.randn(N, IN, device="cuda")
    prof = profile_step(model, x, loss_fn=_sum_loss, steps=1)
    assert prof.saved_bytes == N * IN * FP32 + 2 * N * HID * FP32
    assert prof.peak_bytes >= prof.saved_bytes
    assert prof.peak_method.startswith("cuda")
