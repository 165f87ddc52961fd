"""The reference (the specification) against plain torch.nn modules and the paper's formulas; the moments feature
(functional steps take advanced moments, in-place steps advance them) and the tanh output."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import (DTYPE_IDS, OUTPUTS, VARIANTS, WEIGHT_KINDS, branch_counts, make_net, moments_for, random_grad,
                      random_moments, random_state, random_weights, variant_id)
from l2l_fast import CoordinatewiseLSTM, reference
from l2l_fast import features as registry


def torch_modules(weights, hidden_size, num_layers):
    """nn.LSTM(I, H, L) and nn.Linear(H, 1) in float64 holding `weights` (op order; I from weight_ih_l0)."""
    lstm = nn.LSTM(weights[0].shape[1], hidden_size, num_layers).double()
    out = nn.Linear(hidden_size, 1).double()
    names = ("weight_ih_l{}", "weight_hh_l{}", "bias_ih_l{}", "bias_hh_l{}")
    targets = [getattr(lstm, name.format(l)) for l in range(num_layers) for name in names] + [out.weight, out.bias]
    with torch.no_grad():
        for dst, src in zip(targets, weights, strict=True):
            dst.copy_(src)
    return lstm, out


def torch_step(lstm, out, x_seq, state, scale, output=0):
    """nn.LSTM over a sequence x_seq [T, n, 2] from state [L, 2, H, n] -> (update of the last step, final state)."""
    h0 = state[:, 0].transpose(1, 2).contiguous()  # [L, n, H]
    c0 = state[:, 1].transpose(1, 2).contiguous()
    y, (h, c) = lstm(x_seq, (h0, c0))
    value = out(y[-1]).squeeze(1)
    update = scale * (torch.tanh(value) if output == 1 else value)
    return update, torch.stack([h.transpose(1, 2), c.transpose(1, 2)], dim=1)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("hidden_size,num_layers", [(1, 1), (20, 2), (7, 3)], ids=["H1-L1", "H20-L2", "H7-L3"])
def test_reference_equals_torch_lstm_and_linear(gen, hidden_size, num_layers, kind, variant):
    features, output = variant
    p, scale, n = 10.0, 0.1, 257
    weights = random_weights(hidden_size, num_layers, gen=gen, kind=kind, features=features)
    grad = random_grad(n, gen=gen, p=p)
    state = random_state(num_layers, hidden_size, n, gen=gen)
    moments = moments_for(features, grad, gen=gen)
    big, small = branch_counts(grad, p)
    assert big > 0 and small > 0

    update, new_state = reference.lstm_step(grad, state, weights, p, scale, features, moments, output)

    lstm, out = torch_modules(weights, hidden_size, num_layers)
    # the features in bit order, each its registered function of the gradient (and the moments)
    x = torch.cat([f(grad, p, moments) for f in registry.REGISTRY.values() if features & f.bit], dim=1).unsqueeze(0)
    expected_update, expected_state = torch_step(lstm, out, x, state, scale, output)
    torch.testing.assert_close(update, expected_update, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(new_state, expected_state, rtol=1e-12, atol=1e-14)


def test_reference_steps_equal_torch_lstm_sequence(gen):
    """T reference steps with the state carried equal one nn.LSTM run over the T preprocessed gradients."""
    H, L, p, scale, n, T = 9, 2, 5.0, 0.3, 31, 6
    weights = random_weights(H, L, gen=gen, kind="random")
    state = random_state(L, H, n, gen=gen)
    grads = [random_grad(n, gen=gen, p=p) for _ in range(T)]
    s = state
    for g in grads:
        update, s = reference.lstm_step(g, s, weights, p, scale)
    lstm, out = torch_modules(weights, H, L)
    x_seq = torch.stack([reference.preprocess(g, p) for g in grads])  # [T, n, 2]
    expected_update, expected_state = torch_step(lstm, out, x_seq, state, scale)
    torch.testing.assert_close(update, expected_update, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s, expected_state, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("p", [10.0, 2.0, 0.5])
def test_preprocess_formula_both_branches(p):
    threshold = math.exp(-p)
    g = torch.tensor([1.0, -1.0, 3.7, -250.0, 2 * threshold, threshold, -threshold,
                      0.5 * threshold, -1e-3 * threshold, 0.0, -0.0, 1e-300], dtype=torch.float64)
    x = reference.preprocess(g, p)
    assert x.shape == (g.shape[0], 2)
    for k, value in enumerate(g.tolist()):
        if abs(value) >= threshold:  # log branch
            expected = (math.log(abs(value)) / p, math.copysign(1.0, value))
        else:  # linear branch
            expected = (-1.0, math.exp(p) * value)
        assert x[k, 0].item() == pytest.approx(expected[0], rel=1e-14, abs=1e-300), f"x0 for g={value!r}"
        assert x[k, 1].item() == pytest.approx(expected[1], rel=1e-14, abs=1e-300), f"x1 for g={value!r}"


def test_preprocess_is_continuous_at_the_kink():
    p = 10.0
    threshold = math.exp(-p)
    g = torch.tensor([threshold * (1 - 1e-12), threshold * (1 + 1e-12)], dtype=torch.float64)
    x = reference.preprocess(g, p)
    torch.testing.assert_close(x[0], x[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(x[0], torch.tensor([-1.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-10)


def test_preprocess_gradient_both_branches():
    """d x0/dg = 1/(p g), d x1/dg = 0 on the log branch; 0 and e^p on the linear branch; finite at g = 0."""
    p = 4.0
    g = torch.tensor([2.0, -0.3, 1e-4, -1e-5, 0.0], dtype=torch.float64, requires_grad=True)
    x = reference.preprocess(g, p)
    d0, = torch.autograd.grad(x[:, 0].sum(), g, retain_graph=True)
    d1, = torch.autograd.grad(x[:, 1].sum(), g)
    big = g.detach().abs() >= math.exp(-p)
    torch.testing.assert_close(d0, torch.where(big, 1 / (p * g.detach()), torch.zeros_like(d0)))
    torch.testing.assert_close(d1, torch.where(big, torch.zeros_like(d1), torch.full_like(d1, math.exp(p))))
    assert torch.isfinite(d0).all() and torch.isfinite(d1).all()


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_reference_step_inplace_advances_the_moments(gen, variant):
    """lstm_step_: the moments advanced (features.advance_moments), then the functional step on the advanced ones;
    a NaN-gradient coordinate keeps its moments bit for bit."""
    features, output = variant
    H, L, n, p, scale = 4, 2, 30, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, features=features)
    grad = random_grad(n, gen=gen, p=p)
    grad[5] = math.nan
    state = random_state(L, H, n, gen=gen)
    param = torch.randn(n, dtype=torch.float64, generator=gen)
    moments = random_moments(n, gen=gen) if registry.reads_moments(features) else None
    advanced = None if moments is None else registry.advance_moments(grad, moments)
    update, new_state = reference.lstm_step(grad, state, weights, p, scale, features, advanced, output)
    before = None if moments is None else moments.clone()
    expected_param = param + update
    reference.lstm_step_(param, grad, state, weights, p, scale, features, moments, output)
    assert torch.equal(param, expected_param) and torch.equal(state, new_state)
    if moments is not None:
        assert torch.equal(moments, advanced)
        assert torch.equal(moments[:, 5], before[:, 5])


@pytest.mark.parametrize("output", OUTPUTS, ids=["linear", "tanh"])
def test_reference_multi_step_moments_at_the_state_offsets(gen, output):
    """lstm_multi_step_: tensor k's moments are the columns [offset_k, offset_k + n_k), as its state's."""
    H, L, p, scale, features = 3, 2, 10.0, 0.1, registry.ALL_MASK
    sizes = [4, 0, 7]
    weights = random_weights(H, L, gen=gen, features=features)
    params = [torch.randn(n, dtype=torch.float64, generator=gen) for n in sizes]
    grads = [random_grad(n, gen=gen, p=p) for n in sizes]
    state = random_state(L, H, sum(sizes), gen=gen)
    moments = random_moments(sum(sizes), gen=gen)
    expected = [p.clone() for p in params], state.clone(), moments.clone()
    offset = 0
    for param, grad, n in zip(expected[0], grads, sizes):
        columns = slice(offset, offset + n)
        rows, cols = expected[1][..., columns].clone(), expected[2][:, columns].clone()
        reference.lstm_step_(param, grad, rows, weights, p, scale, features, cols, output)
        expected[1][..., columns], expected[2][:, columns] = rows, cols
        offset += n
    reference.lstm_multi_step_(params, grads, state, weights, p, scale, features, moments, output)
    assert all(torch.equal(a, b) for a, b in zip(params, expected[0]))
    assert torch.equal(state, expected[1]) and torch.equal(moments, expected[2])


def test_reference_moments_get_no_gradient(gen):
    """The functional step treats the moments as data: no gradient reaches them, d grad only through
    g / (sqrt(v_hat) + eps)."""
    H, L, n, p, scale = 3, 2, 8, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, features=2)
    grad = random_grad(n, gen=gen, p=p).requires_grad_(True)
    moments = random_moments(n, gen=gen, grad=grad.detach()).requires_grad_(True)
    update, new_state = reference.lstm_step(grad, random_state(L, H, n, gen=gen), weights, p, scale, 2, moments)
    d_grad, d_moments = torch.autograd.grad(update.sum() + new_state.sum(), [grad, moments], allow_unused=True)
    assert d_moments is None and torch.isfinite(d_grad).all() and d_grad.abs().max() > 0


@pytest.mark.parametrize("which", ["m", "v", "t"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_reference_non_finite_moments_poison(gen, bad, which):
    """A finite-gradient coordinate with a non-finite moment is poisoned like one with a non-finite state value:
    NaN update and new state, NaN gradients; the other coordinates as if it were absent. With a non-finite
    gradient it keeps everything instead."""
    H, L, p, scale, n, features = 4, 2, 10.0, 0.1, 9, registry.ALL_MASK
    weights = [w.requires_grad_(True) for w in random_weights(H, L, gen=gen, kind="random", features=features)]
    grad = random_grad(n, gen=gen, p=p)
    grad[6] = math.nan
    state = random_state(L, H, n, gen=gen).requires_grad_(True)
    moments = random_moments(n, gen=gen, grad=grad)
    row = "mvt".index(which)
    moments[row, [4, 6]] = bad
    grad.requires_grad_(True)
    update, new_state = reference.lstm_step(grad, state, weights, p, scale, features, moments)
    up_u = torch.randn(n, dtype=torch.float64, generator=gen)
    up_s = torch.randn(L, 2, H, n, dtype=torch.float64, generator=gen)
    assert math.isnan(update[4].item()) and torch.isnan(new_state[..., 4]).all()
    assert update[6].item() == 0.0 and torch.equal(new_state[..., 6], state[..., 6])
    keep = [k for k in range(n) if k not in (4, 6)]
    sub_update, sub_state = reference.lstm_step(grad[keep], state[..., keep], weights, p, scale, features,
                                                moments[:, keep])
    torch.testing.assert_close(update[keep], sub_update, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(new_state[..., keep], sub_state, rtol=1e-13, atol=1e-15)
    d = torch.autograd.grad([update, new_state], [grad, state, *weights], [up_u, up_s])
    assert math.isnan(d[0][4].item()) and torch.isnan(d[1][..., 4]).all()
    assert all(torch.isnan(w).all() for w in d[2:])
    assert d[0][6].item() == 0.0 and torch.equal(d[1][..., 6], up_s[..., 6])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_reference_non_finite_policy(gen, bad):
    """Update 0 and state kept for the bad coordinate; the others as if it were absent; gradients as documented."""
    H, L, p, scale, n = 5, 2, 10.0, 0.1, 9
    weights = [w.requires_grad_(True) for w in random_weights(H, L, gen=gen, kind="random")]
    grad = random_grad(n, gen=gen, p=p)
    grad[4] = bad
    grad.requires_grad_(True)
    state = random_state(L, H, n, gen=gen).requires_grad_(True)
    update, new_state = reference.lstm_step(grad, state, weights, p, scale)
    assert update[4].item() == 0.0
    assert torch.equal(new_state[..., 4], state[..., 4])
    keep = [k for k in range(n) if k != 4]
    sub_update, sub_state = reference.lstm_step(grad[keep], state[..., keep], weights, p, scale)
    # equal up to float64 rounding, not bit for bit: 9 and 8 columns may take different BLAS kernels
    # (on an AMD EPYC they differed in the last bit)
    torch.testing.assert_close(update[keep], sub_update, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(new_state[..., keep], sub_state, rtol=1e-13, atol=1e-15)

    up_u, up_s = torch.randn(n, dtype=torch.float64, generator=gen), torch.randn(L, 2, H, n, dtype=torch.float64, generator=gen)
    d = torch.autograd.grad([update, new_state], [grad, state, *weights], [up_u, up_s])
    d_sub = torch.autograd.grad([sub_update, sub_state], weights, [up_u[keep], up_s[..., keep]])
    assert d[0][4].item() == 0.0
    assert torch.equal(d[1][..., 4], up_s[..., 4])
    for a, b in zip(d[2:], d_sub):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# the module front: state_dict compatible with plain torch modules
@pytest.mark.parametrize("hidden_size,num_layers", [(20, 2), (3, 1), (8, 3)], ids=["H20-L2", "H3-L1", "H8-L3"])
def test_state_dict_matches_torch_modules(hidden_size, num_layers):
    net = CoordinatewiseLSTM(hidden_size, num_layers, backend="reference")
    lstm, out = nn.LSTM(2, hidden_size, num_layers), nn.Linear(hidden_size, 1)
    expected = {f"lstm.{k}": v.shape for k, v in lstm.state_dict().items()}
    expected.update({f"out.{k}": v.shape for k, v in out.state_dict().items()})
    got = {k: v.shape for k, v in net.state_dict().items()}
    assert got == expected
    assert [tuple(w.shape) for w in net.weights()] == [
        tuple(getattr(lstm, f"{name}_l{l}").shape) for l in range(num_layers)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")] + [(1, hidden_size), (1,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
def test_state_dict_round_trip_through_torch_modules(gen, dtype):
    H, L, n = 6, 2, 40
    net = make_net(H, L, gen=gen, dtype=dtype, backend="reference", preprocess_p=7.0, output_scale=0.05)
    sd = net.state_dict()
    lstm, out = nn.LSTM(2, H, L).to(dtype), nn.Linear(H, 1).to(dtype)
    lstm.load_state_dict({k[len("lstm."):]: v for k, v in sd.items() if k.startswith("lstm.")})
    out.load_state_dict({k[len("out."):]: v for k, v in sd.items() if k.startswith("out.")})

    # the plain modules compute the same step
    grad = random_grad(n, gen=gen, p=7.0, dtype=dtype)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    update, new_state = net(grad, state)
    expected_update, expected_state = torch_step(lstm.double(), out.double(), reference.preprocess(grad.double(), 7.0)[None],
                                                 state.double(), 0.05)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(update.double(), expected_update, **tol)
    torch.testing.assert_close(new_state.double(), expected_state, **tol)

    # and back: a fresh net loaded from the plain modules is identical
    back = CoordinatewiseLSTM(H, L, 7.0, 0.05, backend="reference").to(dtype)
    back.load_state_dict({**{f"lstm.{k}": v for k, v in lstm.to(dtype).state_dict().items()},
                          **{f"out.{k}": v for k, v in out.to(dtype).state_dict().items()}})
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    u2, s2 = back(grad, state)
    assert torch.equal(u2, update) and torch.equal(s2, new_state)


def test_init_state_shape_device_dtype():
    net = CoordinatewiseLSTM(5, 3, backend="reference").double()
    s = net.init_state(11)
    assert s.shape == (3, 2, 5, 11) and s.dtype == torch.float64 and s.device.type == "cpu"
    assert torch.count_nonzero(s) == 0
    assert net.init_state(0).shape == (3, 2, 5, 0)
    assert net.init_state(4, dtype=torch.float32).dtype == torch.float32


def test_reference_step_inplace_equals_param_plus_update(gen):
    H, L, n, p, scale = 4, 2, 50, 10.0, 0.1
    weights = random_weights(H, L, gen=gen)
    grad = random_grad(n, gen=gen, p=p)
    state = random_state(L, H, n, gen=gen)
    param = torch.randn(n, dtype=torch.float64, generator=gen)
    update, new_state = reference.lstm_step(grad, state, weights, p, scale)
    expected_param = param + update
    reference.lstm_step_(param, grad, state, weights, p, scale)
    assert torch.equal(param, expected_param)
    assert torch.equal(state, new_state)
