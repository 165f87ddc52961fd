"""torch's autograd contracts on the ops: in-place safety as torch's own in-place ops keep it, forward-mode
AD and the double backward.

Regression tests for the reliability issue: lstm_step_ and lstm_multi_step_ left the version counters of
the tensors they write unchanged (a backward through a graph that had saved them silently used the new
values) and accepted an in-place step on a leaf that requires grad; torch.func.jvp through the native step
returned zero tangents and gradgradcheck a Jacobian mismatch.
"""
from __future__ import annotations

import pytest
import torch

import math

from conftest import make_net, random_grad, random_moments, random_state, random_weights, requires_native
from l2l_fast import features as registry
from l2l_fast import ops, reference
from test_gradcheck import away_from_kink

pytestmark = requires_native


def _inputs(gen, n=9):
    net = make_net(gen=gen, dtype=torch.float32)
    weights = [w.detach() for w in net.weights()]
    grad = random_grad(n, gen=gen, dtype=torch.float32)
    state = random_state(2, 20, n, gen=gen, dtype=torch.float32)
    return weights, grad, state


def _step(op, param, grad, state, weights):
    impl = reference if op.startswith("reference.") else ops
    if op.endswith("lstm_step_"):
        impl.lstm_step_(param, grad, state, weights)
    else:
        impl.lstm_multi_step_([param], [grad], state, weights)


# the native ops and the reference's in-place steps keep the same contract
OPS = ["lstm_step_", "lstm_multi_step_", "reference.lstm_step_", "reference.lstm_multi_step_"]


@pytest.mark.parametrize("op", OPS)
def test_written_tensors_get_a_new_version(gen, op):
    weights, grad, state = _inputs(gen)
    param = torch.randn(9, generator=gen)
    versions = param._version, state._version, grad._version
    _step(op, param, grad, state, weights)
    assert param._version > versions[0] and state._version > versions[1]
    assert grad._version == versions[2], "grad is read, not written"


@pytest.mark.parametrize("op", OPS)
def test_written_moments_get_a_new_version(gen, op):
    net = make_net(gen=gen, dtype=torch.float32, features=registry.ALL_MASK)
    weights, grad = [w.detach() for w in net.weights()], random_grad(9, gen=gen, dtype=torch.float32)
    state, moments = random_state(2, 20, 9, gen=gen, dtype=torch.float32), net.init_moments(9)
    impl = reference if op.startswith("reference.") else ops
    before = moments._version
    if op.endswith("lstm_step_"):
        impl.lstm_step_(torch.zeros(9), grad, state, weights, 10.0, 0.1, registry.ALL_MASK, moments)
    else:
        impl.lstm_multi_step_([torch.zeros(9)], [grad], state, weights, 10.0, 0.1, registry.ALL_MASK, moments)
    assert moments._version > before and torch.equal(moments[2], torch.ones(9))


def test_multi_step_bumps_every_param_of_the_list(gen):
    weights, _, _ = _inputs(gen)
    params = [torch.randn(n, generator=gen) for n in (3, 4)]
    grads = [random_grad(p.numel(), gen=gen, dtype=torch.float32) for p in params]
    state = torch.zeros(2, 2, 20, 7)
    before = [p._version for p in params]
    ops.lstm_multi_step_(params, grads, state, weights)
    assert all(p._version > v for p, v in zip(params, before))


@pytest.mark.parametrize("op", OPS)
def test_backward_through_a_graph_that_saved_the_param_fails(gen, op):
    """The error torch raises for its own in-place ops, instead of a silently wrong gradient."""
    weights, grad, state = _inputs(gen)
    leaf = torch.randn(9, generator=gen, requires_grad=True)
    param = leaf * 1.0  # a non-leaf the product below saves
    loss = (param * param).sum()
    with torch.no_grad():
        _step(op, param, grad, state, weights)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("op", OPS)
def test_backward_through_a_graph_that_saved_the_state_fails(gen, op):
    weights, grad, state = _inputs(gen)
    leaf = state.clone().requires_grad_(True)
    saved = leaf * 1.0
    loss = (saved * saved).sum()
    with torch.no_grad():
        _step(op, torch.zeros(9), grad, saved.view(state.shape), weights)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("op", OPS)
def test_step_on_a_leaf_that_requires_grad_is_refused_with_grad_mode_on(gen, op):
    weights, grad, state = _inputs(gen)
    param = torch.randn(9, generator=gen, requires_grad=True)
    before = param.detach().clone()
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place"):
        _step(op, param, grad, state, weights)
    assert torch.equal(param.detach(), before), "refused before anything was written"


@pytest.mark.parametrize("op", OPS)
def test_step_on_a_leaf_that_requires_grad_works_under_no_grad(gen, op):
    """What torch.optim's optimizers do: step() runs under no_grad."""
    weights, grad, state = _inputs(gen)
    param = torch.zeros(9, requires_grad=True)
    with torch.no_grad():
        _step(op, param, grad, state, weights)
    assert param.detach().abs().sum() > 0


@pytest.mark.parametrize("op", OPS)
def test_weights_that_require_grad_with_grad_mode_on_are_refused(gen, op):
    """The op has no derivative: a result without a graph would be silently wrong for meta-training."""
    weights, grad, state = _inputs(gen)
    weights = [w.clone().requires_grad_(True) for w in weights]
    with pytest.raises(RuntimeError, match="has no derivative"):
        _step(op, torch.zeros(9), grad, state, weights)


def test_inference_mode_steps_work(gen):
    weights, grad, state = _inputs(gen)
    with torch.inference_mode():
        param = torch.zeros(9)
        state = state.clone()
        ops.lstm_step_(param, grad, state, weights)
    assert param.abs().sum() > 0


