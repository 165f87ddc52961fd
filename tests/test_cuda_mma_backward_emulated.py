"""The backward on tensor cores (L2L_FAST_CUDA_BACKWARD=mma / mma_wgrad) on CPU threads: the weight gradients
(csrc/cuda/backward_mma.h) and, for hidden 20 x 2, the gate recompute and d inputs (csrc/cuda/backward_mma_body.h).

Three parts: the weight-gradient tile GEMM alone through warp_mma.h's fragment model (random dz, x against a float64
matmul within backward_mma.h's 3xTF32 bound, the padding never read into a stored entry, NaN kept); the gate and
input products alone (z = x W^T + b, dx = dz W against float64 within backward_mma_body.h's bound, NaN kept in its
row); then the whole backward kernel against the float64 reference's autograd: weight gradients (tests/tolerances.py's
float32 rule, unchanged), d grad and d state (the float32 elementwise table, unchanged; bit for bit the FFMA
backward's with mma_wgrad, where only the weight-gradient reduction differs), on n that are not multiples of 8, 16,
32 or the block, blocks of 32, 64 and 128 threads, every feature set, both output kinds, NaN/Inf per the README's
policy, determinism. With mma, hidden 20 x 2 runs every product on tensor cores (checked by a launch counter), the
other shapes the weight gradients alone. The backward
takes its state in grad's dtype (a bfloat16 state exists only in the multi-tensor in-place step, which has no
backward), so float32 is the one state dtype here; float64 keeps the FFMA loop.
Runs with L2L_FAST_CUDA_EMULATION=1, like test_cuda_emulated.py.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import cuda_cases as cases
from conftest import FEATURE_SETS, feature_id, step_grads
from l2l_fast import reference

if os.environ.get("L2L_FAST_CUDA_EMULATION") != "1":
    pytest.skip("set L2L_FAST_CUDA_EMULATION=1 to build and run the CPU emulation of the CUDA kernels",
                allow_module_level=True)

MOMENT_SETS = cases.MOMENT_SETS
# smem_limit per block -> the backward's block size for hidden 20 x 2 (101 / 61 / 41 KB at 128 / 64 / 32 threads)
BLOCKS = {128: 227 * 1024, 64: 100 * 1024, 32: 50 * 1024}
SHAPES = [(20, 2), (3, 2), (1, 1), (33, 3)]  # compiled-in size; run-time paths up to 32 and 128


def tf32x3_bound(tile: int) -> float:
    """backward_mma.h: a tile's weight gradient is within this much of sum |dz x| from exact (rounding to nearest,
    as the CPU model)."""
    return 5.01 * 2.0**-22 + (tile + 1) * 2.0**-24 * (1 + 2.0**-9)


@pytest.fixture(scope="module")
def emu():
    return cases.emulation_module()


def configure(emu, threads=128, blocks=3):
    emu.configure(forward_threads=32, forward_blocks=3, backward_blocks=blocks, smem_limit=BLOCKS[threads],
                  forward_smem_limit=48 * 1024, mma_threads=64)


@pytest.fixture
def impl(emu, monkeypatch):
    """The ops with L2L_FAST_CUDA_BACKWARD=mma (the forward's FFMA kernel), backward blocks of 128, grids of 3."""
    monkeypatch.setenv("L2L_FAST_CUDA_BACKWARD", "mma")
    configure(emu)
    return cases.Impl("cpu", emu.lstm_step, emu.lstm_step_backward, emu.lstm_step_, emu.lstm_multi_step_)


class MmaRan:
    """Asserts that the block ran the tensor-core backward (or, with expected=False, did not); with gates=True / False,
    that it ran (did not run) the gate and input products on tensor cores too (backward_mma_body.h)."""

    def __init__(self, emu, expected=True, gates=None):
        self.emu, self.expected, self.gates = emu, expected, gates

    def __enter__(self):
        self.before = self.emu.mma_backward_launches()
        self.gates_before = self.emu.mma_gates_backward_launches()

    def __exit__(self, *exc):
        if exc[0] is None:
            ran = self.emu.mma_backward_launches() > self.before
            assert ran == self.expected, "the mma backward " + ("did not run" if self.expected else "ran")
            if self.gates is not None:
                gates = self.emu.mma_gates_backward_launches() > self.gates_before
                assert gates == self.gates, "the mma gate products " + ("did not run" if self.gates else "ran")


# ---------------------------------------------------------------------------------------------
# the tile GEMM alone
def packed(m: torch.Tensor, units: int, G: int, K: int) -> torch.Tensor:
    """[units G, K + 1] (gate row, input) -> the packed order of weight_grads_tile: (u K + k) G + g, then u G + g."""
    m = m.view(units, G, K + 1)
    return torch.cat([m[:, :, :K].permute(0, 2, 1).reshape(-1), m[:, :, K].reshape(-1)])


def tile_inputs(tile, units, G, K, gen, spread=0):
    """x [tile, K + 1] (last column the bias's 1) and dz [tile, units G], entries times 2^e, e in [-spread, spread];
    two zero rows (inactive coordinates)."""
    def values(shape):
        scale = 2.0 ** torch.randint(-spread, spread + 1, shape, generator=gen)
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).float()

    x, dz = values((tile, K + 1)), values((tile, units * G))
    x[:, K] = 1.0
    x[3], dz[3] = 0.0, 0.0
    x[tile - 1], dz[tile - 1] = 0.0, 0.0
    return x, dz


