"""One rank of the distributed columns of the compatibility matrix (run as a script).

``python dist_worker.py {ddp,fsdp2} RANK WORLD INIT_FILE OUT_JSON``: joins a gloo process
group through ``INIT_FILE``, then for every row of ``compat_rows.ROWS`` converts the same
seeded TinyBlock, wraps it (``DistributedDataParallel``, or ``fully_shard`` on each layer and
the root), runs one forward and backward on this rank's input with the same global seed on
every rank (the usual setup) and gathers the full gradients. Rank 0 writes, per row:
``error`` (None, or the exception of the first failing rank), ``identical`` (every rank holds
bitwise the same full gradients), ``rel_exact`` / ``rel_fewbit`` (per parameter, relative
error against the rank-averaged gradient of the unconverted model / of the converted model
run locally without the wrapper), ``forward_exact`` (each rank's output equals the unconverted
model's on the same input).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compat_rows as R  # noqa: E402

SEED = 5


def wrap(kind: str, model: nn.Module, world: int) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in (model.attn, model.up, model.down, model.norm):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(g: Tensor) -> Tensor:
    """The whole gradient (FSDP2 keeps a DTensor shard)."""
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def run_row(kind: str, row: str, rank: int, world: int) -> Dict[str, Any]:
    inputs = [R.make_input(seed=1 + r) for r in range(world)]
    model = R.converted_model(row)
    wrapped = wrap(kind, model, world)
    torch.manual_seed(SEED)
    with R.context(row, model):
        out = wrapped(inputs[rank])
        R.loss_of(out).backward()
    grads = {n: full(p.grad).detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, (out.detach(), grads))
    if rank != 0:
        return {}
    identical = all(set(g) == set(grads) and all(torch.equal(g[n], grads[n]) for n in grads)
                    for _, g in gathered)
    exact = R.grads_at("exact", R.base_model(), inputs, SEED)
    local = R.grads_at(row, R.converted_model(row), inputs, SEED)
    base = R.base_model()
    with torch.no_grad():
        forward_exact = all(torch.equal(o, base(x)) for (o, _), x in zip(gathered, inputs))
    return {
        "error": None,
        "identical": identical,
        "forward_exact": forward_exact,
        "names": sorted(grads) == sorted(exact),
        "rel_exact": {n: R.rel_err(grads[n], exact[n]) for n in grads if n in exact},
        "rel_fewbit": {n: R.rel_err(grads[n], local[n]) for n in grads if n in local},
    }


def main() -> None:
    kind, rank, world, init_file, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    results: Dict[str, Any] = {}
    for row in R.ROWS:
        try:
            res = run_row(kind, row, rank, world)
            failed = None
        except Exception as e:  # reported per row; the other rank fails the same way
            failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc()
            res = {}
        errors: List[Any] = [None] * world
        dist.all_gather_object(errors, failed)
        first = next((e for e in errors if e is not None), None)
        if rank == 0:
            results[row] = res if first is None else {"error": first}
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
