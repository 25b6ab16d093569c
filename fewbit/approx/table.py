"""A piecewise-constant derivative table: what a few-bit code means in backward."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Table"]


@dataclass(frozen=True)
class Table:
    """Piecewise-constant approximation q of an activation's derivative.

    ``boundaries`` t_1 < ... < t_{K-1} split the line (or, when ``symmetric``,
    the half-line of |x|) into K = 2**bits segments; segment i has derivative
    ``levels[i]``. The code of x is the number of boundaries strictly below x
    (or |x|), so x == t_i falls in the lower segment.
    """

    boundaries: tuple[float, ...]
    levels: tuple[float, ...]
    symmetric: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "boundaries", tuple(float(b) for b in self.boundaries))
        object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))
        k = len(self.levels)
        if k < 2 or k > 256 or k & (k - 1):
            raise ValueError(f"levels must have 2**bits entries (bits in 1..8), got {k}")
        if len(self.boundaries) != k - 1:
            raise ValueError(
                f"boundaries must have len(levels) - 1 = {k - 1} entries, "
                f"got {len(self.boundaries)}"
            )
        if not all(math.isfinite(v) for v in self.levels + self.boundaries):
            raise ValueError("boundaries and levels must be finite")
        if any(b >= c for b, c in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError("boundaries must be strictly increasing")
        if self.symmetric and self.boundaries and self.boundaries[0] < 0:
            raise ValueError("boundaries of a symmetric (|x|) table must be >= 0")

    @classmethod
    def from_sequences(
        cls, boundaries: Sequence[float], levels: Sequence[float], symmetric: bool = False
    ) -> Table:
        return cls(tuple(boundaries), tuple(levels), symmetric)

    @property
    def bits(self) -> int:
        return len(self.levels).bit_length() - 1

    def encode(self, x: Tensor) -> Tensor:
        """Codes (uint8, same shape as x) of the segments x falls in.

        Up to 15 boundaries (4 bits) the code is a sum of in-place comparisons, several
        times faster on CPU than ``torch.bucketize`` (a binary search per element);
        both count the boundaries strictly below x.
        """
        src = x.abs() if self.symmetric else x
        if len(self.boundaries) > 15:
            bounds = torch.tensor(self.boundaries, dtype=x.dtype, device=x.device)
            return torch.bucketize(src, bounds, out_int32=True).to(torch.uint8)
        bounds_cast = torch.tensor(self.boundaries, dtype=x.dtype).tolist()
        codes = torch.gt(src, bounds_cast[0]).view(torch.uint8)
        if len(bounds_cast) > 1:
            above = torch.empty(src.shape, dtype=torch.bool, device=x.device)
            for bound in bounds_cast[1:]:
                torch.gt(src, bound, out=above)
                codes.add_(above.view(torch.uint8))
        return codes

    def level_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """The levels as a float32 tensor (the backward lookup table)."""
        return torch.tensor(self.levels, dtype=torch.float32, device=device)

    def __call__(self, x: Tensor) -> Tensor:
        """q(x) in float32: the approximated derivative at x."""
        return self.level_tensor(x.device)[self.encode(x).long()]
