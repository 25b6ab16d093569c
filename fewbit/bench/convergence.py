"""Convergence on real data: scikit-learn's handwritten digits (1797 8x8 images, bundled
with the package, no download).

Each configuration trains the same model from the same initialisation on the same fixed
split (75% train, 25% test, stratified) with the same batch order, and reports the final
test accuracy and the per-epoch training loss. Models:

* ``transformer`` (default): the 8 image rows are 8 tokens; row embedding (Linear 8->64)
  plus learned positions, 2 pre-norm blocks of 4-head self-attention (Linear q, k, v, o)
  and a GELU MLP (64->128->64), mean pooling and a linear classifier. Exercises both the
  GELU and the Linear paths that fewbit replaces.
* ``mlp``: 64 -> 256 -> 256 -> 10 with GELU.

The classifier is named ``classifier`` so that `fewbit.convert` keeps it exact by default.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch
from torch import Tensor, nn

from fewbit.bench.configs import get_config

__all__ = [
    "DigitTransformer",
    "DigitMLP",
    "load_digits_split",
    "train_digits",
    "run_convergence",
    "format_convergence",
]


class RowAttention(nn.Module):
    """Multi-head self-attention with explicit nn.Linear projections."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(x.shape)
        return self.out(y)


class Block(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, both residual."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RowAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class DigitTransformer(nn.Module):
    """8x8 image -> 8 row tokens -> 2 transformer blocks -> 10 classes."""

    def __init__(self, dim: int = 64, heads: int = 4, hidden: int = 128, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.randn(8, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.view(-1, 8, 8)) + self.pos
        return self.classifier(self.norm(self.blocks(h)).mean(dim=1))


class DigitMLP(nn.Module):
    """64 -> 256 -> 256 -> 10 with GELU."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(x))


MODELS = {"transformer": DigitTransformer, "mlp": DigitMLP}


def load_digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.25, random_state=seed, stratify=data.target)
    return x[tr], y[tr], x[te], y[te]


def train_digits(
    config: str,
    model: str = "transformer",
    epochs: int = 20,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    data: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None,
) -> dict[str, Any]:
    """Train one configuration (AdamW, cosine learning-rate decay to 0 over all steps);
    returns test accuracy (%) and per-epoch mean training loss."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    x_tr, y_tr, x_te, y_te = data if data is not None else load_digits_split()
    torch.manual_seed(seed)
    net = get_config(config).apply(MODELS[model]())
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    total_steps = epochs * math.ceil(len(y_tr) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i, total_steps) / total_steps))
    )
    order = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_tr), generator=order)
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            loss = nn.functional.cross_entropy(net(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(perm))
    net.eval()
    with torch.no_grad():
        acc = float((net(x_te).argmax(dim=1) == y_te).float().mean()) * 100.0
    return {
        "config": config,
        "test_accuracy": acc,
        "train_loss": losses,
        "final_train_loss": losses[-1],
        "train_time_s": time.perf_counter() - t0,
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _merge_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from runs of one configuration with different seeds (means, per-seed list)."""
    accs = [r["test_accuracy"] for r in runs]
    curves = [r["train_loss"] for r in runs]
    mean_curve = [_mean([c[i] for c in curves]) for i in range(len(curves[0]))]
    return {
        "config": runs[0]["config"],
        "test_accuracy": _mean(accs),
        "test_accuracy_per_seed": accs,
        "train_loss": mean_curve,
        "final_train_loss": mean_curve[-1],
        "train_time_s": sum(r["train_time_s"] for r in runs),
    }


def run_convergence(
    configs: list[str],
    model: str = "transformer",
    epochs: int = 20,
    seed: int = 0,
    seeds: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every configuration (vanilla first) with seeds ``seed .. seed+seeds-1``
    (initialisation and batch order; the split is fixed); mean test accuracy and its
    difference from vanilla in points."""
    from tqdm import tqdm

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    names = list(dict.fromkeys(["vanilla", *configs]))
    for name in names:
        get_config(name)
    data = load_digits_split()
    jobs = [(name, s) for name in names for s in range(seed, seed + seeds)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for name, s in tqdm(jobs, desc="fewbit convergence", unit="run", disable=not progress):
        runs[name].append(train_digits(name, model=model, epochs=epochs, seed=s, data=data))
    rows = [_merge_seeds(runs[name]) for name in names]
    base = rows[0]["test_accuracy"]
    for r in rows:
        r["accuracy_delta"] = r["test_accuracy"] - base
    settings = {
        "model": f"digits-{model}",
        "epochs": epochs,
        "seed": seed,
        "seeds": seeds,
        "train": len(data[1]),
        "test": len(data[3]),
    }
    return {"settings": settings, "rows": rows}


def format_convergence(report: dict[str, Any]) -> str:
    """Table: configuration, final test accuracy, change vs vanilla, final loss, time."""
    s = report["settings"]
    w = max([len("config"), *(len(r["config"]) for r in report["rows"])])
    lines = [
        f"{s['model']}: {s['epochs']} epochs, {s['train']} train / {s['test']} test images,"
        f" mean over {s.get('seeds', 1)} seed(s)",
        f"{'config':<{w}}  {'test acc':>8}  {'vs vanilla':>10}  {'final loss':>10}  {'time':>7}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['config']:<{w}}  {r['test_accuracy']:7.2f}%  "
            f"{r['accuracy_delta']:+9.2f}pt  {r['final_train_loss']:10.4f}  "
            f"{r['train_time_s']:6.1f}s"
        )
    return "\n".join(lines)
