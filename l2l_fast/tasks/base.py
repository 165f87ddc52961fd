"""What a meta-training problem is: a batch of P optimizees of D parameters each, with a functional loss.

Batching the problems lets one kernel call step all P * D coordinates and one batched forward
(bmm) compute all P losses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..grouped import ParamGroup  # the net layer's: one LSTM per group reads these slices


class ProblemBatch:
    """P problems of the same shape. Subclasses define `init_params` and `loss`.

    params are always [P, D]; `loss(params, step)` returns the P losses [P] at optimization step
    `step` (minibatch problems draw the batch of that step deterministically from their seeds, so an
    optimizer and its baselines see the same data).
    """

    num_problems: int
    dim: int
    groups: list[ParamGroup]

    def init_params(self) -> Tensor:
        raise NotImplementedError

    def loss(self, params: Tensor, step: int) -> Tensor:
        raise NotImplementedError


class ClassifierBatch(ProblemBatch):
    """Problems that classify minibatches of one dataset: subclasses give `logits(params, x)`.

    images [N, ...], labels [N]; each problem draws `batch_size` examples per step, the same ones for
    every optimizer given (seed, salt, step).
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, num_problems: int, seed: int, salt: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.num_problems, self.seed, self.salt = num_problems, seed, salt

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The minibatch of `step` for every problem: x [P, B, ...], labels [P, B]."""
        generator = seeded(self.seed, self.salt, 2, step)
        index = torch.randint(len(self.labels), (self.num_problems, self.batch_size), generator=generator)
        return self.images[index], self.labels[index]

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, params: Tensor, step: int) -> Tensor:
        """Mean cross-entropy of each problem on its minibatch of `step`: [P]."""
        x, labels = self.batch(step)
        logits = self.logits(params, x)
        per_example = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        return per_example.view(self.num_problems, -1).mean(1)


@dataclass
class Task:
    """A distribution of problems; `sample(P, seed, split)` draws a ProblemBatch."""

    name: str
    kwargs: dict = field(default_factory=dict)

    def sample(self, num_problems: int, seed: int, split: str = "train") -> ProblemBatch:
        raise NotImplementedError


def check_split(split: str) -> None:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split: expected 'train', 'val' or 'test', got {split!r}")


def seeded(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator for (seed, *salt): independent streams without global RNG state."""
    value = int(seed)
    for s in salt:
        value = (value * 1_000_003 + int(s) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)
