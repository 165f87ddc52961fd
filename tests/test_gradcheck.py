"""torch.autograd.gradcheck in float64: the registered backward against finite differences.

Gradient values are kept away from the preprocessing kink |g| = e^-p (where the derivative jumps)
and, on the log branch, from 0; the unrolled test asserts that along its whole trajectory.
The single-step checks perturb the gradient in units of e^-p (grad = k * e^-p, gradcheck wrt k):
an absolute eps of 1e-6 on grad would be multiplied by e^p (22026 for p = 10) on the linear branch
and swamp the finite differences with curvature. The moments are data (no gradient): they are fixed
inputs, advanced with the unperturbed gradients, of magnitudes e^-p..10 e^-p like the gradients', so
that the moments feature's g / sqrt(v_hat) scales the perturbation by at most about e^p as well.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from conftest import (VARIANTS, native_step, random_moments, random_state, random_weights, reference_step,
                      requires_native, variant_id)
from l2l_fast import features as registry

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


def moments_like_grads(n, p, *, gen, features, grad=None):
    """Moments of magnitudes e^-p..10 e^-p (advanced with grad when given) when the features read them, else None."""
    if not registry.reads_moments(features):
        return None
    return random_moments(n, gen=gen, grad=grad, lo=math.exp(-p), hi=10 * math.exp(-p))


def assert_away_from_kink(grad, p, margin=0.1):
    ratio = grad.detach().abs() / math.exp(-p)
    assert ((ratio - 1).abs() > margin).all(), f"|grad| too close to e^-p: ratios {ratio.tolist()}"


# the native backward with every variant; the reference (plain autograd, and slow to gradcheck) with the paper's
# set and the widest one
SINGLE_STEP_CASES = [pytest.param(backend, variant, id=f"{backend}-{variant_id(variant)}") for backend in STEP_FNS
                     for variant in (VARIANTS if backend == "native" else [VARIANTS[0], VARIANTS[-1]])]


@pytest.mark.parametrize("backend,variant", SINGLE_STEP_CASES)
@pytest.mark.parametrize("hidden_size,num_layers,n,p", [(3, 2, 7, 10.0), (4, 1, 6, 2.0), (5, 3, 5, 1.0)],
                         ids=["H3-L2-n7-p10", "H4-L1-n6-p2", "H5-L3-n5-p1"])
def test_gradcheck_single_step(gen, backend, hidden_size, num_layers, n, p, variant):
    features, output = variant
    scale = 0.3
    weights = [w.requires_grad_(True)
               for w in random_weights(hidden_size, num_layers, gen=gen, kind="random", features=features)]
    grad = away_from_kink(n, p, gen=gen)
    state = random_state(num_layers, hidden_size, n, gen=gen).requires_grad_(True)
    moments = moments_like_grads(n, p, gen=gen, features=features, grad=grad)
    assert_away_from_kink(grad, p, margin=0.25)
    step = STEP_FNS[backend]

    def fn(k, state, *weights):
        return step(k * math.exp(-p), state, list(weights), p, scale, features, moments, output)

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


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_gradcheck_with_non_finite_gradient(gen, bad, variant):
    """Finite differences see the policy too: a non-finite coordinate is a constant (update 0, state kept)."""
    features, output = variant
    H, L, n, p, scale = 3, 2, 5, 10.0, 0.2
    weights = [w.requires_grad_(True) for w in random_weights(H, L, gen=gen, kind="random", features=features)]
    grad = away_from_kink(n, p, gen=gen)
    grad[2] = bad
    moments = moments_like_grads(n, p, gen=gen, features=features, grad=grad)
    grad.requires_grad_(True)
    state = random_state(L, H, n, gen=gen).requires_grad_(True)

    def fn(state, *weights):  # grad itself is not perturbed: NaN +- eps is still NaN, inf +- eps still inf
        return native_step(grad, state, list(weights), p, scale, features, moments, output)

    assert gradcheck(fn, (state, *weights), eps=1e-6, atol=1e-7, rtol=1e-5)


def unroll(step, weights, state0, theta0, noises, *, a, p, scale, features=1, output=0, moments_at=None):
    """An optimizee-like rollout: grad_t = noise_t + a * theta_t, theta_{t+1} = theta_t + update_t.

    The gradient fed to the optimizer depends on theta (so on earlier updates) and on inputs that
    require grad themselves. moments_at(t, grad): step t's moments (data), None for features that read
    none. Returns (theta_T, state_T, list of the gradients fed in).
    """
    theta, state, grads = theta0, state0, []
    for t, noise in enumerate(noises):
        grad = noise + a * theta
        grads.append(grad)
        moments = None if moments_at is None else moments_at(t, grad)
        update, state = step(grad, state, list(weights), p, scale, features, moments, output)
        theta = theta + update
    return theta, state, grads


def advancing(moments, fed: list):
    """moments_at of a rollout that advances `moments` with each gradient it sees and appends each step's to
    `fed`; None for None."""
    if moments is None:
        return None

    def at(t, grad):
        fed.append(registry.advance_moments(grad.detach(), fed[-1] if fed else moments))
        return fed[-1]

    return at


# every variant through the small native net; the reference and the paper's size (slow) with the paper's set and
# the widest one
UNROLLED_SIZES = {"native-H3-L2-n6": ("native", 3, 2, 6), "reference-H3-L2-n6": ("reference", 3, 2, 6),
                  "native-H20-L2-n2": ("native", 20, 2, 2)}
UNROLLED_CASES = [pytest.param(*sizes, variant, id=f"{label}-{variant_id(variant)}")
                  for label, sizes in UNROLLED_SIZES.items()
                  for variant in (VARIANTS if label == "native-H3-L2-n6" else [VARIANTS[0], VARIANTS[-1]])]


@pytest.mark.parametrize("backend,hidden_size,num_layers,n,variant", UNROLLED_CASES)
def test_gradcheck_three_unrolled_steps(gen, backend, hidden_size, num_layers, n, variant):
    """Through 3 steps with the state carried: wrt every weight, the initial state, theta0 and the gradient noise.
    The moments are those of the unperturbed rollout, fixed (data)."""
    features, output = variant
    p, scale, a, steps = 2.0, 0.1, 0.02, 3
    weights = [w.requires_grad_(True)
               for w in random_weights(hidden_size, num_layers, gen=gen, kind="random", features=features)]
    state0 = random_state(num_layers, hidden_size, n, gen=gen).requires_grad_(True)
    theta0 = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    noises = [away_from_kink(n, p, gen=gen).requires_grad_(True) for _ in range(steps)]
    moments0 = moments_like_grads(n, p, gen=gen, features=features)
    step = STEP_FNS[backend]
    variant = dict(a=a, p=p, scale=scale, features=features, output=output)

    # the inputs keep every gradient of the rollout away from the kink (and the log branch away from 0)
    with torch.no_grad():
        fed = []
        _, _, grads = unroll(step, weights, state0, theta0, noises, **variant, moments_at=advancing(moments0, fed))
    for grad in grads:
        assert_away_from_kink(grad, p, margin=0.1)
    moments_at = None if moments0 is None else lambda t, grad: fed[t]

    n_w = len(weights)

    def fn(*inputs):
        ws, state, theta, ns = inputs[:n_w], inputs[n_w], inputs[n_w + 1], inputs[n_w + 2:]
        theta_T, state_T, _ = unroll(step, ws, state, theta, ns, **variant, moments_at=moments_at)
        return theta_T, state_T

    assert gradcheck(fn, (*weights, state0, theta0, *noises), eps=1e-6, atol=1e-7, rtol=1e-5)
