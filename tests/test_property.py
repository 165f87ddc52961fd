"""Property test: for random shapes, hyper-parameters, magnitudes, feature sets (with random moments advanced with
the gradient where read) and output kinds, native == reference in float64.

Examples per run come from the hypothesis profile (tests/conftest.py):
    HYPOTHESIS_PROFILE=thorough pytest tests/test_property.py
"""
from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import (FEATURE_SETS, OUTPUTS, generator, native_step, random_moments, reference_step, requires_native,
                      step_grads)
from l2l_fast import features as registry
from tolerances import assert_elementwise_close, assert_weight_grads_close, backward_error_scale

pytestmark = requires_native

F64 = torch.float64


@st.composite
def problems(draw):
    n = draw(st.integers(0, 300))
    hidden_size = draw(st.integers(1, 33))
    num_layers = draw(st.integers(1, 3))
    p = draw(st.floats(0.1, 30.0))
    scale = draw(st.one_of(st.floats(-3.0, 3.0), st.sampled_from([0.0, 0.1, 1.0])))
    # gradient magnitudes: a decade range anywhere from subnormal-adjacent to huge, often around e^-p
    lo = draw(st.one_of(st.floats(-320.0, 300.0), st.just(-p / math.log(10) - 2)))
    width = draw(st.floats(0.0, 20.0))
    weight_std = draw(st.sampled_from([0.1, 0.5, 1.0, 3.0]))
    state_std = draw(st.sampled_from([0.0, 1.0, 5.0]))
    bad_fraction = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]))
    features = draw(st.sampled_from(FEATURE_SETS))
    output = draw(st.sampled_from(OUTPUTS))
    # the moments' magnitudes (10^moments_lo .. 10^(moments_lo + 10), v ~ their square finite): like the
    # gradients', or decades away from them
    moments_lo = draw(st.one_of(st.just(min(max(lo, -150.0), 140.0)), st.floats(-150.0, 140.0)))
    seed = draw(st.integers(0, 2**63 - 1))
    return dict(n=n, hidden_size=hidden_size, num_layers=num_layers, p=p, scale=scale, lo=lo,
                hi=min(lo + width, 307.0), weight_std=weight_std, state_std=state_std, bad_fraction=bad_fraction,
                features=features, output=output, moments_lo=moments_lo, seed=seed)


def make_inputs(problem):
    gen = generator(problem["seed"])
    n, H, L = problem["n"], problem["hidden_size"], problem["num_layers"]
    exponent = problem["lo"] + torch.rand(n, generator=gen, dtype=F64) * (problem["hi"] - problem["lo"])
    if registry.reads_moments(problem["features"]):
        # g^2 stays finite in v (an overflowed v poisons the coordinate: tests/test_nonfinite_policy.py's subject)
        exponent = exponent.clamp(max=150.0)
    sign = torch.where(torch.rand(n, generator=gen, dtype=F64) < 0.5, -1.0, 1.0)
    grad = sign * torch.pow(10.0, exponent)
    bad = torch.rand(n, generator=gen, dtype=F64) < problem["bad_fraction"]
    choice = torch.randint(0, 3, (n,), generator=gen)
    grad = torch.where(bad, torch.tensor([math.nan, math.inf, -math.inf], dtype=F64)[choice], grad)
    weights = []
    for l in range(L):
        inputs = registry.input_size(problem["features"]) if l == 0 else H
        for shape in ((4 * H, inputs), (4 * H, H), (4 * H,), (4 * H,)):
            weights.append(problem["weight_std"] * torch.randn(shape, generator=gen, dtype=F64))
    weights += [problem["weight_std"] * torch.randn(1, H, generator=gen, dtype=F64),
                torch.randn(1, generator=gen, dtype=F64)]
    state = problem["state_std"] * torch.randn(L, 2, H, n, generator=gen, dtype=F64)
    state[:, 0] = torch.tanh(state[:, 0])
    up_u = torch.randn(n, generator=gen, dtype=F64)
    up_s = torch.randn(L, 2, H, n, generator=gen, dtype=F64)
    moments = None
    if registry.reads_moments(problem["features"]):
        lo = problem["moments_lo"]
        moments = random_moments(n, gen=gen, grad=grad, lo=10.0**lo, hi=10.0 ** (lo + 10.0))
    return grad, state, weights, up_u, up_s, moments


@given(problems())
def test_native_equals_reference_float64(problem):
    grad, state, weights, up_u, up_s, moments = make_inputs(problem)
    p, scale = problem["p"], problem["scale"]
    variant = dict(features=problem["features"], moments=moments, output=problem["output"])
    got = step_grads(native_step, grad, state, weights, p, scale, up_u, up_s, **variant)
    ref = step_grads(reference_step, grad, state, weights, p, scale, up_u, up_s, **variant)
    s_grad, s_state, s_weights = backward_error_scale(grad, state, weights, p, scale, up_u, up_s, **variant)
    for name, a, e, es in zip(("update", "new_state", "d_grad", "d_state"), got[:4], ref[:4], [None, None, s_grad, s_state]):
        assert_elementwise_close(a, e, F64, name, es)
    assert_weight_grads_close(got[4], ref[4], F64, error_scale=s_weights)
    # the policy for non-finite gradients holds exactly
    bad = ~torch.isfinite(grad)
    assert torch.count_nonzero(got[0][bad]) == 0
    assert torch.equal(got[1][..., bad], state[..., bad])
    assert torch.count_nonzero(got[2][bad]) == 0
    assert torch.equal(got[3][..., bad], up_s[..., bad])
