"""Op registration (torch.library.opcheck) and the torch.compile path (fullgraph, inductor), for every set of input
features (with the running moments where they are read) and output kind."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import (DTYPE_IDS, VARIANTS, VARIANTS_ONCE_EACH, make_net, moments_for, random_grad, random_state,
                      random_weights, requires_native, variant_id)
from l2l_fast import features as registry
from l2l_fast import ops
from tolerances import assert_moments_advanced

pytestmark = requires_native

DTYPES = [torch.float64, torch.float32]
H, L, P, SCALE = 3, 2, 10.0, 0.1


def sample(gen, dtype, n=7, features=1):
    """grad (a NaN at 4), state, weights, and the moments (advanced with grad) when the features read them."""
    grad = random_grad(n, gen=gen, dtype=dtype, p=P)
    if n >= 5:
        grad[4] = math.nan  # the masked path is part of the op's behaviour under test too
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random", features=features)
    return grad, state, weights, moments_for(features, grad, gen=gen)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# opcheck
REQUIRES_GRAD = {"none": (), "all": ("grad", "state", "weights"), "weights": ("weights",), "state": ("state",)}


# The trailing arguments (features, moments, output) all given, and in the short form without the trailing ones
# equal to their defaults (the dispatcher drops those: the autograd formula and the fake kernels must take both;
# paper + linear in the short form is the call with every default).
TRAILING_DEFAULTS = (1, None, 0)
ARG_FORMS = [pytest.param(variant, short, id=f"{variant_id(variant)}-{'short' if short else 'full'}")
             for variant in VARIANTS for short in (False, True)]


def trailing(variant, moments, short):
    """(features, moments, output) as the call passes them."""
    features, output = variant
    args = (features, moments, output)
    while short and args and not isinstance(args[-1], torch.Tensor) and args[-1] == TRAILING_DEFAULTS[len(args) - 1]:
        args = args[:-1]
    return args


@pytest.mark.parametrize("variant,short", ARG_FORMS)
@pytest.mark.parametrize("requires_grad", REQUIRES_GRAD)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [7, 0], ids=lambda n: f"n{n}")
def test_opcheck_lstm_step(gen, dtype, requires_grad, n, variant, short):
    grad, state, weights, moments = sample(gen, dtype, n, variant[0])
    which = REQUIRES_GRAD[requires_grad]
    grad.requires_grad_("grad" in which)
    state.requires_grad_("state" in which)
    for w in weights:
        w.requires_grad_("weights" in which)
    torch.library.opcheck(torch.ops.l2l_fast.lstm_step.default,
                          (grad, state, weights, P, SCALE, *trailing(variant, moments, short)))


@pytest.mark.parametrize("variant,short", ARG_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [7, 0], ids=lambda n: f"n{n}")
def test_opcheck_lstm_step_backward(gen, dtype, n, variant, short):
    grad, state, weights, moments = sample(gen, dtype, n, variant[0])
    grad_update = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    grad_new_state = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(dtype)
    torch.library.opcheck(torch.ops.l2l_fast.lstm_step_backward.default,
                          (grad_update, grad_new_state, grad, state, weights, P, SCALE,
                           *trailing(variant, moments, short)))


@pytest.mark.parametrize("variant,short", ARG_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [7, 0], ids=lambda n: f"n{n}")
def test_opcheck_lstm_step_inplace(gen, dtype, n, variant, short):
    grad, state, weights, moments = sample(gen, dtype, n, variant[0])
    param = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    torch.library.opcheck(torch.ops.l2l_fast.lstm_step_.default,
                          (param, grad, state, weights, P, SCALE, *trailing(variant, moments, short)))


def test_schemas_mark_the_mutated_arguments():
    schema = torch.ops.l2l_fast.lstm_step_.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["param", "state", "moments"]
    assert len(schema.returns) == 0
    for op in (torch.ops.l2l_fast.lstm_step.default, torch.ops.l2l_fast.lstm_step_backward.default):
        assert not any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments), op


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
@pytest.mark.parametrize("variant", VARIANTS_ONCE_EACH, ids=variant_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_compile_forward(gen, dtype, variant):
    features, output = variant
    net = make_net(H, L, gen=gen, dtype=dtype, backend="native", features=features, output=output)
    grad, state, _, moments = sample(gen, dtype, n=37, features=features)

    def fn(grad, state, moments):
        update, new_state = net(grad, state, moments)
        return update * 2, new_state

    compiled = torch.compile(fn, fullgraph=True)
    with torch.no_grad():
        got = compiled(grad, state, moments)
        expected = fn(grad, state, moments)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS_ONCE_EACH, ids=variant_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_compile_step_inplace(gen, dtype, variant):
    features, output = variant
    net = make_net(H, L, gen=gen, dtype=dtype, backend="native", features=features, output=output)
    grad, state, _, moments = sample(gen, dtype, n=37, features=features)
    param = torch.randn(37, generator=gen, dtype=torch.float64).to(dtype)
    param_eager, state_eager = param.clone(), state.clone()
    moments_eager = None if moments is None else moments.clone()

    def fn(param, grad, state, moments):
        net.step_(param, grad, state, moments)

    compiled = torch.compile(fn, fullgraph=True)
    for _ in range(3):  # repeated calls: the mutation happens every time, on the caller's tensors
        compiled(param, grad, state, moments)
        fn(param_eager, grad, state_eager, moments_eager)
        torch.testing.assert_close(param, param_eager, rtol=0, atol=0)
        torch.testing.assert_close(state, state_eager, rtol=0, atol=0)
        torch.testing.assert_close(moments, moments_eager, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS_ONCE_EACH, ids=variant_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_compile_forward_backward_unrolled(gen, dtype, variant):
    """A compiled 3-step rollout whose loss is differentiated (AOTAutograd compiles the backward too); the moments,
    when the net reads them, advanced by the net inside the compiled function."""
    features, output = variant
    net = make_net(H, L, gen=gen, dtype=dtype, backend="native", features=features, output=output)
    net_eager = make_net(H, L, gen=gen, dtype=dtype, backend="native", features=features, output=output)
    net_eager.load_state_dict(net.state_dict())
    n = 37
    grads = [random_grad(n, gen=gen, dtype=dtype, p=P) for _ in range(3)]
    state0 = random_state(L, H, n, gen=gen, dtype=dtype)
    theta0 = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)

    def rollout(model, theta, state):
        moments = model.init_moments(n)
        for g in grads:
            grad = g + 0.01 * theta
            moments = model.advance_moments(grad, moments)
            update, state = model(grad, state, moments)
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


@pytest.mark.parametrize("variant", [(1, 0), VARIANTS_ONCE_EACH[-1]], ids=variant_id)
def test_compile_dynamic_number_of_coordinates(gen, variant):
    """One compiled function for several n (the fake kernels propagate the symbolic size, the moments' too)."""
    features, output = variant
    net = make_net(H, L, gen=gen, backend="native", features=features, output=output)
    compiled = torch.compile(lambda g, s, m: net(g, s, m), fullgraph=True, dynamic=True)
    for n in (5, 11, 0, 64):
        grad, state, _, moments = sample(gen, torch.float64, n, features=features)
        with torch.no_grad():
            got, expected = compiled(grad, state, moments), net(grad, state, moments)
        assert got[0].shape == (n,) and got[1].shape == (L, 2, H, n)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("variant", [(1, 0), VARIANTS_ONCE_EACH[-1]], ids=variant_id)
def test_compile_raw_ops(gen, variant):
    """lstm_step on advanced moments and lstm_step_ advancing `previous` in place, compiled: as eager, bit for bit
    (the in-place step equals the functional one on the moments it advanced)."""
    features, output = variant
    grad, state, weights, previous = sample(gen, torch.float64, features=features)
    moments = None if previous is None else registry.advance_moments(grad, previous)

    def fn(grad, state, param, previous):
        update, new_state = ops.lstm_step(grad, state, weights, P, SCALE, features, moments, output)
        ops.lstm_step_(param, grad, state, weights, P, SCALE, features, previous, output)
        return update, new_state

    param = torch.zeros(grad.shape[0], dtype=torch.float64)
    state_c = state.clone()
    advanced = None if previous is None else previous.clone()
    update, new_state = torch.compile(fn, fullgraph=True)(grad, state_c, param, advanced)
    e_update, e_state = ops.lstm_step(grad, state, weights, P, SCALE, features, moments, output)
    torch.testing.assert_close(update, e_update, rtol=0, atol=0)
    torch.testing.assert_close(new_state, e_state, rtol=0, atol=0)
    if advanced is not None:
        assert_moments_advanced(advanced, grad, moments)
        e_update, e_state = ops.lstm_step(grad, state, weights, P, SCALE, features, advanced, output)
    torch.testing.assert_close(param, e_update, rtol=0, atol=0)
    torch.testing.assert_close(state_c, e_state, rtol=0, atol=0)
