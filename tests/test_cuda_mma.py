"""The tensor-core forward kernel (L2L_FAST_CUDA_GATES=mma, csrc/cuda/forward_mma_body.h) on a GPU.

The same checks as tests/test_cuda.py's for the forward and the in-place steps, with the mma kernel selected
for every test of this module: against the float64 CPU reference (tolerances.py's float32 table: the 3xTF32
error analysis in csrc/cuda/mma_tf32.h), odd sizes, both state dtypes, every feature set and output kind,
NaN/Inf policy, CUDA graph capture, the current stream. The backward is the FFMA kernel's whatever the variable
says. Skipped without a GPU; tests/test_cuda_mma_emulated.py runs the same kernel body on CPU threads.
"""
from __future__ import annotations

import math

import pytest
import torch

import cuda_cases as cases
from conftest import FEATURE_SETS, WEIGHT_KINDS, feature_id, requires_native
from l2l_fast import ops
from tolerances import assert_elementwise_close

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)", allow_module_level=True)
pytestmark = requires_native

P, SCALE = 10.0, 0.1
IMPL = cases.cuda_ops()
MOMENT_SETS = cases.MOMENT_SETS
GATES = ["mma", "mma16"]  # 32 / 16 coordinates per warp; the module's default is mma


@pytest.fixture(autouse=True)
def mma_gates(monkeypatch):
    cases.require_tensor_cores()
    monkeypatch.setenv("L2L_FAST_CUDA_GATES", "mma")


@pytest.mark.parametrize("gates", GATES)
def test_mma_kernel_runs(monkeypatch, gates):
    """The variable switches the kernel: the two kernels round differently, so some update differs in its last
    bits (were it the FFMA kernel again, every value would be equal)."""
    monkeypatch.setenv("L2L_FAST_CUDA_GATES", gates)
    gen = torch.Generator().manual_seed(5)
    grad, state, weights, _, _ = cases.on(IMPL, cases.inputs(4097, 20, 2, torch.float32, gen))
    mma = ops.lstm_step(grad, state, weights, P, SCALE)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("L2L_FAST_CUDA_GATES", "ffma")
        ffma = ops.lstm_step(grad, state, weights, P, SCALE)
    assert not torch.equal(mma[0], ffma[0])
    assert_elementwise_close(mma[0].cpu(), ffma[0].cpu().double(), torch.float32, "update mma vs ffma")


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("n", [1, 7, 33, 4097, 2**16 + 3], ids=lambda n: f"n{n}")
def test_step_matches_reference(gen, monkeypatch, n, kind, gates):
    monkeypatch.setenv("L2L_FAST_CUDA_GATES", gates)
    cases.check_forward_backward(IMPL, n, 20, 2, torch.float32, gen, kind=kind, non_finite=True)


@pytest.mark.parametrize("output", [0, 1], ids=["linear", "tanh"])
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_features(gen, features, output):
    cases.check_forward_backward(IMPL, 4097, 20, 2, torch.float32, gen, non_finite=True, features=features,
                                 output=output)
    cases.check_step_inplace(IMPL, 1000, 20, 2, torch.float32, gen, features=features, output=output)
    cases.check_multi_step(IMPL, [7, 0, 4000], [torch.float32], 20, 2, gen, weight_dtype=torch.float32,
                           state_dtype=torch.float32, features=features, output=output)


@pytest.mark.parametrize("features", MOMENT_SETS, ids=feature_id)
def test_nonfinite_moments(gen, features):
    for output in (0, 1):
        cases.check_nonfinite_moments(IMPL, 1000, 20, 2, torch.float32, gen, features=features, output=output)