def test_learned_optimizer_step_still_works_and_bumps_versions(gen):
    from l2l_fast import LearnedOptimizer

    net = make_net(gen=gen, dtype=torch.float32)
    p = torch.nn.Parameter(torch.randn(4, 5, generator=gen))
    opt = LearnedOptimizer([p], net=net)
    p.grad = torch.randn(4, 5, generator=gen)
    before = p._version
    opt.step()
    assert p._version > before


# ---------------------------------------------------------------------------------------------
# forward-mode AD and the double backward

def _small(gen, n=5, p=10.0):
    weights = random_weights(3, 2, gen=gen, kind="random")
    grad = away_from_kink(n, p, gen=gen)
    state = random_state(2, 3, n, gen=gen)
    return grad, state, weights


def test_jvp_through_the_native_step_equals_the_reference_jvp(gen):
    grad, state, weights = _small(gen)
    tangents = (torch.randn(grad.shape, generator=gen, dtype=torch.float64) * 1e-5,
                torch.randn(state.shape, generator=gen, dtype=torch.float64),
                *[torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in weights])
    primals = (grad, state, *weights)
    _, native = torch.func.jvp(lambda g, s, *w: ops.lstm_step(g, s, list(w), 10.0, 0.1), primals, tangents)
    _, expected = torch.func.jvp(lambda g, s, *w: reference.lstm_step(g, s, list(w), 10.0, 0.1), primals, tangents)
    assert expected[0].abs().max() > 0, "a test whose tangents are all zero would pass on the old bug"
    for got, want in zip(native, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_forward_ad_dual_tensors_through_the_net(gen):
    import torch.autograd.forward_ad as fwAD

    net = make_net(3, 2, gen=gen, dtype=torch.float64)
    grad, state, _ = _small(gen)
    tangent = torch.randn(grad.shape, generator=gen, dtype=torch.float64) * 1e-5
    with fwAD.dual_level():
        update, _ = net(fwAD.make_dual(grad, tangent), state)
        got = fwAD.unpack_dual(update).tangent
    _, (want, _) = torch.func.jvp(lambda g: reference.lstm_step(g, state, net.weights(), 10.0, 0.1), (grad,), (tangent,))
    assert got is not None and want.abs().max() > 0
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-15)


def test_jvp_with_moments_and_tanh_output_equals_the_reference_jvp(gen):
    """Forward-mode AD through the reference with the moments (data: no tangent) and the tanh output."""
    grad, state, _ = _small(gen)
    weights = random_weights(3, 2, gen=gen, kind="random", features=registry.ALL_MASK)
    moments = random_moments(grad.shape[0], gen=gen, grad=grad)
    tangents = (torch.randn(grad.shape, generator=gen, dtype=torch.float64) * 1e-5,
                torch.randn(state.shape, generator=gen, dtype=torch.float64),
                *[torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in weights])
    primals = (grad, state, *weights)
    extra = (registry.ALL_MASK, moments, 1)
    _, native = torch.func.jvp(lambda g, s, *w: ops.lstm_step(g, s, list(w), 10.0, 0.1, *extra), primals, tangents)
    _, expected = torch.func.jvp(lambda g, s, *w: reference.lstm_step(g, s, list(w), 10.0, 0.1, *extra), primals,
                                 tangents)
    assert expected[0].abs().max() > 0
    for got, want in zip(native, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("features,output", [(registry.ALL_MASK, 1), (registry.REGISTRY["moments"].bit, 0)])
def test_gradgradcheck_with_moments(gen, features, output):
    """The double backward (through the reference) with the moments as fixed data, of magnitudes like the
    gradients' (see test_gradcheck)."""
    p, n = 10.0, 5
    grad = away_from_kink(n, p, gen=gen)
    moments = random_moments(n, gen=gen, grad=grad, lo=math.exp(-p), hi=10 * math.exp(-p))
    k = (grad / math.exp(-p)).requires_grad_(True)
    state = random_state(2, 3, n, gen=gen).requires_grad_(True)
    weights = [w.requires_grad_(True) for w in random_weights(3, 2, gen=gen, kind="random", features=features)]

    def fn(k, state, *weights):
        return ops.lstm_step(k * math.exp(-p), state, list(weights), p, 0.3, features, moments, output)

    assert torch.autograd.gradgradcheck(fn, (k, state, *weights), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradgradcheck_through_the_native_step(gen):
    p = 10.0
    grad, state, weights = _small(gen, p=p)
    k = (grad / math.exp(-p)).requires_grad_(True)  # perturb in units of e^-p, as test_gradcheck explains
    state.requires_grad_(True)
    weights = [w.requires_grad_(True) for w in weights]

    def fn(k, state, *weights):
        return ops.lstm_step(k * math.exp(-p), state, list(weights), p, 0.3)

    assert torch.autograd.gradgradcheck(fn, (k, state, *weights), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_the_first_backward_is_the_fused_kernel_unless_a_graph_is_asked_for(gen, monkeypatch):
    """The reference path costs reference speed: it must only run for create_graph=True."""
    grad, state, weights = _small(gen)
    weights = [w.requires_grad_(True) for w in weights]
    calls = []
    original = reference.lstm_step
    monkeypatch.setattr(reference, "lstm_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    update, new_state = ops.lstm_step(grad, state, weights, 10.0, 0.1)
    torch.autograd.grad(update.sum() + new_state.sum(), weights)
    assert calls == []
    update, new_state = ops.lstm_step(grad, state, weights, 10.0, 0.1)
    torch.autograd.grad(update.sum() + new_state.sum(), weights, create_graph=True)
    assert calls == [1]
