"""The net's verbs (forward, step_, multi_step_) are the one API the optimizer and meta-training call,
and converted weights are made once per weight version."""
from __future__ import annotations

import torch

import pytest

from conftest import VARIANTS, make_net, random_grad, random_moments, random_state, variant_id
from l2l_fast import LearnedOptimizer, reference
from l2l_fast import features as registry
from l2l_fast.grouped import GroupedLSTM, ParamGroup


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_multi_step_matches_the_reference_op(gen, variant, backend):
    """lr scales output_scale; the net passes its mask, output kind and moments (advanced in place)."""
    features, output = variant
    net = make_net(gen=gen, dtype=torch.float64, features=features, output=output, backend=backend)
    params = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (5, 1, 33)]
    grads = [random_grad(p.numel(), gen=gen) for p in params]
    state = random_state(2, 20, 39, gen=gen)
    moments = random_moments(39, gen=gen) if net.reads_moments else None
    expected_params, expected_state = [p.clone() for p in params], state.clone()
    expected_moments = None if moments is None else moments.clone()
    with torch.no_grad():  # an in-place step has no derivative: the net's weights require grad
        reference.lstm_multi_step_(expected_params, grads, expected_state, net.weights(), net.preprocess_p,
                                   net.output_scale * 0.5, features, expected_moments, output)
    net.multi_step_(params, grads, state, lr=0.5, moments=moments)
    for got, want in zip(params, expected_params):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state, expected_state, rtol=1e-12, atol=1e-14)
    if moments is not None:
        torch.testing.assert_close(moments, expected_moments, rtol=1e-14, atol=0)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_step_equals_forward_on_the_advanced_moments(gen, variant):
    """The verbs agree: step_ advances the moments in place and adds forward's update on the advanced ones."""
    features, output = variant
    net = make_net(6, 2, gen=gen, dtype=torch.float64, features=features, output=output)
    grad, state = random_grad(40, gen=gen), random_state(2, 6, 40, gen=gen)
    moments = random_moments(40, gen=gen) if net.reads_moments else None
    update, new_state = net(grad, state, net.advance_moments(grad, moments))
    param = torch.zeros(40, dtype=torch.float64)
    net.step_(param, grad, state, moments)
    torch.testing.assert_close(param, update.detach(), rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(state, new_state.detach(), rtol=1e-13, atol=1e-16)


def test_grouped_nets_split_the_moments_like_the_state(gen):
    """GroupedLSTM: one moments tensor in the state's group order, each group's net stepping its own columns."""
    dim, problems = 5, 3
    groups = [ParamGroup("a", 0, 2), ParamGroup("b", 2, 5)]
    nets = {g.name: make_net(4, 2, gen=gen, features=registry.ALL_MASK, output=k) for k, g in enumerate(groups)}
    grouped = GroupedLSTM(nets, groups, dim)
    n = problems * dim
    grad, param = random_grad(n, gen=gen), torch.zeros(n, dtype=torch.float64)
    state, moments = grouped.init_state(n), random_moments(n, gen=gen)
    assert grouped.reads_moments and grouped.init_moments(n).shape == (registry.MOMENT_ROWS, n)
    expected_param, expected_moments, offset = torch.zeros(problems, dim, dtype=torch.float64), moments.clone(), 0
    for group in groups:
        columns = grad.view(problems, dim)[:, group.start:group.stop].reshape(-1)
        span = slice(offset, offset + columns.numel())
        rows, cols = state[..., span].clone(), expected_moments[:, span].clone()
        update = torch.zeros_like(columns)
        nets[group.name].step_(update, columns, rows, cols)
        expected_param[:, group.start:group.stop] = update.view(problems, -1)
        expected_moments[:, span] = cols
        offset += columns.numel()
    grouped.step_(param, grad, state, moments)
    torch.testing.assert_close(param, expected_param.view(-1), rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(moments, expected_moments, rtol=1e-14, atol=0)


def test_grouped_nets_must_agree_on_reading_moments(gen):
    groups = [ParamGroup("a", 0, 1), ParamGroup("b", 1, 2)]
    nets = {"a": make_net(4, 2, gen=gen), "b": make_net(4, 2, gen=gen, features=registry.ALL_MASK)}
    with pytest.raises(ValueError, match="^nets: .* read the running moments or none"):
        GroupedLSTM(nets, groups, 2)


def test_converted_weights_are_reused_until_a_weight_changes(gen):
    net = make_net(gen=gen, dtype=torch.float32)
    first = net.weights_for(torch.device("cpu"), torch.float64)
    again = net.weights_for(torch.device("cpu"), torch.float64)
    assert all(a is b for a, b in zip(first, again)), "same weight version: the same converted tensors"
    assert all(w.dtype == torch.float64 for w in first)
    with torch.no_grad():
        net.out.bias.add_(1.0)  # a new weight version
    changed = net.weights_for(torch.device("cpu"), torch.float64)
    assert changed[-1] is not first[-1]
    torch.testing.assert_close(changed[-1], net.out.bias.detach().double())


def test_weights_in_the_right_dtype_are_passed_as_they_are(gen):
    net = make_net(gen=gen, dtype=torch.float64)
    assert all(a is b for a, b in zip(net.weights_for(torch.device("cpu"), torch.float64), net.weights()))


def test_multi_step_after_a_weight_change_uses_the_new_weights(gen):
    """A stale conversion would step float64 params with the old weights."""
    net = make_net(gen=gen, dtype=torch.float32)
    grad = random_grad(17, gen=gen)
    runs = []
    for _ in range(2):
        param, state = torch.zeros(17, dtype=torch.float64), torch.zeros(2, 2, 20, 17, dtype=torch.float64)
        net.multi_step_([param], [grad], state)
        runs.append(param)
        with torch.no_grad():
            net.out.bias.add_(0.25)
    # the output bias moved by 0.25: every update moves by output_scale * 0.25
    torch.testing.assert_close(runs[1] - runs[0], torch.full_like(runs[0], 0.1 * 0.25), rtol=0, atol=1e-6)


def test_the_optimizer_steps_through_the_net_verb(gen, monkeypatch):
    net = make_net(gen=gen, dtype=torch.float32)
    calls = []
    original = type(net).multi_step_

    def spy(self, params, grads, state, lr=1.0, moments=None):
        calls.append(lr)
        return original(self, params, grads, state, lr, moments)

    monkeypatch.setattr(type(net), "multi_step_", spy)
    param = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    opt = LearnedOptimizer([param], net=net, lr=0.3)
    param.grad = torch.randn(4, 3, generator=gen)
    opt.step()
    assert calls == [0.3]
