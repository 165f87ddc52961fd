"""Op registration (torch.library.opcheck) and the torch.compile path (fullgraph, inductor)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import (DTYPE_IDS, FEATURE_SETS, feature_id, make_net, random_grad, random_state, random_weights,
                      requires_native)
from l2l_fast import ops

pytestmark = requires_native

DTYPES = [torch.float64, torch.float32]
H, L, P, SCALE = 3, 2, 10.0, 0.1


def sample(gen, dtype, n=7, features=1):
    grad = random_grad(n, gen=gen, dtype=dtype, p=P)
    if n >= 5:
        grad[4] = math.nan  # the masked path is part of the op's behaviour under test too
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random", features=features)
    return grad, state, weights


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# opcheck
REQUIRES_GRAD = {"none": (), "all": ("grad", "state", "weights"), "weights": ("weights",), "state": ("state",)}


# The features argument given (every set of the registry) and left to its default (the dispatcher drops an
# argument equal to its default: the autograd formula and the fake kernels must take both).
FEATURE_ARGS = [pytest.param((f,), id=feature_id(f)) for f in FEATURE_SETS] + [pytest.param((), id="default")]


def features_of(extra):
    return extra[0] if extra else 1


@pytest.mark.parametrize("extra", FEATURE_ARGS)
@pytest.mark.parametrize("requires_grad", REQUIRES_GRAD)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [7, 0], ids=lambda n: f"n{n}")
def test_opcheck_lstm_step(gen, dtype, requires_grad, n, extra):
    grad, state, weights = sample(gen, dtype, n, features_of(extra))
    which = REQUIRES_GRAD[requires_grad]
    grad.requires_grad_("grad" in which)
    state.requires_grad_("state" in which)
    for w in weights:
        w.requires_grad_("weights" in which)
    torch.library.opcheck(torch.ops.l2l_fast.lstm_step.default, (grad, state, weights, P, SCALE, *extra))


@pytest.mark.parametrize("extra", FEATURE_ARGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [7, 0], ids=lambda n: f"n{n}")
def test_opcheck_lstm_step_backward(gen, dtype, n, extra):
    grad, state, weights = sample(gen, dtype, n, features_of(extra))
    grad_update = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    grad_new_state = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(dtype)
    torch.library.opcheck(torch.ops.l2l_fast.lstm_step_backward.default,
                          (grad_update, grad_new_state, grad, state, weights, P, SCALE, *extra))


@pytest.mark.parametrize("extra", FEATURE_ARGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [7, 0], ids=lambda n: f"n{n}")
def test_opcheck_lstm_step_inplace(gen, dtype, n, extra):
    grad, state, weights = sample(gen, dtype, n, features_of(extra))
    param = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    torch.library.opcheck(torch.ops.l2l_fast.lstm_step_.default, (param, grad, state, weights, P, SCALE, *extra))


def test_schemas_mark_the_mutated_arguments():
    schema = torch.ops.l2l_fast.lstm_step_.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["param", "state"]
    assert len(schema.returns) == 0
    for op in (torch.ops.l2l_fast.lstm_step.default, torch.ops.l2l_fast.lstm_step_backward.default):
        assert not any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments), op


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_compile_forward(gen, dtype, features):
    net = make_net(H, L, gen=gen, dtype=dtype, backend="native", features=features)
    grad, state, _ = sample(gen, dtype, n=37)

    def fn(grad, state):
        update, new_state = net(grad, state)
        return update * 2, new_state

    compiled = torch.compile(fn, fullgraph=True)
    with torch.no_grad():
        got = compiled(grad, state)
        expected = fn(grad, state)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_compile_step_inplace(gen, dtype):
    net = make_net(H, L, gen=gen, dtype=dtype, backend="native")
    grad, state, _ = sample(gen, dtype, n=37)
    param = torch.randn(37, generator=gen, dtype=torch.float64).to(dtype)
    param_eager, state_eager = param.clone(), state.clone()

    def fn(param, grad, state):
        net.step_(param, grad, state)

    compiled = torch.compile(fn, fullgraph=True)
    for _ in range(3):  # repeated calls: the mutation happens every time, on the caller's tensors
        compiled(param, grad, state)
        fn(param_eager, grad, state_eager)
        torch.testing.assert_close(param, param_eager, rtol=0, atol=0)
        torch.testing.assert_close(state, state_eager, rtol=0, atol=0)


@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_compile_forward_backward_unrolled(gen, dtype, features):
    """A compiled 3-step rollout whose loss is differentiated (AOTAutograd compiles the backward too)."""
    net = make_net(H, L, gen=gen, dtype=dtype, backend="native", features=features)
    net_eager = make_net(H, L, gen=gen, dtype=dtype, backend="native", features=features)
    net_eager.load_state_dict(net.state_dict())
    n = 37
    grads = [random_grad(n, gen=gen, dtype=dtype, p=P) for _ in range(3)]
    state0 = random_state(L, H, n, gen=gen, dtype=dtype)
    theta0 = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)

    def rollout(model, theta, state):
        for g in grads:
            update, state = model(g + 0.01 * theta, state)
            theta = theta + update
        return (theta ** 2).sum() + state.sum()

    s_c, t_c = state0.clone().requires_grad_(True), theta0.clone().requires_grad_(True)
    s_e, t_e = state0.clone().requires_grad_(True), theta0.clone().requires_grad_(True)
    loss_c = torch.compile(rollout, fullgraph=True)(net, t_c, s_c)
    loss_e = rollout(net_eager, t_e, s_e)
    loss_c.backward()
    loss_e.backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_c, loss_e, **tol)
    torch.testing.assert_close(s_c.grad, s_e.grad, **tol)
    torch.testing.assert_close(t_c.grad, t_e.grad, **tol)
    for (name, a), b in zip(net.named_parameters(), net_eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **tol, msg=lambda m, name=name: f"{name}\n{m}")


def test_compile_dynamic_number_of_coordinates(gen):
    """One compiled function for several n (the fake kernels propagate the symbolic size)."""
    net = make_net(H, L, gen=gen, backend="native")
    compiled = torch.compile(lambda g, s: net(g, s), fullgraph=True, dynamic=True)
    for n in (5, 11, 0, 64):
        grad, state, _ = sample(gen, torch.float64, n)
        with torch.no_grad():
            got, expected = compiled(grad, state), net(grad, state)
        assert got[0].shape == (n,) and got[1].shape == (L, 2, H, n)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


def test_compile_raw_ops(gen):
    grad, state, weights = sample(gen, torch.float64)

    def fn(grad, state, param):
        update, new_state = ops.lstm_step(grad, state, weights, P, SCALE)
        ops.lstm_step_(param, grad, state, weights, P, SCALE)
        return update, new_state

    param = torch.zeros(grad.shape[0], dtype=torch.float64)
    state_c = state.clone()
    update, new_state = torch.compile(fn, fullgraph=True)(grad, state_c, param)
    e_update, e_state = ops.lstm_step(grad, state, weights, P, SCALE)
    torch.testing.assert_close(update, e_update, rtol=0, atol=0)
    torch.testing.assert_close(new_state, e_state, rtol=0, atol=0)
    torch.testing.assert_close(param, e_update, rtol=0, atol=0)
    torch.testing.assert_close(state_c, e_state, rtol=0, atol=0)
