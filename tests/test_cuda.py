"""The CUDA kernels on a GPU: against the float64 CPU reference, gradcheck, opcheck, bfloat16 state,
CUDA graphs / torch.compile(mode="reduce-overhead"), a non-default stream, the multi-tensor step.

Skipped without a GPU. On a machine with a GPU but an extension built without the CUDA kernels, every
test fails (a CPU-only build there is a build problem, not a reason to skip).
Shared checks: tests/cuda_cases.py (also run, on CPU threads, by test_cuda_emulated.py).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.autograd import gradcheck

import cuda_cases as cases
from conftest import (DTYPE_IDS, FEATURE_SETS, WEIGHT_KINDS, feature_id, make_net, random_grad, random_state,
                      random_weights, reference_forward64, requires_native, to64)
from l2l_fast import features as registry
from l2l_fast import ops
from test_gradcheck import assert_away_from_kink, away_from_kink, unroll
from tolerances import assert_elementwise_close, assert_weight_grads_close

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)", allow_module_level=True)
pytestmark = requires_native

DTYPES = [torch.float32, torch.float64]
P, SCALE = 10.0, 0.1
IMPL = cases.cuda_ops()


@pytest.fixture(autouse=True)
def cuda_kernels_built():
    from l2l_fast import _C

    assert _C.has_cuda_kernels(), "a GPU is present but l2l_fast._C was built without the CUDA kernels"
    assert "cuda" in ops.native_devices()


# ---------------------------------------------------------------------------------------------
# kernel vs the float64 CPU reference
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [1, 7, 4097, 2**16 + 3], ids=lambda n: f"n{n}")
def test_step_matches_reference(gen, n, dtype, kind):
    cases.check_forward_backward(IMPL, n, 20, 2, dtype, gen, kind=kind, non_finite=True)


@pytest.mark.parametrize("hidden_size,num_layers", [(1, 1), (3, 2), (8, 2), (19, 1), (20, 1), (20, 3), (33, 3),
                                                    (64, 1), (100, 2), (128, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_hidden_sizes_and_layers(gen, hidden_size, num_layers, dtype):
    """Every size but (20, 2) runs the run-time-sized kernels (per-thread arrays in local memory)."""
    cases.check_forward_backward(IMPL, 133, hidden_size, num_layers, dtype, gen, non_finite=True)


@pytest.mark.parametrize("output", [0, 1], ids=["linear", "tanh"])
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("hidden,layers", [(20, 2), (3, 2)], ids=lambda v: str(v))
def test_features(gen, hidden, layers, dtype, features, output):
    """Every set of input features and output kind: forward, backward, step_ and the multi-tensor step, the sets
    reading moments with them (with 20 x 2, the paper's set runs the compiled-in sizes and every other set the
    run-time path)."""
    cases.check_forward_backward(IMPL, 4097, hidden, layers, dtype, gen, non_finite=True, features=features,
                                 output=output)
    cases.check_step_inplace(IMPL, 1000, hidden, layers, dtype, gen, features=features, output=output)
    cases.check_multi_step(IMPL, [7, 0, 4000], [dtype], hidden, layers, gen, weight_dtype=dtype, state_dtype=dtype,
                           features=features, output=output)


@pytest.mark.parametrize("features", cases.MOMENT_SETS, ids=feature_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_nonfinite_moments(gen, dtype, features):
    """Non-finite moments poison like a non-finite state; a non-finite gradient keeps its moments bit for bit."""
    for output in (0, 1):
        cases.check_nonfinite_moments(IMPL, 1000, 20, 2, dtype, gen, features=features, output=output)


@pytest.mark.parametrize("p,scale", [(1.0, 1.0), (20.0, -0.5), (0.25, 7.0)], ids=lambda v: str(v))
def test_preprocess_p_and_output_scale(gen, p, scale):
    cases.check_forward_backward(IMPL, 513, 20, 2, torch.float32, gen, p=p, scale=scale)


def test_huge_n(gen):
    """n = 2^20 + 3 (no multiple of a block; many tiles per block): forward, in-place step and backward.

    The float64 reference runs in chunks of 2^17 coordinates; its weight gradients are the chunk sums, and so
    are those of PyTorch float32 that the flash-attention rule compares the kernel with.
    """
    H, L, n, dtype = 20, 2, 2**20 + 3, torch.float32
    grad, state, weights, up_u, up_s = cases.inputs(n, H, L, dtype, gen, non_finite=True)
    param = torch.randn(n, generator=gen, dtype=dtype)
    g_d, s_d, w_d = cases.on(IMPL, [grad, state, weights])
    update, new_state = ops.lstm_step(g_d, s_d, w_d, P, SCALE)
    d_grad, d_state, d_weights = torch.ops.l2l_fast.lstm_step_backward(*cases.on(IMPL, [up_u, up_s]), g_d, s_d, w_d,
                                                                       P, SCALE)
    p_d = param.cuda()
    ops.lstm_step_(p_d, g_d, s_d, w_d, P, SCALE)
    torch.cuda.synchronize()

    e_update, e_state = reference_forward64(grad, state, weights, P, SCALE)
    assert_elementwise_close(update.cpu(), e_update, dtype, "update")
    assert_elementwise_close(new_state.cpu(), e_state, dtype, "new_state")
    assert_elementwise_close(p_d.cpu(), param.double() + e_update, dtype, "param (step_)")
    assert_elementwise_close(s_d.cpu(), e_state, dtype, "state (step_)")
    del e_state, new_state

    chunk = 2**17
    e_dw64 = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
    e_dw32 = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
    derived = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
    d_grad, d_state = d_grad.cpu(), d_state.cpu()
    for start in range(0, n, chunk):
        cols = slice(start, start + chunk)
        ref = cases.reference_grads(to64(grad[cols]), to64(state[..., cols]), to64(weights), P, SCALE,
                                    to64(up_u[cols]), to64(up_s[..., cols]))
        same = cases.reference_grads(grad[cols], state[..., cols], weights, P, SCALE, up_u[cols], up_s[..., cols])[4]
        assert_elementwise_close(d_grad[cols], ref[2], dtype, f"d_grad[{cols}]")
        assert_elementwise_close(d_state[..., cols], ref[3], dtype, f"d_state[..., {cols}]")
        term = cases.derived_term(grad[cols], state[..., cols], weights, P, SCALE, up_u[cols], up_s[..., cols], n=n)
        for total64, total32, total_term, e64, e32, t in zip(e_dw64, e_dw32, derived, ref[4], same, term):
            total64 += e64
            total32 += e32.double()
            total_term += t
    assert_weight_grads_close([d.cpu() for d in d_weights], e_dw64, dtype, e_dw32, derived=derived)


def test_non_contiguous_inputs(gen):
    """Strided grad, state, upstream gradients and weights: the op makes contiguous copies, same results."""
    H, L, n, dtype = 20, 2, 301, torch.float32
    grad, state, weights, up_u, up_s = cases.inputs(n, H, L, dtype, gen, non_finite=True)

    def strided(t):  # same values, other strides: every second element / transposed storage
        t = t.cuda()
        if t.dim() == 1:
            buf = torch.full((2 * t.numel(),), math.nan, dtype=t.dtype, device=t.device)
            buf[::2] = t
            return buf[::2]
        return t.transpose(0, -1).contiguous().transpose(0, -1)

    args = [strided(t) for t in (grad, state)], [strided(w) for w in weights]
    assert not args[0][0].is_contiguous() and not args[0][1].is_contiguous()
    update, new_state = ops.lstm_step(*args[0], args[1], P, SCALE)
    d = torch.ops.l2l_fast.lstm_step_backward(strided(up_u), strided(up_s), *args[0], args[1], P, SCALE)
    c_update, c_state = ops.lstm_step(*cases.on(IMPL, [grad, state]), cases.on(IMPL, weights), P, SCALE)
    c_d = torch.ops.l2l_fast.lstm_step_backward(*cases.on(IMPL, [up_u, up_s, grad, state]), cases.on(IMPL, weights),
                                                P, SCALE)
    assert torch.equal(update, c_update) and torch.equal(new_state, c_state)
    assert torch.equal(d[0], c_d[0]) and torch.equal(d[1], c_d[1])
    for a, b in zip(d[2], c_d[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [1, 7, 2**16 + 3], ids=lambda n: f"n{n}")
def test_step_inplace(gen, n, dtype, non_contiguous):
    cases.check_step_inplace(IMPL, n, 20, 2, dtype, gen, non_contiguous=non_contiguous)


def test_backward_deterministic(gen):
    cases.check_backward_deterministic(IMPL, 100_003, 20, 2, torch.float32, gen)


def test_module_on_cuda(gen):
    """CoordinatewiseLSTM on a CUDA device picks the CUDA kernels (backend 'auto') and matches the reference."""
    net = make_net(20, 2, gen=gen, dtype=torch.float32).cuda()
    ref = make_net(20, 2, gen=gen, dtype=torch.float32, backend="reference").cuda()
    ref.load_state_dict(net.state_dict())
    grad, state = random_grad(1000, gen=gen, dtype=torch.float32).cuda(), random_state(2, 20, 1000, gen=gen).float().cuda()
    with torch.no_grad():
        got, expected = net(grad, state), ref(grad, state)
    assert_elementwise_close(got[0].cpu(), expected[0].cpu().double(), torch.float32, "update")


def test_rejects_bad_inputs(gen):
    grad, state, weights, _, _ = cases.inputs(5, 129, 1, torch.float32, gen)
    with pytest.raises(ValueError, match="hidden_size 129"):
        torch.ops.l2l_fast.lstm_step(*cases.on(IMPL, [grad, state]), cases.on(IMPL, weights), P, SCALE)
    grad, state, weights, _, _ = cases.inputs(5, 20, 2, torch.float32, gen)
    with pytest.raises(ValueError, match="state: expected a tensor on cuda"):
        torch.ops.l2l_fast.lstm_step(grad.cuda(), state, cases.on(IMPL, weights), P, SCALE)


# ---------------------------------------------------------------------------------------------
# gradcheck in float64 on the GPU
@pytest.mark.parametrize("hidden_size,num_layers,n,p", [(3, 2, 7, 10.0), (20, 2, 3, 10.0), (5, 3, 5, 1.0)],
                         ids=["H3-L2-n7-p10", "H20-L2-n3-p10", "H5-L3-n5-p1"])
def test_gradcheck_single_step(gen, hidden_size, num_layers, n, p):
    weights = [w.cuda().requires_grad_(True) for w in random_weights(hidden_size, num_layers, gen=gen, kind="random")]
    grad = away_from_kink(n, p, gen=gen)
    state = random_state(num_layers, hidden_size, n, gen=gen).cuda().requires_grad_(True)
    assert_away_from_kink(grad, p, margin=0.25)

    def fn(k, state, *weights):
        return ops.lstm_step(k * math.exp(-p), state, list(weights), p, 0.3)

    k = (grad / math.exp(-p)).cuda().requires_grad_(True)
    assert gradcheck(fn, (k, state, *weights), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_moments_and_tanh_output(gen):
    """The paper's features with the moments (data: no gradient) and the bounded output, run-time path."""
    p, H, L, n, features = 10.0, 3, 2, 7, registry.ALL_MASK
    weights = [w.cuda().requires_grad_(True) for w in random_weights(H, L, gen=gen, kind="random", features=features)]
    grad = away_from_kink(n, p, gen=gen)
    assert_away_from_kink(grad, p, margin=0.25)
    moments = cases.moments_for(features, grad, gen).cuda()
    state = random_state(L, H, n, gen=gen).cuda().requires_grad_(True)

    def fn(k, state, *weights):
        return ops.lstm_step(k * math.exp(-p), state, list(weights), p, 0.3, features, moments, 1)

    k = (grad / math.exp(-p)).cuda().requires_grad_(True)
    assert gradcheck(fn, (k, state, *weights), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_three_unrolled_steps(gen):
    p, scale, a, steps, H, L, n = 2.0, 0.1, 0.02, 3, 3, 2, 6
    weights = [w.cuda().requires_grad_(True) for w in random_weights(H, L, gen=gen, kind="random")]
    state0 = random_state(L, H, n, gen=gen).cuda().requires_grad_(True)
    theta0 = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1).cuda().requires_grad_(True)
    noises = [away_from_kink(n, p, gen=gen).cuda().requires_grad_(True) for _ in range(steps)]
    with torch.no_grad():
        _, _, grads = unroll(ops.lstm_step, weights, state0, theta0, noises, a=a, p=p, scale=scale)
    for g in grads:
        assert_away_from_kink(g.cpu(), p, margin=0.1)
    n_w = len(weights)

    def fn(*inputs):
        ws, state, theta, ns = inputs[:n_w], inputs[n_w], inputs[n_w + 1], inputs[n_w + 2:]
        theta_T, state_T, _ = unroll(ops.lstm_step, ws, state, theta, ns, a=a, p=p, scale=scale)
        return theta_T, state_T

    assert gradcheck(fn, (*weights, state0, theta0, *noises), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# opcheck
def _sample(gen, dtype, n=7, H=3, L=2):
    grad = random_grad(n, gen=gen, dtype=dtype, p=P)
    if n >= 5:
        grad[4] = math.nan
    return grad.cuda(), random_state(L, H, n, gen=gen, dtype=dtype).cuda(), [
        w.cuda() for w in random_weights(H, L, gen=gen, dtype=dtype)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [7, 0], ids=lambda n: f"n{n}")
def test_opcheck(gen, dtype, n):
    grad, state, weights = _sample(gen, dtype, n)
    torch.library.opcheck(torch.ops.l2l_fast.lstm_step.default, (grad, state, weights, P, SCALE))
    state_rg = state.clone().requires_grad_(True)
    weights_rg = [w.clone().requires_grad_(True) for w in weights]
    torch.library.opcheck(torch.ops.l2l_fast.lstm_step.default, (grad, state_rg, weights_rg, P, SCALE))
    up_u, up_s = torch.randn_like(grad), torch.randn_like(state)
    torch.library.opcheck(torch.ops.l2l_fast.lstm_step_backward.default, (up_u, up_s, grad, state, weights, P, SCALE))
    torch.library.opcheck(torch.ops.l2l_fast.lstm_step_.default, (torch.randn_like(grad), grad, state, weights, P, SCALE))


def _has_fake(op_name: str) -> bool:
    try:
        from torch._library.simple_registry import singleton
        return singleton.find(op_name).fake_impl.kernel is not None
    except Exception:  # noqa: BLE001 - private API: without it, test what needs no fake kernel
        return False


def test_opcheck_multi_step(gen):
    """All of opcheck where the fake kernel of lstm_multi_step_ is registered (it comes with its CPU kernel);
    until then the schema and autograd-registration parts."""
    grad, state, weights = _sample(gen, torch.float32, n=9)
    params = [torch.randn(4, device="cuda"), torch.randn(5, device="cuda").to(torch.bfloat16)]
    grads = [grad[:4].clone(), grad[4:].to(torch.bfloat16)]
    utils = None if _has_fake("l2l_fast::lstm_multi_step_") else ("test_schema", "test_autograd_registration")
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.l2l_fast.lstm_multi_step_.default, (params, grads, state, weights, P, SCALE),
                          **kwargs)


