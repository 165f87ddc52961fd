"""One fused launch: the parameters of a param group that share a device and math dtype, stepped by a single
``lstm_multi_step_`` over cached flat views, with one LSTM state [L, 2, H, sum of their numels] and, for a net
that reads moments, one moments tensor [4, sum of their numels] (rows m, v, t, u) in the math dtype.

Coordinates are each parameter's elements in logical (row-major) order, parameters in group order. A
non-contiguous parameter is stepped as a contiguous copy that is written back; a parameter without a
gradient is passed a NaN gradient, which the ops' NaN/Inf policy turns into "no update, state unchanged".
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ..features import MOMENT_ROWS
from ..net import CoordinatewiseLSTM, math_dtype_of
from .sharding import is_dtensor, local

__all__ = ["FusedGroup", "math_dtype_of"]


def resolve_state_dtype(state_dtype: torch.dtype | None, math_dtype: torch.dtype) -> torch.dtype:
    if state_dtype is None:
        return math_dtype
    if state_dtype not in (math_dtype, torch.bfloat16):
        raise ValueError(f"state_dtype: {state_dtype} is not available for {math_dtype} math; use None (= "
                         f"{math_dtype}) or torch.bfloat16")
    return state_dtype


class FusedGroup:
    """params: the tensors (Parameters or DTensors), one device, one math dtype; states: each one's previous
    LSTM state (any dtype, [L, 2, H, *shape]) or None for a zero state; moments: each one's previous moments
    ([4, *shape]) or None for zeros, used only for a net that reads moments; positions: each one's index in its
    param group's list; names: how errors name each parameter."""

    def __init__(self, params: list[Tensor], net: CoordinatewiseLSTM, state_dtype: torch.dtype | None,
                 states: list[Tensor | None], positions: list[int], names: list[str],
                 moments: list[Tensor | None] | None = None):
        self.params, self.positions, self.names = params, positions, names
        self.locals = [local(p) for p in params]
        self.device = self.locals[0].device
        self.math_dtype = math_dtype_of(self.locals[0].dtype)
        self.requested_state_dtype = state_dtype
        self.state_dtype = resolve_state_dtype(state_dtype, self.math_dtype)
        self.lead = (net.num_layers, 2, net.hidden_size)
        self.numels = [t.numel() for t in self.locals]
        self.offsets = list(itertools.accumulate(self.numels, initial=0))
        self.state = torch.zeros(*self.lead, self.offsets[-1], dtype=self.state_dtype, device=self.device)
        for k, previous in enumerate(states):
            if previous is None:
                continue
            previous = local(previous)
            if tuple(previous.shape) != (*self.lead, *self.locals[k].shape):
                raise ValueError(f"state: a parameter of shape {tuple(self.locals[k].shape)} has an LSTM state of shape "
                                 f"{tuple(previous.shape)}, expected {(*self.lead, *self.locals[k].shape)}; was the "
                                 "parameter resized (p.data = a tensor of another shape) or the group's net replaced "
                                 "by one of another size?")
            self._rows(k).copy_(previous.reshape(*self.lead, self.numels[k]))
        # the moments: in the math dtype whatever the state's (a bfloat16 v would lose the gradient's scale)
        self.reads_moments = bool(net.reads_moments)
        self.moments = None
        if self.reads_moments:
            self.moments = torch.zeros(MOMENT_ROWS, self.offsets[-1], dtype=self.math_dtype, device=self.device)
            for k, previous in enumerate(moments or [None] * len(params)):
                if previous is None:
                    continue
                previous = local(previous)
                expected = (MOMENT_ROWS, *self.locals[k].shape)
                if tuple(previous.shape) != expected:
                    raise ValueError(f"state: a parameter of shape {tuple(self.locals[k].shape)} has moments of shape "
                                     f"{tuple(previous.shape)}, expected {expected}")
                self._moment_rows(k).copy_(previous.reshape(MOMENT_ROWS, self.numels[k]))
        self.dynamic = any(is_dtensor(p) for p in params)  # DTensor locals are re-read every step
        self.nan = {t.dtype: torch.full((), float("nan"), dtype=t.dtype, device=self.device) for t in self.locals}
        self._cache_views()

    def _rows(self, k: int) -> Tensor:
        return self.state[..., self.offsets[k] : self.offsets[k + 1]]

    def _moment_rows(self, k: int) -> Tensor:
        return self.moments[:, self.offsets[k] : self.offsets[k + 1]]

    def _cache_views(self) -> None:
        self.flat = [t.view(-1) if t.is_contiguous() else None for t in self.locals]
        self.strided = [k for k, view in enumerate(self.flat) if view is None]
        self.pointers = [t.data_ptr() for t in self.locals]

    def state_views(self) -> list[Tensor]:
        """Each parameter's state: a view [L, 2, H, *local shape] of the fused state."""
        return [self._rows(k).view(*self.lead, *t.shape) for k, t in enumerate(self.locals)]

    def moment_views(self) -> list[Tensor] | None:
        """Each parameter's moments: a view [4, *local shape] of the fused moments; None for a net without."""
        if self.moments is None:
            return None
        return [self._moment_rows(k).view(MOMENT_ROWS, *t.shape) for k, t in enumerate(self.locals)]

    def is_current(self, state_dtype: torch.dtype | None, net: CoordinatewiseLSTM, group_params: list[Tensor]) -> bool:
        """False when the group's list holds another tensor at one of this part's positions, a parameter was
        given other storage (p.data = ...), or the group's state_dtype, the size of its net or whether it reads
        moments changed."""
        if state_dtype != self.requested_state_dtype or self.lead != (net.num_layers, 2, net.hidden_size):
            return False
        if self.reads_moments != net.reads_moments:
            return False
        if torch.compiler.is_compiling():
            return True
        if not all(j < len(group_params) and group_params[j] is p for j, p in zip(self.positions, self.params)):
            return False
        return self.dynamic or list(map(Tensor.data_ptr, self.params)) == self.pointers

    def gradients(self) -> list[Tensor] | None:
        """The flat gradients to step with (NaN for a parameter without one), or None when no parameter has one.

        Raises (before anything is stepped) for a gradient that is sparse, or whose shape or dtype is not its
        parameter's: torch checks the shape when p.grad is assigned, but not p.grad.data = g.view(...).
        """
        grads, missing = [], 0
        for k, p in enumerate(self.params):
            g = p.grad
            if g is None:
                missing += 1
                grads.append(self.nan[self.locals[k].dtype].expand(self.numels[k]))
                continue
            if g.layout != torch.strided:
                raise TypeError(f"params: LearnedOptimizer does not support sparse gradients (got {g.layout} for "
                                f"{self.names[k]}, of shape {tuple(p.shape)}); use a dense gradient")
            if g.shape != p.shape:
                raise ValueError(f"params: {self.names[k]} has shape {tuple(p.shape)} but its gradient "
                                 f"{tuple(g.shape)}; a gradient must have its parameter's shape (was p.grad.data "
                                 "replaced by a reshaped tensor?)")
            if g.dtype != p.dtype:
                raise TypeError(f"params: {self.names[k]} has dtype {p.dtype} but its gradient {g.dtype}; a gradient "
                                "must have its parameter's dtype")
            grads.append(local(g).reshape(-1))
        return None if missing == len(self.params) else grads

    @torch.no_grad()
    def step(self, net: CoordinatewiseLSTM, lr: float, grads: list[Tensor], progress=None) -> None:
        """grads: from gradients(), not None; progress: (t, total_steps) for a net that reads it."""
        if self.dynamic:
            self.locals = [local(p) for p in self.params]
            self._cache_views()
        flat = self.flat
        if self.strided:
            flat = list(flat)
            for k in self.strided:
                flat[k] = self.locals[k].reshape(-1)
        # advances the moments (if any) in place, columns at the state's offsets; progress for a net that reads it
        extra = {} if self.moments is None else {"moments": self.moments}
        if progress is not None:
            extra["progress"] = progress
        net.multi_step_(flat, grads, self.state, lr, **extra)
        for k in self.strided:
            self.locals[k].copy_(flat[k].view(self.locals[k].shape))
