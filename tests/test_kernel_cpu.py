"""Native CPU kernels against the float64 reference on fresh random inputs.

Every comparison runs the reference in float64 on the kernel's (possibly float32) inputs; the
tolerances are in tests/tolerances.py. Gradient magnitudes are log-uniform over 1e-12..1e3 with
random signs, so both preprocessing branches occur (asserted). Feature sets that read the running
moments get random ones advanced with the gradient (conftest.moments_for); the in-place ops must
advance them exactly as features.advance_moments does.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import (DTYPE_IDS, FEATURE_SETS, OUTPUTS, VARIANTS, VARIANTS_ONCE_EACH, WEIGHT_KINDS,
                      available_cpu_isas, branch_counts, copy_net, feature_id, make_net, moments_for, native_step,
                      random_grad, random_moments, random_state, random_weights, reference_forward64, reference_step,
                      requires_native, step_grads, to64, variant_id)
from l2l_fast import features as registry
from l2l_fast import ops, reference
from tolerances import (ELEMENTWISE, REORDERED_SUM, activation_error_bound, assert_close_rel_max,
                        assert_elementwise_close, assert_moments_advanced, assert_weight_grads_close,
                        backward_error_scale, feature_slope_bound, weight_grad_derived_term)

pytestmark = requires_native

DTYPES = [torch.float64, torch.float32]
SIZES = [0, 1, 7, 1000, 2**16 + 3]


def random_upstream(n, L, H, *, gen, dtype):
    return (torch.randn(n, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(L, 2, H, n, generator=gen, dtype=torch.float64).to(dtype))


def check_step_against_reference(grad, state, weights, p, scale, up_u, up_s, *, kernel_step=native_step,
                                 features=1, moments=None, output=0):
    """Kernel forward + backward vs the float64 reference (float32 weight gradients: tolerances.WEIGHT_GRAD's rule,
    the flash-attention factor + the derived term)."""
    dtype = grad.dtype
    variant = dict(features=features, moments=moments, output=output)
    got = step_grads(kernel_step, grad, state, weights, p, scale, up_u, up_s, **variant)
    ref = step_grads(reference_step, to64(grad), to64(state), to64(weights), p, scale, to64(up_u), to64(up_s),
                     features, None if moments is None else to64(moments), output)
    ref_same, scales, act, slopes = None, [None, None, None], [None, None, None, None], [None, None, None, None]
    derived = None
    if dtype != torch.float64:
        ref_same = step_grads(reference_step, grad, state, weights, p, scale, up_u, up_s, **variant)[4]
        derived = weight_grad_derived_term(grad, state, weights, p, scale, up_u, up_s, **variant)
        # the float32 activations' own error, propagated (tolerances.activation_error_bound)
        act[:2] = activation_error_bound(grad, state, weights, p, scale, **variant)
        slopes[2] = feature_slope_bound(grad, state, weights, p, scale, up_u, up_s, **variant, dtype=dtype)
    else:
        scales = backward_error_scale(grad, state, weights, p, scale, up_u, up_s, **variant)
    for name, a, e, es, ab, sb in zip(("update", "new_state", "d_grad", "d_state"), got[:4], ref[:4],
                                      [None, None, *scales[:2]], act, slopes):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert_elementwise_close(a, e, dtype, name, es, ab, sb)
    assert_weight_grads_close(got[4], ref[4], dtype, ref_same, scales[2], derived)
    return got


# ---------------------------------------------------------------------------------------------
# one step, forward and backward
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_step_matches_reference(gen, n, dtype, kind):
    H, L, p, scale = 20, 2, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind=kind)
    grad = random_grad(n, gen=gen, dtype=dtype, p=p)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    if n >= 2:
        big, small = branch_counts(grad, p)
        assert big > 0 and small > 0, "inputs must exercise both preprocessing branches"
    if n >= 1000:
        big, small = branch_counts(grad[2:], p)  # not only the two forced coordinates
        assert big > n // 10 and small > n // 10
    up_u, up_s = random_upstream(n, L, H, gen=gen, dtype=dtype)
    update, new_state, *_ = check_step_against_reference(grad, state, weights, p, scale, up_u, up_s)
    assert update.shape == (n,) and new_state.shape == (L, 2, H, n)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("hidden_size,num_layers", [(1, 1), (2, 2), (3, 1), (4, 3), (8, 2), (16, 2), (19, 1),
                                                    (21, 2), (32, 2), (33, 3), (64, 1), (100, 2)],
                         ids=lambda v: str(v))
def test_hidden_sizes_and_layers(gen, hidden_size, num_layers, variant):
    features, output = variant
    n, p, scale = 133, 10.0, 0.1
    weights = random_weights(hidden_size, num_layers, gen=gen, kind="random", features=features)
    grad = random_grad(n, gen=gen, p=p)
    state = random_state(num_layers, hidden_size, n, gen=gen)
    up_u, up_s = random_upstream(n, num_layers, hidden_size, gen=gen, dtype=torch.float64)
    check_step_against_reference(grad, state, weights, p, scale, up_u, up_s, features=features,
                                 moments=moments_for(features, grad, gen=gen), output=output)


@pytest.mark.parametrize("output", OUTPUTS, ids=["linear", "tanh"])
@pytest.mark.parametrize("p,scale", [(10.0, 0.1), (1.0, 1.0), (20.0, -0.5), (3.5, 0.0), (0.25, 7.0)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_preprocess_p_and_output_scale(gen, p, scale, dtype, output):
    H, L, n = 20, 2, 513
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random")
    grad = random_grad(n, gen=gen, dtype=dtype, p=p)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    up_u, up_s = random_upstream(n, L, H, gen=gen, dtype=dtype)
    update, *_ = check_step_against_reference(grad, state, weights, p, scale, up_u, up_s, output=output)
    if output == 1:
        assert (update.abs() <= abs(scale)).all(), "a tanh output's update is bounded by |output_scale|"


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_backward_op_directly(gen, variant):
    """torch.ops.l2l_fast.lstm_step_backward called by hand equals the reference's autograd."""
    features, output = variant
    H, L, n, p, scale = 20, 2, 301, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, features=features)
    grad, state = random_grad(n, gen=gen, p=p), random_state(L, H, n, gen=gen)
    moments = moments_for(features, grad, gen=gen)
    up_u, up_s = random_upstream(n, L, H, gen=gen, dtype=torch.float64)
    d_grad, d_state, d_weights = torch.ops.l2l_fast.lstm_step_backward(up_u, up_s, grad, state, weights, p, scale,
                                                                       features, moments, output)
    variant = dict(features=features, moments=moments, output=output)
    _, _, e_grad, e_state, e_weights = step_grads(reference_step, grad, state, weights, p, scale, up_u, up_s,
                                                  **variant)
    s_grad, s_state, s_weights = backward_error_scale(grad, state, weights, p, scale, up_u, up_s, **variant)
    assert_elementwise_close(d_grad, e_grad, torch.float64, "d_grad", s_grad)
    assert_elementwise_close(d_state, e_state, torch.float64, "d_state", s_state)
    assert len(d_weights) == len(weights)
    assert_weight_grads_close(list(d_weights), e_weights, torch.float64, error_scale=s_weights)


