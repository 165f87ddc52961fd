"""The net's verbs (forward, step_, multi_step_) are the one API the optimizer and meta-training call,
and converted weights are made once per weight version."""
from __future__ import annotations

import torch

from conftest import make_net, random_grad, random_state
from l2l_fast import LearnedOptimizer, reference


def test_multi_step_matches_the_reference_op(gen):
    net = make_net(gen=gen, dtype=torch.float64)
    params = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (5, 1, 33)]
    grads = [random_grad(p.numel(), gen=gen) for p in params]
    state = random_state(2, 20, 39, gen=gen)
    expected_params, expected_state = [p.clone() for p in params], state.clone()
    with torch.no_grad():  # an in-place step has no derivative: the net's weights require grad
        reference.lstm_multi_step_(expected_params, grads, expected_state, net.weights(), net.preprocess_p,
                                   net.output_scale * 0.5)
    net.multi_step_(params, grads, state, lr=0.5)
    for got, want in zip(params, expected_params):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state, expected_state, rtol=1e-12, atol=1e-14)


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

    def spy(self, params, grads, state, lr=1.0):
        calls.append(lr)
        return original(self, params, grads, state, lr)

    monkeypatch.setattr(type(net), "multi_step_", spy)
    param = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    opt = LearnedOptimizer([param], net=net, lr=0.3)
    param.grad = torch.randn(4, 3, generator=gen)
    opt.step()
    assert calls == [0.3]
