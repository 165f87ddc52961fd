"""Argument checks shared by every backend, so bad input fails the same way everywhere.

Each message names the argument and what was expected.
"""
from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_tensor(name: str, value, *, dim: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name}: sparse tensors are not supported (got layout {value.layout}); pass a dense tensor")
    if value.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported (got {value.dtype}); the optimizer is real-valued")
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