@pytest.mark.slow
def test_huge_n_float32(gen):
    """n = 1000003 (not a multiple of any vector width or thread chunk): forward and step_.

    H = 8: the kernels loop over the hidden size at run time, so n is what this test is about, and a
    smaller state keeps the float64 reference and the comparison within a few seconds.
    """
    H, L, n, p, scale = 8, 2, 1_000_003, 10.0, 0.1
    dtype = torch.float32
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random")
    grad = random_grad(n, gen=gen, dtype=dtype, p=p)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    param = torch.randn(n, generator=gen, dtype=dtype)
    big, small = branch_counts(grad, p)
    assert big > n // 10 and small > n // 10
    e_update, e_state = reference_forward64(grad, state, weights, p, scale)

    d_update, d_state = activation_error_bound(grad, state, weights, p, scale)

    update, new_state = ops.lstm_step(grad, state, weights, p, scale)
    assert_elementwise_close(update, e_update, dtype, "update", activation_bound=d_update)
    assert_elementwise_close(new_state, e_state, dtype, "new_state", activation_bound=d_state)
    # the last coordinates (the tail after the last full vector / chunk) got the same treatment
    assert_elementwise_close(update[-5:], e_update[-5:], dtype, "update tail", activation_bound=d_update[-5:])

    expected_param = param.double() + e_update
    ops.lstm_step_(param, grad, state, weights, p, scale)
    # param = old + update rounded once more: its rounding, 2^-24 |param|, is inside rtol
    assert_elementwise_close(param, expected_param, dtype, "param", activation_bound=d_update)
    assert_elementwise_close(state, e_state, dtype, "state", activation_bound=d_state)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,n", [(torch.float64, 2**17), (torch.float32, 2**18 + 16)], ids=["f64", "f32"])
def test_outputs_past_the_caches_match_reference(gen, dtype, n):
    """States over 64 MB are written with streaming (cache-bypassing) stores in the forward and the
    backward; with n a multiple of the vector width every row is aligned, so that path runs for every
    full tile. A few non-finite gradients send their tiles through the masked path in between."""
    H, L, p, scale = 20, 2, 10.0, 0.1
    assert L * 2 * H * n * torch.finfo(dtype).bits // 8 >= 64 << 20
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random")
    grad = random_grad(n, gen=gen, dtype=dtype, p=p)
    grad[torch.randint(n, (5,), generator=gen)] = float("nan")
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    up_u, up_s = random_upstream(n, L, H, gen=gen, dtype=dtype)
    check_step_against_reference(grad, state, weights, p, scale, up_u, up_s)


# ---------------------------------------------------------------------------------------------
# every instruction set the CPU runs (the default run only uses the best one)
ISAS = available_cpu_isas()


# n = 8195 (more than one thread chunk, the slowest) with the paper's set and the widest one only
ISA_CASES = [pytest.param(n, variant, id=f"n{n}-{variant_id(variant)}")
             for n in (1, 7, 37, 1000, 8195) for variant in (VARIANTS if n < 8195 else [VARIANTS[0], VARIANTS[-1]])]


