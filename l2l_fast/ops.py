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

from ._runtime_check import warn_if_private_cxx_runtime
from .checks import check_multi_step_inputs, check_step_inputs, check_tensor

try:  # loading the extension runs its TORCH_LIBRARY registrations
    from . import _C  # noqa: F401

    HAS_NATIVE = True
    NATIVE_IMPORT_ERROR: Exception | None = None
    warn_if_private_cxx_runtime(_C.__file__)
except ImportError as error:  # pure-Python install: the reference backend still works
    HAS_NATIVE = False
    NATIVE_IMPORT_ERROR = error

__all__ = ["HAS_NATIVE", "cpu_cache_bytes", "empty_cpu_cache", "lstm_multi_step_", "lstm_step", "lstm_step_",
           "native_devices"]


# Fixed at import: a plain constant that torch.compile can trace (a pybind call it cannot).
_NATIVE_DEVICES = frozenset(({"cpu", "cuda"} if _C.has_cuda_kernels() else {"cpu"}) if HAS_NATIVE else ())


def native_devices() -> frozenset[str]:
    """Device types with a native kernel in this build."""
    return _NATIVE_DEVICES


def empty_cpu_cache() -> int:
    """Gives the unused blocks of the CPU output cache back to the system; returns the bytes released.

    CPU outputs of 8 MB or more (state-sized outputs of the forward and backward) come from a cache
    of freed blocks, as CUDA memory does from torch's caching allocator: a fresh block costs a page
    fault and a kernel zeroing per page on first touch. The cache keeps at most
    ``L2L_FAST_CPU_CACHE_MB`` MB of unused blocks (default 2048; 0 turns it off).
    """
    return _C.empty_cpu_cache() if HAS_NATIVE else 0


def cpu_cache_bytes() -> int:
    """Bytes held by the CPU output cache in blocks no tensor uses."""
    return _C.cpu_cache_bytes() if HAS_NATIVE else 0


def lstm_step(grad: Tensor, state: Tensor, weights: Sequence[Tensor], preprocess_p: float = 10.0,
              output_scale: float = 0.1) -> tuple[Tensor, Tensor]:
    """Fused, differentiable step: returns (update [n], new_state [L, 2, H, n]); inputs untouched."""
    return torch.ops.l2l_fast.lstm_step(grad, state, list(weights), float(preprocess_p), float(output_scale))


def lstm_step_(param: Tensor, grad: Tensor, state: Tensor, weights: Sequence[Tensor], preprocess_p: float = 10.0,
               output_scale: float = 0.1) -> None:
    """Fused in-place step, no autograd: param [n] += update; state [L, 2, H, n] advanced in place."""
    torch.ops.l2l_fast.lstm_step_(param, grad, state, list(weights), float(preprocess_p), float(output_scale))


def lstm_multi_step_(params: Sequence[Tensor], grads: Sequence[Tensor], state: Tensor, weights: Sequence[Tensor],
                     preprocess_p: float = 10.0, output_scale: float = 0.1) -> None:
    """Fused in-place step over many tensors in one call, no autograd: params[k] [n_k] += update of grads[k] [n_k];
    state [L, 2, H, sum_k n_k] advanced in place, tensor k's coordinates at [offset_k, offset_k + n_k) (list order).

    Math in the weights' dtype; params may also be bfloat16 / float16 (with float32 weights; rounded to nearest
    on store); grads[k] in params[k]'s dtype; state in the weights' dtype or bfloat16."""
    torch.ops.l2l_fast.lstm_multi_step_(list(params), list(grads), state, list(weights), float(preprocess_p),
                                        float(output_scale))


def _check_fake(grad, state, weights, param=None, grad_update=None, grad_new_state=None) -> None:
    """The checks of csrc/op_checks.h for fake tensors: mixed meta/real inputs reach the fake kernels
    instead of the C++ ones, and must fail the same way."""
    if len(weights) < 6 or (len(weights) - 2) % 4:
        raise ValueError(f"weights: expected 4 tensors per LSTM layer plus 2 for the output layer, got {len(weights)}")
    # the weights define dtype and device, as for the module front
    dtype, device = weights[-2].dtype, weights[-2].device
    layers, hidden = (len(weights) - 2) // 4, weights[-2].shape[-1]
    check_step_inputs(grad, state, num_layers=layers, hidden_size=hidden, dtype=dtype, device=device, param=param)
    if grad_update is not None:
        check_step_inputs(grad_update, grad_new_state, num_layers=layers, hidden_size=hidden, dtype=dtype,
                          device=device, names=("grad_update", "grad_new_state"))
    for index, weight in enumerate(weights):
        check_tensor(f"weights[{index}]", weight, dim=weight.dim(), dtype=dtype, device=device)


if HAS_NATIVE:

    @torch.library.register_fake("l2l_fast::lstm_step")
    def _lstm_step_fake(grad, state, weights, preprocess_p, output_scale):
        _check_fake(grad, state, weights)
        return grad.new_empty(grad.shape[0]), state.new_empty(state.shape)

    @torch.library.register_fake("l2l_fast::lstm_step_backward")
    def _lstm_step_backward_fake(grad_update, grad_new_state, grad, state, weights, preprocess_p, output_scale):
        _check_fake(grad, state, weights, grad_update=grad_update, grad_new_state=grad_new_state)
        return grad.new_empty(grad.shape[0]), state.new_empty(state.shape), [w.new_empty(w.shape) for w in weights]

    @torch.library.register_fake("l2l_fast::lstm_step_")
    def _lstm_step_inplace_fake(param, grad, state, weights, preprocess_p, output_scale):
        _check_fake(grad, state, weights, param=param)
        return None

    @torch.library.register_fake("l2l_fast::lstm_multi_step_")
    def _lstm_multi_step_fake(params, grads, state, weights, preprocess_p, output_scale):
        check_multi_step_inputs(params, grads, state, weights)
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
