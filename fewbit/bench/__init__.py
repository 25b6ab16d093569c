"""Benchmarks: peak memory, saved activations, step time and gradient error of a training
step under several fewbit configurations (`fewbit bench`), and convergence on real data
(`fewbit bench --convergence`).

Each configuration runs in a fresh child process (`python -m fewbit.bench.runner`) so that
no allocation of one configuration can raise another's peak.
"""

from .configs import CONFIGS, Config, register
from .models import PRESETS, ModelSpec, build_model, make_batch, resolve_spec

__all__ = [
    "CONFIGS",
    "Config",
    "register",
    "PRESETS",
    "ModelSpec",
    "build_model",
    "make_batch",
    "resolve_spec",
]