@pytest.mark.parametrize("n,variant", ISA_CASES)
@pytest.mark.parametrize("cpu_isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_each_cpu_isa_matches_reference(gen, cpu_isa, n, dtype, variant):
    """Forward, backward, step_ and the non-finite policy with the kernels of one instruction set, for every
    set of input features and output kind.

    n covers a partial vector, several tiles with a tail, and (8195) more than one thread chunk.
    """
    features, output = variant
    H, L, p, scale = 20, 2, 10.0, 0.1
    kind = "saturating" if n == 37 else "random"
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind=kind, features=features)
    grad = random_grad(n, gen=gen, dtype=dtype, p=p)
    if n >= 7:
        grad[[2, n - 1]] = torch.tensor([math.nan, -math.inf], dtype=dtype)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    # the moments before this step: advanced by step_ below, given advanced to the functional ops
    before = random_moments(n, gen=gen, dtype=dtype) if registry.reads_moments(features) else None
    moments = None if before is None else registry.advance_moments(grad, before)
    up_u, up_s = random_upstream(n, L, H, gen=gen, dtype=dtype)
    update, new_state, d_grad, d_state, _ = check_step_against_reference(grad, state, weights, p, scale, up_u, up_s,
                                                                         features=features, moments=moments,
                                                                         output=output)
    bad = ~torch.isfinite(grad)
    assert torch.equal(new_state[..., bad], state[..., bad]) and torch.count_nonzero(update[bad]) == 0
    assert torch.count_nonzero(d_grad[bad]) == 0 and torch.equal(d_state[..., bad], up_s[..., bad])

    param = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    expected_param = param + update
    ops.lstm_step_(param, grad, state, weights, p, scale, features, before, output)
    torch.testing.assert_close(param, expected_param)
    torch.testing.assert_close(state, new_state)
    if before is not None:
        assert_moments_advanced(before, grad, moments)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cpu_isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_weight_gradients_across_the_backward_passes(gen, cpu_isa, dtype, threads):
    """The backward sums its gate weights' gradients over 16 tiles at a time, in one pass at each flush
    (csrc/cpu/kernel_body.inc, "float products' backward"). n = 1023, 1024, 1025 end one coordinate before, at
    and after a multiple of 16 tiles for every tile width (8 to 64 coordinates: 1024 = 16 x 64), and 3100 ends
    on a partial pass; a pass that dropped, repeated or mixed up a pending tile would be off by a tile's share
    of every weight's gradient. Against the float64 reference, with 1 and 2 threads."""
    H, L, p, scale = 20, 2, 10.0, 0.1
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1023, 1024, 1025, 3100):
            weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random")
            grad = random_grad(n, gen=gen, dtype=dtype, p=p)
            state = random_state(L, H, n, gen=gen, dtype=dtype)
            up_u, up_s = random_upstream(n, L, H, gen=gen, dtype=dtype)
            check_step_against_reference(grad, state, weights, p, scale, up_u, up_s)
    finally:
        torch.set_num_threads(torch_threads)


# ---------------------------------------------------------------------------------------------
# inputs untouched; step_ = param + update
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_forward_does_not_modify_inputs(gen, dtype):
    H, L, n = 20, 2, 1000
    weights = [w.requires_grad_(True) for w in random_weights(H, L, gen=gen, dtype=dtype)]
    grad = random_grad(n, gen=gen, dtype=dtype)
    grad[5] = math.nan
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    before = [t.detach().clone() for t in (grad, state, *weights)]
    update, new_state = ops.lstm_step(grad, state, weights, 10.0, 0.1)
    torch.autograd.grad([update, new_state], weights, [torch.ones_like(update), torch.ones_like(new_state)])
    for k, (old, new) in enumerate(zip(before, (grad, state, *weights))):
        assert torch.equal(old.nan_to_num(7.0), new.detach().nan_to_num(7.0)), f"input {k} was modified"
    assert new_state.data_ptr() != state.data_ptr()


@pytest.mark.parametrize("output", OUTPUTS, ids=["linear", "tanh"])
@pytest.mark.parametrize("features", [f for f in FEATURE_SETS if registry.reads_moments(f)], ids=feature_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_step_inplace_advances_the_moments(gen, n, dtype, features, output):
    """step_ advances the moments as features.advance_moments does (t + 1, the moving averages), keeps those of
    NaN/Inf-gradient coordinates bit for bit, and its features see the advanced moments: param + update and
    the state equal lstm_step's on the advanced moments."""
    H, L, p, scale = 20, 2, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random", features=features)
    grad = random_grad(n, gen=gen, dtype=dtype, p=p)
    grad[torch.rand(n, generator=gen) < 0.05] = math.nan
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    param = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    moments = random_moments(n, gen=gen, dtype=dtype)
    advanced = registry.advance_moments(grad, moments)
    update, new_state = ops.lstm_step(grad, state, weights, p, scale, features, advanced, output)
    e_update, e_state = reference_forward64(grad, state, weights, p, scale, features=features, moments=advanced,
                                            output=output)
    param_before, moments_ptr = param.clone(), moments.data_ptr()

    ops.lstm_step_(param, grad, state, weights, p, scale, features, moments, output)
    assert moments.data_ptr() == moments_ptr
    assert_moments_advanced(moments, grad, advanced)
    torch.testing.assert_close(param, param_before + update)
    torch.testing.assert_close(state, new_state)
    assert_elementwise_close(param, param_before.double() + e_update, dtype, "param")
    assert_elementwise_close(state, e_state, dtype, "state")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_step_inplace_equals_param_plus_update(gen, n, dtype):
    H, L, p, scale = 20, 2, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random")
    grad = random_grad(n, gen=gen, dtype=dtype, p=p)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    param = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    update, new_state = ops.lstm_step(grad, state, weights, p, scale)
    e_update, e_state = reference_forward64(grad, state, weights, p, scale)
    grad_before, weights_before, param_before = grad.clone(), [w.clone() for w in weights], param.clone()
    state_ptr, param_ptr = state.data_ptr(), param.data_ptr()

    assert ops.lstm_step_(param, grad, state, weights, p, scale) is None
    assert state.data_ptr() == state_ptr and param.data_ptr() == param_ptr
    torch.testing.assert_close(param, param_before + update)  # default tolerances of the dtype: a few ulp
    torch.testing.assert_close(state, new_state)
    assert_elementwise_close(param, param_before.double() + e_update, dtype, "param")
    assert_elementwise_close(state, e_state, dtype, "state")
    assert torch.equal(grad, grad_before)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_before))


