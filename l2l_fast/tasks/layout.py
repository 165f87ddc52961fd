"""The parameters of one problem as named tensors laid end to end in a row of params [P, D], their
initialisations (PyTorch's defaults or the paper's small Gaussian), and the batch of problems built on them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import ParamGroup, ProblemBatch, seeded

WEIGHT_INITS = ("default", "small")


@dataclass(frozen=True)
class Entry:
    """A parameter tensor of each problem. fan_in: sets PyTorch's default bound 1 / sqrt(fan_in)."""

    name: str
    shape: tuple[int, ...]
    fan_in: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Layout:
    """Named parameter tensors of one problem, in row order: problem p's `name` is params[p, offset:offset+size]."""

    def __init__(self, entries: list[Entry]):
        self.entries = list(entries)
        self.sizes = [e.size for e in self.entries]
        self.dim = sum(self.sizes)

    def split(self, params: Tensor) -> dict[str, Tensor]:
        """params [P, D] -> {name: [P, *shape]} (views)."""
        P = params.shape[0]
        return {e.name: piece.reshape(P, *e.shape) for e, piece in zip(self.entries, params.split(self.sizes, dim=1))}

    def init(self, num_problems: int, scheme: str, generator: torch.Generator) -> Tensor:
        """[P, D] initial parameters. default: PyTorch's nn.Linear / nn.Conv2d / nn.LSTM initialisation,
        every entry U(-1/sqrt(fan_in), 1/sqrt(fan_in)); small: N(0, 0.01^2) (the paper's MNIST MLP)."""
        if scheme == "small":
            return 0.01 * torch.randn(num_problems, self.dim, generator=generator)
        if scheme != "default":
            raise ValueError(f"weight_init: expected one of {WEIGHT_INITS}, got {scheme!r}")
        bounds = torch.cat([torch.full((e.size,), 1.0 / math.sqrt(e.fan_in)) for e in self.entries])
        return (torch.rand(num_problems, self.dim, generator=generator) * 2 - 1) * bounds


class LayoutBatch(ProblemBatch):
    """P problems whose parameters follow one Layout, drawn by `weight_init` from (seed, salt), each minimising
    the data source's loss of `forward(params, x)` on its minibatch of every step. Subclasses call
    `_set_up` and give `forward(params [P, D], x) -> outputs`."""

    def _set_up(self, data, entries: list[Entry], activation, weight_init: str, batch_size: int, num_problems: int,
                seed: int, salt: int) -> None:
        self.data, self.activation, self.batch_size = data, activation, batch_size
        self.weight_init, self.num_problems, self.seed, self.salt = weight_init, num_problems, seed, salt
        self.layout = Layout(entries)
        self.dim = self.layout.dim
        self.groups = [ParamGroup("all", 0, self.dim)]

    def init_params(self) -> Tensor:
        return self.own_rows(self.layout.init(self.drawn, self.weight_init, seeded(self.seed, self.salt, 1)))

    def _select(self, start: int, stop: int) -> "LayoutBatch":
        return self._rows(start, stop)

    def forward(self, params: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, params: Tensor, step: int) -> Tensor:
        rows = slice(self.draw_offset, self.draw_offset + self.num_problems)
        x, target = self.data.batch(step, self.drawn, self.batch_size, rows)
        return self.data.loss(self.forward(params, x), target)
