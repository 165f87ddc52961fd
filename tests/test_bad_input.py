"""Bad input fails early with an error that names the argument: through the module front (Python
checks in l2l_fast/checks.py) and through the raw torch.ops.l2l_fast.* ops (the C++ checks). The running
moments (given exactly when the features read them) and `output` fail with the same message on every
front: the C++ ops, their fake kernels' Python mirror, the reference and the net."""
from __future__ import annotations

import pytest
import torch

from conftest import (FEATURE_SETS, feature_id, make_net, moments_for, random_grad, random_state, random_weights,
                      requires_native)
from l2l_fast import CoordinatewiseLSTM, checks, reference
from l2l_fast import features as registry

H, L, N = 4, 2, 9
ERRORS = (ValueError, TypeError, RuntimeError)
META = torch.device("meta")


def arg(name):
    """match= pattern for a message naming the argument `name` (not as part of a longer identifier)."""
    return rf"(?<![\w.]){name}(?!\w)"


# ---------------------------------------------------------------------------------------------
# module front
BACKENDS = ["reference", pytest.param("native", marks=requires_native)]


def good(gen, net, n=N):
    dtype = net.out.weight.dtype
    return (torch.randn(n, generator=gen, dtype=torch.float64).to(dtype),  # param
            random_grad(n, gen=gen, dtype=dtype),
            random_state(net.num_layers, net.hidden_size, n, gen=gen, dtype=dtype))


def sparse(t):
    return t.to_sparse()


BAD_GRAD = {
    "2d": lambda g: g[:, None],
    "0d": lambda g: g[0],
    "float16": lambda g: g.half(),
    "int64": lambda g: g.long(),
    "float32": lambda g: g.float(),
    "complex": lambda g: g.to(torch.complex128),
    "sparse": sparse,
    "meta": lambda g: g.to(META),
    "list": lambda g: g.tolist(),
}
BAD_STATE = {
    "3d": lambda s: s[0],
    "5d": lambda s: s[None],
    "other_n": lambda s: torch.cat([s, s[..., :1]], dim=-1),
    "fewer_n": lambda s: s[..., :-1],
    "other_hidden_size": lambda s: torch.zeros(L, 2, H + 1, N, dtype=s.dtype),
    "other_num_layers": lambda s: torch.zeros(L + 1, 2, H, N, dtype=s.dtype),
    "hc_axis_3": lambda s: torch.zeros(L, 3, H, N, dtype=s.dtype),
    "float32": lambda s: s.float(),
    "int64": lambda s: s.long(),
    "complex": lambda s: s.to(torch.complex128),
    "sparse": sparse,
    "meta": lambda s: s.to(META),
}
BAD_PARAM = {
    "2d": lambda p: p[:, None],
    "other_n": lambda p: torch.cat([p, p[:1]]),
    "float16": lambda p: p.half(),
    "int64": lambda p: p.long(),
    "complex": lambda p: p.to(torch.complex128),
    "sparse": sparse,
    "meta": lambda p: p.to(META),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD_GRAD)
def test_module_rejects_bad_grad(gen, backend, bad):
    net = make_net(H, L, gen=gen, backend=backend)
    param, grad, state = good(gen, net)
    with pytest.raises(ERRORS, match=arg("grad")):
        net(BAD_GRAD[bad](grad), state)
    with pytest.raises(ERRORS, match=arg("grad")):
        net.step_(param, BAD_GRAD[bad](grad), state)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD_STATE)
def test_module_rejects_bad_state(gen, backend, bad):
    net = make_net(H, L, gen=gen, backend=backend)
    param, grad, state = good(gen, net)
    state_before, param_before = state.clone(), param.clone()
    with pytest.raises(ERRORS, match=arg("state")):
        net(grad, BAD_STATE[bad](state))
    with pytest.raises(ERRORS, match=arg("state")):
        net.step_(param, grad, BAD_STATE[bad](state))
    assert torch.equal(param, param_before) and torch.equal(state, state_before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD_PARAM)
def test_module_rejects_bad_param(gen, backend, bad):
    net = make_net(H, L, gen=gen, backend=backend)
    param, grad, state = good(gen, net)
    state_before = state.clone()
    with pytest.raises(ERRORS, match=arg("param")):
        net.step_(BAD_PARAM[bad](param), grad, state)
    assert torch.equal(state, state_before), "a rejected step_ must not advance the state"


