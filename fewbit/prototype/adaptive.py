"""Adaptive per-layer bits (levels L3-L5; prototype: not yet measured on a GPU).

While the model trains, each quantizing layer ``l`` keeps running averages (EMA, momentum 0.9)
of ``S_l = mean(grad_output**2)`` (a tensor hook on its output) and ``R_l**2 = mean over
quantization groups of range**2`` of its saved activation (read off the quantizer's per-group
scales, no extra pass), and ``N_l`` its element count. Stochastic rounding at ``b`` bits adds
variance ``<= step**2 / 4`` per element with ``step = R / (2**b - 1)``, which reaches the
weight/input gradients through the output gradient, so the gradient variance added by layer
``l`` is modelled as ``V_l(b) = S_l * N_l * R_l**2 / (2**b - 1)**2``. Every ``interval``
training steps (forward calls of the root module in training mode) :func:`allocate_bits`
minimises ``sum_l V_l(b_l)`` subject to ``sum_l N_l b_l <= avg_bits * sum_l N_l`` greedily:
all layers start at 1 bit and the upgrade (to the next of 1, 2, 4, 8) with the largest
variance reduction per extra bit is applied while it fits the budget. No extra forward or
backward pass is run. Until the first allocation all layers use the configured bits (2).

Under torch.compile, compressed Linear and LayerNorm layers compute the same two numbers with
tensor ops in their traced backward and hand them to the host through a probe tensor's gradient
(see :class:`fewbit.modules.compressed.LayerStats`); the root's forward pre-hook is then part of
the graph, so a step is counted at the end of each backward that reached a watched layer instead
(its re-allocation sees that backward's statistics and applies from the next forward; new bits
recompile the graph).

State: the allocator is stored in the root module's ``__dict__`` (:func:`get_allocator`); each
watched layer holds a :class:`fewbit.modules.compressed.LayerStats` (four numbers and a
3-element float64 probe tensor on the layer's device).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..modules.compressed import CompressedLayer, LayerStats, layer_device

__all__ = ["BIT_CHOICES", "AdaptiveBitAllocator", "allocate_bits", "attach_allocator",
           "detach_allocator", "get_allocator"]

BIT_CHOICES = (1, 2, 4, 8)
_ALLOCATOR_ATTR = "_fewbit_allocator"


def allocate_bits(weights: Sequence[float], numels: Sequence[int], avg_bits: float = 2.0,
                  choices: Sequence[int] = BIT_CHOICES) -> List[int]:
    """Greedy bits per layer minimising ``sum w_l / (2**b_l - 1)**2`` with mean bits <= avg.

    ``weights[l] = S_l * N_l * R_l**2`` (see the module docstring), ``numels[l] = N_l``; the
    budget is ``avg_bits * sum(numels)`` bits. Starts from ``choices[0]`` everywhere and
    applies the best variance reduction per extra bit that fits, until none does.
    """
    if len(weights) != len(numels):
        raise ValueError("weights and numels must have the same length")
    choices = sorted(choices)
    bits = [choices[0]] * len(weights)
    budget = avg_bits * sum(numels) - sum(n * b for n, b in zip(numels, bits))
    while True:
        best: Optional[Tuple[float, int, int]] = None
        for i, (w, n) in enumerate(zip(weights, numels)):
            pos = choices.index(bits[i])
            if pos + 1 == len(choices) or w <= 0 or n <= 0:
                continue
            nb = choices[pos + 1]
            cost = n * (nb - bits[i])
            if cost > budget + 1e-9:
                continue
            gain = w * (1 / ((1 << bits[i]) - 1) ** 2 - 1 / ((1 << nb) - 1) ** 2)
            if best is None or gain / cost > best[0]:
                best = (gain / cost, i, nb)
        if best is None:
            return bits
        _, i, nb = best
        budget -= numels[i] * (nb - bits[i])
        bits[i] = nb


class AdaptiveBitAllocator:
    """Collects :class:`LayerStats` on ``layers`` and re-allocates their bits every
    ``interval`` training steps (see the module docstring). ``step()`` counts one step;
    :func:`attach_allocator` calls it from a forward pre-hook on the root module.
    """

    def __init__(self, layers: Sequence[CompressedLayer], avg_bits: float = 2.0,
                 interval: int = 100, choices: Sequence[int] = BIT_CHOICES) -> None:
        self.layers = list(layers)
        self.avg_bits = float(avg_bits)
        self.interval = int(interval)
        self.choices = tuple(choices)
        self.steps = 0
        self.allocations = 0
        self._handle: Optional[Any] = None
        self._forward_clock = True
        self._end_queued = False
        for layer in self.layers:
            stats = LayerStats(on_backward=self._backward_seen)
            stats.make_probe(layer_device(layer))
            layer.fewbit_stats = stats

    def attach(self, root: nn.Module) -> None:
        """Count the training forwards of ``root`` as steps."""
        self._handle = root.register_forward_pre_hook(self._pre_hook)

    def detach(self) -> None:
        """Stop counting and collecting statistics."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for layer in self.layers:
            layer.fewbit_stats = None

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            # traced: a host-side count here would be frozen into the graph; backward counts
            self._forward_clock = False
            return
        self._forward_clock = True
        if module.training and torch.is_grad_enabled():
            self.step()

    def _backward_seen(self) -> None:
        """A watched layer got its output gradient. When the root's forward was compiled (its
        pre-hook could not count), the step is counted when this backward ends: the step's
        re-allocation then uses this backward's statistics too and takes effect at the next
        forward (one step after eager counting would)."""
        if self._forward_clock or self._end_queued:
            return
        self._end_queued = True
        # runs once, after the current backward pass finishes (as DDP's reducer does)
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        self._end_queued = False
        self.step()

    def step(self) -> None:
        """One training step; re-allocates when ``steps`` is a multiple of ``interval``."""
        self.steps += 1
        if self.steps % self.interval == 0:
            self.reallocate()

    def sensitivities(self) -> List[float]:
        """``S_l * N_l * R_l**2`` per layer (0 for layers without statistics yet)."""
        out = []
        for layer in self.layers:
            s = layer.fewbit_stats
            ok = s is not None and s.steps > 0 and s.numel > 0 and math.isfinite(s.grad_sq)
            out.append(s.grad_sq * s.numel * s.range_sq if ok and s is not None else 0.0)
        return out

    def reallocate(self) -> List[int]:
        """Set each watched layer's ``bits`` from the current statistics; returns them.

        Layers that have not yet seen a forward and a backward keep their bits and are left
        out of the budget.
        """
        ready = [i for i, layer in enumerate(self.layers)
                 if layer.fewbit_stats is not None and layer.fewbit_stats.steps > 0
                 and layer.fewbit_stats.numel > 0]
        if not ready:
            return [layer.bits for layer in self.layers]
        sens = self.sensitivities()
        numels = [self.layers[i].fewbit_stats.numel for i in ready]  # type: ignore[union-attr]
        bits = allocate_bits([sens[i] for i in ready], numels, self.avg_bits, self.choices)
        for i, b in zip(ready, bits):
            self.layers[i].bits = b
        self.allocations += 1
        return [layer.bits for layer in self.layers]


def get_allocator(model: nn.Module) -> Optional[AdaptiveBitAllocator]:
    """The allocator attached to ``model`` (levels L3-L5), else None."""
    alloc = model.__dict__.get(_ALLOCATOR_ATTR)
    return alloc if isinstance(alloc, AdaptiveBitAllocator) else None


def attach_allocator(root: nn.Module, avg_bits: float, interval: int) -> AdaptiveBitAllocator:
    """Watch every compressed layer under ``root`` (replacing an earlier allocator)."""
    detach_allocator(root)
    layers = [m for m in root.modules() if isinstance(m, CompressedLayer)]
    alloc = AdaptiveBitAllocator(layers, avg_bits, interval)
    alloc.attach(root)
    root.__dict__[_ALLOCATOR_ATTR] = alloc
    return alloc


def detach_allocator(root: nn.Module) -> None:
    """Stop and forget the allocator attached to ``root``, if any."""
    alloc = get_allocator(root)
    if alloc is not None:
        alloc.detach()
        del root.__dict__[_ALLOCATOR_ATTR]