@pytest.mark.parametrize("spread", [0, 8], ids=["unit-range", "wide-range"])
@pytest.mark.parametrize("units,G,K", [(20, 4, 22), (20, 4, 40), (1, 1, 20), (3, 4, 5), (1, 4, 1), (33, 4, 66)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("tile", [32, 64, 128])
def test_tile_gemm_within_3xtf32_bound(emu, gen, tile, units, G, K, spread):
    """mma_weight_grads on one staged tile (padding NaN) against float64: every entry within tf32x3_bound(tile) of
    sum |dz x| (row permutation, fragment rows / columns, n-tile chunks, the output layer's one row); plain TF32
    would not be (the control of test_cuda_mma_emulated's 3xTF32 test)."""
    x, dz = tile_inputs(tile, units, G, K, gen, spread)
    exact = packed(dz.double().t() @ x.double(), units, G, K)
    scale = packed(dz.double().abs().t() @ x.double().abs(), units, G, K)
    got = emu.weight_grads_tile(x, dz, G, True)
    assert torch.isfinite(got).all(), "a padding value reached a stored entry"
    worst = ((got - exact).abs() / scale).max().item()
    assert worst <= tf32x3_bound(tile), f"{worst:.3g} of sum|dz x| > bound {tf32x3_bound(tile):.3g}"
    ffma = emu.weight_grads_tile(x, dz, G, False)  # the FFMA loop on the same staging, for scale
    assert ((ffma - exact).abs() / scale).max().item() <= tile * 2.0**-24


def test_tile_gemm_nan_coordinate(emu, gen):
    """A poisoned coordinate (dz all NaN, as backward_body.h stages it) makes every entry NaN, as the FFMA loop does;
    a NaN in one input column of one coordinate makes that column's entries NaN only."""
    x, dz = tile_inputs(64, 20, 4, 22, gen)
    dz[10] = math.nan
    assert torch.isnan(emu.weight_grads_tile(x, dz, 4, True)).all()
    x, dz = tile_inputs(64, 20, 4, 22, gen)
    x[10, 7] = math.nan
    got = packed_to_matrix(emu.weight_grads_tile(x, dz, 4, True), 20, 4, 22)
    assert torch.isnan(got[:, 7]).all() and torch.isfinite(got[:, [k for k in range(23) if k != 7]]).all()


def packed_to_matrix(p: torch.Tensor, units: int, G: int, K: int) -> torch.Tensor:
    w = p[:units * K * G].view(units, K, G).permute(0, 2, 1)
    b = p[units * K * G:].view(units, G, 1)
    return torch.cat([w, b], 2).reshape(units * G, K + 1)


# ---------------------------------------------------------------------------------------------
# the gate and input products alone (backward_mma_body.h)
def gates_bound(K: int) -> float:
    """backward_mma_body.h: z within this much of sum |w x| + |b| from exact (rounding to nearest, as the CPU model)."""
    return 5.01 * 2.0**-22 + (3 * K + 1) * 2.0**-24 * (1 + 2.0**-9)


def input_grads_bound() -> float:
    """backward_mma_body.h: dx within this much of sum |w dz| from exact (80 gate rows, 3 products each)."""
    return 5.01 * 2.0**-22 + 3 * 80 * 2.0**-24 * (1 + 2.0**-9)


def gate_products_inputs(tile, K, gen, spread):
    def values(shape, scale=1.0):
        e = 2.0 ** torch.randint(-spread, spread + 1, shape, generator=gen)
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * e * scale).float()

    x, dz = values((tile, K)), values((tile, 80))
    w, b = values((20, K, 4), K**-0.5), values((80,), 0.5)
    x[5], dz[5] = 0.0, 0.0  # an inactive coordinate's row
    return x, dz, w, b


@pytest.mark.parametrize("spread", [0, 8], ids=["unit-range", "wide-range"])
@pytest.mark.parametrize("K", [21, 22, 24, 26, 40], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("tile", [32, 64, 128])
def test_gate_products_within_3xtf32_bound(emu, gen, tile, K, spread):
    """warp_gates and warp_input_grads on one staged block (NaN wherever the staging writes nothing) against float64:
    every z entry within gates_bound(K) of sum |w x| + |b|, every dx entry within input_grads_bound() of sum |w dz|
    (fragment rows / columns, the gate order of the packed weights, the padding k- and n-tiles of K = 21 .. 26);
    the FFMA-order float32 sum as a control of the scale."""
    x, dz, w, b = gate_products_inputs(tile, K, gen, spread)
    W = w.double().permute(0, 2, 1).reshape(80, K)  # [gate row 4 u + g, input k]
    z, dx = emu.gate_products_tile(x, dz, w.flatten(), b)
    assert torch.isfinite(z).all() and torch.isfinite(dx).all(), "a padding value reached a result"
    exact_z = x.double() @ W.t() + b.double()
    scale_z = x.double().abs() @ W.abs().t() + b.double().abs()
    worst = ((z.double() - exact_z).abs() / scale_z).max().item()
    assert worst <= gates_bound(K), f"z: {worst:.3g} of sum|w x| > bound {gates_bound(K):.3g}"
    exact_dx = dz.double() @ W
    scale_dx = dz.double().abs() @ W.abs()
    ok = scale_dx > 0
    worst = ((dx.double() - exact_dx).abs()[ok] / scale_dx[ok]).max().item()
    assert worst <= input_grads_bound(), f"dx: {worst:.3g} of sum|w dz| > bound {input_grads_bound():.3g}"
    assert (dx[~ok] == 0).all()
    plain = (x @ W.float().t() + b).double()  # one float32 matmul, for scale: the bound is not loose by orders
    assert ((plain - exact_z).abs() / scale_z).max().item() <= (K + 1) * 2.0**-24 * 4


def test_gate_products_nan_stays_in_its_row(emu, gen):
    """A poisoned coordinate's NaN / Inf input (row 9) or dz (row 40) makes its own z / dx row NaN and no other row
    (a D row depends on its own A row): the other coordinates of the warp are not poisoned by it."""
    x, dz, w, b = gate_products_inputs(64, 22, gen, 0)
    x[9, 3], x[10, 0], dz[40, 17] = math.nan, math.inf, math.nan
    z, dx = emu.gate_products_tile(x, dz, w.flatten(), b)
    bad_z, bad_dx = ~torch.isfinite(z).all(1), ~torch.isfinite(dx).all(1)
    assert bad_z.nonzero().flatten().tolist() == [9, 10] and torch.isnan(z[9]).all()
    assert bad_dx.nonzero().flatten().tolist() == [40] and torch.isnan(dx[40]).all()


# ---------------------------------------------------------------------------------------------
# the backward kernel
@pytest.mark.parametrize("threads", [128, 64, 32], ids=lambda t: f"block{t}")
@pytest.mark.parametrize("hidden,layers", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("n", [1, 7, 45, 301], ids=lambda n: f"n{n}")
def test_backward_matches_reference(impl, emu, gen, n, hidden, layers, threads):
    """Weight gradients, d grad and d state against the float64 reference; non-finite gradients (n >= 6) add nothing
    and pass d state through. n = 301 takes several tiles per block at every block size."""
    configure(emu, threads)
    with MmaRan(emu, gates=(hidden, layers) == (20, 2)):
        cases.check_forward_backward(impl, n, hidden, layers, torch.float32, gen, non_finite=True)


@pytest.mark.parametrize("output", [0, 1], ids=["linear", "tanh"])
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_features_and_outputs(impl, emu, gen, features, output):
    """Every feature set (other first-layer widths: other k-tile counts of layer 0's gates, n-tile counts of its
    d inputs and weight gradients) and output kind (tanh: y from the tensor-core gates), 20 x 2 and 3 x 2."""
    with MmaRan(emu, gates=True):
        cases.check_forward_backward(impl, 77, 20, 2, torch.float32, gen, non_finite=True, features=features,
                                     output=output)
    with MmaRan(emu, gates=False):
        cases.check_forward_backward(impl, 40, 3, 2, torch.float32, gen, non_finite=True, features=features,
                                     output=output)


@pytest.mark.parametrize("kind", ["init", "saturating"])
def test_weight_kinds(impl, emu, gen, kind):
    with MmaRan(emu, gates=True):
        cases.check_forward_backward(impl, 200, 20, 2, torch.float32, gen, kind=kind)


def test_many_tiles_per_block(impl, emu, gen):
    """n = 2000 over 3 blocks of 128: each block adds 5 or 6 tiles into its float64 row."""
    with MmaRan(emu):
        cases.check_forward_backward(impl, 2000, 20, 2, torch.float32, gen)


@pytest.mark.parametrize("hidden,layers", [(20, 2), (33, 3)], ids=lambda v: str(v))
def test_only_weight_gradients_change(impl, emu, gen, monkeypatch, hidden, layers):
    """mma_wgrad: d grad and d state are the FFMA backward's bit for bit (it changes the reduction only); the weight
    gradients differ in some last bits (else the FFMA loop ran again) and agree within the float32 rule's floor."""
    grad, state, weights, up_u, up_s = cases.inputs(333, hidden, layers, torch.float32, gen, non_finite=True)
    args = (up_u, up_s, grad, state, weights, 10.0, 0.1)
    monkeypatch.setenv("L2L_FAST_CUDA_BACKWARD", "mma_wgrad")
    with MmaRan(emu, gates=False):
        mma = impl.lstm_step_backward(*args)
    monkeypatch.setenv("L2L_FAST_CUDA_BACKWARD", "ffma")
    with MmaRan(emu, expected=False):
        ffma = impl.lstm_step_backward(*args)
    assert torch.equal(mma[0], ffma[0]) and torch.equal(mma[1], ffma[1])
    assert any(not torch.equal(a, b) for a, b in zip(mma[2], ffma[2]))
    scale = max(w.abs().max().item() for w in ffma[2])
    for a, b in zip(mma[2], ffma[2]):
        assert (a - b).abs().max().item() <= 3e-6 * scale


def test_gate_products_change_d_grad_within_tolerance(impl, emu, gen, monkeypatch):
    """mma at 20 x 2: d grad and d state are no longer the FFMA backward's bit for bit (else the FFMA products ran)
    but agree within the float32 elementwise table, with the same NaN pattern; the mma_wgrad weight gradients and
    these agree within the float32 rule's floor."""
    from tolerances import assert_elementwise_close

    grad, state, weights, up_u, up_s = cases.inputs(333, 20, 2, torch.float32, gen, non_finite=True)
    args = (up_u, up_s, grad, state, weights, 10.0, 0.1)
    with MmaRan(emu, gates=True):
        mma = impl.lstm_step_backward(*args)
    monkeypatch.setenv("L2L_FAST_CUDA_BACKWARD", "mma_wgrad")
    with MmaRan(emu, gates=False):
        wgrad = impl.lstm_step_backward(*args)
    for name, a, b in (("d_grad", mma[0], wgrad[0]), ("d_state", mma[1], wgrad[1])):
        assert not torch.equal(a, b), name
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)), name
        assert_elementwise_close(a[finite], b[finite], torch.float32, name)
    scale = max(w.abs().max().item() for w in wgrad[2])
    for a, b in zip(mma[2], wgrad[2]):
        assert (a - b).abs().max().item() <= 3e-6 * scale


def test_deterministic(impl, emu, gen):
    """Two backward calls give bit-identical results (each partial entry one lane's, blocks summed in order)."""
    with MmaRan(emu, gates=True):
        cases.check_backward_deterministic(impl, 500, 20, 2, torch.float32, gen)
        cases.check_backward_deterministic(impl, 97, 33, 3, torch.float32, gen)


def test_float64_keeps_ffma(impl, emu, gen):
    """float64 runs the FFMA loop whatever the variable says, and is correct."""
    with MmaRan(emu, expected=False):
        cases.check_forward_backward(impl, 45, 20, 2, torch.float64, gen, non_finite=True)


def test_backward_variable_checked(impl, gen, monkeypatch):
    grad, state, weights, up_u, up_s = cases.inputs(9, 20, 2, torch.float32, gen)
    monkeypatch.setenv("L2L_FAST_CUDA_BACKWARD", "tensorcores")
    with pytest.raises(ValueError, match="L2L_FAST_CUDA_BACKWARD"):
        impl.lstm_step_backward(up_u, up_s, grad, state, weights, 10.0, 0.1)
    monkeypatch.setenv("L2L_FAST_CUDA_BACKWARD", "mma_gates")
    with pytest.raises(ValueError, match="L2L_FAST_CUDA_BACKWARD"):
        impl.lstm_step_backward(up_u, up_s, grad, state, weights, 10.0, 0.1)


NONFINITE_CASES = [dict(n=n, hidden=h, layers=l, bad_grads=bg, bad_states=bs, bad_moments=0, bad_weight=bw,
                        kind="random", features=1, output=0, seed=s)
                   for s, (n, h, l, bg, bs, bw) in enumerate([
                       (40, 20, 2, 3, 4, None), (40, 20, 2, 2, 0, math.nan), (40, 3, 2, 0, 3, None),
                       (33, 3, 2, 4, 6, math.inf), (70, 20, 2, 5, 5, None), (9, 1, 1, 1, 2, -math.inf),
                       (45, 20, 2, 4, 0, None)])]


@pytest.mark.parametrize("pr", NONFINITE_CASES, ids=lambda pr: f"n{pr['n']}h{pr['hidden']}s{pr['seed']}")
def test_nonfinite_policy(impl, emu, pr):
    """README "Non-finite values": a NaN/Inf state value or weight poisons its coordinate, which makes every weight
    gradient NaN (the tile GEMM keeps the NaN); non-finite gradients alone leave them finite."""
    from test_nonfinite_policy import assert_same_pattern, expected_poisoned, make_inputs
    from tolerances import assert_elementwise_close

    grad, state, weights, up_u, up_s, _ = make_inputs(pr, torch.float32)
    with MmaRan(emu):
        d_grad, d_state, d_weights = impl.lstm_step_backward(up_u, up_s, grad, state, weights, 10.0, 0.1, 1)
    ref = step_grads(reference.lstm_step, grad.double(), state.double(), [w.double() for w in weights], 10.0, 0.1,
                     up_u.double(), up_s.double())
    for name, a, e in (("d_grad", d_grad, ref[2]), ("d_state", d_state, ref[3])):
        fa, fe, _ = assert_same_pattern(a, e, name)
        assert_elementwise_close(fa, fe, torch.float32, name)
    if expected_poisoned(grad, state, weights).any():
        assert all(torch.isnan(w).all() for w in d_weights)
    else:
        assert all(torch.isfinite(w).all() for w in d_weights)


@pytest.mark.parametrize("output", [0, 1], ids=["linear", "tanh"])
@pytest.mark.parametrize("features", MOMENT_SETS, ids=feature_id)
def test_nonfinite_moments(impl, emu, gen, features, output):
    """Non-finite moments poison like a non-finite state (every weight gradient NaN)."""
    with MmaRan(emu):
        cases.check_nonfinite_moments(impl, 40, 20, 2, torch.float32, gen, features=features, output=output)