# ---------------------------------------------------------------------------------------------
# bfloat16 state and the multi-tensor step
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32-state", "bf16-state"])
def test_multi_step_mixed_dtypes(gen, state_dtype):
    sizes = [7, 0, 1, 4097, 5, 2**16 + 3, 33]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]  # the params float32 weights take
    cases.check_multi_step(IMPL, sizes, dtypes, 20, 2, gen, state_dtype=state_dtype)


def test_multi_step_float64_weights(gen):
    cases.check_multi_step(IMPL, [9, 4000], [torch.float64], 4, 2, gen, weight_dtype=torch.float64,
                           state_dtype=torch.float64)
    cases.check_multi_step(IMPL, [9, 4000], [torch.float64], 20, 2, gen, weight_dtype=torch.float64,
                           state_dtype=torch.bfloat16)


def test_multi_step_matches_single_tensor_steps(gen):
    """One launch over many tensors equals lstm_step_ per tensor, bit for bit; 130 tensors need 3 launches."""
    cases.check_multi_matches_single(IMPL, [5, 1, 70_000, 0, 32, 3, 1000], 20, 2, gen)
    cases.check_multi_matches_single(IMPL, [(k * 37) % 301 for k in range(130)], 20, 2, gen)


def test_bf16_state_trajectory(gen):
    """Ten steps with bfloat16 state stay close to ten with float32 state (cases.BF16_TRAJECTORY_REL)."""
    cases.check_bf16_trajectory(IMPL, 50_000, 20, 2, gen)


