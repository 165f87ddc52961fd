"""Argument checks shared by every backend, so bad input fails the same way everywhere.

Each message names the argument and what was expected.
"""
from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_dense_real(name: str, value) -> None:
    """A dense (strided), real torch.Tensor, else a TypeError naming `name`."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name}: sparse tensors are not supported (got layout {value.layout}); pass a dense tensor")
    if value.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported (got {value.dtype}); the optimizer is real-valued")


def check_tensor(name: str, value, *, dim: int, dtype: torch.dtype, device: torch.device) -> None:
    check_dense_real(name, value)
    if value.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of the net's weights), got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where the net's weights are), got {value.device}")
    if value.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(value.shape)}")


def check_step_inputs(grad, state, *, num_layers: int, hidden_size: int, dtype: torch.dtype,
                      device: torch.device, param=None, names: tuple[str, str] = ("grad", "state")) -> None:
    """grad [n], state [num_layers, 2, hidden_size, n], param [n] (optional); `names` for the messages."""
    grad_name, state_name = names
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"net weights: expected float32 or float64, got {dtype}")
    check_tensor(grad_name, grad, dim=1, dtype=dtype, device=device)
    n = grad.shape[0]
    if param is not None:
        check_tensor("param", param, dim=1, dtype=dtype, device=device)
        if param.shape[0] != n:
            raise ValueError(f"param: expected {n} elements (as many as grad), got {param.shape[0]}")
    check_tensor(state_name, state, dim=4, dtype=dtype, device=device)
    expected = (num_layers, 2, hidden_size, n)
    if tuple(state.shape) != expected:
        raise ValueError(
            f"{state_name}: expected shape {expected} = (num_layers, 2, hidden_size, n) for this net and {n} coordinates, "
            f"got {tuple(state.shape)}; was it made by init_state of another net or for another parameter?")


PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_weight_list(weights) -> tuple[int, int, torch.dtype, torch.device]:
    """The flat weight list of torch.nn.LSTM(2, H, L) + Linear(H, 1): returns (L, H, dtype, device);
    weights[0] sets the dtype (float32 or float64) and device of all."""
    if not isinstance(weights, (list, tuple)) or len(weights) < 6 or (len(weights) - 2) % 4:
        count = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
        raise ValueError(f"weights: expected 4 tensors per LSTM layer plus 2 for the output layer, got {count}")
    first = weights[0]
    if not isinstance(first, Tensor):
        raise TypeError(f"weights[0]: expected a torch.Tensor, got {type(first).__name__}")
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weights[0]: expected float32 or float64, got {first.dtype}")
    dtype, device = first.dtype, first.device
    for index, weight in enumerate(weights):
        if not isinstance(weight, Tensor):
            raise TypeError(f"weights[{index}]: expected a torch.Tensor, got {type(weight).__name__}")
        check_tensor(f"weights[{index}]", weight, dim=weight.dim(), dtype=dtype, device=device)
    layers, hidden = (len(weights) - 2) // 4, weights[-2].shape[-1] if weights[-2].dim() else 0
    expected = []
    for l in range(layers):
        inputs = 2 if l == 0 else hidden
        expected += [(4 * hidden, inputs), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,)]
    expected += [(1, hidden), (1,)]
    for index, (weight, shape) in enumerate(zip(weights, expected)):
        if tuple(weight.shape) != shape or hidden < 1:
            raise ValueError(f"weights[{index}]: expected shape {shape} for hidden_size {hidden}, got {tuple(weight.shape)}")
    return layers, hidden, dtype, device


def check_multi_step_inputs(params, grads, state, weights) -> None:
    """The checks of lstm_multi_step_ (csrc/cpu/multi_step_cpu.cpp): params[k], grads[k] [n_k];
    state [L, 2, H, sum_k n_k]; params in the weights' dtype, or bfloat16 / float16 with float32 weights;
    grads[k] in params[k]'s dtype; state in the weights' dtype or bfloat16."""
    layers, hidden, dtype, device = check_weight_list(weights)
    if not isinstance(params, (list, tuple)) or not isinstance(grads, (list, tuple)):
        raise TypeError("params, grads: expected lists of tensors")
    if len(params) != len(grads):
        raise ValueError(f"grads: expected one gradient per parameter ({len(params)}), got {len(grads)}")
    allowed = (dtype, torch.bfloat16, torch.float16) if dtype == torch.float32 else (dtype,)
    total = 0
    for k, (param, grad) in enumerate(zip(params, grads)):
        for name, t in ((f"params[{k}]", param), (f"grads[{k}]", grad)):
            check_dense_real(name, t)
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name}: expected a tensor on {device} (the device of the weights), got {t.device}")
            if t.dim() != 1:
                raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
        if param.dtype not in allowed:
            raise TypeError(f"params[{k}]: expected dtype {' or '.join(map(str, allowed))} for {dtype} weights, "
                            f"got {param.dtype}")
        if grad.dtype != param.dtype:
            raise TypeError(f"grads[{k}]: expected dtype {param.dtype} (the dtype of params[{k}]), got {grad.dtype}")
        if grad.shape[0] != param.shape[0]:
            raise ValueError(f"grads[{k}]: expected {param.shape[0]} elements (as many as params[{k}]), got {grad.shape[0]}")
        if param.shape[0] > 1 and param.stride(0) == 0:
            raise ValueError(f"params[{k}]: elements share memory (an expanded tensor?); an in-place step needs "
                             "distinct elements")
        total += param.shape[0]
    if not isinstance(state, Tensor):
        raise TypeError(f"state: expected a torch.Tensor, got {type(state).__name__}")
    if state.layout != torch.strided:
        raise TypeError("state: sparse tensors are not supported")
    if state.dtype not in (dtype, torch.bfloat16):
        raise TypeError(f"state: expected dtype {dtype} (the weights' dtype) or torch.bfloat16, got {state.dtype}")
    if state.device != device:
        raise ValueError(f"state: expected a tensor on {device} (the device of the weights), got {state.device}")
    expected = (layers, 2, hidden, total)
    if tuple(state.shape) != expected:
        raise ValueError(f"state: expected shape {expected} = (num_layers, 2, hidden_size, sum of the params' numels), "
                         f"got {tuple(state.shape)} (a state made for another net or parameter list?)")
