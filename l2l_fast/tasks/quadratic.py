"""The paper's synthetic task: f(theta) = ||W theta - y||^2, W (d x d) and y drawn N(0, 1), theta0 = 0."""
from __future__ import annotations

import torch
from torch import Tensor

from ..argtypes import positive_int
from .base import ParamGroup, ProblemBatch, Task, check_split, seeded
from .registry import TaskOption, register_task

# Problems of different splits never share a seed stream.
_SPLIT_SALT = {"train": 0, "val": 1, "test": 2}


class QuadraticBatch(ProblemBatch):
    def __init__(self, W: Tensor, y: Tensor):
        self.W, self.y = W, y  # [P, d, d], [P, d]
        self.num_problems, self.dim = y.shape
        self.groups = [ParamGroup("all", 0, self.dim)]

    def init_params(self) -> Tensor:
        return torch.zeros_like(self.y)

    def _select(self, start: int, stop: int) -> "QuadraticBatch":
        return QuadraticBatch(self.W[start:stop], self.y[start:stop])

    def loss(self, params: Tensor, step: int) -> Tensor:
        residual = torch.bmm(self.W, params.unsqueeze(2)).squeeze(2) - self.y
        return residual.pow(2).sum(1)


@register_task("quadratic", options=[TaskOption("dim", positive_int, "size of theta (W is dim x dim)")],
               help="f(theta) = ||W theta - y||^2, W and y drawn N(0, 1)")
class QuadraticTask(Task):
    def __init__(self, dim: int = 10):
        super().__init__("quadratic", {"dim": dim})
        self.dim = dim

    def sample(self, num_problems: int, seed: int, split: str = "train") -> QuadraticBatch:
        check_split(split)
        generator = seeded(seed, _SPLIT_SALT[split])
        W = torch.randn(num_problems, self.dim, self.dim, generator=generator)
        y = torch.randn(num_problems, self.dim, generator=generator)
        return QuadraticBatch(W, y)