# ---------------------------------------------------------------------------------------------
# CUDA graphs, torch.compile(mode="reduce-overhead"), streams
def test_cuda_graph_capture(gen):
    """Every op captures into a CUDA graph (no host synchronisation, no host-device copy) and its replays compute
    what the same calls compute eagerly."""
    grad, state, weights, up_u, up_s = cases.on(IMPL, cases.inputs(70_003, 20, 2, torch.float32, gen, non_finite=True))
    param = torch.randn(grad.shape, device="cuda")

    def calls(param, state):
        update, new_state = ops.lstm_step(grad, state, weights, P, SCALE)
        d = torch.ops.l2l_fast.lstm_step_backward(up_u, up_s, grad, state, weights, P, SCALE)
        ops.lstm_step_(param, grad, state, weights, P, SCALE)
        torch.ops.l2l_fast.lstm_multi_step_([param[:10], param[10:]], [grad[:10], grad[10:]], state, weights, P, SCALE)
        return [update, new_state, d[0], d[1], *d[2]]

    cases.check_graph_replays(calls, param, state)


def test_cuda_graph_replays_see_in_place_weight_updates(gen):
    """Regression guard of the packed-weight cache (csrc/packed_cache.h): during capture the packing is recorded
    into the graph instead of taken from the cache, so replays pack the weights as they are at replay time. The
    capture stream was warmed up with these very weights, so a cached packing would be found there."""
    grad, state, weights, _, _ = cases.on(IMPL, cases.inputs(4096, 20, 2, torch.float32, gen))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.lstm_step(grad, state, weights, P, SCALE)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        update, _ = ops.lstm_step(grad, state, weights, P, SCALE)
    for _ in range(2):
        with torch.no_grad():
            weights[-2].add_(0.5)
        graph.replay()
        torch.cuda.synchronize()
        expected = ops.lstm_step(grad, state, [w.clone() for w in weights], P, SCALE)[0]
        assert torch.equal(update, expected)


