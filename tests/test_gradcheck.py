"""torch.autograd.gradcheck in float64: the registered backward against finite differences.

Gradient values are kept away from the preprocessing kink |g| = e^-p (where the derivative jumps)
and, on the log branch, from 0; the unrolled test asserts that along its whole trajectory.
The single-step checks perturb the gradient in units of e^-p (grad = k * e^-p, gradcheck wrt k):
an absolute eps of 1e-6 on grad would be multiplied by e^p (22026 for p = 10) on the linear branch
and swamp the finite differences with curvature.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from conftest import FEATURE_SETS, feature_id, native_step, random_state, random_weights, reference_step, requires_native

pytestmark = requires_native

STEP_FNS = {"native": native_step, "reference": reference_step}


def away_from_kink(n, p, *, gen):
    """[n] float64 values alternating between the two branches, at least 30% away from |g| = e^-p."""
    threshold = math.exp(-p)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    big = threshold * torch.pow(10.0, 0.12 + 2 * u)  # [1.3, 130] x threshold
    small = threshold * 0.7 * u  # [0, 0.7) x threshold: the linear branch is smooth through 0
    branch = torch.arange(n) % 2 == 0
    return sign * torch.where(branch, big, small)


def assert_away_from_kink(grad, p, margin=0.1):
    ratio = grad.detach().abs() / math.exp(-p)
    assert ((ratio - 1).abs() > margin).all(), f"|grad| too close to e^-p: ratios {ratio.tolist()}"


@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
@pytest.mark.parametrize("backend", STEP_FNS)
@pytest.mark.parametrize("hidden_size,num_layers,n,p", [(3, 2, 7, 10.0), (4, 1, 6, 2.0), (5, 3, 5, 1.0)],
                         ids=["H3-L2-n7-p10", "H4-L1-n6-p2", "H5-L3-n5-p1"])
def test_gradcheck_single_step(gen, backend, hidden_size, num_layers, n, p, features):
    scale = 0.3
    weights = [w.requires_grad_(True)
               for w in random_weights(hidden_size, num_layers, gen=gen, kind="random", features=features)]
    grad = away_from_kink(n, p, gen=gen)
    state = random_state(num_layers, hidden_size, n, gen=gen).requires_grad_(True)
    assert_away_from_kink(grad, p, margin=0.25)
    step = STEP_FNS[backend]

    def fn(k, state, *weights):
        return step(k * math.exp(-p), state, list(weights), p, scale, features)

    k = (grad.detach() / math.exp(-p)).requires_grad_(True)
    assert gradcheck(fn, (k, state, *weights), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_single_step_hidden_20(gen):
    H, L, n, p, scale = 20, 2, 3, 10.0, 0.1
    weights = [w.requires_grad_(True) for w in random_weights(H, L, gen=gen, kind="saturating")]
    grad = away_from_kink(n, p, gen=gen)
    state = random_state(L, H, n, gen=gen).requires_grad_(True)

    def fn(k, state, *weights):
        return native_step(k * math.exp(-p), state, list(weights), p, scale)

    k = (grad.detach() / math.exp(-p)).requires_grad_(True)
    assert gradcheck(fn, (k, state, *weights), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_gradcheck_with_non_finite_gradient(gen, bad):
    """Finite differences see the policy too: a non-finite coordinate is a constant (update 0, state kept)."""
    H, L, n, p, scale = 3, 2, 5, 10.0, 0.2
    weights = [w.requires_grad_(True) for w in random_weights(H, L, gen=gen, kind="random")]
    grad = away_from_kink(n, p, gen=gen)
    grad[2] = bad
    grad.requires_grad_(True)
    state = random_state(L, H, n, gen=gen).requires_grad_(True)

    def fn(state, *weights):  # grad itself is not perturbed: NaN +- eps is still NaN, inf +- eps still inf
        return native_step(grad, state, list(weights), p, scale)

    assert gradcheck(fn, (state, *weights), eps=1e-6, atol=1e-7, rtol=1e-5)


def unroll(step, weights, state0, theta0, noises, *, a, p, scale, features=1):
    """An optimizee-like rollout: grad_t = noise_t + a * theta_t, theta_{t+1} = theta_t + update_t.

    The gradient fed to the optimizer depends on theta (so on earlier updates) and on inputs that
    require grad themselves. Returns (theta_T, state_T, list of the gradients fed in).
    """
    theta, state, grads = theta0, state0, []
    for noise in noises:
        grad = noise + a * theta
        grads.append(grad)
        update, state = step(grad, state, list(weights), p, scale, features)
        theta = theta + update
    return theta, state, grads


@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
@pytest.mark.parametrize("backend,hidden_size,num_layers,n", [("native", 3, 2, 6), ("reference", 3, 2, 6),
                                                             ("native", 20, 2, 2)],
                         ids=["native-H3-L2-n6", "reference-H3-L2-n6", "native-H20-L2-n2"])
def test_gradcheck_three_unrolled_steps(gen, backend, hidden_size, num_layers, n, features):
    """Through 3 steps with the state carried: wrt every weight, the initial state, theta0 and the gradient noise."""
    p, scale, a, steps = 2.0, 0.1, 0.02, 3
    weights = [w.requires_grad_(True)
               for w in random_weights(hidden_size, num_layers, gen=gen, kind="random", features=features)]
    state0 = random_state(num_layers, hidden_size, n, gen=gen).requires_grad_(True)
    theta0 = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    noises = [away_from_kink(n, p, gen=gen).requires_grad_(True) for _ in range(steps)]
    step = STEP_FNS[backend]

    # the inputs keep every gradient of the rollout away from the kink (and the log branch away from 0)
    with torch.no_grad():
        _, _, grads = unroll(step, weights, state0, theta0, noises, a=a, p=p, scale=scale, features=features)
    for grad in grads:
        assert_away_from_kink(grad, p, margin=0.1)

    n_w = len(weights)

    def fn(*inputs):
        ws, state, theta, ns = inputs[:n_w], inputs[n_w], inputs[n_w + 1], inputs[n_w + 2:]
        theta_T, state_T, _ = unroll(step, ws, state, theta, ns, a=a, p=p, scale=scale, features=features)
        return theta_T, state_T

    assert gradcheck(fn, (*weights, state0, theta0, *noises), eps=1e-6, atol=1e-7, rtol=1e-5)
