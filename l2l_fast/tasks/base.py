"""What a meta-training problem is: a batch of P optimizees with a functional loss.

Batching the problems lets one kernel call step all their coordinates and one batched forward (bmm)
compute all P losses. P problems of one shape hold params [P, D]; a MixedBatch holds problems of
different shapes as one flat [N] with a segment per problem, so they still share each kernel call.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..grouped import ParamGroup  # the net layer's: one LSTM per group reads these slices


class ProblemBatch:
    """P problems. Subclasses define `init_params` and `loss`.

    params have the shape `param_shape`: [P, D] for P problems of one shape (the default), [N] for a
    MixedBatch. `loss(params, step)` returns the P losses [P] at optimization step `step` (minibatch
    problems draw the batch of that step deterministically from their seeds, so an optimizer and its
    baselines see the same data). Every optimizer of the package is elementwise, so the meta-training
    engine only ever needs params flattened: problem p owns the p-th segment of `problem_sizes()`.
    """

    num_problems: int
    dim: int
    groups: list[ParamGroup]
    # evaluation scores each problem's losses relative to its loss at theta_0 (problems of different scales)
    relative_scores: bool = False
    # A batch cut out of a larger one (select) keeps the problems [draw_offset, draw_offset + num_problems) of a
    # draw of draw_size problems: whatever is drawn per problem (initial params, minibatches, teachers) is drawn
    # for the whole draw and cut to these rows, so each problem is exactly the one of the whole batch.
    draw_offset: int = 0
    draw_size: int | None = None  # None: this batch is the whole draw

    @property
    def drawn(self) -> int:
        """Problems of the draw this batch comes from (num_problems unless it was cut out by select)."""
        return self.num_problems if self.draw_size is None else self.draw_size

    def own_rows(self, drawn: Tensor) -> Tensor:
        """A tensor drawn for every problem of the draw, [drawn, ...] -> this batch's rows [num_problems, ...]."""
        if self.draw_size is None:
            return drawn
        return drawn[self.draw_offset:self.draw_offset + self.num_problems]

    def select(self, start: int, stop: int) -> "ProblemBatch":
        """Problems [start, stop) of this batch as a batch of their own: the same initial params, minibatches and
        losses as here (what rank r of a distributed meta-training run optimizes of the global batch)."""
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.num_problems):
            raise ValueError(f"select: expected 0 <= start < stop <= {self.num_problems}, got [{start}, {stop})")
        if (start, stop) == (0, self.num_problems):
            return self
        return self._select(start, stop)

    def _select(self, start: int, stop: int) -> "ProblemBatch":
        raise NotImplementedError(f"{type(self).__name__} cannot select some of its problems: give it a _select "
                                  "(needed to split a meta-batch across processes)")

    def _rows(self, start: int, stop: int) -> "ProblemBatch":
        """_select of a batch whose per-problem data all comes from draws cut by own_rows."""
        part = copy.copy(self)
        part.draw_offset, part.draw_size = self.draw_offset + start, self.drawn
        part.num_problems = stop - start
        return part

    def coordinate_range(self, start: int, stop: int) -> tuple[int, int]:
        """Where problems [start, stop) lie in the flattened params: [first coordinate, end)."""
        sizes = self.problem_sizes()
        return sum(sizes[:start]), sum(sizes[:stop])

    @property
    def param_shape(self) -> tuple[int, ...]:
        """The shape of `init_params()` and of the params `loss` takes."""
        return (self.num_problems, self.dim)

    def problem_sizes(self) -> list[int]:
        """Coordinates of each problem, in the order of the flattened params: [P] ints."""
        return [self.dim] * self.num_problems

    def init_params(self) -> Tensor:
        raise NotImplementedError

    def loss(self, params: Tensor, step: int) -> Tensor:
        raise NotImplementedError


class MixedBatch(ProblemBatch):
    """Problems of different shapes as one batch: the parts' params flattened and concatenated, [N].

    parts: ProblemBatches (each of one shape, [P_k, D_k], or mixed itself), with one parameter group each;
    the problems are the parts' in order, and `loss(params [N], step)` their losses [sum P_k]. `specs`:
    optional, a description of each problem (the sampler's family and options), [P].
    """

    relative_scores = True

    def __init__(self, parts: Sequence[ProblemBatch], specs: Sequence | None = None):
        if not parts:
            raise ValueError("parts: expected at least one ProblemBatch")
        for part in parts:
            if len(part.groups) > 1:
                raise ValueError(f"parts: a part with {len(part.groups)} parameter groups cannot be mixed "
                                 "(one LSTM steps all of a mixed batch's coordinates)")
        self.parts = list(parts)
        self.counts = [math.prod(part.param_shape) for part in self.parts]
        self.num_problems = sum(part.num_problems for part in self.parts)
        self.dim = sum(self.counts)  # N: all coordinates (params are [N])
        self.groups = [ParamGroup("all", 0, self.dim)]
        self.specs = list(specs) if specs is not None else None

    @property
    def param_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def problem_sizes(self) -> list[int]:
        return [size for part in self.parts for size in part.problem_sizes()]

    def init_params(self) -> Tensor:
        return torch.cat([part.init_params().reshape(-1) for part in self.parts])

    def _select(self, start: int, stop: int) -> "MixedBatch":
        parts, first = [], 0
        for part in self.parts:  # the parts overlapping [start, stop), each cut to the overlap
            last = first + part.num_problems
            if first < stop and start < last:
                parts.append(part.select(max(start, first) - first, min(stop, last) - first))
            first = last
        return MixedBatch(parts, specs=None if self.specs is None else self.specs[start:stop])

    def loss(self, params: Tensor, step: int) -> Tensor:
        """params [N] -> losses [P]."""
        pieces = params.split(self.counts)
        return torch.cat([part.loss(piece.view(part.param_shape), step) for part, piece in zip(self.parts, pieces)])


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
        index = self.own_rows(torch.randint(len(self.labels), (self.drawn, self.batch_size), generator=generator))
        return self.images[index], self.labels[index]

    def _select(self, start: int, stop: int) -> "ClassifierBatch":
        return self._rows(start, stop)

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


def derive_seed(seed: int, *salt: int) -> int:
    """An int seed for (seed, *salt): what `seeded` seeds its generator with."""
    value = int(seed)
    for s in salt:
        value = (value * 1_000_003 + int(s) + 1) % (2**63 - 1)
    return value


def seeded(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator for (seed, *salt): independent streams without global RNG state."""
    return torch.Generator().manual_seed(derive_seed(seed, *salt))
