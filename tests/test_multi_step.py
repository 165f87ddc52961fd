"""lstm_multi_step_, the optimizer's one-call step over a list of tensors: against the float64 reference, against
the single-tensor op (bit for bit), 16-bit params and state, strides, NaN/Inf, threads, ISAs, opcheck, compile
and bad input (C++ checks and the fake kernel's Python checks); the running moments [4, sum_k n_k] at the
state's offsets, for feature sets that read them, with either output kind."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import (DTYPE_IDS, FEATURE_SETS, VARIANTS, available_cpu_isas, feature_id, random_grad, random_moments,
                      random_state, random_weights, requires_native, variant_id)
from l2l_fast import features as registry
from l2l_fast import ops, reference
from tolerances import assert_elementwise_close, assert_moments_advanced

pytestmark = requires_native

H, L, P, SCALE = 20, 2, 10.0, 0.1
DTYPES = [torch.float64, torch.float32]
SIZE_LISTS = {"0-1-7-65539": [0, 1, 7, 2**16 + 3], "7": [7], "empty": [], "zeros": [0, 0],
              "many": [3, 4097, 1, 40000, 5, 0, 33]}


def inputs(gen, sizes, dtype, param_dtype=None, state_dtype=None, features=1):
    """params, grads (param_dtype), state [L, 2, H, sum] (state_dtype), weights (dtype): fresh random values."""
    param_dtype, state_dtype = param_dtype or dtype, state_dtype or dtype
    params = [torch.randn(n, generator=gen, dtype=torch.float64).to(param_dtype) for n in sizes]
    grads = [random_grad(n, gen=gen, p=P).to(param_dtype) for n in sizes]
    state = random_state(L, H, sum(sizes), gen=gen).to(state_dtype)
    return params, grads, state, random_weights(H, L, gen=gen, dtype=dtype, features=features)


def moments_of(features, sizes, gen, dtype):
    """Random moments [4, sum(sizes)] in the math dtype when the features read them, else None."""
    return random_moments(sum(sizes), gen=gen, dtype=dtype) if registry.reads_moments(features) else None


def per_tensor(params, grads, state, weights, p=P, scale=SCALE, features=1, moments=None, output=0):
    """The same step tensor by tensor through the single-tensor op lstm_step_, in the weights' dtype;
    16-bit params and a bfloat16 state are widened before and rounded after: returns (params, state, moments)."""
    math_dtype = weights[0].dtype
    out_params, out_state, offset = [], state.clone(), 0
    out_moments = None if moments is None else moments.clone()
    for param, grad in zip(params, grads):
        n = param.shape[0]
        p32 = param.to(math_dtype, copy=True)
        rows = state[..., offset:offset + n].to(math_dtype, copy=True).contiguous()
        columns = None if moments is None else out_moments[:, offset:offset + n].contiguous()
        ops.lstm_step_(p32, grad.to(math_dtype), rows, weights, p, scale, features, columns, output)
        out_params.append(p32.to(param.dtype))
        out_state[..., offset:offset + n] = rows.to(state.dtype)
        if moments is not None:
            out_moments[:, offset:offset + n] = columns
        offset += n
    return out_params, out_state, out_moments


def assert_same(actual, expected, name):
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype and torch.equal(a, e), f"{name}[{k}] differs (max {(a.double() - e.double()).abs().max()})"


# ---------------------------------------------------------------------------------------------
# values
def joined(grads, dtype):
    """The grads as one [sum_k n_k] tensor, the moments' columns."""
    return torch.cat(grads) if grads else torch.empty(0, dtype=dtype)


