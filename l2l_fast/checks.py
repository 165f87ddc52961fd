"""Argument checks, so bad input fails the same way everywhere. Each message names the argument and what
was expected.

- One validator per op (``check_step_args``, ``check_backward_args``, ``check_inplace_args``,
  ``check_multi_step_args``): the Python mirror of ``csrc/op_checks.h``, check for check in the same order,
  run by the ops' fake kernels (torch.compile, meta tensors), so that they fail like the C++ kernels
  (tests/test_bad_input.py and tests/test_multi_step.py compare the two).
- ``check_step_inputs``: the module front's (CoordinatewiseLSTM), against the net's own sizes.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import features as features_

SUPPORTED_DTYPES = (torch.float32, torch.float64)
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_dense_real(name: str, value) -> None:
    """A dense (strided), real torch.Tensor, else a TypeError naming `name`."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name}: sparse tensors are not supported (got layout {value.layout}); pass a dense tensor")
    if value.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported (got {value.dtype})")


def check_tensor(name: str, value, *, dim: int, dtype: torch.dtype, device: torch.device) -> None:
    check_dense_real(name, value)
    if value.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of the net's weights), got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where the net's weights are), got {value.device}")
    if value.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(value.shape)}")


# ---------------------------------------------------------------------------------------------
# the ops' contracts (csrc/op_checks.h)
def _check_float(name: str, t) -> None:
    check_dense_real(name, t)
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected float32 or float64, got {t.dtype}")


def _check_like(name: str, t, like: Tensor, like_name: str) -> None:
    _check_float(name, t)
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of {like_name}), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device} (the device of {like_name}), got {t.device}")


# preprocess_p's largest value: e^p and e^-p stay normal float32 numbers (FLT_MAX = e^88.7, FLT_MIN = e^-87.3).
MAX_PREPROCESS_P = 87.0


def check_constants(preprocess_p, output_scale) -> None:
    """preprocess_p finite in (0, 87] and output_scale finite, else a ValueError naming the argument (the ops,
    the reference and the net constructor all check them; csrc/op_checks.h's check_constants)."""
    p = float(preprocess_p)
    if not (math.isfinite(p) and 0.0 < p <= MAX_PREPROCESS_P):
        raise ValueError(f"preprocess_p: expected a finite number in (0, {MAX_PREPROCESS_P:g}] (e^p and e^-p normal "
                         f"float32 numbers), got {preprocess_p!r}")
    if not math.isfinite(float(output_scale)):
        raise ValueError(f"output_scale: expected a finite number, got {output_scale!r}")


def check_total_steps(total_steps) -> None:
    """total_steps: a positive int (the optimizer steps of the run) or None; else a ValueError naming it."""
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps < 1):
        raise ValueError(f"total_steps: expected a positive int (the optimizer steps of the run) or None, got "
                         f"{total_steps!r}")


def check_progress(progress, reads_progress: bool) -> None:
    """progress (t, total_steps) given exactly to a net that reads it: ints, t >= 0, total_steps >= 1; else a
    ValueError naming it."""
    if not reads_progress:
        if progress is not None:
            raise ValueError(f"progress: this net has no progress input (built without progress_input), got "
                             f"{progress!r}; pass None")
        return
    if progress is None:
        raise ValueError("progress: this net reads where training is (progress_input=True); pass progress = "
                         "(t, total_steps), step t counted from 0")
    ok = isinstance(progress, (tuple, list)) and len(progress) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in progress)
    if not ok or progress[0] < 0 or progress[1] < 1:
        raise ValueError(f"progress: expected (t, total_steps), ints with t >= 0 and total_steps >= 1, got "
                         f"{progress!r}")


# The ops' `output` (csrc/lstm_layout.h OutputKind): 0 update = scale * y, 1 update = scale * tanh(y).
OUTPUT_KINDS = 2


def check_output(output) -> None:
    """The ops' `output`: 0 or 1, else a ValueError naming it (csrc/op_checks.h's check_output)."""
    if isinstance(output, bool) or not isinstance(output, int) or not 0 <= output < OUTPUT_KINDS:
        raise ValueError(f"output: expected 0 (update = scale * y, the paper's) or 1 (scale * tanh(y), bounded), "
                         f"got {output}")


