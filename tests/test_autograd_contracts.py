"""torch's autograd safety contracts on the in-place ops, as torch's own in-place ops keep them.

Regression tests for the reliability issue: lstm_step_ and lstm_multi_step_ left the version counters of
the tensors they write unchanged (a backward through a graph that had saved them silently used the new
values) and accepted an in-place step on a leaf that requires grad.
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_net, random_grad, random_state, requires_native
from l2l_fast import ops

pytestmark = requires_native


def _inputs(gen, n=9):
    net = make_net(gen=gen, dtype=torch.float32)
    weights = [w.detach() for w in net.weights()]
    grad = random_grad(n, gen=gen, dtype=torch.float32)
    state = random_state(2, 20, n, gen=gen, dtype=torch.float32)
    return weights, grad, state


def _step(op, param, grad, state, weights):
    if op == "lstm_step_":
        ops.lstm_step_(param, grad, state, weights)
    else:
        ops.lstm_multi_step_([param], [grad], state, weights)


OPS = ["lstm_step_", "lstm_multi_step_"]


@pytest.mark.parametrize("op", OPS)
def test_written_tensors_get_a_new_version(gen, op):
    weights, grad, state = _inputs(gen)
    param = torch.randn(9, generator=gen)
    versions = param._version, state._version, grad._version
    _step(op, param, grad, state, weights)
    assert param._version > versions[0] and state._version > versions[1]
    assert grad._version == versions[2], "grad is read, not written"


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
