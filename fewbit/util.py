"""Model surgery and memory accounting helpers (published FewBit ``fewbit.util`` API).

* :func:`map_module` rebuilds a module tree in place with a per-module function;
  :func:`convert_linear` turns an ``nn.Linear`` into another linear class sharing its
  parameters. Together: ``map_module(model, lambda m: convert_linear(m, RandomizedLinear,
  proj_dim_ratio=0.1))``.
* :func:`traverse`, :func:`teniter`, :func:`estimate_memory_usage` walk an autograd graph
  (the published semantics: leaves by default, saved tensors with ``saved_only=True``);
  :func:`memory_usage_hooks` counts what autograd saves while it is active.
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

__all__ = [
    "HookedMemoryUsage",
    "convert_linear",
    "estimate_memory_usage",
    "map_module",
    "memory_usage_hooks",
    "saved_tensors_of",
    "teniter",
    "traverse",
]

ModuleFunc = Union[Callable[[nn.Module], nn.Module], Callable[[nn.Module, str], nn.Module]]
TraverseCallable = Callable[[Any, Tensor, bool], Any]


# ---------------------------------------------------------------------------- module surgery


def _takes_path(func: Callable[..., Any]) -> bool:
    """True if ``func`` accepts a second positional argument (the module path)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = 0
    for p in params:
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            return True
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 2


def map_module(root: nn.Module, func: ModuleFunc, patt: Optional[str] = None) -> nn.Module:
    """Apply ``func`` to every module of the tree below ``root`` (children first, then the
    parent) whose path matches ``patt``, replacing each by the module ``func`` returns.

    Paths exist in two spellings, and ``patt`` (a regex, ``re.search``) may match either:
    slashed as published (``'/'`` for the root, ``'/encoder/layer/0'``) or dotted as in
    ``named_modules`` (``''``, ``'encoder.layer.0'``). ``func`` is called as
    ``func(module, slashed_path)`` if it takes two positional arguments, else
    ``func(module)``. A module shared by several parents is converted once and stays shared.
    Returns the new root (``root`` itself unless ``func`` replaced the root); the tree is
    modified in place.
    """
    if not isinstance(root, nn.Module):
        raise TypeError(f"root must be an nn.Module, got {type(root).__name__}")
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    regex = re.compile(patt) if patt is not None else None
    memo: dict[int, nn.Module] = {}
    return _map(root, func, _takes_path(func), regex, "", "", memo)