# ---------------------------------------------------------------------------------------------
# non-contiguous inputs
def strided_vector(values, *, gen, step=3):
    """values [n] as a non-contiguous view (every step-th element of a larger buffer)."""
    n = values.shape[0]
    base = torch.randn(n * step + 1, generator=gen, dtype=torch.float64).to(values.dtype)
    view = base[1::step]
    view.copy_(values)
    return view, base


def permuted_state(values, *, gen):
    """values [L, 2, H, n] as a view of a buffer stored [n, H, 2, L] (coordinates the slowest axis)."""
    base = torch.empty(values.permute(3, 2, 1, 0).shape, dtype=values.dtype)
    view = base.permute(3, 2, 1, 0)
    view.copy_(values)
    return view, base


def sliced_state(values, *, gen):
    """values [L, 2, H, n] as every other coordinate of a [L, 2, H, 2n] buffer."""
    L, two, H, n = values.shape
    base = torch.randn(L, two, H, 2 * n, generator=gen, dtype=torch.float64).to(values.dtype)
    view = base[..., ::2]
    view.copy_(values)
    return view, base


def moments_view(values, *, gen):
    """values [rows, n] as a view of a buffer stored [n, rows] (coordinates the slowest axis); None for None."""
    if values is None:
        return None, None
    base = torch.randn(values.shape[1], values.shape[0], generator=gen, dtype=torch.float64).to(values.dtype)
    view = base.t()
    view.copy_(values)
    return view, base


