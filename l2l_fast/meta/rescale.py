"""Random rescaling of meta-training problems (Lv et al. 2017): problem p's coordinate i is optimized
as theta'_i = theta_i / c_i, with c_i = exp(u), u ~ U(-lambda, lambda).

The loss is the same function of theta, but the gradients the optimizer sees are scaled by c and the
steps it takes by 1 / c in theta's units, so it cannot fit itself to one problem's gradient scales.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..tasks.base import ProblemBatch


class RescaledProblems(ProblemBatch):
    """base with coordinates scaled by `scale` (base.param_shape: [P, D], or [N] for a MixedBatch)."""

    def __init__(self, base: ProblemBatch, scale: Tensor):
        if scale.shape != base.param_shape:
            raise ValueError(f"scale: expected shape {tuple(base.param_shape)}, got {tuple(scale.shape)}")
        self.base, self.scale = base, scale
        self.num_problems, self.dim, self.groups = base.num_problems, base.dim, base.groups
        self.relative_scores = base.relative_scores

    @property
    def param_shape(self) -> tuple[int, ...]:
        return self.base.param_shape

    def problem_sizes(self) -> list[int]:
        return self.base.problem_sizes()

    @classmethod
    def random(cls, base: ProblemBatch, spread: float, generator: torch.Generator) -> "RescaledProblems":
        """Scales exp(U(-spread, spread)), independent per problem and coordinate."""
        if not spread > 0:
            raise ValueError(f"spread: expected a number > 0, got {spread!r}")
        u = torch.rand(*base.param_shape, generator=generator, dtype=torch.float64)
        return cls(base, torch.exp((2 * u - 1) * spread).to(torch.get_default_dtype()))

    def _select(self, start: int, stop: int) -> "RescaledProblems":
        part = self.base.select(start, stop)
        first, end = self.base.coordinate_range(start, stop)
        return RescaledProblems(part, self.scale.reshape(-1)[first:end].view(part.param_shape))

    def init_params(self) -> Tensor:
        return self.base.init_params() / self.scale

    def loss(self, params: Tensor, step: int) -> Tensor:
        return self.base.loss(params * self.scale.to(params.dtype), step)
