"""The autograd Function behind every few-bit activation.

Forward computes torch's own activation (so the output is torch's, bit for bit)
and stores, for backward, only a packed code of the input: ``ceil(n*bits/8)``
bytes instead of the ``n * element_size`` bytes torch keeps. Backward returns
``grad_output * levels[code]``.

Non-finite inputs (NaN, +-inf) are rare but must not silently change the
gradient: their flat indices and torch's own derivative there are stored on the
side (nothing when the input is finite), so those elements get exactly torch's
gradient (NaN where torch gives NaN).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from ..codecs.bitpack import pack, unpack
from ..codecs.marks import mark_compact

__all__ = ["FewBitActivation", "apply_fewbit", "check_floating"]

Forward = Callable[[Tensor], Tensor]
Encoder = Callable[[Tensor], Tensor]


def check_floating(input: Tensor, name: str = "input") -> None:
    """Raise a TypeError naming ``name`` unless ``input`` is a floating-point tensor."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {input.dtype}")


def _keep(t: Tensor) -> Tensor:
    return t


def _nonfinite_derivative(x: Tensor, forward: Forward) -> tuple[Tensor, Tensor]:
    """Flat indices of non-finite elements of x and torch's derivative of forward there."""
    flat = x.detach().reshape(-1)
    # A finite sum proves every element finite (NaN and inf propagate); the rare
    # overflow of a finite tensor's sum only sends it down the exact path below.
    total = flat.sum(dtype=torch.float64 if flat.dtype == torch.float64 else torch.float32)
    if bool(torch.isfinite(total)):
        return torch.empty(0, dtype=torch.long, device=x.device), flat.new_empty(0)
    index = (~torch.isfinite(flat)).nonzero().squeeze(1)
    if index.numel() == 0:
        return index, flat.new_empty(0)
    # Identity hooks: this tiny transient graph is not a save of the model's, so outer
    # hooks (the generic compressor, the profiler) must not see it.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        xs = flat[index].clone().requires_grad_(True)
        (derivative,) = torch.autograd.grad(forward(xs), xs, torch.ones_like(xs))
    return index, derivative


class FewBitActivation(torch.autograd.Function):
    """y = forward(x); saves pack(encode(x), bits); backward: grad * levels[code]."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: Tensor,
        forward: Forward,
        encode: Encoder,
        levels: Sequence[float],
        bits: int,
    ) -> Tensor:
        y = forward(x)
        packed = mark_compact(pack(encode(x), bits))
        index, derivative = _nonfinite_derivative(x, forward)
        ctx.save_for_backward(packed, index, derivative)
        ctx.shape = x.shape  # type: ignore[attr-defined]
        ctx.bits = bits  # type: ignore[attr-defined]
        ctx.levels = tuple(levels)  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fewbit activations keep only a few-bit code of their input, so they cannot "
                "be differentiated twice (backward with create_graph=True); use the torch.nn "
                "activation where a second derivative is needed"
            )
        packed, index, derivative = ctx.saved_tensors  # type: ignore[attr-defined]
        shape: torch.Size = ctx.shape  # type: ignore[attr-defined]
        codes = unpack(packed, ctx.bits, shape.numel())  # type: ignore[attr-defined]
        compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
        lut = torch.tensor(ctx.levels, dtype=compute, device=grad.device)  # type: ignore[attr-defined]
        factor = lut.index_select(0, codes.int()).view(shape)
        grad_in = torch.mul(grad, factor).to(grad.dtype)
        if index.numel():
            grad_in = grad_in.contiguous()
            flat = grad_in.view(-1)
            flat[index] = grad.reshape(-1)[index] * derivative
        return grad_in, None, None, None, None


def apply_fewbit(
    x: Tensor, forward: Forward, encode: Encoder, levels: Sequence[float], bits: int
) -> Tensor:
    """Run ``forward`` on x, saving only a ``bits``-bit code when a gradient is needed."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return forward(x)
    return FewBitActivation.apply(x, forward, encode, levels, bits)
