"""The CUDA kernels' code run on CPU threads (tests/cuda_emulation/emulate.cpp) against the reference.

Checks the kernel bodies (indexing, tiling, barriers, shared-memory staging, the per-block weight-gradient
rows, the multi-tensor slots) and the ops' host code (csrc/cuda/step_ops.h) without a GPU. It compiles
its own small extension (about a minute), so it runs only with L2L_FAST_CUDA_EMULATION=1, e.g. from
scripts/check_cuda_build.sh; it needs no CUDA toolkit. The GPU's own arithmetic (ex2.approx, the
compiler's contractions) is not emulated: tests/test_cuda.py checks that on a GPU.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import cuda_cases as cases
from conftest import DTYPE_IDS, FEATURE_SETS, feature_id, step_grads
from l2l_fast import features as registry
from l2l_fast import reference

if os.environ.get("L2L_FAST_CUDA_EMULATION") != "1":
    pytest.skip("set L2L_FAST_CUDA_EMULATION=1 to build and run the CPU emulation of the CUDA kernels",
                allow_module_level=True)

DTYPES = [torch.float32, torch.float64]
# (hidden, layers): the compiled-in size (registers, unrolled) and the run-time paths up to 32 and 128
SHAPES = [(20, 2), (3, 2), (1, 1), (33, 3)]
OUTPUTS = [0, 1]  # update = scale * y, scale * tanh(y)
# the paper's features alone, and with the running moments (which only the run-time path reads)
MOMENT_SETS = cases.MOMENT_SETS


def output_id(output):
    return ("linear", "tanh")[output]


@pytest.fixture(scope="module")
def emu():
    return cases.emulation_module()


@pytest.fixture
def impl(emu):
    emu.configure(forward_threads=32, forward_blocks=3, backward_blocks=3, smem_limit=227 * 1024,
                  forward_smem_limit=48 * 1024, mma_threads=64)
    return cases.Impl("cpu", emu.lstm_step, emu.lstm_step_backward, emu.lstm_step_, emu.lstm_multi_step_)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("hidden,layers", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("n", [1, 7, 300], ids=lambda n: f"n{n}")
def test_forward_backward(impl, gen, n, hidden, layers, dtype):
    cases.check_forward_backward(impl, n, hidden, layers, dtype, gen, non_finite=True)


@pytest.mark.parametrize("output", OUTPUTS, ids=output_id)
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("hidden,layers", [(20, 2), (3, 2)], ids=lambda v: str(v))
def test_features(impl, gen, hidden, layers, dtype, features, output):
    """Every set of input features and output kind: forward, backward, step_ and the multi-tensor step, the sets
    reading moments with them (with 20 x 2, the paper's set runs the compiled-in sizes and every other set the
    run-time path)."""
    cases.check_forward_backward(impl, 100, hidden, layers, dtype, gen, non_finite=True, features=features,
                                 output=output)
    cases.check_step_inplace(impl, 37, hidden, layers, dtype, gen, features=features, output=output)
    cases.check_multi_step(impl, [7, 0, 40], [dtype], hidden, layers, gen, weight_dtype=dtype, state_dtype=dtype,
                           features=features, output=output)


@pytest.mark.parametrize("features", MOMENT_SETS, ids=feature_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_moments_large_hidden(impl, gen, dtype, features):
    """Moments and the bounded output on the run-time path up to 128 (local-memory arrays), over several tiles."""
    cases.check_forward_backward(impl, 300, 33, 3, dtype, gen, non_finite=True, features=features, output=1)
    cases.check_step_inplace(impl, 70, 33, 3, dtype, gen, features=features, output=1)


@pytest.mark.parametrize("kind", ["init", "saturating"])
def test_weight_kinds(impl, gen, kind):
    cases.check_forward_backward(impl, 200, 20, 2, torch.float32, gen, kind=kind)


def test_many_tiles_per_block(impl, emu, gen):
    """n = 2000 over 3 blocks of 32 (forward) / 128 (backward) threads: each block loops over many tiles."""
    cases.check_forward_backward(impl, 2000, 20, 2, torch.float32, gen)


def test_small_shared_memory(impl, emu, gen):
    """Less shared memory: the backward takes smaller blocks (64, then 32 threads), then leaves the weights in
    global memory (the forward too, below its 1 KB limit here); beyond that it refuses with a message."""
    emu.configure(forward_threads=64, forward_blocks=2, backward_blocks=2, smem_limit=24 * 1024, forward_smem_limit=1024)
    cases.check_forward_backward(impl, 150, 7, 2, torch.float32, gen)  # 64 threads, weights in shared memory
    emu.configure(forward_threads=64, forward_blocks=2, backward_blocks=2, smem_limit=40 * 1024, forward_smem_limit=1024)
    cases.check_forward_backward(impl, 150, 33, 1, torch.float32, gen)  # 32 threads, weights in global memory
    with pytest.raises(RuntimeError, match="shared memory"):
        cases.check_forward_backward(impl, 150, 33, 1, torch.float64, gen)


@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_step_inplace(impl, gen, dtype, non_contiguous):
    cases.check_step_inplace(impl, 97, 20, 2, dtype, gen, non_contiguous=non_contiguous)
    cases.check_step_inplace(impl, 50, 5, 3, dtype, gen, non_contiguous=non_contiguous)
    for features in MOMENT_SETS:  # strided moments are advanced in a copy and written back
        cases.check_step_inplace(impl, 50, 5, 3, dtype, gen, non_contiguous=non_contiguous, features=features)


@pytest.mark.parametrize("features", [1, *MOMENT_SETS], ids=feature_id)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32-state", "bf16-state"])
def test_multi_step_mixed_dtypes(impl, gen, state_dtype, features):
    sizes = [7, 0, 1, 130, 5, 64, 33]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]  # the params float32 weights take
    cases.check_multi_step(impl, sizes, dtypes, 20, 2, gen, state_dtype=state_dtype, features=features, output=1)


def test_bf16_state_trajectory(impl, gen):
    cases.check_bf16_trajectory(impl, 3000, 20, 2, gen)


def test_multi_step_float64_weights(impl, gen):
    cases.check_multi_step(impl, [9, 40], [torch.float64], 4, 2, gen, weight_dtype=torch.float64,
                           state_dtype=torch.float64)
    cases.check_multi_step(impl, [9, 40], [torch.float64], 4, 2, gen, weight_dtype=torch.float64,
                           state_dtype=torch.bfloat16)


def test_multi_step_matches_single_tensor_steps(impl, gen):
    cases.check_multi_matches_single(impl, [5, 1, 77, 0, 32, 3], 20, 2, gen)


@pytest.mark.parametrize("features", [1, *MOMENT_SETS], ids=feature_id)
def test_multi_step_many_tensors(impl, emu, gen, features):
    """110 tensors: more than one launch's 48 slots, so the launches split and must still tile the state (and the
    moments, at the same columns)."""
    sizes = [(k * 7) % 11 for k in range(110)]
    before = emu.launches()
    cases.check_multi_matches_single(impl, sizes, 3, 1, gen, features=features, output=1)
    nonempty = sum(1 for n in sizes if n)
    assert emu.launches() - before >= (nonempty + 47) // 48 + nonempty  # the multi step's launches + one per tensor


def test_backward_deterministic(impl, gen):
    cases.check_backward_deterministic(impl, 500, 20, 2, torch.float32, gen)


def test_16bit_conversions_match_torch(emu, gen):
    x = torch.cat([torch.randn(10000, generator=gen) * 10 ** torch.randint(-8, 6, (10000,), generator=gen),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e-8, 5.96e-8, 2.98e-8, 6.1e-5, 1e30,
                                 float("inf"), -float("inf")])])
    assert torch.equal(emu.to_bf16(x).view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(emu.to_f16(x).view(torch.int16), x.to(torch.float16).view(torch.int16))
    h = x.to(torch.float16)
    assert torch.equal(emu.from_f16(h), h.float())


def test_rejects_hidden_size_over_limit(impl, gen):
    grad, state, weights, _, _ = cases.inputs(3, 129, 1, torch.float32, gen)
    with pytest.raises(ValueError, match="hidden_size 129"):
        impl.lstm_step(grad, state, weights, 10.0, 0.1)


def test_moments_and_output_checked(impl, gen):
    """The bindings pass moments and output to op_checks.h's validators."""
    grad, state, weights, _, _ = cases.inputs(9, 3, 1, torch.float32, gen, features=3)
    with pytest.raises(ValueError, match="moments"):
        impl.lstm_step(grad, state, weights, 10.0, 0.1, 3)
    with pytest.raises(ValueError, match="moments"):
        impl.lstm_step_(torch.zeros(9), grad, state, weights, 10.0, 0.1, 3, moments=torch.zeros(registry.MOMENT_ROWS, 8))
    with pytest.raises(TypeError, match="moments"):
        impl.lstm_step_backward(torch.zeros(9), state, grad, state, weights, 10.0, 0.1, 3,
                                moments=torch.zeros(registry.MOMENT_ROWS, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="output"):
        impl.lstm_multi_step_([torch.zeros(9)], [grad], state, weights, 10.0, 0.1, 3, moments=torch.zeros(registry.MOMENT_ROWS, 9),
                              output=2)
    grad, state, weights, _, _ = cases.inputs(9, 3, 1, torch.float32, gen)
    with pytest.raises(ValueError, match="moments"):
        impl.lstm_step(grad, state, weights, 10.0, 0.1, 1, moments=torch.zeros(registry.MOMENT_ROWS, 9))


def test_multi_step_keeps_the_cpu_contract(impl, gen):
    """Regression: the CUDA binding's own validator accepted float32 params with float64 weights, which the CPU one
    rejects; both now run csrc/op_checks.h's check_multi_step_args."""
    params, grads, weights, state = cases.multi_inputs([9, 40], [torch.float64, torch.float32], 4, 2, torch.float64,
                                                       gen)
    with pytest.raises(TypeError, match=r"params\[1\]"):
        impl.lstm_multi_step_(params, grads, state, weights, 10.0, 0.1)
    with pytest.raises(ValueError, match="features"):
        impl.lstm_multi_step_(params[:1], grads[:1], state[..., :9], weights, 10.0, 0.1, 0)


def test_packed_weights_cached_per_version(impl, emu, gen):
    """step_ops.h packs through the cache (csrc/packed_cache.h): a hit on the same weights, a miss after an
    in-place change, which the result shows; calls autograd records for the weights bypass it (a CUDA hit is
    not checked against the values, and gradcheck perturbs them through .data)."""
    grad, state, weights, _, _ = cases.inputs(50, 3, 2, torch.float32, gen)
    hits, misses, bypassed = emu.packed_cache_counts()
    first = impl.lstm_step(grad, state, weights, 10.0, 0.1)[0]
    assert torch.equal(first, impl.lstm_step(grad, state, weights, 10.0, 0.1)[0])
    assert emu.packed_cache_counts() == (hits + 1, misses + 1, bypassed)
    with torch.no_grad():
        weights[-2].add_(1)
    assert not torch.equal(first, impl.lstm_step(grad, state, weights, 10.0, 0.1)[0])
    assert emu.packed_cache_counts() == (hits + 1, misses + 2, bypassed)
    recorded = [w.requires_grad_(True) for w in weights]
    impl.lstm_step(grad, state, recorded, 10.0, 0.1)
    with torch.no_grad():
        impl.lstm_step(grad, state, recorded, 10.0, 0.1)
    assert emu.packed_cache_counts() == (hits + 2, misses + 2, bypassed + 1)


# The paper's features and output here (make_inputs' full draw); the moments' cases: test_nonfinite_moments.
NONFINITE_CASES = [dict(n=n, hidden=h, layers=l, bad_grads=bg, bad_states=bs, bad_moments=0, bad_weight=bw,
                        kind="random", features=1, output=0, seed=s)
                   for s, (n, h, l, bg, bs, bw) in enumerate([
                       (40, 20, 2, 3, 4, None), (40, 20, 2, 2, 0, math.nan), (40, 3, 2, 0, 3, None),
                       (33, 3, 2, 4, 6, math.inf), (70, 20, 2, 5, 5, None), (9, 1, 1, 1, 2, -math.inf)])]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("pr", NONFINITE_CASES, ids=lambda pr: f"n{pr['n']}h{pr['hidden']}s{pr['seed']}")
def test_nonfinite_policy(impl, pr, dtype):
    """README "Non-finite values": NaN/Inf in gradient, state and weights give the reference's NaN pattern."""
    from test_nonfinite_policy import assert_same_pattern, expected_poisoned, make_inputs
    from tolerances import assert_elementwise_close

    grad, state, weights, up_u, up_s, _ = make_inputs(pr, dtype)
    update, new_state = impl.lstm_step(grad, state, weights, 10.0, 0.1, 1)
    d_grad, d_state, d_weights = impl.lstm_step_backward(up_u, up_s, grad, state, weights, 10.0, 0.1, 1)
    ref = step_grads(reference.lstm_step, grad.double(), state.double(), [w.double() for w in weights], 10.0, 0.1,
                     up_u.double(), up_s.double())
    for name, a, e in zip(("update", "new_state", "d_grad", "d_state"), (update, new_state, d_grad, d_state), ref):
        fa, fe, _ = assert_same_pattern(a, e, name)
        assert_elementwise_close(fa, fe, dtype, name)
    poisoned = expected_poisoned(grad, state, weights)
    assert torch.isnan(update[poisoned]).all() and torch.isnan(new_state[..., poisoned]).all()
    if poisoned.any():
        assert all(torch.isnan(w).all() for w in d_weights)
    else:
        assert all(torch.isfinite(w).all() for w in d_weights)
    cases.check_nonfinite_inplace(impl, grad, state, weights)


@pytest.mark.parametrize("output", OUTPUTS, ids=output_id)
@pytest.mark.parametrize("features", MOMENT_SETS, ids=feature_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_nonfinite_moments(impl, gen, dtype, features, output):
    """Non-finite moments poison like a non-finite state; a non-finite gradient keeps its moments bit for bit."""
    cases.check_nonfinite_moments(impl, 40, 20, 2, dtype, gen, features=features, output=output)
    cases.check_nonfinite_moments(impl, 33, 3, 2, dtype, gen, features=features, output=output)
