"""Max-pool window offsets on the CPU: one C pass per direction (csrc/maxpool.c) writes the
bytes of the torch-op path (encode + bitpack) and decodes them back to torch's indices."""

from __future__ import annotations

import importlib
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fewbit.codecs.native import library

P = importlib.import_module("fewbit.functional.pooling")

needs_native = pytest.mark.skipif(library() is None, reason="no native codec library")

# (dims, input shape, kwargs): 1 to 8 bits per code, padding, dilation, ceil_mode, strides
# larger and smaller than the kernel, unbatched input, output sizes not a multiple of 8
CASES = [
    (1, (2, 3, 37), dict(kernel_size=3, stride=1, padding=1)),
    (1, (2, 3, 37), dict(kernel_size=2)),  # 1 bit
    (2, (2, 3, 11, 13), dict(kernel_size=3, stride=2, padding=1)),
    (2, (2, 3, 11, 13), dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)),
    (2, (3, 17, 19), dict(kernel_size=(2, 5), stride=(1, 3))),
    (2, (1, 2, 40, 40), dict(kernel_size=16, stride=7, padding=8)),  # 256-element window: 8 bits
    (3, (1, 2, 7, 8, 9), dict(kernel_size=3, stride=2, padding=1)),  # 27: 5 bits
    (3, (1, 2, 9, 9, 9), dict(kernel_size=(2, 3, 2), stride=1, dilation=(1, 2, 1))),
]


def _run(dims: int, x: Tensor, kw: dict, g: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
    saved: List[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    x = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = getattr(P, f"max_pool{dims}d")(x, **kw)
    (gx,) = torch.autograd.grad(out, x, g)
    return out.detach(), gx, saved


@needs_native
@pytest.mark.parametrize("case", range(len(CASES)))
def test_native_offsets_same_bytes_and_torch_gradients(monkeypatch, case: int) -> None:
    dims, shape, kw = CASES[case]
    x = torch.randn(shape).round(decimals=1)  # ties: the argmax choice must be torch's too
    ref = getattr(F, f"max_pool{dims}d")(x, **kw)
    g = torch.randn_like(ref)
    native = _run(dims, x, kw, g)
    monkeypatch.setenv("FEWBIT_COMPILE", "0")
    eager = _run(dims, x, kw, g)
    xr = x.detach().requires_grad_(True)
    (gref,) = torch.autograd.grad(getattr(F, f"max_pool{dims}d")(xr, **kw), xr, g)
    assert len(native[2]) == len(eager[2]) == 1
    assert torch.equal(native[2][0], eager[2][0])  # the same packed bytes
    assert torch.equal(native[0], ref) and torch.equal(native[1], gref)


@needs_native
def test_native_offsets_parallel_chunks_and_channels_last(monkeypatch) -> None:
    """Past the parallel threshold (64K codes, chunks of 8K), channels-last input: bytes equal
    for 1 and 2 threads and to the torch-op path; gradients torch's."""
    x = torch.randn(8, 16, 66, 66).round(decimals=1).to(memory_format=torch.channels_last)
    kw = dict(kernel_size=3, stride=2, padding=1)
    ref = F.max_pool2d(x, **kw)
    g = torch.randn_like(ref)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(_run(2, x, kw, g))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("FEWBIT_COMPILE", "0")
    runs.append(_run(2, x, kw, g))
    xr = x.detach().requires_grad_(True)
    (gref,) = torch.autograd.grad(F.max_pool2d(xr, **kw), xr, g)
    assert ref.numel() >= 1 << 16
    for out, gx, saved in runs:
        assert torch.equal(saved[0], runs[-1][2][0])
        assert torch.equal(out, ref) and torch.equal(gx, gref)
