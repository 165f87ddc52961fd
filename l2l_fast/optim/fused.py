"""One fused launch: the parameters of a param group that share a device and math dtype, stepped by a single
``lstm_multi_step_`` over cached flat views, with one LSTM state [L, 2, H, sum of their numels].

Coordinates are each parameter's elements in logical (row-major) order, parameters in group order. A
non-contiguous parameter is stepped as a contiguous copy that is written back; a parameter without a
gradient is passed a NaN gradient, which the ops' NaN/Inf policy turns into "no update, state unchanged".
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ..net import CoordinatewiseLSTM
from .sharding import is_dtensor, local

__all__ = ["FusedGroup", "math_dtype_of"]


def math_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters step in float64; float32, bfloat16 and float16 ones in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_state_dtype(state_dtype: torch.dtype | None, math_dtype: torch.dtype) -> torch.dtype:
    if state_dtype is None:
        return math_dtype
    if state_dtype not in (math_dtype, torch.bfloat16):
        raise ValueError(f"state_dtype: {state_dtype} is not available for {math_dtype} math; use None (= "
                         f"{math_dtype}) or torch.bfloat16")
    return state_dtype


class FusedGroup:
    """params: the tensors (Parameters or DTensors), one device, one math dtype; states: each one's previous
    LSTM state (any dtype, [L, 2, H, *shape]) or None for a zero state."""

    def __init__(self, params: list[Tensor], net: CoordinatewiseLSTM, state_dtype: torch.dtype | None,
                 states: list[Tensor | None]):
        self.params = params
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
                                 "group's net replaced by one of another size?")
            self._rows(k).copy_(previous.reshape(*self.lead, self.numels[k]))
        self.dynamic = any(is_dtensor(p) for p in params)  # DTensor locals are re-read every step
        self.nan: dict[torch.dtype, Tensor] = {}
        self._cache_views()

    def _rows(self, k: int) -> Tensor:
        return self.state[..., self.offsets[k] : self.offsets[k + 1]]

    def _cache_views(self) -> None:
        self.flat = [t.view(-1) if t.is_contiguous() else None for t in self.locals]
        self.strided = [k for k, view in enumerate(self.flat) if view is None]
        self.pointers = [t.data_ptr() for t in self.locals]

    def state_views(self) -> list[Tensor]:
        """Each parameter's state: a view [L, 2, H, *local shape] of the fused state."""
        return [self._rows(k).view(*self.lead, *t.shape) for k, t in enumerate(self.locals)]

    def is_current(self, state_dtype: torch.dtype | None, net: CoordinatewiseLSTM) -> bool:
        """False when a parameter was given other storage (p.data = ...), or the group's state_dtype or the
        size of its net changed."""
        if state_dtype != self.requested_state_dtype or self.lead != (net.num_layers, 2, net.hidden_size):
            return False
        if self.dynamic or torch.compiler.is_compiling():
            return True
        return list(map(Tensor.data_ptr, self.params)) == self.pointers

    def _flat_grads(self) -> list[Tensor] | None:
        grads, missing = [], 0
        for k, p in enumerate(self.params):
            g = p.grad
            if g is None:
                missing += 1
                grads.append(self._no_grad(k))
                continue
            if g.layout != torch.strided:
                raise TypeError(f"params: LearnedOptimizer does not support sparse gradients (got {g.layout} for a "
                                f"parameter of shape {tuple(p.shape)}); use a dense gradient")
            grads.append(local(g).reshape(-1))
        return None if missing == len(self.params) else grads

    def _no_grad(self, k: int) -> Tensor:
        dtype = self.locals[k].dtype
        if dtype not in self.nan:
            self.nan[dtype] = torch.full((), float("nan"), dtype=dtype, device=self.device)
        return self.nan[dtype].expand(self.numels[k])

    @torch.no_grad()
    def step(self, net: CoordinatewiseLSTM, lr: float) -> None:
        grads = self._flat_grads()
        if grads is None:  # no gradient at all: nothing moves
            return
        if self.dynamic:
            self.locals = [local(p) for p in self.params]
            self._cache_views()
        flat = self.flat
        if self.strided:
            flat = list(flat)
            for k in self.strided:
                flat[k] = self.locals[k].reshape(-1)
        weights = [w.detach().to(device=self.device, dtype=self.math_dtype) for w in net.weights()]
        net.implementation(self.device).lstm_multi_step_(flat, grads, self.state, weights, net.preprocess_p,
                                                           net.output_scale * lr, net.feature_mask)
        for k in self.strided:
            self.locals[k].copy_(flat[k].view(self.locals[k].shape))