STATE_LAYOUTS = {"permuted": permuted_state, "sliced": sliced_state}


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("layout", STATE_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [7, 1000], ids=lambda n: f"n{n}")
def test_non_contiguous_forward_backward(gen, n, dtype, layout, variant):
    features, output = variant
    H, L, p, scale = 20, 2, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random", features=features)
    grad = random_grad(n, gen=gen, dtype=dtype, p=p)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    moments = moments_for(features, grad, gen=gen)
    up_u, up_s = random_upstream(n, L, H, gen=gen, dtype=dtype)
    grad_nc, _ = strided_vector(grad, gen=gen)
    state_nc, _ = STATE_LAYOUTS[layout](state, gen=gen)
    up_s_nc, _ = STATE_LAYOUTS[layout](up_s, gen=gen)
    moments_nc, _ = moments_view(moments, gen=gen)
    assert not grad_nc.is_contiguous() and not state_nc.is_contiguous()
    assert moments_nc is None or not moments_nc.is_contiguous()
    variant = dict(features=features, output=output)
    got = check_step_against_reference(grad_nc, state_nc, weights, p, scale, up_u, up_s_nc, moments=moments_nc,
                                       **variant)
    contiguous = step_grads(native_step, grad, state, weights, p, scale, up_u, up_s, moments=moments, **variant)
    for name, a, b in zip(("update", "new_state", "d_grad", "d_state"), got[:4], contiguous[:4]):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: non-contiguous != contiguous\n{m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_non_contiguous_weights(gen, dtype):
    """Weights given as transposed views (e.g. weights tied to another module's transposed tensors)."""
    H, L, n, p, scale = 20, 2, 300, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random")
    weights_nc = [w.t().contiguous().t() if w.dim() == 2 else torch.stack([w, w], 1)[:, 0] for w in weights]
    assert not any(w.is_contiguous() for w in weights_nc if w.shape[0] > 1 and w.shape[-1] > 1)
    grad, state = random_grad(n, gen=gen, dtype=dtype, p=p), random_state(L, H, n, gen=gen, dtype=dtype)
    up_u, up_s = random_upstream(n, L, H, gen=gen, dtype=dtype)
    check_step_against_reference(grad, state, weights_nc, p, scale, up_u, up_s)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("layout", STATE_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_non_contiguous_step_inplace(gen, dtype, layout, variant):
    """step_ on views writes through to the viewed buffers, and only to the viewed elements."""
    features, output = variant
    H, L, n, p, scale = 20, 2, 1000, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random", features=features)
    grad = random_grad(n, gen=gen, dtype=dtype, p=p)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    param = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    moments = random_moments(n, gen=gen, dtype=dtype) if registry.reads_moments(features) else None
    advanced = None if moments is None else registry.advance_moments(grad, moments)
    e_update, e_state = reference_forward64(grad, state, weights, p, scale, features=features, moments=advanced,
                                            output=output)

    grad_nc, _ = strided_vector(grad, gen=gen, step=2)
    param_nc, param_base = strided_vector(param, gen=gen, step=3)
    state_nc, state_base = STATE_LAYOUTS[layout](state, gen=gen)
    moments_nc, _ = moments_view(moments, gen=gen)
    param_base_before, state_base_before = param_base.clone(), state_base.clone()
    ops.lstm_step_(param_nc, grad_nc, state_nc, weights, p, scale, features, moments_nc, output)

    assert_elementwise_close(param_nc, param.double() + e_update, dtype, "param view")
    assert_elementwise_close(state_nc, e_state, dtype, "state view")
    if moments is not None:
        assert_moments_advanced(moments_nc, grad, advanced)
    untouched = torch.ones_like(param_base, dtype=torch.bool)
    untouched[1::3] = False
    assert torch.equal(param_base[untouched], param_base_before[untouched]), "step_ wrote outside the param view"
    if layout == "sliced":
        assert torch.equal(state_base[..., 1::2], state_base_before[..., 1::2]), "step_ wrote outside the state view"


# ---------------------------------------------------------------------------------------------
# several steps with the state carried
STEPS = 6


def copy64(t):
    """A float64 copy (None for None), never the tensor itself: the reference's in-place steps write it."""
    return None if t is None else t.to(torch.float64, copy=True)


def quadratic(n, *, gen, dtype):
    """An optimizee f(theta) = sum(a (theta - b)^2) / 2 with curvatures over 6 decades: grad = a (theta - b)."""
    a = torch.pow(10.0, torch.rand(n, generator=gen, dtype=torch.float64) * 6 - 4).to(dtype)
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    return a, b


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [7, 1000], ids=lambda n: f"n{n}")
def test_unrolled_steps_forward_and_backward(gen, n, dtype):
    """theta_{t+1} = theta_t + update_t, grad_t = a (theta_t - b): values, states and all gradients."""
    H, L, p, scale = 20, 2, 10.0, 0.1
    weights64 = random_weights(H, L, gen=gen, kind="random")
    state64 = random_state(L, H, n, gen=gen)
    theta64 = torch.randn(n, generator=gen, dtype=torch.float64)
    # minima 2..4 away from theta0, curvatures over 6 decades: gradients on both preprocessing branches,
    # and no theta - b cancelling to near 0 (where d/dtheta of log|a (theta - b)| = 1 / (theta - b) would
    # make the float32 rollout ill-conditioned whatever computes the step)
    a = torch.pow(10.0, torch.rand(n, generator=gen, dtype=torch.float64) * 6 - 6)
    a[:2] = torch.tensor([1e-6, 1.0], dtype=torch.float64)  # |grad| < 4e-6 and > 2: one on each branch
    b = theta64 + torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) * (2 + 2 * torch.rand(n, generator=gen, dtype=torch.float64))
    r = torch.randn(STEPS, n, generator=gen, dtype=torch.float64)
    big, small = branch_counts(a * (theta64 - b), p)
    assert big > 0 and small > 0

    def unroll(step_fn, run_dtype):
        weights = [w.to(run_dtype).requires_grad_(True) for w in weights64]
        state0 = state64.to(run_dtype).requires_grad_(True)
        theta0 = theta64.to(run_dtype).requires_grad_(True)
        theta, state, updates, states = theta0, state0, [], []
        for t in range(STEPS):
            grad = a.to(run_dtype) * (theta - b.to(run_dtype))
            update, state = step_fn(grad, state, weights, p, scale)
            theta = theta + update
            updates.append(update)
            states.append(state)
        loss = (torch.stack(updates) * r.to(run_dtype)).sum() + (state ** 2).sum() + theta.square().sum()
        d = torch.autograd.grad(loss, [theta0, state0, *weights])
        return [u.detach() for u in updates], [s.detach() for s in states], d

    got_u, got_s, got_d = unroll(native_step, dtype)
    ref_u, ref_s, ref_d = unroll(reference_step, torch.float64)
    names = [f"update of step {t}" for t in range(STEPS)] + [f"state of step {t}" for t in range(STEPS)]
    names += ["d theta0", "d state0"] + [f"d_weights[{k}]" for k in range(len(weights64))]
    got, ref = got_u + got_s + list(got_d), ref_u + ref_s + list(ref_d)
    n_w = len(weights64)
    for name, actual, expected in zip(names[:-n_w], got[:-n_w], ref[:-n_w]):
        assert_elementwise_close(actual, expected, dtype, name)
    if dtype == torch.float64:
        assert_weight_grads_close(list(got_d[2:]), list(ref_d[2:]), dtype)
    else:
        # float32: the one-step table (the optimizee keeps the rollout well conditioned), weight gradients
        # relative to the largest of them (a single-entry sum like out.bias's gradient cancels).
        weight_scale = max(g.abs().max().item() for g in ref[-n_w:])
        for name, actual, expected in zip(names[-n_w:], got[-n_w:], ref[-n_w:]):
            assert_close_rel_max(actual, expected, ELEMENTWISE[dtype]["atol_rel"], name, scale=weight_scale)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [1, 7, 1000], ids=lambda n: f"n{n}")
