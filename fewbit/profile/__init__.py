"""Memory profiler for one training step.

`profile_step(model, batch)` runs forward, backward and an optimizer step and reports

* the bytes saved for backward (deduplicated by untyped storage, parameters and buffers
  excluded), grouped by the autograd operation that saved them and by module path;
* the peak memory of the step above the memory held before it (CUDA: the caching
  allocator's ``max_memory_allocated``; CPU: torch.profiler's allocation events summed in
  time order);
* the step time (median of several steps after warm-up).

`saved_bytes(fn)` is the one-number helper: bytes saved for backward while ``fn`` runs.

Attribution. A pack hook (`torch.autograd.graph.saved_tensors_hooks`) sees every saved
tensor but not the operation saving it, so the operation is found afterwards by walking
the autograd graph from the loss and reading each node's saved tensors (``_saved_*``
attributes of built-in nodes, ``saved_tensors`` of custom `Function` nodes). A storage
saved by several nodes (a ReLU output that the next Linear saves too) counts once, for
the node created first in the forward pass. The module path is the innermost module
whose forward was running when the tensor was saved (forward pre/post hooks).
"""

from .peak import cpu_profiler_peak, rss_step_peak
from .saved import SavedTensorLog, saved_by_node, saved_bytes
from .step import StepProfile, TrainStep, default_loss, held_bytes, profile_step, time_steps
from .storage import format_bytes, storage_key, storage_nbytes

__all__ = [
    "StepProfile",
    "profile_step",
    "saved_bytes",
    "saved_by_node",
    "SavedTensorLog",
    "storage_key",
    "storage_nbytes",
    "cpu_profiler_peak",
    "rss_step_peak",
    "format_bytes",
    "TrainStep",
    "default_loss",
    "held_bytes",
    "time_steps",
]