def _map(module: nn.Module, func: ModuleFunc, with_path: bool, regex: Optional[re.Pattern[str]],
         slashed: str, dotted: str, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    # Not named_children(): it skips a module shared by two slots; every slot is rebound.
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _map(child, func, with_path, regex, f"{slashed}/{name}",
                   f"{dotted}.{name}" if dotted else name, memo)
        if new is not child:
            setattr(module, name, new)
    path = slashed or "/"
    result = module
    if regex is None or regex.search(path) or regex.search(dotted):
        result = func(module, path) if with_path else func(module)  # type: ignore[call-arg]
        if not isinstance(result, nn.Module):
            raise TypeError(f"func must return an nn.Module, got {type(result).__name__} "
                            f"for the module at {path!r}")
    memo[id(module)] = result
    return result


def convert_linear(module: nn.Module, ctor: type[nn.Module], **kwargs: Any) -> nn.Module:
    """``module`` rebuilt as ``ctor(in_features, out_features, bias=..., device=...,
    dtype=..., **kwargs)`` if it is an ``nn.Linear`` (not already a ``ctor``), sharing the
    SAME weight and bias ``Parameter`` objects (so optimizer state stays valid) and the
    train/eval mode; any other module is returned unchanged."""
    if not (isinstance(ctor, type) and issubclass(ctor, nn.Module)):
        raise TypeError(f"ctor must be an nn.Module subclass, got {ctor!r}")
    if not isinstance(module, nn.Linear) or isinstance(module, ctor):
        return module
    weight, bias = module.weight, module.bias
    layer = _build(ctor, module, torch.device("meta"), kwargs)
    if any(t.is_meta for t in _tensors_besides(layer)):
        layer = _build(ctor, module, weight.device, kwargs)
    layer.weight = weight
    layer.bias = bias
    layer.train(module.training)
    return layer


def _build(ctor: type[nn.Module], module: nn.Linear, device: torch.device,
           kwargs: dict[str, Any]) -> nn.Module:
    return ctor(in_features=module.in_features, out_features=module.out_features,
                bias=module.bias is not None, device=device, dtype=module.weight.dtype, **kwargs)


def _tensors_besides(layer: nn.Module) -> Iterator[Tensor]:
    for name, tensor in layer.named_parameters(recurse=True):
        if name not in ("weight", "bias"):
            yield tensor
    yield from layer.buffers()


# ------------------------------------------------------------------------- autograd graphs


def saved_tensors_of(node: Any) -> Iterator[Tensor]:
    """Tensors a grad_fn node saved: ``_saved_*`` attributes of built-in nodes and
    ``saved_tensors`` of custom Functions (unpacked through any active hooks)."""
    names = [name for name in dir(node) if name.startswith("_saved_")]
    if hasattr(node, "saved_tensors"):
        names.append("saved_tensors")
    for name in names:
        try:
            value = getattr(node, name)
        except RuntimeError:  # freed after backward, or not a tensor at all
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        yield from (t for t in values if isinstance(t, Tensor))


def traverse(variable: Tensor, callback: TraverseCallable) -> None:
    """Walk the backward graph of ``variable`` and call ``callback(node, tensor, saved)``
    for each tensor met: ``saved=True`` for saved tensors, ``False`` for the leaves held by
    ``AccumulateGrad`` nodes. A tensor may be reported more than once."""
    seen: set[int] = set()
    stack = [variable.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        leaf = getattr(node, "variable", None)
        if isinstance(leaf, Tensor):
            callback(node, leaf, False)
        for tensor in saved_tensors_of(node):
            callback(node, tensor, True)
        stack.extend(child for child, _ in getattr(node, "next_functions", ()))


def teniter(variable: Tensor, include_ordinary: bool = True,
            include_saved: bool = False) -> Iterator[Tensor]:
    """Distinct tensors (by identity) reachable from ``variable``'s graph: leaves
    (``include_ordinary``) and/or saved tensors (``include_saved``)."""
    found: dict[int, tuple[Tensor, bool, bool]] = {}

    def collect(node: Any, tensor: Tensor, saved: bool) -> None:
        _, ordinary0, saved0 = found.get(id(tensor), (tensor, False, False))
        found[id(tensor)] = (tensor, ordinary0 or not saved, saved0 or saved)

    traverse(variable, collect)
    for tensor, ordinary, saved in found.values():
        if (include_ordinary and ordinary) or (include_saved and saved):
            yield tensor


def estimate_memory_usage(variable: Tensor, saved_only: bool = False) -> int:
    """Bytes (``numel * element_size``) of distinct tensors reached from ``variable``'s
    backward graph, as the published FewBit defines it: by default the leaves the graph
    accumulates gradients into (parameters, and inputs that require grad); with
    ``saved_only=True`` the tensors saved for backward instead. Tensors are told apart by
    identity, so a saved output unpacked by two nodes may count twice (as published).

    ``nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 1))`` on a ``(3, 8)`` input that requires
    grad: ``4 * (3*8 + 4*8 + 4 + 1*4 + 1) = 260`` bytes (input and parameters)."""
    tensors = teniter(variable, include_ordinary=not saved_only, include_saved=saved_only)
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------- saved tensor hooks


@dataclass
class HookedMemoryUsage:
    """What autograd saved inside :func:`memory_usage_hooks`.

    ``forward``: bytes of every tensor packed (published semantics, duplicates counted);
    ``backward``: bytes unpacked by backward; ``unique``: bytes of the distinct storages
    packed, without parameters and the ``exclude`` tensors (the memory actually held)."""

    forward: Optional[int] = None
    backward: Optional[int] = None
    unique: int = 0
    _storages: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def value(self) -> Optional[int]:
        return self.backward or self.forward


def _storage_key(tensor: Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


@contextmanager
def memory_usage_hooks(exclude: Iterable[Tensor] = ()) -> Iterator[HookedMemoryUsage]:
    """Context manager counting the tensors autograd saves (see :class:`HookedMemoryUsage`).
    Pass ``exclude=model.parameters()`` to leave out parameters held anyway, views included."""
    usage = HookedMemoryUsage()
    skip = {_storage_key(t)[0] for t in exclude}

    def pack(tensor: Tensor) -> Tensor:
        size = tensor.numel() * tensor.element_size()
        usage.forward = (usage.forward or 0) + size
        if not isinstance(tensor, nn.Parameter) and tensor.device.type != "meta":
            ptr, nbytes = _storage_key(tensor)
            if ptr not in skip and ptr not in usage._storages:
                usage._storages[ptr] = nbytes
                usage.unique += nbytes
        return tensor

    def unpack(tensor: Tensor) -> Tensor:
        usage.backward = (usage.backward or 0) + tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield usage