def test_unrolled_step_inplace(gen, n, dtype, variant):
    """STEPS in-place steps on a quadratic from fresh moments: param, state and moments follow the reference's
    lstm_step_."""
    features, output = variant
    H, L, p, scale = 20, 2, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random", features=features)
    a, b = quadratic(n, gen=gen, dtype=dtype)
    param = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    moments = torch.zeros(registry.MOMENT_ROWS, n, dtype=dtype) if registry.reads_moments(features) else None
    # copies (.double() of a float64 tensor is the tensor itself, which the reference would step a second time)
    param_ref, state_ref, weights_ref = copy64(param), copy64(state), to64(weights)
    moments_ref = copy64(moments)
    for t in range(STEPS):
        grad = a * (param - b)
        grad_ref = grad.double()  # the reference follows the kernel's trajectory of gradients
        ops.lstm_step_(param, grad, state, weights, p, scale, features, moments, output)
        reference.lstm_step_(param_ref, grad_ref, state_ref, weights_ref, p, scale, features, moments_ref, output)
        assert_elementwise_close(param, param_ref, dtype, f"param after step {t}")
        assert_elementwise_close(state, state_ref, dtype, f"state after step {t}")
        if moments is not None:
            assert torch.equal(moments[2], torch.full_like(moments[2], t + 1))
            assert_elementwise_close(moments, moments_ref, dtype, f"moments after step {t}")
            moments_ref = copy64(moments)
        param_ref, state_ref = copy64(param), copy64(state)  # re-sync: compare one step's error at a time


@pytest.mark.parametrize("variant", [VARIANTS[0], *VARIANTS_ONCE_EACH], ids=variant_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_module_native_equals_reference_backend(gen, dtype, variant):
    """The nn.Module front with backend="native" and "auto" vs backend="reference", several steps, the moments
    (when the net reads them) advanced by the net's advance_moments for forward and in place by step_."""
    features, output = variant
    H, L, n = 20, 2, 777
    net = make_net(H, L, gen=gen, dtype=dtype, kind="random", backend="native", features=features, output=output)
    net_auto = copy_net(net, backend="auto")
    net_ref = copy_net(net, backend="reference", dtype=torch.float64)
    state, state_auto = net.init_state(n), net_auto.init_state(n)
    state_ref = net_ref.init_state(n)
    moments = net.init_moments(n)
    assert state.dtype == dtype and state.shape == (L, 2, H, n)
    assert (moments is None) == (not registry.reads_moments(features))
    for t in range(STEPS):
        grad = random_grad(n, gen=gen, dtype=dtype)
        moments = net.advance_moments(grad, moments)
        update, new_state = net(grad, state, moments)
        update_auto, state_auto = net_auto(grad, state_auto, moments)
        e_update, state_ref = net_ref(grad.double(), state.double(), None if moments is None else moments.double())
        assert torch.equal(update, update_auto), "backend='auto' must use the native kernel on CPU"
        assert_elementwise_close(update, e_update, dtype, f"update step {t}")
        assert_elementwise_close(new_state, state_ref, dtype, f"state step {t}")
        state = new_state

    param = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    param_ref, state_ref, moments_ref = copy64(param), copy64(state), copy64(moments)
    for t in range(STEPS):
        grad = random_grad(n, gen=gen, dtype=dtype)
        net.step_(param, grad, state, moments)
        net_ref.step_(param_ref, grad.double(), state_ref, moments_ref)
        assert_elementwise_close(param, param_ref, dtype, f"param step {t}")
        assert_elementwise_close(state, state_ref, dtype, f"state step {t}")
        param_ref, state_ref, moments_ref = copy64(param), copy64(state), copy64(moments)


# ---------------------------------------------------------------------------------------------
# NaN / Inf policy
BAD_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "mixed": None}


