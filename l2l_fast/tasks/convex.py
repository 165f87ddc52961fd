"""RNNprop's convex task (Lv et al. 2017): f(x) = mean(clip((x - a)^2, 0, 10)), a ~ U(-1, 1)^dim, x0 = 0."""
from __future__ import annotations

import torch
from torch import Tensor

from ..argtypes import positive_int
from .base import ParamGroup, ProblemBatch, Task, check_split, seeded
from .registry import TaskOption, register_task

_SPLIT_SALT = {"train": 70, "val": 71, "test": 72}


class ClippedSquareBatch(ProblemBatch):
    def __init__(self, a: Tensor):
        self.a = a  # [P, dim]
        self.num_problems, self.dim = a.shape
        self.groups = [ParamGroup("all", 0, self.dim)]

    def init_params(self) -> Tensor:
        return torch.zeros_like(self.a)

    def _select(self, start: int, stop: int) -> "ClippedSquareBatch":
        return ClippedSquareBatch(self.a[start:stop])

    def loss(self, params: Tensor, step: int) -> Tensor:
        return (params - self.a).pow(2).clamp(0, 10).mean(1)


@register_task("convex", options=[TaskOption("dim", positive_int, "size of x")],
               help="RNNprop's mean(clip((x - a)^2, 0, 10)), a drawn U(-1, 1)")
class ConvexTask(Task):
    def __init__(self, dim: int = 20):
        super().__init__("convex", {"dim": dim})
        self.dim = dim

    def sample(self, num_problems: int, seed: int, split: str = "train") -> ClippedSquareBatch:
        check_split(split)
        generator = seeded(seed, _SPLIT_SALT[split])
        return ClippedSquareBatch(torch.rand(num_problems, self.dim, generator=generator) * 2 - 1)