def copy64(t):
    """A float64 copy, never the tensor itself (.double() of a float64 tensor is): the reference steps it."""
    return None if t is None else t.to(torch.float64, copy=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("sizes", SIZE_LISTS.values(), ids=SIZE_LISTS.keys())
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_matches_reference(gen, dtype, sizes, variant):
    features, output = variant
    params, grads, state, weights = inputs(gen, sizes, dtype, features=features)
    moments = moments_of(features, sizes, gen, dtype)
    ref_params, ref_state, ref_moments = [copy64(p) for p in params], copy64(state), copy64(moments)
    reference.lstm_multi_step_(ref_params, [g.double() for g in grads], ref_state, [w.double() for w in weights], P, SCALE,
                               features, ref_moments, output)
    before = [p.clone() for p in params]
    advanced = None if moments is None else registry.advance_moments(joined(grads, dtype), moments)
    ops.lstm_multi_step_(params, grads, state, weights, P, SCALE, features, moments, output)
    for k, (p, b, e) in enumerate(zip(params, before, ref_params)):
        # the update, so the tolerance scales with it, not with the parameter
        assert_elementwise_close(p.double() - b.double(), e - b.double(), dtype, f"update[{k}]")
    assert_elementwise_close(state, ref_state, dtype, "state")
    if moments is not None:
        assert_moments_advanced(moments, joined(grads, dtype), advanced)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("sizes", SIZE_LISTS.values(), ids=SIZE_LISTS.keys())
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_equals_single_tensor_op(gen, dtype, sizes, variant):
    """Fusing tensors into one call changes nothing: bit for bit the single-tensor op, tensor by tensor (the
    moments too: tensor k's columns at its state offset)."""
    features, output = variant
    params, grads, state, weights = inputs(gen, sizes, dtype, features=features)
    moments = moments_of(features, sizes, gen, dtype)
    expected_params, expected_state, expected_moments = per_tensor(params, grads, state, weights, features=features,
                                                                   moments=moments, output=output)
    ops.lstm_multi_step_(params, grads, state, weights, P, SCALE, features, moments, output)
    assert_same(params, expected_params, "params")
    assert torch.equal(state, expected_state)
    assert moments is None or torch.equal(moments, expected_moments)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["state_f32", "state_bf16"])
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
def test_16bit_params_and_state(gen, param_dtype, state_dtype):
    """16-bit storage, float32 math: widened, stepped, rounded to nearest, i.e. exactly the float32 op's result
    rounded; a bfloat16 state likewise."""
    sizes = [0, 1, 7, 1000, 40000]
    params, grads, state, weights = inputs(gen, sizes, torch.float32, param_dtype, state_dtype)
    expected_params, expected_state, _ = per_tensor(params, grads, state, weights)
    ops.lstm_multi_step_(params, grads, state, weights, P, SCALE)
    assert_same(params, expected_params, "params")
    assert state.dtype == state_dtype and torch.equal(state, expected_state)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["state_f32", "state_bf16"])
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_16bit_params_with_moments(gen, param_dtype, state_dtype):
    """16-bit params and grads, float32 moments (the math dtype): the grads are widened before they advance the
    moments, as the single-tensor float32 op's."""
    sizes, features = [0, 1, 7, 1000], registry.ALL_MASK
    params, grads, state, weights = inputs(gen, sizes, torch.float32, param_dtype, state_dtype, features=features)
    moments = moments_of(features, sizes, gen, torch.float32)
    expected = per_tensor(params, grads, state, weights, features=features, moments=moments, output=1)
    ops.lstm_multi_step_(params, grads, state, weights, P, SCALE, features, moments, 1)
    assert_same(params, expected[0], "params")
    assert torch.equal(state, expected[1]) and torch.equal(moments, expected[2])