def with_bad_coordinates(grad, which, *, gen):
    """grad with ~10% (at least the first, a middle and the last) coordinates replaced; returns (grad, mask)."""
    n = grad.shape[0]
    mask = torch.rand(n, generator=gen) < 0.1
    mask[[0, n // 2, n - 1]] = True
    grad = grad.clone()
    if which == "mixed":
        choice = torch.randint(0, 3, (n,), generator=gen)
        bad = torch.tensor([math.nan, math.inf, -math.inf], dtype=grad.dtype)[choice]
    else:
        bad = torch.full_like(grad, BAD_VALUES[which])
    grad[mask] = bad[mask]
    return grad, mask


# every kind of bad value with the paper's set and linear output, the mixed kind with every other variant
POLICY_CASES = [pytest.param(which, variant, id=f"{which}-{variant_id(variant)}")
                for variant in VARIANTS for which in (BAD_VALUES if variant == VARIANTS[0] else ["mixed"])]


@pytest.mark.parametrize("which,variant", POLICY_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [1, 37, 1000], ids=lambda n: f"n{n}")
def test_non_finite_gradient_policy_forward_backward(gen, n, dtype, which, variant):
    features, output = variant
    H, L, p, scale = 20, 2, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind="random", features=features)
    grad, bad = with_bad_coordinates(random_grad(n, gen=gen, dtype=dtype, p=p), which, gen=gen)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    moments = moments_for(features, grad, gen=gen)
    up_u, up_s = random_upstream(n, L, H, gen=gen, dtype=dtype)
    variant = dict(features=features, moments=moments, output=output)

    update, new_state, d_grad, d_state, d_weights = check_step_against_reference(grad, state, weights, p, scale,
                                                                                 up_u, up_s, **variant)
    # exact policy on the bad coordinates
    assert torch.equal(update[bad], torch.zeros_like(update[bad])), "update must be exactly 0 where grad is not finite"
    assert torch.equal(new_state[..., bad], state[..., bad]), "state must be kept bit for bit where grad is not finite"
    assert torch.equal(d_grad[bad], torch.zeros_like(d_grad[bad])), "d_grad must be exactly 0 where grad is not finite"
    assert torch.equal(d_state[..., bad], up_s[..., bad]), "d_state must pass through where grad is not finite"
    # the bad coordinates contribute nothing: weight gradients equal those of the finite coordinates alone
    good = ~bad
    if good.any():
        sub = step_grads(native_step, grad[good], state[..., good], weights, p, scale, up_u[good], up_s[..., good],
                         features, None if moments is None else moments[:, good], output)
        torch.testing.assert_close(update[good], sub[0])
        torch.testing.assert_close(new_state[..., good], sub[1])
        for k, (a, b) in enumerate(zip(d_weights, sub[4])):
            assert_close_rel_max(a, b, REORDERED_SUM[dtype], f"d_weights[{k}] with vs without the bad coordinates")
    else:
        for k, w in enumerate(d_weights):
            assert torch.count_nonzero(w) == 0, f"d_weights[{k}] must be 0 when no gradient is finite"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_all_gradients_non_finite(gen, dtype):
    H, L, n = 20, 2, 100
    weights = random_weights(H, L, gen=gen, dtype=dtype)
    grad = torch.full((n,), math.nan, dtype=dtype)
    grad[::3] = math.inf
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    up_u, up_s = random_upstream(n, L, H, gen=gen, dtype=dtype)
    update, new_state, d_grad, d_state, d_weights = step_grads(native_step, grad, state, weights, 10.0, 0.1, up_u, up_s)
    assert torch.count_nonzero(update) == 0
    assert torch.equal(new_state, state)
    assert torch.count_nonzero(d_grad) == 0
    assert torch.equal(d_state, up_s)
    for k, w in enumerate(d_weights):
        assert torch.count_nonzero(w) == 0, f"d_weights[{k}]"


@pytest.mark.parametrize("which,variant", POLICY_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_non_finite_gradient_policy_step_inplace(gen, dtype, which, variant):
    features, output = variant
    H, L, n, p, scale = 20, 2, 1000, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=dtype, features=features)
    grad, bad = with_bad_coordinates(random_grad(n, gen=gen, dtype=dtype, p=p), which, gen=gen)
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    param = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    moments = random_moments(n, gen=gen, dtype=dtype) if registry.reads_moments(features) else None
    advanced = None if moments is None else registry.advance_moments(grad, moments)
    param_before, state_before = param.clone(), state.clone()
    moments_before = None if moments is None else moments.clone()
    e_update, e_state = reference_forward64(grad, state, weights, p, scale, features=features, moments=advanced,
                                            output=output)
    ops.lstm_step_(param, grad, state, weights, p, scale, features, moments, output)
    assert torch.equal(param[bad], param_before[bad])
    assert torch.equal(state[..., bad], state_before[..., bad])
    if moments is not None:
        assert torch.equal(moments[:, bad], moments_before[:, bad]), "moments of a non-finite gradient changed"
        assert_moments_advanced(moments, grad, advanced)
    assert_elementwise_close(param, param_before.double() + e_update, dtype, "param")
    assert_elementwise_close(state, e_state, dtype, "state")


# ---------------------------------------------------------------------------------------------
# edge cases of the autograd wiring
@pytest.mark.parametrize("used", ["update", "new_state"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_backward_with_one_output_unused(gen, dtype, used):
    """loss of the update alone (new_state's gradient is None) or of the new state alone."""
    H, L, n = 20, 2, 500
    net = make_net(H, L, gen=gen, dtype=dtype, kind="random", backend="native")
    grad = random_grad(n, gen=gen, dtype=dtype).requires_grad_(True)
    state = random_state(L, H, n, gen=gen, dtype=dtype).requires_grad_(True)
    r_u, r_s = random_upstream(n, L, H, gen=gen, dtype=dtype)

    def grads(step_fn, grad, state, weights):
        update, new_state = step_fn(grad, state, weights, net.preprocess_p, net.output_scale)
        loss = (update * r_u.to(update.dtype)).sum() if used == "update" else (new_state * r_s.to(update.dtype)).sum()
        # out.weight and out.bias do not reach the new state: zero gradients
        return torch.autograd.grad(loss, [grad, state, *weights], allow_unused=True, materialize_grads=True)

    update, new_state = net(grad, state)
    loss = (update * r_u).sum() if used == "update" else (new_state * r_s).sum()
    loss.backward()
    got = [grad.grad, state.grad] + [w.grad for w in net.weights()]
    assert all(g is not None for g in got)
    weights64 = [w.detach().double().requires_grad_(True) for w in net.weights()]
    ref = grads(reference_step, grad.detach().double().requires_grad_(True),
                state.detach().double().requires_grad_(True), weights64)
    assert_elementwise_close(got[0], ref[0], dtype, "d_grad")
    assert_elementwise_close(got[1], ref[1], dtype, "d_state")
    ref_same = scales = derived = None
    up_u, up_s = (r_u, torch.zeros_like(r_s)) if used == "update" else (torch.zeros_like(r_u), r_s)
    if dtype != torch.float64:
        ref_same = grads(reference_step, grad.detach().requires_grad_(True), state.detach().requires_grad_(True),
                         [w.detach().requires_grad_(True) for w in net.weights()])[2:]
        derived = weight_grad_derived_term(grad, state, net.weights(), net.preprocess_p, net.output_scale, up_u, up_s)
    else:
        scales = backward_error_scale(grad, state, net.weights(), net.preprocess_p, net.output_scale, up_u, up_s)[2]
    assert_weight_grads_close(got[2:], list(ref[2:]), dtype, ref_same, scales, derived)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_zero_coordinates_all_ops(gen, dtype, variant):
    features, output = variant
    H, L = 20, 2
    weights = [w.requires_grad_(True) for w in random_weights(H, L, gen=gen, dtype=dtype, features=features)]
    grad = torch.empty(0, dtype=dtype, requires_grad=True)
    state = torch.empty(L, 2, H, 0, dtype=dtype, requires_grad=True)
    moments = torch.empty(registry.MOMENT_ROWS, 0, dtype=dtype) if registry.reads_moments(features) else None
    extra = (features, moments, output)
    update, new_state = ops.lstm_step(grad, state, weights, 10.0, 0.1, *extra)
    assert update.shape == (0,) and new_state.shape == (L, 2, H, 0)
    assert update.dtype == dtype and new_state.dtype == dtype
    d = torch.autograd.grad([update, new_state], [grad, state, *weights],
                            [torch.empty(0, dtype=dtype), torch.empty(L, 2, H, 0, dtype=dtype)])
    assert d[0].shape == (0,) and d[1].shape == (L, 2, H, 0)
    for w, dw in zip(weights, d[2:]):
        assert dw.shape == w.shape and torch.count_nonzero(dw) == 0

    d_grad, d_state, d_weights = torch.ops.l2l_fast.lstm_step_backward(
        torch.empty(0, dtype=dtype), torch.empty(L, 2, H, 0, dtype=dtype), grad.detach(), state.detach(),
        [w.detach() for w in weights], 10.0, 0.1, *extra)
    assert d_grad.shape == (0,) and d_state.shape == (L, 2, H, 0)
    assert [tuple(w.shape) for w in d_weights] == [tuple(w.shape) for w in weights]
    assert all(torch.count_nonzero(w) == 0 for w in d_weights)

    param = torch.empty(0, dtype=dtype)
    ops.lstm_step_(param, grad.detach(), state.detach(), [w.detach() for w in weights], 10.0, 0.1, *extra)
    net = make_net(H, L, gen=gen, dtype=dtype, backend="native", features=features, output=output)
    update, new_state = net(torch.empty(0, dtype=dtype), net.init_state(0), net.init_moments(0))
    assert update.shape == (0,) and new_state.shape == (L, 2, H, 0)
    net.step_(param, torch.empty(0, dtype=dtype), net.init_state(0), net.init_moments(0))


def test_forward_is_deterministic(gen):
    H, L, n = 20, 2, 2**16 + 3
    weights = random_weights(H, L, gen=gen, dtype=torch.float32)
    grad, state = random_grad(n, gen=gen, dtype=torch.float32), random_state(L, H, n, gen=gen, dtype=torch.float32)
    first = ops.lstm_step(grad, state, weights, 10.0, 0.1)
    second = ops.lstm_step(grad, state, weights, 10.0, 0.1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_zero_state_is_the_fresh_start(gen):
    """From init_state (zeros), native and reference agree; a sanity check of the common first step."""
    net = make_net(20, 2, gen=gen, kind="init", backend="native")
    n = 1000
    grad = random_grad(n, gen=gen)
    state = net.init_state(n)
    update, new_state = net(grad, state)
    e_update, e_state = reference.lstm_step(grad, state, net.weights(), net.preprocess_p, net.output_scale)
    assert_elementwise_close(update, e_update, torch.float64, "update")
    assert_elementwise_close(new_state, e_state, torch.float64, "new_state")


def test_module_step_inplace_on_a_parameter(gen):
    """The intended use: step_ on (a flat view of) an nn.Parameter that requires grad, with its .grad."""
    net = make_net(20, 2, gen=gen, kind="random", backend="native")
    weight = torch.nn.Parameter(torch.randn(7, 11, generator=gen, dtype=torch.float64))
    weight.grad = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    before = weight.detach().clone()
    state = net.init_state(weight.numel())
    e_update, e_state = reference.lstm_step(weight.grad.view(-1), state, net.weights(), net.preprocess_p,
                                            net.output_scale)
    net.step_(weight.view(-1), weight.grad.view(-1), state)
    assert weight.requires_grad and weight.grad_fn is None
    assert_elementwise_close(weight.detach().view(-1), before.view(-1) + e_update.detach(), torch.float64, "param")
    assert_elementwise_close(state, e_state.detach(), torch.float64, "state")