def check_moments(moments, features, n: int, math_dtype: torch.dtype, device: torch.device) -> None:
    """`moments` [4, n] in the math dtype on `device`, given exactly when the features read them
    (csrc/op_checks.h's check_moments)."""
    mask = check_features(features)
    described = f"features={mask} ({'+'.join(features_.names_of(mask))})"
    if not features_.reads_moments(mask):
        if moments is not None:
            raise ValueError(f"moments: {described} read no moments; pass None")
        return
    if moments is None:
        raise ValueError(f"moments: {described} read the running moments: pass a [{features_.MOMENT_ROWS}, {n}] tensor "
                         "(rows m, v, t, u; zeros to start)")
    _check_float("moments", moments)
    if moments.dtype != math_dtype:
        raise TypeError(f"moments: expected dtype {math_dtype} (the math dtype), got {moments.dtype}")
    if moments.device != device:
        raise ValueError(f"moments: expected a tensor on {device}, got {moments.device}")
    if tuple(moments.shape) != (features_.MOMENT_ROWS, n):
        raise ValueError(f"moments: expected shape [{features_.MOMENT_ROWS}, {n}] (rows m, v, t, u; one column per "
                         f"coordinate), got {list(moments.shape)} (moments made for another parameter?)")


def check_inplace_moments(moments, features, n: int, math_dtype: torch.dtype, device: torch.device) -> None:
    """check_moments, and elements of their own: the in-place ops write the moments."""
    check_moments(moments, features, n, math_dtype, device)
    if moments is not None and torch._debug_has_internal_overlap(moments) == 1:  # MemOverlap::Yes
        raise ValueError("moments: elements share memory (an expanded tensor?); an in-place step needs distinct "
                         "elements")


def check_features(features) -> int:
    """The ops' `features`: a nonzero int mask of known feature bits (l2l_fast.features), else ValueError."""
    if isinstance(features, bool) or not isinstance(features, int):
        raise ValueError(f"features: expected an int mask of feature bits, got {features!r}")
    return features_.mask_of(features)


def check_weights(weights, like: Tensor, like_name: str, features) -> tuple[int, int]:
    """The flat weight list of torch.nn.LSTM(input_size(features), H, L) + Linear(H, 1), each tensor in like's
    dtype and on its device: returns (L, H)."""
    mask = check_features(features)
    if not isinstance(weights, (list, tuple)) or len(weights) < 6 or (len(weights) - 2) % 4:
        count = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
        raise ValueError(f"weights: expected 4 tensors per LSTM layer plus 2 for the output layer (6, 10, 14, ...), "
                         f"got {count}")
    for j, weight in enumerate(weights):
        _check_like(f"weights[{j}]", weight, like, like_name)
    out_w = weights[-2]
    if out_w.dim() != 2 or out_w.shape[0] != 1 or out_w.shape[1] < 1:
        raise ValueError(f"weights[-2] (out.weight): expected shape [1, hidden_size], got {tuple(out_w.shape)}")
    layers, hidden = (len(weights) - 2) // 4, out_w.shape[1]
    if tuple(weights[-1].shape) != (1,):
        raise ValueError(f"weights[-1] (out.bias): expected shape [1], got {tuple(weights[-1].shape)}")
    inputs = features_.input_size(mask)
    for l in range(layers):
        first = inputs if l == 0 else hidden
        expected = [(4 * hidden, first), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,)]
        for j, name in enumerate(("weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l")):
            if tuple(weights[4 * l + j].shape) != expected[j]:
                names = "+".join(features_.names_of(mask))
                because = f" and features={mask} ({names})" if l == 0 and j == 0 else ""
                raise ValueError(f"weights[{4 * l + j}] ({name}{l}): expected shape {list(expected[j])} for hidden_size "
                                 f"{hidden}{because}, got {tuple(weights[4 * l + j].shape)}")
    return layers, hidden


def _check_grad(grad, name: str = "grad") -> None:
    _check_float(name, grad)
    if grad.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor of per-coordinate values, got shape {tuple(grad.shape)}")


def _check_per_coordinate(t, name: str, grad: Tensor) -> None:
    _check_like(name, t, grad, "grad")
    if t.dim() != 1 or t.shape[0] != grad.shape[0]:
        raise ValueError(f"{name}: expected shape [{grad.shape[0]}] (one value per coordinate of grad), "
                         f"got {tuple(t.shape)}")