def test_mixed_param_dtypes_in_one_call(gen):
    sizes = [5, 300, 17, 2000]
    params, grads, state, weights = inputs(gen, sizes, torch.float32)
    for k, dtype in enumerate([torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]):
        params[k], grads[k] = params[k].to(dtype), grads[k].to(dtype)
    expected_params, expected_state, _ = per_tensor(params, grads, state, weights)
    ops.lstm_multi_step_(params, grads, state, weights, P, SCALE)
    assert_same(params, expected_params, "params")
    assert torch.equal(state, expected_state)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["state_math", "state_bf16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_strided_params_and_grads(gen, dtype, state_dtype):
    """1-D params and grads with strides (every other element, a column): stepped in place through their
    strides, the elements in between untouched; a non-contiguous state is written back."""
    sizes = [7, 1000, 3]
    _, grads, state, weights = inputs(gen, sizes, dtype, state_dtype=state_dtype)
    bases = [torch.randn(3 * n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes]
    params = [b[::3] for b in bases]
    grads = [torch.stack([g, -g], dim=1)[:, 0] for g in grads]  # stride 2
    assert all(p.stride(0) == 3 for p in params) and all(g.stride(0) == 2 for g in grads)
    wide_state = torch.stack([state, -state], dim=-1)  # non-contiguous [L, 2, H, N] view below
    state, beside = wide_state[..., 0], wide_state[..., 1].clone()
    expected_params, expected_state, _ = per_tensor([p.contiguous() for p in params], grads, state.contiguous(),
                                                    weights)
    untouched = [torch.cat([b[1::3], b[2::3]]).clone() for b in bases]
    ops.lstm_multi_step_(params, grads, state, weights, P, SCALE)
    assert_same(params, expected_params, "params")
    assert torch.equal(state, expected_state)
    assert torch.equal(wide_state[..., 1], beside)
    for b, u in zip(bases, untouched):
        assert torch.equal(torch.cat([b[1::3], b[2::3]]), u)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_non_finite_gradients_leave_coordinates_alone(gen, dtype, variant):
    features, output = variant
    sizes = [9, 20000, 4]
    params, grads, state, weights = inputs(gen, sizes, dtype, features=features)
    moments = moments_of(features, sizes, gen, dtype)
    bad = {(0, 2): math.nan, (1, 0): math.inf, (1, 19999): -math.inf, (1, 777): math.nan, (2, 3): math.inf}
    for (k, i), value in bad.items():
        grads[k][i] = value
    before_params, before_state = [p.clone() for p in params], state.clone()
    before_moments = None if moments is None else moments.clone()
    expected_params, expected_state = [p.clone() for p in params], state.clone()
    expected_moments = None if moments is None else moments.clone()
    reference.lstm_multi_step_(expected_params, grads, expected_state, weights, P, SCALE, features, expected_moments,
                               output)
    ops.lstm_multi_step_(params, grads, state, weights, P, SCALE, features, moments, output)
    offsets = [0, 9, 20009]
    for (k, i) in bad:
        assert params[k][i] == before_params[k][i]
        assert torch.equal(state[..., offsets[k] + i], before_state[..., offsets[k] + i])
        assert moments is None or torch.equal(moments[:, offsets[k] + i], before_moments[:, offsets[k] + i])
    if moments is not None:
        assert_moments_advanced(moments, joined(grads, dtype), expected_moments)
    for k, (p, b, e) in enumerate(zip(params, before_params, expected_params)):
        assert_elementwise_close(p.double() - b.double(), e.double() - b.double(), dtype, f"update[{k}]")
    assert_elementwise_close(state, expected_state.double(), dtype, "state")


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["state_math", "state_bf16"])
def test_same_result_for_any_number_of_threads(gen, state_dtype):
    """Chunks of the coordinate range cut tensors anywhere: 1 and several threads give the same bits."""
    sizes = [17000, 1, 30001, 5, 20000]
    params, grads, state, weights = inputs(gen, sizes, torch.float32, state_dtype=state_dtype)
    params[1], grads[1] = params[1].bfloat16(), grads[1].bfloat16()
    params[3], grads[3] = params[3].half(), grads[3].half()
    runs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ps, st = [p.clone() for p in params], state.clone()
            ops.lstm_multi_step_(ps, grads, st, weights, P, SCALE)
            runs.append((ps, st))
    finally:
        torch.set_num_threads(previous)
    for ps, st in runs[1:]:
        assert_same(ps, runs[0][0], "params")
        assert torch.equal(st, runs[0][1])


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_every_instruction_set(gen, cpu_isa, dtype):
    params, grads, state, weights = inputs(gen, [3, 5000, 0, 17], dtype)
    bf = [params[1].bfloat16()], [grads[1].bfloat16()]
    expected_params, expected_state, _ = per_tensor(params, grads, state, weights)
    ops.lstm_multi_step_(params, grads, state, weights, P, SCALE)
    assert_same(params, expected_params, "params")
    assert torch.equal(state, expected_state)
    if dtype == torch.float32:
        bf_state = torch.zeros(L, 2, H, 5000, dtype=torch.bfloat16)
        expected = per_tensor(*bf, bf_state, weights)
        ops.lstm_multi_step_(*bf, bf_state, weights, P, SCALE)
        assert_same(bf[0], expected[0], "bf16 params")
        assert torch.equal(bf_state, expected[1])


# ---------------------------------------------------------------------------------------------
# registration, compile
OPCHECK_CASES = {
    "f64": dict(dtype=torch.float64), "f32": dict(dtype=torch.float32),
    "bf16_params": dict(dtype=torch.float32, param_dtype=torch.bfloat16),
    "f16_params_bf16_state": dict(dtype=torch.float32, param_dtype=torch.float16, state_dtype=torch.bfloat16),
    "f64_bf16_state": dict(dtype=torch.float64, state_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("sizes", [[7, 0, 3], []], ids=["7-0-3", "empty"])
@pytest.mark.parametrize("case", OPCHECK_CASES.values(), ids=OPCHECK_CASES.keys())
@pytest.mark.parametrize("variant", [(1, 0), *VARIANTS[-2:]], ids=variant_id)
def test_opcheck(gen, case, sizes, variant):
    features, output = variant
    params, grads, state, weights = inputs(gen, sizes, **case, features=features)
    if sizes:
        grads[0][2] = math.nan
    moments = moments_of(features, sizes, gen, weights[0].dtype)
    trailing = (features, moments, output) if variant != (1, 0) else ()
    torch.library.opcheck(torch.ops.l2l_fast.lstm_multi_step_.default,
                          (params, grads, state, weights, P, SCALE, *trailing))


def test_schema_marks_params_state_and_moments_mutated():
    schema = torch.ops.l2l_fast.lstm_multi_step_.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["params", "state", "moments"] and len(schema.returns) == 0


@pytest.mark.parametrize("variant", [(1, 0), VARIANTS[-1]], ids=variant_id)
def test_compile_fullgraph(gen, variant):
    features, output = variant
    torch._dynamo.reset()
    params, grads, state, weights = inputs(gen, [7, 0, 300], torch.float32, features=features)
    params[0], grads[0] = params[0].bfloat16(), grads[0].bfloat16()
    moments = moments_of(features, [7, 0, 300], gen, torch.float32)
    eager_params, eager_state = [p.clone() for p in params], state.clone()
    eager_moments = None if moments is None else moments.clone()

    def fn(params, grads, state, moments):
        ops.lstm_multi_step_(params, [g * 2 for g in grads], state, weights, P, SCALE, features, moments, output)

    compiled = torch.compile(fn, fullgraph=True)
    for _ in range(3):
        compiled(params, grads, state, moments)
        fn(eager_params, grads, eager_state, eager_moments)
        assert_same(params, eager_params, "params")
        assert torch.equal(state, eager_state)
        assert moments is None or torch.equal(moments, eager_moments)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# bad input: the C++ checks (real tensors) and the fake kernel's (a meta tensor among them)
ERRORS = (ValueError, TypeError, RuntimeError)


def arg(name):
    return rf"(?<![\w.]){name}"


def _replace(seq, k, value):
    seq = list(seq)
    seq[k] = value
    return seq


BAD = {  # name: (what it does to (params, grads, state, weights), argument named, error type)
    "grads_shorter": (lambda p, g, s, w: (p, g[:-1], s, w), "grads", ValueError),
    "grad_dtype": (lambda p, g, s, w: (p, _replace(g, 1, g[1].float()), s, w), r"grads\[1\]", TypeError),
    "grad_numel": (lambda p, g, s, w: (p, _replace(g, 1, g[1][:-1]), s, w), r"grads\[1\]", ValueError),
    "grad_2d": (lambda p, g, s, w: (p, _replace(g, 0, g[0][:, None]), s, w), r"grads\[0\]", ValueError),
    "grad_sparse": (lambda p, g, s, w: (p, _replace(g, 0, g[0].to_sparse()), s, w), r"grads\[0\]", TypeError),
    "grad_int": (lambda p, g, s, w: (p, _replace(g, 0, g[0].long()), s, w), r"grads\[0\]", TypeError),
    "param_2d": (lambda p, g, s, w: (_replace(p, 1, p[1][:, None]), g, s, w), r"params\[1\]", ValueError),
    "param_complex": (lambda p, g, s, w: (_replace(p, 0, p[0].to(torch.complex128)), g, s, w), r"params\[0\]", TypeError),
    "param_float32": (lambda p, g, s, w: (_replace(p, 0, p[0].float()), g, s, w), r"params\[0\]", TypeError),
    "param_bf16_f64_weights": (lambda p, g, s, w: (_replace(p, 0, p[0].bfloat16()), _replace(g, 0, g[0].bfloat16()), s, w),
                               r"params\[0\]", TypeError),
    "param_expanded": (lambda p, g, s, w: (_replace(p, 1, p[1][:1].expand(p[1].shape[0])), g, s, w), r"params\[1\]",
                       ValueError),
    "state_shape": (lambda p, g, s, w: (p, g, s[..., 1:], w), "state", ValueError),
    "state_hidden": (lambda p, g, s, w: (p, g, torch.zeros(L, 2, H + 1, s.shape[-1], dtype=s.dtype), w), "state",
                     ValueError),
    "state_float16": (lambda p, g, s, w: (p, g, s.half(), w), "state", TypeError),
    "state_float32": (lambda p, g, s, w: (p, g, s.float(), w), "state", TypeError),
    "weights_count": (lambda p, g, s, w: (p, g, s, w[:-1]), "weights", ValueError),
    "weights_dtype": (lambda p, g, s, w: (p, g, s, _replace(w, 3, w[3].float())), r"weights\[3\]", TypeError),
    "weights_shape": (lambda p, g, s, w: (p, g, s, _replace(w, 1, w[1][:, :-1])), r"weights\[1\]", ValueError),
}
BAD_META = {  # the same through the fake kernel: one argument on the meta device
    "grad_meta": (lambda p, g, s, w: (p, _replace(g, 0, g[0].to("meta")), s, w), r"grads\[0\]", ValueError),
    "param_meta": (lambda p, g, s, w: (_replace(p, 2, p[2].to("meta")), g, s, w), r"params\[2\]", ValueError),
    "state_meta": (lambda p, g, s, w: (p, g, s.to("meta"), w), "state", ValueError),
}


@pytest.mark.parametrize("bad", BAD)
def test_rejects_bad_input(gen, bad):
    change, name, error = BAD[bad]
    params, grads, state, weights = inputs(gen, [4, 9, 2], torch.float64)
    before = [p.clone() for p in params], state.clone()
    with pytest.raises(error, match=arg(name)):
        ops.lstm_multi_step_(*change(params, grads, state, weights), P, SCALE)
    assert_same(params, before[0], "params")
    assert torch.equal(state, before[1]), "a rejected call must not change anything"


BAD_FEATURES = {  # name: (features, weight_ih_l0's input width, both functions of the good mask)
    "features_zero": (lambda f: 0, registry.input_size),
    "features_unknown_bit": (lambda f: f | (registry.ALL_MASK + 1), registry.input_size),
    "w_ih_other_width": (lambda f: f, lambda f: registry.input_size(f) + 1),
}


@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
@pytest.mark.parametrize("bad", list(BAD) + list(BAD_META) + list(BAD_FEATURES))
def test_python_checks_agree(gen, bad, features):
    """The fake kernel's checks (l2l_fast.checks.check_multi_step_args) fail the same way as the C++ ones."""
    from l2l_fast.checks import check_multi_step_args

    params, grads, state, weights = inputs(gen, [4, 9, 2], torch.float64, features=features)
    if bad in BAD_FEATURES:
        mask_of, width_of = BAD_FEATURES[bad]
        weights = _replace(weights, 0, torch.zeros(4 * H, width_of(features), dtype=torch.float64))
        args, name, error = (params, grads, state, weights, mask_of(features)), "features", ValueError
        if bad == "w_ih_other_width":
            name = r"weights\[0\]"
    else:
        change, name, error = {**BAD, **BAD_META}[bad]
        args = (*change(params, grads, state, weights), features)
    with pytest.raises(error, match=arg(name)):
        check_multi_step_args(*args)
    if bad not in BAD:  # real tensors: the C++ checks (the meta ones go to the fake kernel)
        before = state.clone()
        with pytest.raises(error if bad in BAD_FEATURES else ERRORS, match=arg(name)):
            ops.lstm_multi_step_(*args[:4], P, SCALE, args[4])
        assert torch.equal(state, before)


MULTI_BAD_MOMENTS = {  # name: (for feature sets that read moments or for those that read none, good, total -> bad)
    "missing": (True, lambda m, total: None),
    "extra": (False, lambda m, total: torch.zeros(registry.MOMENT_ROWS, total, dtype=torch.float64)),
    "one_more_column": (True, lambda m, total: torch.zeros(registry.MOMENT_ROWS, total + 1, dtype=torch.float64)),
    "first_tensor_only": (True, lambda m, total: m[:, :4]),
    "two_rows": (True, lambda m, total: m[:2]),
    "float32": (True, lambda m, total: m.float()),
    "bfloat16": (True, lambda m, total: m.bfloat16()),
    "meta": (True, lambda m, total: m.to("meta")),
    "expanded": (True, lambda m, total: m[:, :1].expand(registry.MOMENT_ROWS, total)),
}
MULTI_MOMENT_CASES = [pytest.param(f, bad, id=f"{feature_id(f)}-{bad}") for f in FEATURE_SETS
                      for bad, (reads, _) in MULTI_BAD_MOMENTS.items() if reads == registry.reads_moments(f)]


@pytest.mark.parametrize("features,bad", MULTI_MOMENT_CASES)
def test_rejects_bad_moments(gen, features, bad):
    """Moments missing, extra, of another shape, dtype or device, or with elements sharing memory: the C++ op, its
    fake kernel's Python checks and the reference raise the same error, and nothing changes."""
    from l2l_fast.checks import check_multi_step_args
    from test_bad_input import as_cpp_message

    sizes = [4, 9, 2]
    params, grads, state, weights = inputs(gen, sizes, torch.float64, features=features)
    moments = MULTI_BAD_MOMENTS[bad][1](moments_of(features, sizes, gen, torch.float64), sum(sizes))
    before = [p.clone() for p in params], state.clone()
    messages = []
    for front in (ops.lstm_multi_step_, check_multi_step_args, reference.lstm_multi_step_):
        constants = (features, P, SCALE) if front is check_multi_step_args else (P, SCALE, features)
        with pytest.raises(ERRORS, match=arg("moments")) as error:
            front(params, grads, state, weights, *constants, moments)
        messages.append((type(error.value), as_cpp_message(error.value)))
    assert messages[0] == messages[1] == messages[2], messages
    assert_same(params, before[0], "params")
    assert torch.equal(state, before[1]), "a rejected call must not change anything"


@pytest.mark.parametrize("output", [2, -1])
def test_rejects_bad_output(gen, output):
    from l2l_fast.checks import check_multi_step_args

    params, grads, state, weights = inputs(gen, [4, 9], torch.float64)
    for call in (lambda: ops.lstm_multi_step_(params, grads, state, weights, P, SCALE, 1, None, output),
                 lambda: check_multi_step_args(params, grads, state, weights, 1, P, SCALE, None, output),
                 lambda: reference.lstm_multi_step_(params, grads, state, weights, P, SCALE, 1, None, output)):
        with pytest.raises(ValueError, match=rf"^output: expected 0 .* or 1 .*, got {output}$"):
            call()
