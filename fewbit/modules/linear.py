"""Drop-in ``nn.Linear`` replacements that save a random sketch of the input for backward.

``RandomizedLinear`` (published name ``LinearGRP``) keeps ``k x in_features`` of the
``N x in_features`` input (``N`` = batch and sequence flattened); ``LinearCRS`` keeps a
sample of input features. Both subclass ``nn.Linear``: same parameters, state_dict keys and
exact forward output; only the weight gradient is an (unbiased) estimate.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..codecs.sketch import DEFAULT_SKETCH, check_proj_args, check_sketch
from ..functional.linear import linear_crs, linear_randomized

__all__ = ["LinearCRS", "LinearGRP", "RandomizedConv1D", "RandomizedLinear"]


class _SketchSettings:
    """The sketch settings shared by :class:`RandomizedLinear` and :class:`RandomizedConv1D`:
    validation, attributes, the sketched call and their part of the repr."""

    proj_dim_ratio: Optional[float]
    proj_dim: Optional[int]
    proj_dim_min: Optional[int]
    proj_dim_max: Optional[int]
    matmul: str
    generator: Optional[torch.Generator]
    independent_ranks: bool

    @staticmethod
    def _check_sketch_args(
        proj_dim_ratio: Optional[float],
        proj_dim: Optional[int],
        proj_dim_min: Optional[int],
        proj_dim_max: Optional[int],
        matmul: str,
        generator: Optional[torch.Generator],
    ) -> None:
        check_proj_args(proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max)
        check_sketch(matmul)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)!r}")

    def _set_sketch_args(
        self,
        proj_dim_ratio: Optional[float],
        proj_dim: Optional[int],
        proj_dim_min: Optional[int],
        proj_dim_max: Optional[int],
        matmul: str,
        generator: Optional[torch.Generator],
        independent_ranks: bool = True,
    ) -> None:
        self.proj_dim_ratio = proj_dim_ratio
        self.proj_dim = proj_dim
        self.proj_dim_min = proj_dim_min
        self.proj_dim_max = proj_dim_max
        self.matmul = matmul
        self.generator = generator
        self.independent_ranks = bool(independent_ranks)

    def _sketched(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return linear_randomized(
            input,
            weight,
            bias,
            self.proj_dim_ratio,
            self.proj_dim,
            self.proj_dim_min,
            self.proj_dim_max,
            self.matmul,
            self.generator,
            independent_ranks=self.independent_ranks,
        )

    def _sketch_repr(self) -> list[str]:
        parts = [f"matmul={self.matmul!r}"]
        if self.proj_dim is not None:
            parts.append(f"proj_dim={self.proj_dim}")
        else:
            ratio = 0.5 if self.proj_dim_ratio is None else self.proj_dim_ratio
            parts.append(f"proj_dim_ratio={ratio}")
        if self.proj_dim_min is not None:
            parts.append(f"proj_dim_min={self.proj_dim_min}")
        if self.proj_dim_max is not None:
            parts.append(f"proj_dim_max={self.proj_dim_max}")
        if not self.independent_ranks:
            parts.append("independent_ranks=False")
        return parts


class RandomizedLinear(_SketchSettings, nn.Linear):
    """``nn.Linear`` whose backward uses a random sketch of the input (GRP).

    Forward is exactly ``F.linear``. Saved for backward: ``k x in_features`` elements of the
    input dtype (plus ``8 k`` bytes of indices for ``matmul='sampling'``) instead of the
    whole input, with ``k`` = ``proj_dim`` or ``round(proj_dim_ratio * N)`` (default ratio
    0.5), clamped to ``[proj_dim_min, proj_dim_max]`` and ``[1, N]``; the input itself when
    ``k = N``. Input and bias gradients are exact; the weight gradient is unbiased with the
    variance of the chosen ``matmul`` (``'countsketch'``, the default: Rademacher's variance,
    one pass over the input; ``'gaussian'``, the published library's default;
    ``'rademacher'``; ``'sampling'``; see :mod:`fewbit.codecs.sketch`). A new projection is
    drawn for every call that will compute a weight gradient, from ``generator`` when given
    (the global RNG is then never touched), with the distributed rank folded in
    (``independent_ranks``, see
    :func:`fewbit.functional.linear.linear_randomized`). Under ``no_grad``,
    ``inference_mode`` or with a frozen weight the layer is exactly ``nn.Linear`` (no draw,
    no sketch); ``eval()`` changes nothing, as for ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        proj_dim_ratio: Optional[float] = None,
        proj_dim: Optional[int] = None,
        proj_dim_min: Optional[int] = None,
        proj_dim_max: Optional[int] = None,
        matmul: str = DEFAULT_SKETCH,
        generator: Optional[torch.Generator] = None,
        independent_ranks: bool = True,
    ) -> None:
        args = (proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, matmul, generator)
        self._check_sketch_args(*args)
        super().__init__(in_features, out_features, bias, device, dtype)
        self._set_sketch_args(*args, independent_ranks)

    def forward(self, input: Tensor) -> Tensor:
        return self._sketched(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return ", ".join([super().extra_repr(), *self._sketch_repr()])


LinearGRP = RandomizedLinear


class LinearCRS(nn.Linear):
    """``nn.Linear`` whose backward samples input features (column-row sampling).

    Forward is exactly ``F.linear``. ``proj_dim`` draws (default ``in_features // 2``) pick
    input features with probability proportional to their norm over the batch; saved: the
    ``N x c`` distinct drawn columns (``c <= proj_dim``), reweighted, and ``8 c`` bytes of
    indices. Weight gradient unbiased, input and bias gradients exact. Under ``no_grad``,
    ``inference_mode`` or with a frozen weight it is exactly ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        proj_dim: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        independent_ranks: bool = True,
    ) -> None:
        check_proj_args(None, proj_dim, None, None)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.proj_dim = proj_dim if proj_dim is not None else max(1, in_features // 2)
        self.generator = generator
        self.independent_ranks = bool(independent_ranks)

    def forward(self, input: Tensor) -> Tensor:
        return linear_crs(input, self.weight, self.bias, self.proj_dim, self.generator,
                          independent_ranks=self.independent_ranks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, proj_dim={self.proj_dim}"


class RandomizedConv1D(_SketchSettings, nn.Module):
    """The ``transformers`` GPT-2 ``Conv1D`` (``y = x @ weight + bias`` with ``weight`` of
    shape ``(nx, nf)``) with the backward of :class:`RandomizedLinear`: same parameter names
    and shapes, so state_dicts are interchangeable; forward is exact."""

    def __init__(
        self,
        nf: int,
        nx: int,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        proj_dim_ratio: Optional[float] = None,
        proj_dim: Optional[int] = None,
        proj_dim_min: Optional[int] = None,
        proj_dim_max: Optional[int] = None,
        matmul: str = DEFAULT_SKETCH,
        generator: Optional[torch.Generator] = None,
        independent_ranks: bool = True,
    ) -> None:
        args = (proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, matmul, generator)
        self._check_sketch_args(*args)
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self._set_sketch_args(*args, independent_ranks)

    def forward(self, input: Tensor) -> Tensor:
        return self._sketched(input, self.weight.t(), self.bias)

    def extra_repr(self) -> str:
        return ", ".join([f"nf={self.nf}, nx={self.nx}", *self._sketch_repr()])