@pytest.mark.parametrize("seed", range(4))
def test_nonfinite_policy(seed):
    """NaN/Inf in state and weights reach all four lanes of a coordinate (through the output product)."""
    from test_nonfinite_policy import assert_same_pattern, make_inputs
    from l2l_fast import reference

    pr = dict(n=1000 + seed, hidden=20, layers=2, bad_grads=5, bad_states=20, bad_moments=0,
              bad_weight=[None, math.nan, None, -math.inf][seed], kind="random", features=1, output=0, seed=seed)
    grad, state, weights, _, _, _ = make_inputs(pr, torch.float32)
    update, new_state = ops.lstm_step(*cases.on(IMPL, [grad, state]), cases.on(IMPL, weights), P, SCALE)
    e_update, e_state = reference.lstm_step(grad.double(), state.double(), [w.double() for w in weights], P, SCALE)
    for name, a, e in (("update", update.cpu(), e_update), ("new_state", new_state.cpu(), e_state)):
        fa, fe, _ = assert_same_pattern(a, e, name)
        assert_elementwise_close(fa, fe, torch.float32, name)
    param, s_got = torch.zeros(grad.shape, device="cuda"), state.cuda()
    p_ref, s_ref = torch.zeros_like(grad, dtype=torch.float64), state.double().clone()
    reference.lstm_step_(p_ref, grad.double(), s_ref, [w.double() for w in weights], P, SCALE)
    ops.lstm_step_(param, grad.cuda(), s_got, cases.on(IMPL, weights), P, SCALE)
    assert_same_pattern(param.cpu(), p_ref, "param")
    assert_same_pattern(s_got.cpu(), s_ref, "state")


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("n", [1, 7, 2**16 + 3], ids=lambda n: f"n{n}")
def test_step_inplace(gen, monkeypatch, n, non_contiguous, gates):
    monkeypatch.setenv("L2L_FAST_CUDA_GATES", gates)
    cases.check_step_inplace(IMPL, n, 20, 2, torch.float32, gen, non_contiguous=non_contiguous)


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32-state", "bf16-state"])
def test_multi_step_mixed_dtypes(gen, monkeypatch, state_dtype, gates):
    monkeypatch.setenv("L2L_FAST_CUDA_GATES", gates)
    sizes = [7, 0, 1, 130, 5, 64, 33, 70_001]
    cases.check_multi_step(IMPL, sizes, [torch.float32, torch.bfloat16, torch.float16], 20, 2, gen,
                           state_dtype=state_dtype, output=1)


def test_multi_step_matches_single_tensor_steps(gen):
    cases.check_multi_matches_single(IMPL, [5, 1, 77, 0, 32, 3, 40_000], 20, 2, gen)


def test_bf16_state_trajectory(gen):
    cases.check_bf16_trajectory(IMPL, 50_000, 20, 2, gen)


def test_cuda_graph_capture(gen):
    """The forward and the in-place steps capture into a CUDA graph with the mma kernel; replays compute what the
    same calls compute eagerly (the kernel is chosen at capture time)."""
    grad, state, weights, _, _ = cases.on(IMPL, cases.inputs(70_003, 20, 2, torch.float32, gen, non_finite=True))
    param = torch.randn(grad.shape, device="cuda")

    def calls(param, state):
        update, new_state = ops.lstm_step(grad, state, weights, P, SCALE)
        ops.lstm_step_(param, grad, state, weights, P, SCALE)
        torch.ops.l2l_fast.lstm_multi_step_([param[:10], param[10:]], [grad[:10], grad[10:]], state, weights, P, SCALE)
        return [update, new_state]

    cases.check_graph_replays(calls, param, state)


def test_runs_on_the_current_stream(gen):
    grad, state, weights, _, _ = cases.on(IMPL, cases.inputs(100_000, 20, 2, torch.float32, gen))
    expected = ops.lstm_step(grad, state, weights, P, SCALE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        grad_late, state_late = grad * 1.0, state * 1.0
        update, new_state = ops.lstm_step(grad_late, state_late, weights, P, SCALE)
        param = torch.zeros_like(grad)
        ops.lstm_step_(param, grad_late, state_late, weights, P, SCALE)
    side.synchronize()
    assert torch.equal(update, expected[0]) and torch.equal(new_state, expected[1])
    assert torch.equal(param, expected[0]) and torch.equal(state_late, expected[1])


def test_deterministic(gen):
    """The same inputs give the same bits (no atomics, fixed mma order)."""
    grad, state, weights, _, _ = cases.on(IMPL, cases.inputs(300_007, 20, 2, torch.float32, gen))
    a = ops.lstm_step(grad, state, weights, P, SCALE)
    b = ops.lstm_step(grad, state, weights, P, SCALE)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
