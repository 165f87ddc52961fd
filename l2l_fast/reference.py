"""Pure-PyTorch coordinatewise LSTM optimizer step: the executable specification.

Every native kernel is tested against these functions, and they are the fallback on devices
without a kernel. They favour clarity over speed.

Shapes (n = number of coordinates, L = num_layers, H = hidden_size):
  grad    [n]            gradient of the optimizee for each coordinate (data, but differentiable)
  state   [L, 2, H, n]   per-coordinate LSTM state; state[l, 0] is h of layer l, state[l, 1] is c.
                         Coordinates are the last (contiguous) axis so that both the CPU vector
                         lanes and the GPU threads read consecutive coordinates.
  weights list in ``torch.nn.LSTM`` + ``torch.nn.Linear`` order:
          [weight_ih_l0 [4H, I], weight_hh_l0 [4H, H], bias_ih_l0 [4H], bias_hh_l0 [4H],
           ... one group of four per layer (input size H above layer 0) ...,
           out_weight [1, H], out_bias [1]]
  features mask of the LSTM's input features (l2l_fast.features; default 1, the paper's preprocessing
          of the gradient): the first layer's I = features.input_size(features) inputs.
  moments [4, n]         the running moments, in the math dtype (grad's; the weights' in lstm_multi_step_),
                         given exactly when a feature of the mask reads them ("moments", RNNprop's scale-free
                         inputs; "long_moments", the same over Adam's long second moment), else None. Rows m
                         (moving average of g), v (of g^2), t (steps taken), u (long moving average of g^2);
                         zeros to start. lstm_step (and its backward) takes them already advanced with this
                         step's gradient, as data: no gradient flows to them, d grad only through
                         g / (sqrt(v_hat) + eps) (and g / (sqrt(u_hat) + eps)). The in-place steps advance them
                         first (features.advance_moments: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, t + 1,
                         u = b3 u + (1 - b3) g^2; b1 = b2 = 0.95, b3 = 0.999) and compute the features from the
                         advanced values; lstm_multi_step_'s columns sit at the state's offsets.
  output  how the output layer's value y becomes the update: 0 (default) update = output_scale * y, the
          paper's; 1 update = output_scale * tanh(y), bounded by |output_scale|.

Non-finite values (the same on every backend, instruction set and dtype), in this order:
  1. A coordinate whose gradient is NaN or +-Inf gets update 0 and keeps its state (and its moments)
     bit for bit (the LSTM never sees the bad value nor its state); in the backward it is the identity
     for its state, 0 for its gradient input, and it adds nothing to the weight gradients.
  2. A coordinate with a finite gradient is "poisoned" when any of its 2 L H state values is NaN or
     +-Inf, or any of its moments (m, v, t, u; when given), or when any weight is NaN or +-Inf: its update
     is NaN and its whole new state is NaN (the optimizer never continues silently from a corrupt state
     or net). In the backward its gradient input and state gradients are NaN, and so are the weight
     gradients. (The in-place steps advance a poisoned coordinate's moments as any other's.)
  preprocess_p must be finite in (0, 87] (e^p and e^-p normal float32 numbers), output_scale finite and
  output 0 or 1, else a ValueError naming the argument; moments given or missing against the mask, or of
  another shape, dtype or device, fail as the ops do (l2l_fast.checks.check_moments).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import features as features_
from .checks import check_constants, check_inplace_moments, check_moments, check_output

__all__ = ["preprocess", "lstm_step", "lstm_step_", "lstm_multi_step_", "lstm_from_inputs", "split_weights"]


# The paper's feature (appendix A): |g| >= e^-p -> (log|g| / p, sign g), else (-1, e^p g); [n] -> [n, 2].
preprocess = features_.paper


def split_weights(weights: Sequence[Tensor]) -> tuple[list[tuple[Tensor, Tensor, Tensor, Tensor]], Tensor, Tensor]:
    """Split the flat weight list into per-layer (w_ih, w_hh, b_ih, b_hh) and the output layer."""
    if len(weights) < 6 or (len(weights) - 2) % 4 != 0:
        raise ValueError(f"weights: expected 4 tensors per LSTM layer plus 2 output tensors, got {len(weights)}")
    layers = [tuple(weights[i : i + 4]) for i in range(0, len(weights) - 2, 4)]
    return layers, weights[-2], weights[-1]


def _lstm_step_unmasked(grad: Tensor, state: Tensor, weights: Sequence[Tensor], p: float, scale: float,
                        features: int, moments: Tensor | None, output: int):
    return lstm_from_inputs(features_.compute(grad, features, p, moments), state, weights, scale, output)


def lstm_from_inputs(x: Tensor, state: Tensor, weights: Sequence[Tensor], output_scale: float = 0.1,
                     output: int = 0) -> tuple[Tensor, Tensor]:
    """The net on given input features x [n, I] (no masking): (update [n], new_state [L, 2, H, n]).
    lstm_step is this after the features and with the non-finite policy."""
    layers, out_w, out_b = split_weights(weights)
    new_rows = []
    for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        h, c = state[l, 0].t(), state[l, 1].t()  # [n, H]
        gates = x @ w_ih.t() + h @ w_hh.t() + b_ih + b_hh  # [n, 4H], torch.nn.LSTM order i, f, g, o
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        new_rows.append(torch.stack([h_new.t(), c_new.t()]))
        x = h_new
    y = (x @ out_w.t() + out_b).squeeze(1)
    update = output_scale * (torch.tanh(y) if output == 1 else y)
    return update, torch.stack(new_rows)


def lstm_step(grad: Tensor, state: Tensor, weights: Sequence[Tensor], preprocess_p: float = 10.0,
              output_scale: float = 0.1, features: int = 1, moments: Tensor | None = None,
              output: int = 0) -> tuple[Tensor, Tensor]:
    """One optimizer step for every coordinate: returns (update [n], new_state [L, 2, H, n]). moments [4, n]:
    already advanced with grad, when the features read them."""
    check_constants(preprocess_p, output_scale)
    check_moments(moments, features, grad.shape[0], grad.dtype, grad.device)
    check_output(output)
    finite = torch.isfinite(grad)
    safe_grad = torch.where(finite, grad, torch.zeros_like(grad))
    # rule 1: the LSTM (and so its backward) never sees the state or moments of a non-finite-gradient coordinate
    safe_state = torch.where(finite, state, torch.zeros_like(state))
    safe_moments = None if moments is None else torch.where(finite, moments.detach(), torch.zeros_like(moments))
    update, new_state = _lstm_step_unmasked(safe_grad, safe_state, weights, preprocess_p, output_scale, features,
                                            safe_moments, output)
    # rule 2, without a host synchronisation: poisoned coordinates get NaN, and NaN gradients (the extra
    # terms make d grad and d state NaN even where the net's own derivative is structurally 0)
    sound = torch.isfinite(state).flatten(0, 2).all(0)
    if moments is not None:
        sound = sound & torch.isfinite(moments).all(0)
    sound = sound & torch.stack([torch.isfinite(w).all() for w in weights]).all()
    poisoned = finite & ~sound
    # (the factor is 1, not NaN, where not selected: a NaN there would turn the 0 that where's backward
    # passes into NaN)
    nan = torch.where(poisoned, torch.full_like(update, float("nan")), torch.ones_like(update))
    update = torch.where(poisoned, (update + safe_grad + safe_state.sum(dim=(0, 1, 2))) * nan, update)
    new_state = torch.where(poisoned, new_state * nan, new_state)
    update = torch.where(finite, update, torch.zeros_like(update))
    new_state = torch.where(finite, new_state, state)
    return update, new_state


def check_inplace_autograd(name: str, written: Sequence[Tensor], read: Sequence[Tensor]) -> None:
    """The in-place steps have no derivative: with grad mode on, torch's own error for a written leaf that
    requires grad, else a RuntimeError when any input requires grad (as the native ops refuse,
    csrc/inplace_autograd.cpp); under torch.no_grad (what optimizers do) everything is allowed."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (*written, *read)):
        return
    for t in written:
        if t.requires_grad and (t.is_leaf or (t._base is not None and t._base.is_leaf)):
            raise RuntimeError(f"a {'' if t.is_leaf else 'view of a '}leaf Variable that requires grad is being used "
                               "in an in-place operation.")
    raise RuntimeError(f"l2l_fast::{name} has no derivative and some of its inputs require grad: call it under "
                       "torch.no_grad() (as LearnedOptimizer.step does), or use the differentiable l2l_fast::lstm_step")


