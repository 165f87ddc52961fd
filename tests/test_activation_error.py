"""The derived term of the float32 weight-gradient rule (tests/activation_error.py) against what it bounds: a float64
emulation of the kernels' step (cell_backward's formulas, derivatives from the computed values) whose every sigmoid
and tanh is off by +-e_s / +-e_t, everything else exact. The bound must hold for every sign pattern and be nearly
attained by the worst (all errors of one sign attain it where no factor changes sign)."""
from __future__ import annotations

import random

import torch

import test_nonfinite_policy as T
from activation_error import weight_grad_activation_bound
from conftest import generator
from l2l_fast import features as registry
from l2l_fast import reference

EPS = {"sigmoid": 3.2e-7, "tanh": 6.4e-7}  # ACTIVATION_BOUND's size


def emulated_weight_grads(grad, state, weights, p, scale, up_u, up_s, features, moments, output, error):
    """float64 weight gradients of one step whose activations are f(z) + error(shape, e_f)."""
    layers, out_w, out_b = reference.split_weights(weights)
    x = registry.compute(grad, features, p, moments)
    sig = lambda z: torch.sigmoid(z) + error(z.shape, EPS["sigmoid"])  # noqa: E731
    tnh = lambda z: torch.tanh(z) + error(z.shape, EPS["tanh"])  # noqa: E731
    saved = []
    for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        h, c = state[l, 0].t(), state[l, 1].t()
        zi, zf, zg, zo = (x @ w_ih.t() + h @ w_hh.t() + b_ih + b_hh).chunk(4, 1)
        i, f, g, o = sig(zi), sig(zf), tnh(zg), sig(zo)
        tc = tnh(f * c + i * g)
        saved.append((x, h, c, i, f, g, o, tc))
        x = o * tc
    y = (x @ out_w.t() + out_b).squeeze(1)
    gu = up_u * scale * (1 - tnh(y) ** 2 if output == 1 else 1)
    d = [None] * len(weights)
    d[-2], d[-1] = (gu[:, None] * x).sum(0)[None], gu.sum(0, keepdim=True)
    dh = gu[:, None] * out_w + up_s[-1, 0].t()
    for l in reversed(range(len(layers))):
        xl, h, c, i, f, g, o, tc = saved[l]
        dcell = up_s[l, 1].t() + dh * o * (1 - tc * tc)
        G = torch.cat([dcell * g * i * (1 - i), dcell * c * f * (1 - f), dcell * i * (1 - g * g),
                       dh * tc * o * (1 - o)], 1)
        d[4 * l], d[4 * l + 1] = G.t() @ xl, G.t() @ h
        d[4 * l + 2] = d[4 * l + 3] = G.sum(0)
        if l > 0:
            dh = G @ layers[l][0] + up_s[l - 1, 0].t()
    return d


def test_bound_holds_and_is_attained():
    rng, worst = random.Random(0), 0.0
    for trial in range(60):
        pr = dict(n=rng.randint(1, 40), hidden=rng.randint(1, 6), layers=rng.randint(1, 3), bad_grads=0, bad_states=0,
                  bad_moments=0, bad_weight=None, kind=("init", "random", "saturating")[trial % 3],
                  features=rng.choice(T.FEATURE_SETS), output=rng.choice(T.OUTPUTS), seed=rng.randrange(2**32))
        grad, state, weights, up_u, up_s, previous = T.make_inputs(pr, torch.float64)
        args = (grad, state, weights, 10.0, 0.1, up_u, up_s, pr["features"], T.advanced(grad, previous), pr["output"])
        exact = emulated_weight_grads(*args, lambda shape, e: torch.zeros(shape, dtype=torch.float64))
        bound, _ = weight_grad_activation_bound(*args[:7], EPS, *args[7:])
        gen = generator(trial)
        for error in (lambda shape, e: torch.full(shape, e, dtype=torch.float64),
                      lambda shape, e: torch.full(shape, -e, dtype=torch.float64),
                      lambda shape, e: e * torch.randint(0, 2, shape, generator=gen).double().mul(2).sub(1)):
            got = emulated_weight_grads(*args, error)
            for k, (a, e, b) in enumerate(zip(got, exact, bound)):
                ratio = ((a - e).abs() / b).nan_to_num(0.0).max().item()
                assert ratio <= 1, f"{pr}: d_weights[{k}] moved by {ratio:.6f} of the bound"
                worst = max(worst, ratio)
    assert worst > 0.9, f"the bound is {1 / worst:.1f}x the worst emulated error: looser than derived"