def _check_state(state, name: str, layers: int, hidden: int, grad: Tensor) -> None:
    _check_like(name, state, grad, "grad")
    expected = (layers, 2, hidden, grad.shape[0])
    if tuple(state.shape) != expected:
        raise ValueError(f"{name}: expected shape {list(expected)} = [num_layers, 2, hidden_size, n] for these weights "
                         f"and {grad.shape[0]} coordinates, got {tuple(state.shape)} (a state made for another net "
                         "or parameter?)")


def check_step_args(grad, state, weights, features, preprocess_p=10.0, output_scale=0.1, moments=None,
                    output=0) -> None:
    """lstm_step: grad [n], state [L, 2, H, n], weights, moments [4, n] (when the features read them); one dtype
    (float32 / float64) and device."""
    _check_grad(grad)
    layers, hidden = check_weights(weights, grad, "grad", features)
    _check_state(state, "state", layers, hidden, grad)
    check_constants(preprocess_p, output_scale)
    check_moments(moments, features, grad.shape[0], grad.dtype, grad.device)
    check_output(output)


def check_backward_args(grad_update, grad_new_state, grad, state, weights, features, preprocess_p=10.0,
                        output_scale=0.1, moments=None, output=0) -> None:
    """lstm_step_backward: lstm_step's arguments and the upstream gradients grad_update [n], grad_new_state."""
    check_step_args(grad, state, weights, features, preprocess_p, output_scale, moments, output)
    layers, hidden = (len(weights) - 2) // 4, weights[-2].shape[1]
    _check_per_coordinate(grad_update, "grad_update", grad)
    _check_state(grad_new_state, "grad_new_state", layers, hidden, grad)


def check_inplace_args(param, grad, state, weights, features, preprocess_p=10.0, output_scale=0.1, moments=None,
                       output=0) -> None:
    """lstm_step_: param [n] (and the moments, when the features read them) modified in place, and lstm_step's
    arguments."""
    _check_grad(grad)
    layers, hidden = check_weights(weights, grad, "grad", features)
    _check_per_coordinate(param, "param", grad)
    _check_state(state, "state", layers, hidden, grad)
    check_constants(preprocess_p, output_scale)
    check_inplace_moments(moments, features, grad.shape[0], grad.dtype, grad.device)
    check_output(output)


def check_multi_step_args(params, grads, state, weights, features, preprocess_p=10.0, output_scale=0.1, moments=None,
                          output=0) -> None:
    """lstm_multi_step_: params[k], grads[k] [n_k]; state [L, 2, H, sum_k n_k]; moments [4, sum_k n_k] in the
    weights' dtype (when the features read them); params in the weights' dtype, or bfloat16 / float16 with
    float32 weights; grads[k] in params[k]'s dtype; state in the weights' dtype or bfloat16; everything on the
    weights' device."""
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError("weights: expected 4 tensors per LSTM layer plus 2 for the output layer, got 0")
    first = weights[0]
    _check_float("weights[0]", first)
    dtype, device = first.dtype, first.device
    for j, weight in enumerate(weights[1:], start=1):
        check_dense_real(f"weights[{j}]", weight)
        if weight.dtype != dtype:
            raise TypeError(f"weights[{j}]: expected dtype {dtype} (the dtype of weights[0]), got {weight.dtype}")
        if weight.device != device:
            raise ValueError(f"weights[{j}]: expected a tensor on {device} (the device of weights[0]), got "
                             f"{weight.device}")
    layers, hidden = check_weights(weights, first, "weights[0]", features)
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
    check_dense_real("state", state)
    if state.dtype not in (dtype, torch.bfloat16):
        raise TypeError(f"state: expected dtype {dtype} (the weights' dtype) or torch.bfloat16, got {state.dtype}")
    if state.device != device:
        raise ValueError(f"state: expected a tensor on {device} (the device of the weights), got {state.device}")
    expected = (layers, 2, hidden, total)
    if tuple(state.shape) != expected:
        raise ValueError(f"state: expected shape {expected} = (num_layers, 2, hidden_size, sum of the params' numels), "
                         f"got {tuple(state.shape)} (a state made for another net or parameter list?)")
    check_constants(preprocess_p, output_scale)
    check_inplace_moments(moments, features, total, dtype, device)
    check_output(output)


# ---------------------------------------------------------------------------------------------
# the module front (CoordinatewiseLSTM)
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