def test_packed_weights_are_cached_per_stream(gen):
    from l2l_fast import _C

    grad, state, weights, _, _ = cases.on(IMPL, cases.inputs(1000, 20, 2, torch.float32, gen))
    _C.clear_packed_cache()
    ops.lstm_step(grad, state, weights, P, SCALE)
    ops.lstm_step(grad, state, weights, P, SCALE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.lstm_step(grad, state, weights, P, SCALE)
    torch.cuda.current_stream().wait_stream(side)
    stats = _C.packed_cache_stats()
    assert (stats["hits"], stats["misses"]) == (1, 2)


def test_compile_reduce_overhead(gen):
    net = make_net(20, 2, gen=gen, dtype=torch.float32).cuda()
    torch._dynamo.reset()
    try:
        def fn(grad, state):
            update, new_state = net(grad, state)
            return update * 2, new_state

        compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
        for _ in range(4):  # warm-up, recording, replays
            grad = random_grad(4096, gen=gen, dtype=torch.float32).cuda()
            state = random_state(2, 20, 4096, gen=gen).float().cuda()
            with torch.no_grad():
                got = [t.clone() for t in compiled(grad, state)]
                expected = fn(grad, state)
            torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
            torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_runs_on_the_current_stream(gen):
    """The kernels go on torch's current stream: inputs produced on a side stream after a long sleep are ready
    when the kernels read them only if the kernels wait in that stream's order."""
    grad, state, weights, up_u, up_s = cases.on(IMPL, cases.inputs(100_000, 20, 2, torch.float32, gen))
    expected = ops.lstm_step(grad, state, weights, P, SCALE)
    expected_d = torch.ops.l2l_fast.lstm_step_backward(up_u, up_s, grad, state, weights, P, SCALE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the inputs exist
        grad_late = grad * 1.0
        state_late = state * 1.0
        update, new_state = ops.lstm_step(grad_late, state_late, weights, P, SCALE)
        d = torch.ops.l2l_fast.lstm_step_backward(up_u, up_s, grad_late, state_late, weights, P, SCALE)
        param = torch.zeros_like(grad)
        ops.lstm_step_(param, grad_late, state_late, weights, P, SCALE)
    side.synchronize()
    assert torch.equal(update, expected[0]) and torch.equal(new_state, expected[1])
    assert torch.equal(d[0], expected_d[0]) and all(torch.equal(a, b) for a, b in zip(d[2], expected_d[2]))
    assert torch.equal(param, expected[0]) and torch.equal(state_late, expected[1])


# ---------------------------------------------------------------------------------------------
# the drop-in optimizer on CUDA tensors (one lstm_multi_step_ launch per group)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_learned_optimizer_matches_reference_optimizer(gen, dtype):
    from test_optimizer import STEPS, ReferenceOptimizer, assert_close, make_params, set_random_grads

    from l2l_fast import LearnedOptimizer

    net = make_net(gen=gen, dtype=dtype, kind="random")
    shapes = [(0,), (1,), (7,), (2**16 + 3,), (13, 7), (3, 5, 4)]
    cpu_params = make_params(shapes, dtype, gen, non_contiguous=(4,))
    params = [torch.nn.Parameter(p.detach().cuda()) for p in cpu_params]
    start = [p.detach().clone() for p in cpu_params]
    ref = ReferenceOptimizer(cpu_params, net)
    opt = LearnedOptimizer(params, copy.deepcopy(net).cuda())  # a copy: the CPU reference keeps the CPU net
    for _ in range(STEPS):
        grads = set_random_grads(cpu_params, gen)
        for p, g in zip(params, grads):
            p.grad = g.cuda()
        opt.step()
        ref.step(grads)
    for k, p in enumerate(params):
        moved = p.detach().cpu().double().reshape(-1) - start[k].double().reshape(-1)
        assert_close(moved, ref.params[k] - start[k].double().reshape(-1), dtype, f"displacement[{k}]")
        state = opt.state[p]["lstm_state"].cpu()
        assert_close(state.reshape(*state.shape[:3], -1), ref.states[k], dtype, f"state[{k}]")


def test_learned_optimizer_bfloat16_params_and_state(gen):
    """bfloat16 parameters with a bfloat16 LSTM state train like float32 ones (within bf16 rounding)."""
    from l2l_fast import LearnedOptimizer

    net = make_net(gen=gen, dtype=torch.float32, kind="random").cuda()
    target = torch.randn(4096, generator=gen).cuda()
    runs = {}
    for name, dtype, state_dtype in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, torch.bfloat16)):
        p = torch.nn.Parameter(torch.zeros(4096, device="cuda", dtype=dtype))
        opt = LearnedOptimizer([p], net, state_dtype=state_dtype)
        for _ in range(20):
            opt.zero_grad()
            ((p.float() - target) ** 2).mean().backward()
            opt.step()
        runs[name] = p.detach().float()
        assert p.dtype == dtype
    assert torch.isfinite(runs["bf16"]).all()
    assert (runs["bf16"] - runs["fp32"]).abs().max() <= 0.05 * runs["fp32"].abs().max() + 1e-3