@pytest.mark.parametrize("other", [dict(hidden_size=H + 3, num_layers=L), dict(hidden_size=H, num_layers=L + 1),
                                   dict(hidden_size=H, num_layers=1)], ids=["other_hidden_size", "more_layers",
                                                                            "fewer_layers"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_rejects_state_of_another_net(gen, backend, other):
    net = make_net(H, L, gen=gen, backend=backend)
    other_net = CoordinatewiseLSTM(**other, backend=backend).double()
    param, grad, _ = good(gen, net)
    with pytest.raises(ValueError, match=arg("state")):
        net(grad, other_net.init_state(N))
    with pytest.raises(ValueError, match=arg("state")):
        net.step_(param, grad, other_net.init_state(N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_rejects_state_for_another_parameter(gen, backend):
    net = make_net(H, L, gen=gen, backend=backend)
    param, grad, _ = good(gen, net)
    with pytest.raises(ValueError, match=arg("state")):
        net(grad, net.init_state(N + 1))
    with pytest.raises(ValueError, match=arg("state")):
        net.step_(param, grad, net.init_state(2 * N))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_rejects_unsupported_weight_dtype(gen, backend, dtype):
    net = CoordinatewiseLSTM(H, L, backend=backend).to(dtype)
    grad, state = random_grad(N, gen=gen, dtype=dtype), net.init_state(N)
    with pytest.raises(TypeError, match="weights"):
        net(grad, state)


@pytest.mark.parametrize("kwargs,name", [
    (dict(hidden_size=0), "hidden_size"), (dict(hidden_size=2.5), "hidden_size"), (dict(num_layers=0), "num_layers"),
    (dict(preprocess_p=0.0), "preprocess_p"), (dict(preprocess_p=-1.0), "preprocess_p"),
    (dict(backend="cuda"), "backend"), (dict(features=()), "features"), (dict(features=("no such",)), "features"),
    (dict(features=0), "features"), (dict(features=registry.ALL_MASK + 1), "features"),
    (dict(output="sigmoid"), "output"), (dict(output=1), "output"), (dict(output=None), "output")],
    ids=lambda v: str(v) if isinstance(v, str) else None)
def test_module_rejects_bad_constructor_arguments(kwargs, name):
    with pytest.raises(ValueError, match=arg(name)):
        CoordinatewiseLSTM(**kwargs)


def test_init_state_rejects_negative_n():
    with pytest.raises(ValueError, match=arg("n")):
        CoordinatewiseLSTM(H, L).init_state(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr, error", [(float("nan"), ValueError), (float("inf"), ValueError), ("1", TypeError),
                                       (None, TypeError)], ids=["nan", "inf", "str", "None"])
def test_multi_step_rejects_a_bad_lr_by_name(gen, backend, lr, error):
    """Regression: net.multi_step_ with lr NaN or Inf was refused as "output_scale: expected a finite number" (the
    op's scale is output_scale * lr), a string lr as "can't multiply sequence by non-int of type 'float'"."""
    net = make_net(H, L, gen=gen, backend=backend)
    param, state = torch.zeros(N, dtype=torch.float64), net.init_state(N)
    with pytest.raises(error, match=arg("lr")):
        net.multi_step_([param], [random_grad(N, gen=gen)], state, lr)
    assert torch.equal(param, torch.zeros(N, dtype=torch.float64)) and not state.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_zero_coordinates_return_empties(gen, backend):
    net = make_net(H, L, gen=gen, backend=backend)
    update, new_state = net(torch.empty(0, dtype=torch.float64), net.init_state(0))
    assert update.shape == (0,) and new_state.shape == (L, 2, H, 0)
    param, state = torch.empty(0, dtype=torch.float64), net.init_state(0)
    net.step_(param, torch.empty(0, dtype=torch.float64), state)
    assert param.shape == (0,) and state.shape == (L, 2, H, 0)


# ---------------------------------------------------------------------------------------------
# raw ops: the C++ checks
def raw_inputs(gen, n=N, dtype=torch.float64, features=1):
    weights = random_weights(H, L, gen=gen, dtype=dtype, features=features)
    grad = random_grad(n, gen=gen, dtype=dtype)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    param = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    return param, grad, state, weights


def call_op(which, param, grad, state, weights, p=10.0, scale=0.1, features=1, grad_update=None,
            grad_new_state=None, moments=None, output=0):
    extra = (features, moments, output)
    if which == "lstm_step":
        return torch.ops.l2l_fast.lstm_step(grad, state, weights, p, scale, *extra)
    if which == "lstm_step_":
        return torch.ops.l2l_fast.lstm_step_(param, grad, state, weights, p, scale, *extra)
    # the backward with good upstream gradients shaped like the (good) outputs unless given
    grad_update = torch.ones(N, dtype=torch.float64) if grad_update is None else grad_update
    grad_new_state = torch.ones(L, 2, H, N, dtype=torch.float64) if grad_new_state is None else grad_new_state
    return torch.ops.l2l_fast.lstm_step_backward(grad_update, grad_new_state, grad, state, weights, p, scale, *extra)


def check_op(which, param, grad, state, weights, p=10.0, scale=0.1, features=1, grad_update=None,
             grad_new_state=None, moments=None, output=0):
    """The op's Python validator (l2l_fast.checks, run by its fake kernel) on call_op's arguments."""
    extra = (p, scale, moments, output)
    if which == "lstm_step":
        return checks.check_step_args(grad, state, weights, features, *extra)
    if which == "lstm_step_":
        return checks.check_inplace_args(param, grad, state, weights, features, *extra)
    grad_update = torch.ones(N, dtype=torch.float64) if grad_update is None else grad_update
    grad_new_state = torch.ones(L, 2, H, N, dtype=torch.float64) if grad_new_state is None else grad_new_state
    return checks.check_backward_args(grad_update, grad_new_state, grad, state, weights, features, *extra)


def reference_op(which, param, grad, state, weights, p=10.0, scale=0.1, features=1, moments=None, output=0):
    """The reference's function of the op (for the backward, the forward: it checks the same arguments)."""
    if which == "lstm_step_":
        return reference.lstm_step_(param, grad, state, weights, p, scale, features, moments, output)
    return reference.lstm_step(grad, state, weights, p, scale, features, moments, output)


OPS = [pytest.param(op, marks=requires_native) for op in ("lstm_step", "lstm_step_", "lstm_step_backward")]

RAW_BAD_GRAD = {k: v for k, v in BAD_GRAD.items() if k not in ("list", "sparse")}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", RAW_BAD_GRAD)
def test_op_rejects_bad_grad(gen, op, bad):
    param, grad, state, weights = raw_inputs(gen)
    with pytest.raises(ERRORS, match=arg("grad")):
        call_op(op, param, RAW_BAD_GRAD[bad](grad), state, weights)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", [k for k in BAD_STATE if k != "sparse"])
def test_op_rejects_bad_state(gen, op, bad):
    param, grad, state, weights = raw_inputs(gen)
    with pytest.raises(ERRORS, match=arg("state")):
        call_op(op, param, grad, BAD_STATE[bad](state), weights)


@pytest.mark.parametrize("bad", [k for k in BAD_PARAM if k != "sparse"])
@requires_native
def test_op_rejects_bad_param(gen, bad):
    param, grad, state, weights = raw_inputs(gen)
    state_before = state.clone()
    with pytest.raises(ERRORS, match=arg("param")):
        torch.ops.l2l_fast.lstm_step_(BAD_PARAM[bad](param), grad, state, weights, 10.0, 0.1)
    assert torch.equal(state, state_before)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("where", ["grad", "state"])
def test_op_rejects_sparse(gen, op, where):
    """A sparse tensor has no kernel: the dispatcher refuses it before the C++ checks, naming the
    sparse backend; a dense-only op may answer that way instead of naming the argument."""
    param, grad, state, weights = raw_inputs(gen)
    args = dict(param=param, grad=grad, state=state, weights=weights)
    args[where] = args[where].to_sparse()
    with pytest.raises((*ERRORS, NotImplementedError), match=rf"{arg(where)}|Sparse"):
        call_op(op, **args)


def replace(weights, index, value):
    weights = list(weights)
    weights[index] = value
    return weights


BAD_WEIGHTS = {
    "empty": (lambda w: [], r"weights"),
    "one_short": (lambda w: w[:-1], r"weights"),
    "one_layer_group_short": (lambda w: w[:4] + w[5:], r"weights"),
    "one_extra": (lambda w: w + [w[-1]], r"weights"),
    "w_ih_wrong_inputs": (lambda w: replace(w, 0, torch.zeros(4 * H, 3, dtype=w[0].dtype)), r"weights\[0\]"),
    "w_hh_wrong_shape": (lambda w: replace(w, 1, torch.zeros(4 * H, H + 1, dtype=w[0].dtype)), r"weights\[1\]"),
    "b_ih_wrong_shape": (lambda w: replace(w, 2, torch.zeros(3 * H, dtype=w[0].dtype)), r"weights\[2\]"),
    "b_hh_2d": (lambda w: replace(w, 3, torch.zeros(1, 4 * H, dtype=w[0].dtype)), r"weights\[3\]"),
    "layer1_w_ih_wrong": (lambda w: replace(w, 4, torch.zeros(4 * H, 2, dtype=w[0].dtype)), r"weights\[4\]"),
    "out_weight_wrong": (lambda w: replace(w, -2, torch.zeros(2, H, dtype=w[0].dtype)), r"weights"),
    "out_weight_other_hidden_size": (lambda w: replace(w, -2, torch.zeros(1, H + 1, dtype=w[0].dtype)), r"weights"),
    "out_bias_wrong": (lambda w: replace(w, -1, torch.zeros(2, dtype=w[0].dtype)), r"weights"),
    "w_hh_float32": (lambda w: replace(w, 1, w[1].float()), r"weights\[1\]"),
    "b_ih_int64": (lambda w: replace(w, 2, w[2].long()), r"weights\[2\]"),
    "out_bias_complex": (lambda w: replace(w, -1, w[-1].to(torch.complex128)), r"weights\[(9|-1)\]"),
    "w_ih_meta": (lambda w: replace(w, 0, w[0].to(META)), r"weights\[0\]"),
    "all_meta": (lambda w: [t.to(META) for t in w], r"weights"),
    "w_hh_sparse": (lambda w: replace(w, 1, w[1].to_sparse()), r"weights\[1\]|Sparse"),
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", BAD_WEIGHTS)
def test_op_rejects_bad_weights(gen, op, bad):
    param, grad, state, weights = raw_inputs(gen)
    make_bad, pattern = BAD_WEIGHTS[bad]
    with pytest.raises((*ERRORS, NotImplementedError), match=pattern):
        call_op(op, param, grad, state, make_bad(weights))


@pytest.mark.parametrize("bad", ["grad_update", "grad_new_state"])
@pytest.mark.parametrize("how", ["shape", "dtype", "meta"])
@requires_native
def test_backward_op_rejects_bad_upstream(gen, bad, how):
    _, grad, state, weights = raw_inputs(gen)
    upstream = dict(grad_update=torch.ones(N, dtype=torch.float64),
                    grad_new_state=torch.ones(L, 2, H, N, dtype=torch.float64))
    t = upstream[bad]
    upstream[bad] = {"shape": t[..., :-1], "dtype": t.float(), "meta": t.to(META)}[how]
    with pytest.raises(ERRORS, match=arg(bad)):
        torch.ops.l2l_fast.lstm_step_backward(upstream["grad_update"], upstream["grad_new_state"], grad, state,
                                              weights, 10.0, 0.1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@requires_native
def test_ops_zero_coordinates_return_empties(gen, dtype):
    param, grad, state, weights = raw_inputs(gen, n=0, dtype=dtype)
    update, new_state = torch.ops.l2l_fast.lstm_step(grad, state, weights, 10.0, 0.1)
    assert update.shape == (0,) and new_state.shape == (L, 2, H, 0) and update.dtype == dtype
    torch.ops.l2l_fast.lstm_step_(param, grad, state, weights, 10.0, 0.1)
    d_grad, d_state, d_weights = torch.ops.l2l_fast.lstm_step_backward(
        torch.empty(0, dtype=dtype), torch.empty(L, 2, H, 0, dtype=dtype), grad, state, weights, 10.0, 0.1)
    assert d_grad.shape == (0,) and d_state.shape == (L, 2, H, 0)
    assert all(dw.shape == w.shape and torch.count_nonzero(dw) == 0 for dw, w in zip(d_weights, weights))


# ---------------------------------------------------------------------------------------------
# features: the mask and the weights it asks for
BAD_FEATURES = {  # name: (features, weights of which input width, argument named)
    "zero": (lambda f: 0, lambda f: registry.input_size(f), "features"),
    "negative": (lambda f: -f, lambda f: registry.input_size(f), "features"),
    "unknown_bit": (lambda f: f | (registry.ALL_MASK + 1), lambda f: registry.input_size(f), "features"),
    "w_ih_one_wider": (lambda f: f, lambda f: registry.input_size(f) + 1, r"weights\[0\]"),
    "w_ih_one_narrower": (lambda f: f, lambda f: registry.input_size(f) - 1, r"weights\[0\]"),
}


def with_input_width(weights, width, gen):
    """weights with weight_ih_l0 replaced by one of `width` inputs."""
    return replace(weights, 0, torch.randn(4 * H, width, generator=gen, dtype=weights[0].dtype))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", BAD_FEATURES)
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_op_rejects_bad_features(gen, op, bad, features):
    """A mask with no feature or an unknown bit, or weights whose weight_ih_l0 does not take the mask's inputs:
    a ValueError naming the argument, and nothing modified."""
    param, grad, state, weights = raw_inputs(gen, features=features)
    mask_of, width_of, name = BAD_FEATURES[bad]
    weights = with_input_width(weights, width_of(features), gen)
    before = param.clone(), state.clone()
    with pytest.raises(ValueError, match=arg(name)):
        call_op(op, param, grad, state, weights, features=mask_of(features),
                moments=moments_for(features, grad, gen=gen))
    assert torch.equal(param, before[0]) and torch.equal(state, before[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_module_takes_its_features(gen, backend, features):
    """A net made for a feature set builds weight_ih_l0 for it and steps with it; its state_dict does not load
    into a net of another input width."""
    net = make_net(H, L, gen=gen, backend=backend, features=features)
    assert net.lstm.weight_ih_l0.shape == (4 * H, registry.input_size(features))
    assert net.features == registry.names_of(features) and net.size_kwargs()["features"] == net.features
    param, grad, state = good(gen, net)
    moments = net.init_moments(N)
    update, new_state = net(grad, state, net.advance_moments(grad, moments))
    net.step_(param, grad, state, moments)
    assert torch.equal(state, new_state)
    other = CoordinatewiseLSTM(H, L, backend=backend)
    other.lstm.weight_ih_l0 = torch.nn.Parameter(torch.zeros(4 * H, registry.input_size(features) + 1))
    with pytest.raises(RuntimeError, match="weight_ih_l0"):
        other.load_state_dict(net.state_dict())


# ---------------------------------------------------------------------------------------------
# the moments and the output: one message on every front
BAD_MOMENTS = {  # name: (for feature sets that read moments or for those that read none, good moments, grad -> bad)
    "missing": (True, lambda m, g: None),
    "extra": (False, lambda m, g: torch.zeros(registry.MOMENT_ROWS, g.shape[0], dtype=g.dtype)),
    "one_more_column": (True, lambda m, g: torch.zeros(registry.MOMENT_ROWS, g.shape[0] + 1, dtype=g.dtype)),
    "one_less_column": (True, lambda m, g: m[:, 1:]),
    "two_rows": (True, lambda m, g: m[:2]),
    "three_rows": (True, lambda m, g: m[:3]),  # the layout before the long moment u
    "transposed": (True, lambda m, g: m.t().contiguous()),
    "1d": (True, lambda m, g: m.flatten()),
    "float32": (True, lambda m, g: m.float()),
    "float16": (True, lambda m, g: m.half()),
    "int64": (True, lambda m, g: m.long()),
    "complex": (True, lambda m, g: m.to(torch.complex128)),
    "meta": (True, lambda m, g: m.to(META)),
}
BAD_OUTPUTS = [2, -1, 7]


def applies(bad: str, features: int) -> bool:
    return BAD_MOMENTS[bad][0] == registry.reads_moments(features)


def moments_case(bad: str, features: int, grad, gen):
    """The moments of case `bad` for the feature set; the good ones (None where it reads none) where the case
    does not apply."""
    moments = moments_for(features, grad, gen=gen)
    return BAD_MOMENTS[bad][1](moments, grad) if applies(bad, features) else moments


MOMENT_CASES = [pytest.param(features, bad, id=f"{feature_id(features)}-{bad}")
                for features in FEATURE_SETS for bad in BAD_MOMENTS if applies(bad, features)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("features,bad", MOMENT_CASES)
def test_op_rejects_bad_moments(gen, op, features, bad):
    """Moments missing for features that read them, given to features that read none, or of another shape,
    dtype or device: an error naming `moments`, and nothing modified."""
    param, grad, state, weights = raw_inputs(gen, features=features)
    before = param.clone(), state.clone()
    with pytest.raises(ERRORS, match=arg("moments")):
        call_op(op, param, grad, state, weights, features=features, moments=moments_case(bad, features, grad, gen))
    assert torch.equal(param, before[0]) and torch.equal(state, before[1])


@pytest.mark.parametrize("features", [f for f in FEATURE_SETS if registry.reads_moments(f)], ids=feature_id)
@requires_native
def test_inplace_op_rejects_expanded_moments(gen, features):
    param, grad, state, weights = raw_inputs(gen, features=features)
    # elements sharing memory: refused by the in-place ops, which write them; data to the functional ones
    moments = moments_for(features, grad, gen=gen)[:, :1].expand(registry.MOMENT_ROWS, N)
    update, _ = torch.ops.l2l_fast.lstm_step(grad, state, weights, 10.0, 0.1, features, moments)
    assert update.shape == (N,), "the functional op reads them as data"
    before = moments.clone()
    for refuse in (lambda: torch.ops.l2l_fast.lstm_step_(param, grad, state, weights, 10.0, 0.1, features, moments),
                   lambda: checks.check_inplace_args(param, grad, state, weights, features, 10.0, 0.1, moments),
                   lambda: reference.lstm_step_(param, grad, state, weights, 10.0, 0.1, features, moments)):
        with pytest.raises(ValueError, match="^moments: elements share memory"):
            refuse()
    assert torch.equal(moments, before)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("output", BAD_OUTPUTS)
def test_op_rejects_bad_output(gen, op, output):
    param, grad, state, weights = raw_inputs(gen)
    before = param.clone(), state.clone()
    with pytest.raises(ValueError, match=rf"^output: expected 0 .* or 1 .*, got {output}$"):
        call_op(op, param, grad, state, weights, output=output)
    assert torch.equal(param, before[0]) and torch.equal(state, before[1])


C10_DTYPE_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
                   torch.int64: "Long", torch.complex128: "ComplexDouble"}


def as_cpp_message(error: BaseException) -> str:
    """The message with torch's dtype names written as c10 writes them (torch.float32 -> Float)."""
    text = str(error)
    for dtype, name in C10_DTYPE_NAMES.items():
        text = text.replace(str(dtype), name)
    return text


OUTPUT_CASES = [pytest.param(f, f"output={o}", id=f"{feature_id(f)}-output={o}") for f in FEATURE_SETS for o in BAD_OUTPUTS]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("features,bad", MOMENT_CASES + OUTPUT_CASES)
def test_moments_and_output_messages_agree(gen, op, features, bad):
    """The C++ ops, their Python mirror (the fake kernels') and the reference raise the same error, word for word
    (dtype names aside: torch.float32 is Float in c10)."""
    param, grad, state, weights = raw_inputs(gen, features=features)
    if bad.startswith("output="):
        moments, output = moments_for(features, grad, gen=gen), int(bad.split("=")[1])
    else:
        moments, output = moments_case(bad, features, grad, gen), 0
    args = dict(param=param, grad=grad, state=state, weights=weights, features=features, moments=moments,
                output=output)
    messages = []
    for front in (call_op, check_op, reference_op):
        with pytest.raises(ERRORS) as error:
            front(op, **args)
        messages.append((type(error.value), as_cpp_message(error.value)))
    assert messages[0] == messages[1] == messages[2], messages


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("features,bad", MOMENT_CASES)
def test_module_rejects_bad_moments(gen, backend, features, bad):
    """The net's forward and step_: the same checks, before anything is written."""
    net = make_net(H, L, gen=gen, backend=backend, features=features)
    param, grad, state = good(gen, net)
    moments = moments_case(bad, features, grad, gen)
    before = param.clone(), state.clone()
    with pytest.raises(ERRORS, match=arg("moments")):
        net(grad, state, moments)
    with pytest.raises(ERRORS, match=arg("moments")):
        net.step_(param, grad, state, moments)
    assert torch.equal(param, before[0]) and torch.equal(state, before[1])


# ---------------------------------------------------------------------------------------------
# the Python validators (fake kernels) and the C++ ones fail the same way
def _named(error: BaseException) -> str:
    """The argument an error message names first: the text before its first ':'."""
    return str(error).split(":")[0].strip()


def _cases():
    """name: function of (inputs dict, gen) -> the bad inputs dict, for every bad real (non-meta, dense) input."""
    cases = {}
    for key, fn in RAW_BAD_GRAD.items():
        if key != "meta":
            cases[f"grad-{key}"] = lambda a, g, fn=fn: {**a, "grad": fn(a["grad"])}
    for key, fn in BAD_STATE.items():
        if key not in ("meta", "sparse"):
            cases[f"state-{key}"] = lambda a, g, fn=fn: {**a, "state": fn(a["state"])}
    for key, fn in BAD_PARAM.items():
        if key not in ("meta", "sparse"):
            cases[f"param-{key}"] = lambda a, g, fn=fn: {**a, "param": fn(a["param"])}
    for key, (fn, _) in BAD_WEIGHTS.items():
        if "meta" not in key and "sparse" not in key:
            cases[f"weights-{key}"] = lambda a, g, fn=fn: {**a, "weights": fn(a["weights"])}
    for which in ("grad_update", "grad_new_state"):
        cases[f"{which}-shape"] = lambda a, g, w=which: {**a, w: torch.ones(N - 1, dtype=torch.float64)
                                                          if w == "grad_update"
                                                          else torch.ones(L, 2, H, N - 1, dtype=torch.float64)}
        cases[f"{which}-dtype"] = lambda a, g, w=which: {**a, w: torch.ones(N) if w == "grad_update"
                                                          else torch.ones(L, 2, H, N)}
    for key, (mask_of, width_of, _) in BAD_FEATURES.items():
        cases[f"features-{key}"] = lambda a, g, m=mask_of, w=width_of: {
            **a, "features": m(a["features"]), "weights": with_input_width(a["weights"], w(a["features"]), g)}
    for key in BAD_MOMENTS:  # for a feature set the case does not apply to, the good moments: both accept
        if key != "meta":
            cases[f"moments-{key}"] = lambda a, g, k=key: {**a, "moments": moments_case(k, a["features"], a["grad"], g)}
    for output in BAD_OUTPUTS:
        cases[f"output-{output}"] = lambda a, g, o=output: {**a, "output": o}
    return cases


AGREE_CASES = _cases()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", AGREE_CASES)
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_python_checks_agree(gen, op, bad, features):
    """Each op's Python validator (l2l_fast.checks, its fake kernel's) raises the C++ validator's error type,
    naming the same argument first, or both accept."""
    param, grad, state, weights = raw_inputs(gen, features=features)
    args = AGREE_CASES[bad](dict(param=param, grad=grad, state=state, weights=weights, features=features,
                                 moments=moments_for(features, grad, gen=gen)), gen)
    errors = []
    for fn in (call_op, check_op):
        try:
            fn(op, **args)
            errors.append(None)
        except (*ERRORS, NotImplementedError) as error:
            errors.append(error)
    cpp, python = errors
    if cpp is None or python is None:
        assert cpp is None and python is None, f"C++: {cpp!r}, Python: {python!r}"
        return
    assert (type(cpp), _named(cpp)) == (type(python), _named(python)), f"C++: {cpp!r}\nPython: {python!r}"
