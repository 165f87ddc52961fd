"""Typed Python front of the native custom ops (``torch.ops.l2l_fast.*``).

The schemas live in ``csrc/ops_schema.cpp``; each backend registers its kernels in its own file.
Here: the fake (meta) kernels that let ``torch.compile`` trace the ops, and the autograd formula,
whose backward is itself a custom op.

Shapes: grad [n], state [L, 2, H, n], weights as in :mod:`l2l_fast.reference`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

try:  # loading the extension runs its TORCH_LIBRARY registrations
    from . import _C  # noqa: F401

    HAS_NATIVE = True
    NATIVE_IMPORT_ERROR: Exception | None = None
except ImportError as error:  # pure-Python install: the reference backend still works
    HAS_NATIVE = False
    NATIVE_IMPORT_ERROR = error

__all__ = ["HAS_NATIVE", "lstm_step", "lstm_step_", "native_devices"]


def native_devices() -> set[str]:
    """Device types with a native kernel in this build."""
    if not HAS_NATIVE:
        return set()
    devices = {"cpu"}
    if _C.has_cuda_kernels():
        devices.add("cuda")
    return devices


def lstm_step(grad: Tensor, state: Tensor, weights: Sequence[Tensor], preprocess_p: float = 10.0,
              output_scale: float = 0.1) -> tuple[Tensor, Tensor]:
    """Fused, differentiable step: returns (update [n], new_state [L, 2, H, n]); inputs untouched."""
    return torch.ops.l2l_fast.lstm_step(grad, state, list(weights), float(preprocess_p), float(output_scale))


def lstm_step_(param: Tensor, grad: Tensor, state: Tensor, weights: Sequence[Tensor], preprocess_p: float = 10.0,
               output_scale: float = 0.1) -> None:
    """Fused in-place step, no autograd: param [n] += update; state [L, 2, H, n] advanced in place."""
    torch.ops.l2l_fast.lstm_step_(param, grad, state, list(weights), float(preprocess_p), float(output_scale))


if HAS_NATIVE:

    @torch.library.register_fake("l2l_fast::lstm_step")
    def _lstm_step_fake(grad, state, weights, preprocess_p, output_scale):
        return grad.new_empty(grad.shape[0]), state.new_empty(state.shape)

    @torch.library.register_fake("l2l_fast::lstm_step_backward")
    def _lstm_step_backward_fake(grad_update, grad_new_state, grad, state, weights, preprocess_p, output_scale):
        return grad.new_empty(grad.shape[0]), state.new_empty(state.shape), [w.new_empty(w.shape) for w in weights]

    @torch.library.register_fake("l2l_fast::lstm_step_")
    def _lstm_step_inplace_fake(param, grad, state, weights, preprocess_p, output_scale):
        return None

    def _setup_context(ctx, inputs, output):
        grad, state, weights, preprocess_p, output_scale = inputs
        ctx.save_for_backward(grad, state, *weights)
        ctx.preprocess_p, ctx.output_scale = preprocess_p, output_scale

    def _backward(ctx, grad_update, grad_new_state):
        grad, state, *weights = ctx.saved_tensors
        # Unused outputs arrive as None; the kernel wants dense zeros there.
        if grad_update is None:
            grad_update = torch.zeros_like(grad)
        if grad_new_state is None:
            grad_new_state = torch.zeros_like(state)
        d_grad, d_state, d_weights = torch.ops.l2l_fast.lstm_step_backward(
            grad_update, grad_new_state, grad, state, weights, ctx.preprocess_p, ctx.output_scale)
        return d_grad, d_state, d_weights, None, None

    torch.library.register_autograd("l2l_fast::lstm_step", _backward, setup_context=_setup_context)
