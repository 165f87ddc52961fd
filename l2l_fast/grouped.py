"""Separate LSTM optimizers for groups of parameters (the paper's CIFAR-10 setup: one for the
convolutional, one for the fully connected parameters), behind the single-net interface.

Coordinates arrive as [P, D] flattened; group g owns the columns [start_g, stop_g) of every problem.
The state is one tensor [L, 2, H, P * D] whose coordinates are ordered group by group, and so are the
moments [4, P * D] of nets that read them (the groups' nets all do or all do not).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .net import CoordinatewiseLSTM


@dataclass
class ParamGroup:
    """A named slice [start, stop) of the D parameters of each problem (for separate optimizers per group)."""

    name: str
    start: int
    stop: int


class GroupedLSTM(nn.Module):
    def __init__(self, nets: dict[str, CoordinatewiseLSTM], groups: list[ParamGroup], dim: int):
        super().__init__()
        if sorted(nets) != sorted(g.name for g in groups):
            raise ValueError(f"nets: expected one net per group {[g.name for g in groups]}, got {sorted(nets)}")
        shapes = {(n.hidden_size, n.num_layers) for n in nets.values()}
        if len(shapes) != 1:
            raise ValueError(f"nets: the groups' nets must share hidden_size and num_layers, got {sorted(shapes)}")
        if len({n.reads_moments for n in nets.values()}) != 1:
            features = {name: n.features for name, n in nets.items()}
            raise ValueError(f"nets: the groups' nets must all read the running moments or none, got {features}")
        if len({n.reads_progress for n in nets.values()}) != 1:
            raise ValueError("nets: the groups' nets must all read progress (progress_input) or none")
        self.nets = nn.ModuleDict(nets)
        self.groups, self.dim = groups, dim

    @property
    def reads_moments(self) -> bool:
        return self._first().reads_moments

    @property
    def reads_progress(self) -> bool:
        return self._first().reads_progress

    def _first(self) -> CoordinatewiseLSTM:
        return next(iter(self.nets.values()))

    def init_state(self, n: int, device=None, dtype=None) -> Tensor:
        return self._first().init_state(n, device=device, dtype=dtype)

    def init_moments(self, n: int, device=None, dtype=None) -> Tensor | None:
        return self._first().init_moments(n, device=device, dtype=dtype)

    def advance_moments(self, grad: Tensor, moments: Tensor | None) -> Tensor | None:
        """The moments after a step with grad [P * D] (a new tensor), in the state's group order."""
        if moments is None:
            return None
        return self._first().advance_moments(self._grouped(grad), moments)

    def _grouped(self, grad: Tensor) -> Tensor:
        """grad [P * D] reordered group by group, as the state's coordinates."""
        rows = grad.view(-1, self.dim)
        return torch.cat([rows[:, columns].reshape(-1) for _, columns, _ in self._spans(grad.numel())])

    def _spans(self, n: int):
        """(group, its columns, its coordinate range in the state) for P = n / dim problems."""
        P, offset = n // self.dim, 0
        for group in self.groups:
            count = P * (group.stop - group.start)
            yield group, slice(group.start, group.stop), slice(offset, offset + count)
            offset += count

    def forward(self, grad: Tensor, state: Tensor, moments: Tensor | None = None,
                progress: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """grad [P * D], state [L, 2, H, P * D] (and moments [4, P * D] advanced with grad, in group order; progress
        for nets that read it) -> (update [P * D], new_state)."""
        grad = grad.view(-1, self.dim)
        updates, states = [], []
        for group, columns, span in self._spans(grad.numel()):
            group_moments = None if moments is None else moments[:, span].contiguous()
            update, new_state = self.nets[group.name](grad[:, columns].reshape(-1), state[..., span].contiguous(),
                                                      group_moments, progress)
            updates.append(update.view(grad.shape[0], -1))
            states.append(new_state)
        return torch.cat(updates, dim=1).reshape(-1), torch.cat(states, dim=-1)

    @torch.no_grad()
    def step_(self, param: Tensor, grad: Tensor, state: Tensor, moments: Tensor | None = None,
              progress: tuple[int, int] | None = None) -> None:
        advanced = self.advance_moments(grad, moments)
        update, new_state = self.forward(grad, state, advanced, progress)
        param.add_(update)
        state.copy_(new_state)
        if moments is not None:
            moments.copy_(advanced)
