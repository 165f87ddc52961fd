"""The backward on tensor cores (L2L_FAST_CUDA_BACKWARD=mma: csrc/cuda/backward_mma_body.h for hidden 20 x 2, the
weight gradients of csrc/cuda/backward_mma.h for every float32 net; mma_wgrad: the weight gradients alone) on a GPU.

The backward checks of tests/test_cuda.py with mma selected for every test of this module: against the float64 CPU
reference (tolerances.py's float32 tables, unchanged: the error analyses in backward_mma.h and backward_mma_body.h),
odd sizes, several nets, every feature set and output kind, NaN/Inf policy, determinism; with mma_wgrad d grad and
d state bit for bit the FFMA backward's, with mma (20 x 2) within the float32 table of them. Here the tensor cores'
own sums are checked, which the CPU model (tests/test_cuda_mma_backward_emulated.py) cannot. Skipped without a GPU.
"""
from __future__ import annotations

import pytest
import torch

import cuda_cases as cases
from conftest import FEATURE_SETS, WEIGHT_KINDS, feature_id, requires_native
from tolerances import assert_weight_grads_close

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)", allow_module_level=True)
pytestmark = requires_native

P, SCALE = 10.0, 0.1
IMPL = cases.cuda_ops()
MOMENT_SETS = cases.MOMENT_SETS


@pytest.fixture(autouse=True)
def mma_backward(monkeypatch):
    cases.require_tensor_cores()
    monkeypatch.setenv("L2L_FAST_CUDA_BACKWARD", "mma")


@pytest.mark.parametrize("hidden,layers", [(20, 2), (33, 3)], ids=lambda v: str(v))
def test_only_weight_gradients_change(gen, monkeypatch, hidden, layers):
    """mma_wgrad switches the reduction only: d grad and d state are the FFMA backward's bit for bit, some weight
    gradient differs in its last bits (were it the FFMA loop again, all would be equal), and both are within the
    float32 rule of the float64 reference."""
    grad, state, weights, up_u, up_s = cases.inputs(100_003, hidden, layers, torch.float32, gen, non_finite=True)
    args = (*cases.on(IMPL, [up_u, up_s, grad, state]), cases.on(IMPL, weights), P, SCALE)
    monkeypatch.setenv("L2L_FAST_CUDA_BACKWARD", "mma_wgrad")
    mma = IMPL.lstm_step_backward(*args)
    monkeypatch.setenv("L2L_FAST_CUDA_BACKWARD", "ffma")
    ffma = IMPL.lstm_step_backward(*args)
    assert torch.equal(mma[0], ffma[0]) and torch.equal(mma[1], ffma[1])
    assert any(not torch.equal(a, b) for a, b in zip(mma[2], ffma[2]))
    ref = cases.reference_grads(*[cases.to64(t) for t in (grad, state, weights)], P, SCALE,
                                *[cases.to64(t) for t in (up_u, up_s)])[4]
    ref32 = cases.reference_grads(grad, state, weights, P, SCALE, up_u, up_s)[4]
    derived = cases.derived_term(grad, state, weights, P, SCALE, up_u, up_s)
    assert_weight_grads_close([w.cpu() for w in mma[2]], ref, torch.float32, ref32, derived=derived)


def test_gate_products_within_tolerance_of_ffma(gen, monkeypatch):
    """mma at 20 x 2 (the gate and input products on tensor cores too): d grad and d state differ from the FFMA
    backward's (else the FFMA products ran) within the float32 elementwise table, with the same non-finite pattern."""
    from tolerances import assert_elementwise_close

    grad, state, weights, up_u, up_s = cases.inputs(100_003, 20, 2, torch.float32, gen, non_finite=True)
    args = (*cases.on(IMPL, [up_u, up_s, grad, state]), cases.on(IMPL, weights), P, SCALE)
    mma = IMPL.lstm_step_backward(*args)
    monkeypatch.setenv("L2L_FAST_CUDA_BACKWARD", "ffma")
    ffma = IMPL.lstm_step_backward(*args)
    for name, a, b in (("d_grad", mma[0], ffma[0]), ("d_state", mma[1], ffma[1])):
        assert not torch.equal(a, b), name
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)), name
        assert_elementwise_close(a[finite].cpu(), b[finite].cpu(), torch.float32, name)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("n", [1, 7, 33, 4097, 2**16 + 3], ids=lambda n: f"n{n}")
def test_backward_matches_reference(gen, n, kind):
    cases.check_forward_backward(IMPL, n, 20, 2, torch.float32, gen, kind=kind, non_finite=True)


@pytest.mark.parametrize("hidden_size,num_layers", [(1, 1), (3, 2), (19, 1), (20, 3), (33, 3), (64, 1), (128, 1)],
                         ids=lambda v: str(v))
def test_hidden_sizes_and_layers(gen, hidden_size, num_layers):
    """The run-time-sized kernels: m-tiles and n-chunks of other sizes, blocks of 64 or 32 where shared memory asks."""
    cases.check_forward_backward(IMPL, 1333, hidden_size, num_layers, torch.float32, gen, non_finite=True)


@pytest.mark.parametrize("output", [0, 1], ids=["linear", "tanh"])
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_features_and_outputs(gen, features, output):
    cases.check_forward_backward(IMPL, 1000, 20, 2, torch.float32, gen, non_finite=True, features=features,
                                 output=output)


@pytest.mark.parametrize("features", MOMENT_SETS, ids=feature_id)
def test_nonfinite_moments(gen, features):
    cases.check_nonfinite_moments(IMPL, 40, 20, 2, torch.float32, gen, features=features, output=1)


def test_nonfinite_policy():
    """README "Non-finite values": a poisoned coordinate makes every weight gradient NaN through the tensor cores."""
    from test_nonfinite_policy import expected_poisoned, make_inputs

    pr = dict(n=70, hidden=20, layers=2, bad_grads=5, bad_states=5, bad_moments=0, bad_weight=None, kind="random",
              features=1, output=0, seed=4)
    grad, state, weights, up_u, up_s, _ = make_inputs(pr, torch.float32)
    assert expected_poisoned(grad, state, weights).any()
    d_weights = IMPL.lstm_step_backward(*cases.on(IMPL, [up_u, up_s, grad, state]), cases.on(IMPL, weights),
                                        P, SCALE, 1)[2]
    assert all(torch.isnan(w).all() for w in d_weights)


def test_backward_deterministic(gen):
    cases.check_backward_deterministic(IMPL, 100_003, 20, 2, torch.float32, gen)
