"""Kernel-vs-reference checks of the CUDA kernels, shared by test_cuda.py (the kernels on a GPU) and
test_cuda_emulated.py (the same kernel code run on CPU threads, see tests/cuda_emulation).

Every check takes an :class:`Impl`: the four ops and the device their tensors live on. Inputs are drawn
on the CPU from the test's generator, the expected values are the float64 reference on the CPU run on
the kernel's (possibly rounded) inputs; tolerances from tolerances.py, and for the 16-bit storage of the
multi-tensor step the table BF16_STATE / PARAM_16BIT below. The checks take the op's `features` and
`output`; features that read the running moments get moments drawn by :func:`moments_for`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import FEATURE_SETS, random_grad, random_state, random_weights, to64
from l2l_fast import features as registry
from l2l_fast import reference
from tolerances import (ACTIVATION_BOUND, assert_elementwise_close, assert_weight_grads_close, backward_error_scale,
                        cuda_sum_roundings, feature_slope_bound, weight_grad_derived_term)

# bfloat16 state of the multi-tensor step: each stored value is the float32 result rounded to 8
# significant bits, at most half a unit in the last place = 2^-8 of its magnitude, on top of the
# float32 error (tolerances.ELEMENTWISE[float32]). The update itself is not rounded: float32 tolerance.
BF16_STATE = dict(rtol=2.0**-8, atol_rel=5e-5, atol=1e-8)
# 16-bit parameters: param + update rounded once to the parameter's dtype (torch's param.add_ rounds the
# update first, then the sum: the two can differ by one unit in the last place).
PARAM_16BIT = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@functools.cache
def emulation_module():
    """tests/cuda_emulation/emulate.cpp built once per session (about a minute): the CUDA kernel bodies on CPU
    threads, the ops of csrc/cuda/step_ops.h with an emulated launcher, the mma model (warp_mma.h)."""
    from torch.utils.cpp_extension import load

    root = Path(__file__).resolve().parents[1]
    build = root / "build" / "cuda_emulation"
    build.mkdir(parents=True, exist_ok=True)
    sources = [str(root / "tests" / "cuda_emulation" / "emulate.cpp"), str(root / "csrc" / "packed_cache.cpp")]
    return load(name="l2l_fast_cuda_emulation", sources=sources, extra_include_paths=[str(root / "csrc")],
                extra_cflags=["-O2", "-fno-strict-aliasing"], build_directory=str(build), verbose=False)


@dataclasses.dataclass
class Impl:
    device: str
    lstm_step: Callable
    lstm_step_backward: Callable
    lstm_step_: Callable
    lstm_multi_step_: Callable


def cuda_ops() -> Impl:
    """The native ops on the GPU (the GPU test modules' IMPL; l2l_fast._C must be loaded)."""
    ops = torch.ops.l2l_fast
    return Impl("cuda", ops.lstm_step, ops.lstm_step_backward, ops.lstm_step_, ops.lstm_multi_step_)


def require_tensor_cores() -> None:
    """In a GPU test: the build has the CUDA kernels (else a failure), the GPU runs mma.sync TF32 (else a skip:
    below compute capability 8.0 the FFMA kernels run whatever L2L_FAST_CUDA_GATES / _BACKWARD say)."""
    from l2l_fast import _C

    assert _C.has_cuda_kernels(), "a GPU is present but l2l_fast._C was built without the CUDA kernels"
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("mma.sync TF32 needs compute capability 8.0 or newer")


# the feature sets that read the running moments (conftest.FEATURE_SETS' others read the gradient alone)
MOMENT_SETS = [f for f in FEATURE_SETS if registry.reads_moments(f)]


def on(impl: Impl, tensors):
    """Copies on impl.device (always copies: the in-place ops must not touch the CPU originals); None stays None."""
    if tensors is None:
        return None
    if isinstance(tensors, torch.Tensor):
        return tensors.to(impl.device, copy=True)
    return [on(impl, t) for t in tensors]


def inputs(n, H, L, dtype, gen, kind="random", p=10.0, non_finite=False, features=1):
    """CPU tensors: grad [n], state [L, 2, H, n], weights, upstream (grad_update [n], grad_new_state)."""
    weights = random_weights(H, L, gen=gen, dtype=dtype, kind=kind, features=features)
    grad = random_grad(n, gen=gen, dtype=dtype, p=p)
    if non_finite and n >= 6:
        grad[3], grad[4], grad[5] = math.nan, math.inf, -math.inf
    state = random_state(L, H, n, gen=gen, dtype=dtype)
    up_u = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    up_s = torch.randn(L, 2, H, n, generator=gen, dtype=torch.float64).to(dtype)
    return grad, state, weights, up_u, up_s


def moments_for(features, grad, gen, *, advanced=True, steps=5):
    """None when the features read no moments, else moments [4, n] in grad's dtype as an optimizer keeps them:
    each coordinate has taken 0 to `steps` earlier steps (t = 0: fresh zeros) with gradients drawn like
    random_grad's, then, when `advanced` (what lstm_step receives), the step of grad itself."""
    if not registry.reads_moments(features):
        return None
    n = grad.shape[0]
    moments = torch.zeros(registry.MOMENT_ROWS, n, dtype=torch.float64)
    taken = torch.randint(0, steps + 1, (n,), generator=gen)
    for step in range(steps):
        earlier = registry.advance_moments(random_grad(n, gen=gen), moments)
        moments = torch.where(taken > step, earlier, moments)
    if advanced:
        moments = registry.advance_moments(grad.double(), moments)
    return moments.to(grad.dtype)


def reference_grads(grad, state, weights, p, scale, up_u, up_s, features=1, moments=None, output=0):
    """(update, new_state, d_grad, d_state, d_weights) of the reference's autograd on these (CPU) tensors."""
    grad = grad.detach().clone().requires_grad_(True)
    state = state.detach().clone().requires_grad_(True)
    weights = [w.detach().clone().requires_grad_(True) for w in weights]
    update, new_state = reference.lstm_step(grad, state, weights, p, scale, features, moments, output)
    d = torch.autograd.grad([update, new_state], [grad, state, *weights], [up_u, up_s])
    return update.detach(), new_state.detach(), d[0], d[1], list(d[2:])


def derived_term(grad, state, weights, p, scale, up_u, up_s, features=1, moments=None, output=0, n=None):
    """The float32 weight gradients' derived term (tolerances.WEIGHT_GRAD) for the CUDA kernels, whose sums run over
    n coordinates (default grad's; a caller that checks a sum in chunks adds the chunks' terms, with the whole n).
    The CUDA activations (device_math.h: ex2.approx and rcp.approx, ~2 ulp each; expf and IEEE division in the
    emulation) within the largest CPU bound: sigmoid ~2.7e-7 by ACTIVATIONS.md's table with 2 ulp of e and of the
    reciprocal, tanh = 2 sigmoid(2x) - 1 twice that (an estimate from the documented ulps, not a scan)."""
    n = grad.shape[0] if n is None else n
    return weight_grad_derived_term(grad, state, weights, p, scale, up_u, up_s, features, moments, output,
                                    eps=ACTIVATION_BOUND, roundings=cuda_sum_roundings(n))


def check_forward_backward(impl: Impl, n, H, L, dtype, gen, *, kind="random", p=10.0, scale=0.1,
                           non_finite=False, features=1, output=0):
    """lstm_step and lstm_step_backward on impl.device vs the float64 reference; returns the kernel outputs."""
    grad, state, weights, up_u, up_s = inputs(n, H, L, dtype, gen, kind, p, non_finite, features)
    moments = moments_for(features, grad, gen)
    options = dict(moments=on(impl, moments), output=output)
    update, new_state = impl.lstm_step(*on(impl, [grad, state]), on(impl, weights), p, scale, features, **options)
    d_grad, d_state, d_weights = impl.lstm_step_backward(*on(impl, [up_u, up_s, grad, state]), on(impl, weights),
                                                         p, scale, features, **options)
    got = [t.cpu() for t in (update, new_state, d_grad, d_state)], [t.cpu() for t in d_weights]
    ref = reference_grads(to64(grad), to64(state), to64(weights), p, scale, to64(up_u), to64(up_s), features,
                          None if moments is None else to64(moments), output)
    scales, ref_same, slopes, derived = [None, None, None], None, [None, None, None, None], None
    if dtype == torch.float32:
        ref_same = reference_grads(grad, state, weights, p, scale, up_u, up_s, features, moments, output)[4]
        derived = derived_term(grad, state, weights, p, scale, up_u, up_s, features, moments, output)
        slopes[2] = feature_slope_bound(grad, state, weights, p, scale, up_u, up_s, features, moments, output)
    elif moments is None:  # (the error scale's features see the gradient only; tanh's slope <= 1 only shrinks it)
        scales = backward_error_scale(grad, state, weights, p, scale, up_u, up_s, features=features)
    for name, a, e, es, sb in zip(("update", "new_state", "d_grad", "d_state"), got[0], ref[:4],
                                  [None, None, *scales[:2]], slopes):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert_elementwise_close(a, e, dtype, name, es, slope_bound=sb)
    assert_weight_grads_close(got[1], ref[4], dtype, ref_same, scales[2], derived)
    if non_finite and n >= 6:
        bad = torch.tensor([3, 4, 5])
        assert (got[0][0][bad] == 0).all(), "update of non-finite coordinates"
        assert torch.equal(got[0][1][..., bad], state[..., bad]), "state of non-finite coordinates must be kept bit for bit"
        assert (got[0][2][bad] == 0).all(), "d_grad of non-finite coordinates"
        assert torch.equal(got[0][3][..., bad], up_s[..., bad]), "d_state of non-finite coordinates: identity"
    return got


def expected_inplace64(grad, state, weights, p, scale, features=1, moments=None, output=0):
    """(update, new_state, new_moments) of the float64 reference's in-place step on these (rounded) inputs."""
    update = torch.zeros(grad.shape[0], dtype=torch.float64)
    state = to64(state).clone()
    moments = None if moments is None else to64(moments).clone()
    reference.lstm_step_(update, to64(grad), state, to64(weights), p, scale, features, moments, output)
    return update, state, moments


def check_step_inplace(impl: Impl, n, H, L, dtype, gen, *, non_contiguous=False, p=10.0, scale=0.1, features=1,
                       output=0):
    """lstm_step_ (param += update, state and moments advanced in place) vs the float64 reference."""
    grad, state, weights, _, _ = inputs(n, H, L, dtype, gen, non_finite=True, features=features)
    moments = moments_for(features, grad, gen, advanced=False)
    param = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    e_update, e_state, e_moments = expected_inplace64(grad, state, weights, p, scale, features, moments, output)
    g_dev, w_dev = on(impl, grad), on(impl, weights)
    if non_contiguous:  # every second element of a buffer twice as long; state and moments with coordinates not
        # last-contiguous
        param_buf = torch.zeros(2 * n, dtype=dtype, device=impl.device)
        param_dev = param_buf[::2]
        param_dev.copy_(param.to(impl.device))
        state_dev = state.to(impl.device).transpose(0, 3).contiguous().transpose(0, 3)
        moments_dev = None if moments is None else moments.to(impl.device).t().contiguous().t()
        assert n <= 1 or not param_dev.is_contiguous()
    else:
        param_dev, state_dev, moments_dev = on(impl, [param, state]) + [on(impl, moments)]
    impl.lstm_step_(param_dev, g_dev, state_dev, w_dev, p, scale, features, moments=moments_dev, output=output)
    assert_elementwise_close(param_dev.cpu(), param.double() + e_update, dtype, "param")
    assert_elementwise_close(state_dev.cpu(), e_state, dtype, "state")
    if moments is not None:
        assert_elementwise_close(moments_dev.cpu(), e_moments, dtype, "moments")
    if non_contiguous:
        assert (param_buf[1::2] == 0).all(), "lstm_step_ wrote between the elements of a strided param"
    if n >= 6:
        assert torch.equal(state_dev.cpu()[..., 3:6], state[..., 3:6]), "non-finite coordinates: state kept"
        assert torch.equal(param_dev.cpu()[3:6], param[3:6]), "non-finite coordinates: param kept"
        if moments is not None:
            assert torch.equal(moments_dev.cpu()[:, 3:6], moments[:, 3:6]), "non-finite coordinates: moments kept"


def assert_same_non_finite(actual, expected, dtype, name):
    """NaN and +-Inf where the float64 reference has them, the finite rest within tolerance."""
    a, e = actual.cpu().double(), expected.double()
    assert torch.equal(a.isnan(), e.isnan()), f"{name}: NaN at {a.isnan().nonzero()[:8].tolist()}, expected at " \
                                              f"{e.isnan().nonzero()[:8].tolist()}"
    infinite = e.isinf()
    assert torch.equal(a[infinite], e[infinite]) and not a[~infinite & ~e.isnan()].isinf().any(), f"{name}: +-Inf"
    finite = e.isfinite()
    assert_elementwise_close(a[finite], e[finite], dtype, name)


def check_nonfinite_inplace(impl: Impl, grad, state, weights, p=10.0, scale=0.1):
    """The in-place step on test_nonfinite_policy's inputs gives the reference's NaN pattern in param and state; for
    float32, so does the multi-tensor step with a bfloat16 state, the coordinates split over two slots."""
    from test_nonfinite_policy import assert_same_pattern

    param = torch.zeros_like(grad)
    p_ref, s_ref, s_got = param.double().clone(), state.double().clone(), state.clone()
    reference.lstm_step_(p_ref, grad.double(), s_ref, [w.double() for w in weights], p, scale)
    impl.lstm_step_(param, grad, s_got, weights, p, scale, 1)
    assert_same_pattern(param, p_ref, "param")
    assert_same_pattern(s_got, s_ref, "state")
    if grad.dtype != torch.float32:
        return
    s16_ref, s16_got = state.to(torch.bfloat16), state.to(torch.bfloat16)
    p_ref, p_got = torch.zeros_like(grad), torch.zeros_like(grad)
    sizes = [grad.numel() // 2, grad.numel() - grad.numel() // 2]
    reference.lstm_multi_step_(list(p_ref.split(sizes)), list(grad.split(sizes)), s16_ref, weights, p, scale)
    impl.lstm_multi_step_(list(p_got.split(sizes)), list(grad.split(sizes)), s16_got, weights, p, scale, 1)
    assert_same_pattern(p_got, p_ref, "param")
    assert_same_pattern(s16_got, s16_ref, "bf16 state")


def check_graph_replays(calls: Callable, param, state, replays: int = 2):
    """`calls(param, state)` (ops that advance param and state in place, returning their other outputs) captured
    into a CUDA graph: every replay computes what the same calls compute eagerly on copies."""
    param_e, state_e = param.clone(), state.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, on scratch copies
        calls(param.clone(), state.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = calls(param, state)
    for replay in range(replays):  # the in-place ops advance param and state on every replay
        expected = calls(param_e, state_e)
        graph.replay()
        torch.cuda.synchronize()
        for j, (a, b) in enumerate(zip(outputs, expected)):
            assert torch.equal(a, b), f"replay {replay}, output {j}"
        assert torch.equal(param, param_e) and torch.equal(state, state_e), f"replay {replay}"


def check_nonfinite_moments(impl: Impl, n, H, L, dtype, gen, *, features, output=0, p=10.0, scale=0.1):
    """Non-finite moments (m NaN, v +Inf, t NaN at finite gradients) poison their coordinates like a non-finite
    state in all four ops; a non-finite gradient keeps its coordinate's moments bit for bit, NaN or not."""
    grad, state, weights, up_u, up_s = inputs(n, H, L, dtype, gen, non_finite=True, features=features)  # 3..5 bad
    moments = moments_for(features, grad, gen, advanced=False)
    moments[0, 6], moments[1, 7], moments[2, 8] = math.nan, math.inf, math.nan
    moments[0, 4] = math.nan  # at the +Inf gradient: kept, not poisoned
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[6:9] = True
    advanced = registry.advance_moments(grad, moments)
    options = dict(moments=on(impl, advanced), output=output)
    update, new_state = impl.lstm_step(*on(impl, [grad, state]), on(impl, weights), p, scale, features, **options)
    d_grad, d_state, d_weights = impl.lstm_step_backward(*on(impl, [up_u, up_s, grad, state]), on(impl, weights),
                                                         p, scale, features, **options)
    ref = reference_grads(to64(grad), to64(state), to64(weights), p, scale, to64(up_u), to64(up_s), features,
                          to64(advanced), output)
    for name, a, e in zip(("update", "new_state", "d_grad", "d_state"), (update, new_state, d_grad, d_state), ref):
        assert_same_non_finite(a, e, dtype, name)
    assert update.cpu()[poisoned].isnan().all() and new_state.cpu()[..., poisoned].isnan().all()
    assert all(w.isnan().all() for w in d_weights), "a poisoned coordinate makes every weight gradient NaN"

    param, state_dev, moments_dev = on(impl, [torch.zeros_like(grad), state, moments])
    impl.lstm_step_(param, on(impl, grad), state_dev, on(impl, weights), p, scale, features, moments=moments_dev,
                    output=output)
    e_update, e_state, e_moments = expected_inplace64(grad, state, weights, p, scale, features, moments, output)
    for name, a, e in (("param", param, e_update), ("state", state_dev, e_state), ("moments", moments_dev, e_moments)):
        assert_same_non_finite(a, e, dtype, f"lstm_step_ {name}")
    assert torch.equal(moments_dev.cpu()[:, 3:6].isnan(), moments[:, 3:6].isnan())
    assert torch.equal(moments_dev.cpu()[:, 3:6].nan_to_num(), moments[:, 3:6].nan_to_num()), "moments kept"

    sizes = [n // 2, n - n // 2]  # the multi-tensor step: the same columns split over two tensors
    params = [torch.zeros(k, dtype=dtype) for k in sizes]
    params_dev, state_dev, moments_dev = on(impl, params), on(impl, state), on(impl, moments)
    impl.lstm_multi_step_(params_dev, on(impl, list(grad.split(sizes))), state_dev, on(impl, weights), p, scale,
                          features, moments=moments_dev, output=output)
    assert_same_non_finite(torch.cat(params_dev), e_update, dtype, "lstm_multi_step_ params")
    assert_same_non_finite(state_dev, e_state, dtype, "lstm_multi_step_ state")
    assert_same_non_finite(moments_dev, e_moments, dtype, "lstm_multi_step_ moments")


def multi_inputs(sizes, param_dtypes, H, L, weight_dtype, gen, p=10.0, features=1):
    """CPU params and grads (one per size, dtypes cycling through param_dtypes; grads in the param's dtype),
    float64 master copies, weights, a float64 state [L, 2, H, sum(sizes)]; a few non-finite gradients."""
    params, grads = [], []
    for k, n in enumerate(sizes):
        dtype = param_dtypes[k % len(param_dtypes)]
        params.append(torch.randn(n, generator=gen, dtype=torch.float64).to(dtype))
        g = random_grad(n, gen=gen, p=p, hi=1e2)
        if n >= 5 and k % 2 == 0:
            g[2], g[4] = math.nan, math.inf
        grads.append(g.to(dtype))
    weights = random_weights(H, L, gen=gen, dtype=weight_dtype, features=features)
    state = random_state(L, H, sum(sizes), gen=gen)
    return params, grads, weights, state


def check_multi_step(impl: Impl, sizes, param_dtypes, H, L, gen, *, weight_dtype=torch.float32,
                     state_dtype=torch.float32, p=10.0, scale=0.1, features=1, output=0):
    """lstm_multi_step_ vs the float64 reference on the rounded inputs, tensor by tensor."""
    params, grads, weights, state64 = multi_inputs(sizes, param_dtypes, H, L, weight_dtype, gen, p, features)
    state = state64.to(state_dtype)
    math_dtype = weight_dtype  # float32 arithmetic for float32 weights, whatever the storage
    all_grads = torch.cat([g.to(math_dtype) for g in grads]) if grads else torch.zeros(0, dtype=math_dtype)
    moments = moments_for(features, all_grads, gen, advanced=False)
    params_dev, grads_dev, state_dev = on(impl, params), on(impl, grads), on(impl, state)
    moments_dev = on(impl, moments)
    impl.lstm_multi_step_(params_dev, grads_dev, state_dev, on(impl, weights), p, scale, features, moments=moments_dev,
                          output=output)
    new_state = state_dev.cpu()
    assert new_state.dtype == state_dtype
    begin = 0
    for k, n in enumerate(sizes):
        cols = slice(begin, begin + n)
        begin += n
        e_update, e_state, e_moments = expected_inplace64(grads[k].to(math_dtype), state[..., cols], weights, p, scale,
                                                          features, None if moments is None else moments[:, cols],
                                                          output)
        if moments is not None:
            assert_elementwise_close(moments_dev[:, cols].cpu(), e_moments, math_dtype, f"moments of params[{k}]")
        got_param = params_dev[k].cpu()
        assert got_param.dtype == params[k].dtype
        expected_param = params[k].double() + e_update
        if n == 0:
            assert got_param.shape == (0,)
        elif params[k].dtype in PARAM_16BIT:
            rel = PARAM_16BIT[params[k].dtype]
            err = (got_param.double() - expected_param).abs()
            bound = rel * expected_param.abs() + 5e-5 * e_update.abs().max() + 1e-30
            assert (err <= bound).all(), f"params[{k}] ({params[k].dtype}): worst error {err.max().item():.3e}"
        else:  # float32 storage or float32 arithmetic: float32 tolerance
            tol_dtype = torch.float64 if params[k].dtype == math_dtype == torch.float64 else torch.float32
            assert_elementwise_close(got_param, expected_param, tol_dtype, f"params[{k}]")
        if state_dtype == torch.bfloat16:
            a, e = new_state[..., cols].double(), e_state
            if n:
                bound = BF16_STATE["rtol"] * e.abs() + BF16_STATE["atol_rel"] * e.abs().max() + BF16_STATE["atol"]
                err = (a - e).abs()
                assert (err <= bound).all(), f"state of params[{k}] (bfloat16): worst error {err.max().item():.3e}"
        else:
            assert_elementwise_close(new_state[..., cols], e_state, math_dtype, f"state of params[{k}]")
        bad = ~torch.isfinite(grads[k].double())
        if bad.any():
            assert torch.equal(got_param[bad], params[k][bad]), f"params[{k}]: non-finite gradient must not move it"
            assert torch.equal(new_state[..., cols][..., bad], state[..., cols][..., bad]), \
                f"state of params[{k}]: non-finite gradient must keep it bit for bit"
            if moments is not None:
                assert torch.equal(moments_dev[:, cols][:, bad].cpu(), moments[:, cols][:, bad]), \
                    f"moments of params[{k}]: non-finite gradient must keep them bit for bit"


def check_multi_matches_single(impl: Impl, sizes, H, L, gen, p=10.0, scale=0.1, features=1, output=0):
    """float32 everywhere: the multi-tensor step equals lstm_step_ on each tensor alone, bit for bit (state and
    moments columns at the same offsets)."""
    params, grads, weights, state64 = multi_inputs(sizes, [torch.float32], H, L, torch.float32, gen, p, features)
    state = state64.float()
    all_grads = torch.cat(grads) if grads else torch.zeros(0)
    moments = moments_for(features, all_grads, gen, advanced=False)
    params_m, grads_d, state_m, w = on(impl, params), on(impl, grads), on(impl, state), on(impl, weights)
    moments_m = on(impl, moments)
    impl.lstm_multi_step_(params_m, grads_d, state_m, w, p, scale, features, moments=moments_m, output=output)
    begin = 0
    for k, n in enumerate(sizes):
        cols = slice(begin, begin + n)
        param_s = on(impl, params[k])
        state_s = on(impl, state[..., cols].contiguous())
        moments_s = None if moments is None else on(impl, moments[:, cols].contiguous())
        impl.lstm_step_(param_s, grads_d[k], state_s, w, p, scale, features, moments=moments_s, output=output)
        assert torch.equal(params_m[k].cpu(), param_s.cpu()), f"params[{k}]"
        assert torch.equal(state_m[..., cols].cpu(), state_s.cpu()), f"state of params[{k}]"
        if moments is not None:
            assert torch.equal(moments_m[:, cols].cpu(), moments_s.cpu()), f"moments of params[{k}]"
        begin += n


def check_backward_deterministic(impl: Impl, n, H, L, dtype, gen, p=10.0, scale=0.1):
    """Two backward calls on the same inputs give bit-identical weight gradients (no atomics)."""
    grad, state, weights, up_u, up_s = on(impl, inputs(n, H, L, dtype, gen))
    first = impl.lstm_step_backward(up_u, up_s, grad, state, weights, p, scale)
    second = impl.lstm_step_backward(up_u, up_s, grad, state, weights, p, scale)
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# Ten steps of the multi-tensor step with bfloat16 state vs float32 state from the same (bf16-representable)
# start: the rounding of every stored h and c (2^-9 relative) feeds the next steps. The bound is on
# max|param_bf16 - param_f32| / max|param_f32 - param_0|, the deviation as a fraction of the distance moved.
# Measured with the kernels' code on CPU threads (test_cuda_emulated, n = 5000, H = 20, L = 2, seeds 0-9):
# 3.3e-4 to 1.8e-3. The bound leaves 5x for other seeds and the GPU's own exp/reciprocal.
BF16_TRAJECTORY_REL = 1e-2


def check_bf16_trajectory(impl: Impl, n, H, L, gen, steps=10, p=10.0, scale=0.1):
    """bf16 vs f32 state over `steps` steps; returns the measured relative deviation."""
    weights = on(impl, random_weights(H, L, gen=gen, dtype=torch.float32))
    state0 = random_state(L, H, n, gen=gen).to(torch.bfloat16)
    param0 = torch.randn(n, generator=gen)
    grads = [on(impl, random_grad(n, gen=gen, dtype=torch.float32, p=p, lo=1e-6, hi=1e1)) for _ in range(steps)]
    runs = {}
    for state_dtype in (torch.float32, torch.bfloat16):
        param, state = on(impl, param0), on(impl, state0.to(state_dtype))
        for g in grads:
            impl.lstm_multi_step_([param], [g], state, weights, p, scale)
        runs[state_dtype] = param.cpu().double()
    moved = (runs[torch.float32] - param0.double()).abs().max().item()
    deviation = (runs[torch.bfloat16] - runs[torch.float32]).abs().max().item()
    rel = deviation / moved
    assert rel <= BF16_TRAJECTORY_REL, f"bfloat16 state drifted {rel:.3e} of the distance moved (> {BF16_TRAJECTORY_REL})"
    return rel