def lstm_step_(param: Tensor, grad: Tensor, state: Tensor, weights: Sequence[Tensor], preprocess_p: float = 10.0,
               output_scale: float = 0.1, features: int = 1, moments: Tensor | None = None, output: int = 0) -> None:
    """In-place step: param [n] += update, state [L, 2, H, n] and moments [4, n] (when the features read them)
    advanced; the features see the advanced moments."""
    check_inplace_autograd("lstm_step_", [param, state, *_given(moments)], [grad, *weights])
    check_inplace_moments(moments, features, grad.shape[0], grad.dtype, grad.device)
    with torch.no_grad():
        advanced = _advanced(grad, moments)
        update, new_state = lstm_step(grad, state, weights, preprocess_p, output_scale, features, advanced, output)
        param.add_(update.to(param.dtype))
        state.copy_(new_state)
        _store(moments, advanced)


def lstm_multi_step_(params: Sequence[Tensor], grads: Sequence[Tensor], state: Tensor, weights: Sequence[Tensor],
                     preprocess_p: float = 10.0, output_scale: float = 0.1, features: int = 1,
                     moments: Tensor | None = None, output: int = 0) -> None:
    """In-place step of a list of tensors sharing one state: params[k] [n_k] += update of grads[k] [n_k], tensor k's
    state at state[..., offset_k : offset_k + n_k] of state [L, 2, H, sum_k n_k] (offsets in list order), and its
    moments (when the features read them) at moments[:, offset_k : offset_k + n_k] of [4, sum_k n_k].

    The math runs in the weights' dtype: 16-bit params, their grads and a bfloat16 state are widened to it,
    and the new param (old + update, summed in the math dtype) and state are rounded to nearest on store.
    """
    check_inplace_autograd("lstm_multi_step_", [*params, state, *_given(moments)], [*grads, *weights])
    # checked before any tensor of the list is written
    check_constants(preprocess_p, output_scale)
    check_inplace_moments(moments, features, sum(param.numel() for param in params), weights[0].dtype,
                          weights[0].device)
    check_output(output)
    with torch.no_grad():
        _multi_step(params, grads, state, weights, preprocess_p, output_scale, features, moments, output)


def _given(moments: Tensor | None) -> list[Tensor]:
    return [] if moments is None else [moments]


def _advanced(grad: Tensor, moments: Tensor | None) -> Tensor | None:
    return None if moments is None else features_.advance_moments(grad, moments)


def _store(moments: Tensor | None, advanced: Tensor | None) -> None:
    if moments is not None:
        moments.copy_(advanced)


def _multi_step(params: Sequence[Tensor], grads: Sequence[Tensor], state: Tensor, weights: Sequence[Tensor],
                preprocess_p: float, output_scale: float, features: int, moments: Tensor | None, output: int) -> None:
    """The body of lstm_multi_step_ (no checks, no grad)."""
    math_dtype = weights[0].dtype
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        n = param.shape[0]
        rows = state[..., offset : offset + n]
        columns = None if moments is None else moments[:, offset : offset + n]
        advanced = _advanced(grad.to(math_dtype), columns)
        update, new_rows = lstm_step(grad.to(math_dtype), rows.to(math_dtype), weights, preprocess_p, output_scale,
                                     features, advanced, output)
        param.copy_(param.to(math_dtype) + update)
        rows.copy_(new_rows)
        _store(columns, advanced)
        offset += n
