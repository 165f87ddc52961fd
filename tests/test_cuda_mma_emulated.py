"""The tensor-core forward (csrc/cuda/forward_mma_body.h, L2L_FAST_CUDA_GATES=mma) on CPU threads.

Two parts: the CPU model of mma.m16n8k8 TF32 itself (tests/cuda_emulation/warp_mma.h: the PTX fragment
layouts, cvt.rna.tf32 bit for bit, the 3xTF32 error bound of csrc/cuda/mma_tf32.h), then the kernel body run
through that model against the float64 reference on sizes that are not multiples of the 16-coordinate m-tiles
or the 32-coordinate warp tiles, both state dtypes, every feature set and output kind, NaN/Inf per the README's
policy, and a NaN the net computes itself from finite values. Tolerances: tests/tolerances.py's float32 table,
unchanged (mma_tf32.h's error analysis: 3xTF32 adds at most 9.6e-7 of sum |w x| per gate, and its extra roundings
stay an order below that table).
Runs with L2L_FAST_CUDA_EMULATION=1, like test_cuda_emulated.py; tests/test_cuda.py runs the kernel on a GPU.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import cuda_cases as cases
from conftest import FEATURE_SETS, feature_id
from l2l_fast import features as registry

if os.environ.get("L2L_FAST_CUDA_EMULATION") != "1":
    pytest.skip("set L2L_FAST_CUDA_EMULATION=1 to build and run the CPU emulation of the CUDA kernels",
                allow_module_level=True)

MOMENT_SETS = cases.MOMENT_SETS


# The fragment layouts of mma.m16n8k8 with .tf32 operands, as the PTX ISA states them (lane = 4 groupID + tig),
# written here independently of warp_mma.h's MmaLayout: (row, col) of element i of a lane's fragment.
def a_at(lane, i):
    return lane // 4 + 8 * (i % 2), lane % 4 + 4 * (i // 2)


def b_at(lane, i):
    return lane % 4 + 4 * i, lane // 4  # (k, n)


def c_at(lane, i):
    return lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2


def to_fragments(a, b, c, a_layout=a_at):
    fa = torch.tensor([[a[a_layout(lane, i)] for i in range(4)] for lane in range(32)], dtype=torch.float32)
    fb = torch.tensor([[b[b_at(lane, i)] for i in range(2)] for lane in range(32)], dtype=torch.float32)
    fc = torch.tensor([[c[c_at(lane, i)] for i in range(4)] for lane in range(32)], dtype=torch.float32)
    return fa, fb, fc


def from_fragments(d):
    out = torch.empty(16, 8, dtype=d.dtype)
    for lane in range(32):
        for i in range(4):
            out[c_at(lane, i)] = d[lane, i]
    return out


@pytest.fixture(scope="module")
def emu():
    return cases.emulation_module()


@pytest.fixture
def impl(emu, monkeypatch):
    """The ops with L2L_FAST_CUDA_GATES=mma, emulated blocks of 2 warps, at most 3 blocks (grid-stride loops)."""
    monkeypatch.setenv("L2L_FAST_CUDA_GATES", "mma")
    emu.configure(forward_threads=32, forward_blocks=3, backward_blocks=3, smem_limit=227 * 1024,
                  forward_smem_limit=48 * 1024, mma_threads=64)
    return cases.Impl("cpu", emu.lstm_step, emu.lstm_step_backward, emu.lstm_step_, emu.lstm_multi_step_)


# ---------------------------------------------------------------------------------------------
# the model of the instruction
def test_mma_layout_matches_ptx(emu, gen):
    """One emulated mma against a plain matmul: every element of A, B and C distinct (small integers: TF32-exact,
    and every sum exact in float32), so a lane or register mapped to the wrong row or column changes D."""
    a = (torch.randperm(128, generator=gen) + 1).view(16, 8).double()
    b = (torch.randperm(64, generator=gen) + 1).view(8, 8).double()
    c = (torch.randperm(128, generator=gen) * 1000).view(16, 8).double()
    d = from_fragments(emu.warp_mma(*to_fragments(a, b, c))).double()
    assert torch.equal(d, c + a @ b)


def test_mma_layout_check_catches_a_swap(emu, gen):
    """The check above has teeth: a0 / a2 swapped (columns tig and tig + 4) gives another D."""
    a = (torch.randperm(128, generator=gen) + 1).view(16, 8).double()
    b = (torch.randperm(64, generator=gen) + 1).view(8, 8).double()
    c = torch.zeros(16, 8, dtype=torch.float64)

    def swapped(lane, i):
        return a_at(lane, {0: 2, 2: 0}.get(i, i))

    d = from_fragments(emu.warp_mma(*to_fragments(a, b, c, a_layout=swapped))).double()
    assert not torch.equal(d, c + a @ b)


def rna_tf32_reference(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32 by its definition, on finite float32 below 2^127: of the two TF32 neighbours of x (13 low
    bits cleared, and one TF32 ulp further from zero) the nearer one in float64, ties away from zero."""
    bits = x.view(torch.int32).long() & 0xFFFFFFFF
    low = (bits & ~0x1FFF).to(torch.int64)
    high = low + 0x2000  # same sign, one TF32 ulp larger in magnitude (may carry into the exponent)

    def as_float(b):
        return (b & 0xFFFFFFFF).to(torch.int64).to(torch.int32).view(torch.float32).double()

    lo, hi, xd = as_float(low), as_float(high), x.double()
    take_high = (hi - xd).abs() <= (xd - lo).abs()  # <=: the tie goes to the larger magnitude
    return torch.where(take_high, hi, lo).float()


def test_round_tf32_is_cvt_rna(emu, gen):
    """mma_tf32.h's host rounding, bit for bit: random values over the whole exponent range, exact ties (low 13
    bits 0x1000, both signs), one below and above them, subnormals; the edges with their known results."""
    mant = torch.randint(0, 1 << 23, (20000,), generator=gen)
    expo = torch.randint(0, 254, (20000,), generator=gen)
    sign = torch.randint(0, 2, (20000,), generator=gen)
    bits = (sign << 31) | (expo << 23) | mant
    ties = (bits & ~0x1FFF) | 0x1000
    bits = torch.cat([bits, ties, ties - 1, ties + 1])
    x = (bits & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    got = emu.round_tf32(x)
    assert torch.equal(got.view(torch.int32), rna_tf32_reference(x).view(torch.int32))
    edge = torch.tensor([0.0, -0.0, math.inf, -math.inf, 3.4028234663852886e38, -3.4028234663852886e38, 1.0,
                         1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11], dtype=torch.float32)
    want = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.inf, -math.inf, 1.0, 1.0 + 2.0**-10,
                         1.0 + 2.0**-9], dtype=torch.float32)
    assert torch.equal(emu.round_tf32(edge).view(torch.int32), want.view(torch.int32))
    assert torch.isnan(emu.round_tf32(torch.tensor([math.nan]))).all()
    # the integer rounding of the layer inputs: the same bits for every finite value and +-Inf
    finite = torch.cat([x, edge])
    assert torch.equal(emu.round_tf32(finite, finite=True).view(torch.int32), emu.round_tf32(finite).view(torch.int32))
    # ... and not NaN: the GPU's NaN 0x7fffffff comes out -0; the host models the device, where arithmetic delivers
    # every NaN as 0x7fffffff (x86's 0xffc00000 would survive the add), so the emulated kernels see that -0 too
    nans = torch.tensor([0x7FFFFFFF, 0x7FC00000, -0x400000], dtype=torch.int32).view(torch.float32)
    assert torch.equal(emu.round_tf32(nans, finite=True).view(torch.int32), torch.full((3,), -2**31, dtype=torch.int32))


def spread_values(shape, spread, gen):
    """float32 normal values times 2^e, e uniform in [-spread, spread]."""
    scale = 2.0 ** torch.randint(-spread, spread + 1, shape, generator=gen)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).float()


@pytest.mark.parametrize("spread", [0, 8], ids=["unit-range", "wide-range"])
def test_3xtf32_error_bound(emu, gen, spread):
    """mma_3xtf32 (kernel code) on float32 operands split as the forward splits them (A with lo unrounded, B with
    both parts rounded) against float64, within mma_tf32.h's bound (4.01 * 2^-22 + 25 * 2^-24) * sum_k |a_k b_k|
    (24 float32 additions of the model); one plain TF32 mma, as a control, is not."""
    bound_rel = 4.01 * 2.0**-22 + 25 * 2.0**-24
    worst_3x, worst_1x = 0.0, 0.0
    for _ in range(20):
        a = spread_values((16, 8), spread, gen)
        b = spread_values((8, 8), spread, gen)
        c = torch.zeros(16, 8)
        exact = a.double() @ b.double()
        scale = a.double().abs() @ b.double().abs()
        for split3 in (True, False):
            d = from_fragments(emu.warp_mma(*to_fragments(a, b, c), split3=split3)).double()
            ratio = ((d - exact).abs() / scale).max().item()
            if split3:
                worst_3x = max(worst_3x, ratio)
            else:
                worst_1x = max(worst_1x, ratio)
    assert worst_3x <= bound_rel, f"3xTF32 error {worst_3x:.3g} of sum|ab| > bound {bound_rel:.3g}"
    assert worst_1x > 10 * bound_rel, f"control: plain TF32 error {worst_1x:.3g} should exceed the bound"


# ---------------------------------------------------------------------------------------------
# the kernel
@pytest.mark.parametrize("dtype", [torch.float32], ids=["f32"])
@pytest.mark.parametrize("n", [1, 7, 33, 301], ids=lambda n: f"n{n}")
def test_forward_matches_reference(impl, emu, gen, n, dtype):
    """lstm_step through the mma kernel (the backward stays FFMA); n = 301 takes several warp tiles per warp."""
    before = emu.mma_launches()
    cases.check_forward_backward(impl, n, 20, 2, dtype, gen, non_finite=True)
    assert emu.mma_launches() > before, "the mma kernel did not run"


@pytest.mark.parametrize("output", [0, 1], ids=["linear", "tanh"])
@pytest.mark.parametrize("features", FEATURE_SETS, ids=feature_id)
def test_features_and_outputs(impl, emu, gen, features, output):
    """Every feature set (the moments read, advanced in place and stored by one lane of four) and output kind:
    forward, in-place step and the multi-tensor step with a float32 state. A set of more than four inputs (slot
    5's four columns) runs the FFMA kernel instead, with the same results."""
    before = emu.mma_launches()
    cases.check_forward_backward(impl, 45, 20, 2, torch.float32, gen, non_finite=True, features=features,
                                 output=output)
    cases.check_step_inplace(impl, 37, 20, 2, torch.float32, gen, features=features, output=output)
    cases.check_multi_step(impl, [7, 0, 40], [torch.float32], 20, 2, gen, weight_dtype=torch.float32,
                           state_dtype=torch.float32, features=features, output=output)
    if registry.input_size(features) <= 4:
        assert emu.mma_launches() >= before + 3
    else:
        assert emu.mma_launches() == before, "the mma kernel ran a net wider than its four input columns"


@pytest.mark.parametrize("non_contiguous", [False, True], ids=["contiguous", "strided"])
def test_step_inplace(impl, gen, non_contiguous):
    cases.check_step_inplace(impl, 97, 20, 2, torch.float32, gen, non_contiguous=non_contiguous)


@pytest.mark.parametrize("features", [1, *MOMENT_SETS], ids=feature_id)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32-state", "bf16-state"])
def test_multi_step_state_dtypes(impl, gen, state_dtype, features):
    sizes = [7, 0, 1, 130, 5, 17]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    cases.check_multi_step(impl, sizes, dtypes, 20, 2, gen, state_dtype=state_dtype, features=features, output=1)


def test_multi_step_matches_single_tensor_steps(impl, gen):
    cases.check_multi_matches_single(impl, [5, 1, 77, 0, 32, 3], 20, 2, gen)


def test_bf16_state_trajectory(impl, gen):
    cases.check_bf16_trajectory(impl, 200, 20, 2, gen, steps=4)


@pytest.mark.parametrize("seed", range(4))
def test_nonfinite_policy(impl, seed):
    """README "Non-finite values" with the mma kernel: a NaN/Inf state value or weight reaches the other three
    lanes of its coordinate through the output product; non-finite gradients keep their state bit for bit."""
    from test_nonfinite_policy import assert_same_pattern, make_inputs
    from l2l_fast import reference
    from tolerances import assert_elementwise_close

    pr = dict(n=40 + 3 * seed, hidden=20, layers=2, bad_grads=3, bad_states=4 + seed, bad_moments=0,
              bad_weight=[None, math.nan, None, math.inf][seed], kind="random", features=1, output=0, seed=seed)
    grad, state, weights, _, _, _ = make_inputs(pr, torch.float32)
    update, new_state = impl.lstm_step(grad, state, weights, 10.0, 0.1, 1)
    ref_update, ref_state = reference.lstm_step(grad.double(), state.double(), [w.double() for w in weights], 10.0, 0.1)
    for name, a, e in (("update", update, ref_update), ("new_state", new_state, ref_state)):
        fa, fe, _ = assert_same_pattern(a, e, name)
        assert_elementwise_close(fa, fe, torch.float32, name)
    cases.check_nonfinite_inplace(impl, grad, state, weights)


@pytest.mark.parametrize("features", MOMENT_SETS, ids=feature_id)
def test_nonfinite_moments(impl, gen, features):
    cases.check_nonfinite_moments(impl, 40, 20, 2, torch.float32, gen, features=features, output=1)


def test_other_nets_fall_back_to_ffma(impl, emu, gen):
    """mma covers hidden 20, 2 layers in float32 only: other sizes and float64 run the FFMA kernel, correctly."""
    before = emu.mma_launches()
    cases.check_forward_backward(impl, 40, 3, 2, torch.float32, gen)
    cases.check_forward_backward(impl, 40, 20, 2, torch.float64, gen)
    assert emu.mma_launches() == before


@pytest.mark.parametrize("features", [1, 3], ids=feature_id)
def test_one_m_tile_per_warp(impl, emu, gen, monkeypatch, features):
    """L2L_FAST_CUDA_GATES=mma16: the same body with one m-tile (16 coordinates) per warp."""
    monkeypatch.setenv("L2L_FAST_CUDA_GATES", "mma16")
    before = emu.mma_launches()
    cases.check_forward_backward(impl, 41, 20, 2, torch.float32, gen, non_finite=True, features=features, output=1)
    cases.check_step_inplace(impl, 37, 20, 2, torch.float32, gen, features=features)
    cases.check_multi_step(impl, [7, 0, 1, 50], [torch.float32, torch.bfloat16], 20, 2, gen,
                           state_dtype=torch.bfloat16, features=features)
    assert emu.mma_launches() >= before + 3


def test_gates_variable_checked(impl, gen, monkeypatch):
    grad, state, weights, _, _ = cases.inputs(9, 20, 2, torch.float32, gen)
    monkeypatch.setenv("L2L_FAST_CUDA_GATES", "tensorcores")
    with pytest.raises(ValueError, match="L2L_FAST_CUDA_GATES"):
        impl.lstm_step(grad, state, weights, 10.0, 0.1)


@pytest.mark.parametrize("threads", [32, 128], ids=["1-warp", "4-warps"])
def test_block_sizes(impl, emu, gen, threads):
    """Blocks of one warp (the weight staging takes more rounds per thread) and of four (the GPU's 128 threads:
    warps of one block take different tiles)."""
    emu.configure(forward_threads=32, forward_blocks=2, backward_blocks=3, smem_limit=227 * 1024,
                  forward_smem_limit=48 * 1024, mma_threads=threads)
    cases.check_step_inplace(impl, 333, 20, 2, torch.float32, gen)


@pytest.mark.parametrize("gates", ["mma", "mma16"])
@pytest.mark.parametrize("features", [1, 3], ids=feature_id)
def test_bf16_state_steps_as_its_float32_copy(impl, gen, monkeypatch, gates, features):
    """A bfloat16 state's old h are TF32 values: the kernel skips their split and their (zero) a_lo b_hi product
    (forward_mma_body.h's tf32_exact_k_tile, mma_2xtf32). The same step on a float32 copy of that state takes the
    full 3xTF32 products, so the two must agree bit for bit: the updates and the new state (rounded to bfloat16
    as the kernel stores it), also across non-finite gradients, n not a multiple of the warp tile."""
    monkeypatch.setenv("L2L_FAST_CUDA_GATES", gates)
    n = 77
    grad, state, weights, _, _ = cases.inputs(n, 20, 2, torch.float32, gen, non_finite=True, features=features)
    state_bf16 = state.to(torch.bfloat16)
    moments = cases.moments_for(features, grad, gen, advanced=False)
    results = []
    for state_dtype in (torch.bfloat16, torch.float32):
        param = torch.randn(n, generator=gen).float() if not results else results[0][2].clone()
        s = state_bf16.to(state_dtype).clone()
        m = None if moments is None else moments.float().clone()
        p0 = param.clone()
        impl.lstm_multi_step_([param], [grad], s, weights, 10.0, 0.1, features, moments=m, output=0)
        results.append((param - p0, s, p0, m))
    (du_b, s_b, _, m_b), (du_f, s_f, _, m_f) = results
    assert torch.equal(du_b.view(torch.int32), du_f.view(torch.int32)), "updates differ"
    assert torch.equal(s_b.view(torch.int16), s_f.to(torch.bfloat16).view(torch.int16)), "new states differ"
    if m_b is not None:
        assert torch.equal(m_b, m_f)


# ---------------------------------------------------------------------------------------------
# a NaN computed inside the net (mma_tf32.h's split of the layer inputs)
def nan_inside_inputs(n, gen, features):
    """grad, state, weights with finite gradients and weights where the net itself computes a NaN: layer 0's
    w_hh gets +1e38 and -1e38 in gate i of unit 3 for units 0 and 8, and coordinates 8 .. n - 4 hold h = 10 in
    both, so that gate is +Inf after k-tile 0 (units 0 .. 7) and Inf - Inf = NaN after k-tile 1 (units 8 .. 15):
    layer 0's h and c of unit 3 are NaN with the coordinate's poison 0. Besides, coordinate 1 has a NaN old h of
    layer 0 and coordinate 2 of layer 1 (finite gradients: poisoned by the policy), 3 .. 5 non-finite gradients."""
    grad, state, weights, up_u, up_s = cases.inputs(n, 20, 2, torch.float32, gen, non_finite=True,
                                                    features=features)
    state[0, 0, 0, 8:n - 3] = 10.0
    state[0, 0, 8, 8:n - 3] = 10.0
    state[0, 0, 5, 1] = math.nan
    state[1, 0, 7, 2] = math.nan
    weights[1][3, 0], weights[1][3, 8] = 1e38, -1e38
    return grad, state, weights, up_u, up_s


def assert_nan_kept(got, want, name):
    """got (mma) against want (the FFMA kernel, emulated): update / param NaN where want has them, the finite rest
    within the float32 table. States ([L, 2, H, n]): a coordinate whose update is NaN is wholly NaN in got (the mma
    kernel's y carries the poison of its group's lanes, so a NaN output poisons the coordinate's new state; the
    FFMA kernel keeps the cells it computed finite), the other coordinates as want."""
    from tolerances import assert_elementwise_close

    if got.dim() == 1:
        where = [t.isnan().nonzero().flatten().tolist() for t in (got, want)]
        assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN at {where[0]}, want {where[1]}"
        finite = want.isfinite()
        assert_elementwise_close(got[finite].double(), want[finite].double(), torch.float32, name)
        return
    g, w = got.float(), want.float()
    nan_coords = w.isnan().flatten(0, 2).any(0) & ~w.isnan().flatten(0, 2).all(0)  # the NaN the net computed
    assert g.isnan().flatten(0, 2).all(0)[nan_coords].all(), f"{name}: a coordinate with a NaN inside not wholly NaN"
    rest = ~nan_coords
    assert torch.equal(g[..., rest].isnan(), w[..., rest].isnan()), f"{name}: NaN positions"
    finite = w[..., rest].isfinite()
    assert_elementwise_close(g[..., rest][finite].double(), w[..., rest][finite].double(), torch.float32, name)


@pytest.mark.parametrize("features", [f for f in [1, *MOMENT_SETS] if registry.input_size(f) <= 4], ids=feature_id)
@pytest.mark.parametrize("gates", ["mma", "mma16"])
def test_nan_computed_inside_is_kept(emu, gen, monkeypatch, gates, features):
    """Regression (issue 22, "keep: the NaN/Inf policy"): the layer inputs were split with an integer TF32 rounding
    that turns the GPU's canonical NaN 0x7fffffff into -0 (mma_tf32.h), on the reasoning that a NaN layer input
    only occurs in a poisoned coordinate. A NaN the net computes itself from finite values (here Inf - Inf in a
    layer-0 gate, nan_inside_inputs) was read by layer 1 as 0: a finite update next to a NaN layer-0 state. The
    emulation's round_tf32_finite models the device's NaN. Against the FFMA kernel's emulation (which rounds each
    product, so the same gate is NaN there; on a GPU the FFMA kernel's fused chain may end at +Inf instead, and so
    may the CPU kernels: how an overflow ends depends on the order of the sum): the forward op, two in-place steps
    (float32 state) and two multi-tensor steps (bfloat16 state): update, param and new state."""
    emu.configure(forward_threads=32, forward_blocks=3, backward_blocks=3, smem_limit=227 * 1024,
                  forward_smem_limit=48 * 1024, mma_threads=64)
    n = 45
    grad, state, weights, _, _ = nan_inside_inputs(n, gen, features)
    moments = cases.moments_for(features, grad, gen, advanced=False)
    advanced = None if moments is None else registry.advance_moments(grad.double(), moments.double()).float()
    runs = {}
    for variant in ("ffma", gates):
        monkeypatch.setenv("L2L_FAST_CUDA_GATES", variant)
        before = emu.mma_launches()
        update, new_state = emu.lstm_step(grad, state, weights, 10.0, 0.1, features, advanced, 0)
        param, s32 = torch.zeros(n), state.clone()
        p16, s16 = torch.zeros(n), state.to(torch.bfloat16)
        m32 = None if moments is None else moments.clone()
        m16 = None if moments is None else moments.clone()
        steps = []
        for _ in range(2):
            emu.lstm_step_(param, grad, s32, weights, 10.0, 0.1, features, m32, 0)
            emu.lstm_multi_step_([p16], [grad], s16, weights, 10.0, 0.1, features, m16, 0)
            steps.append((param.clone(), s32.clone(), p16.clone(), s16.clone()))
        assert (emu.mma_launches() > before) == (variant != "ffma")
        runs[variant] = (update, new_state, steps)
    (u_want, s_want, steps_want), (u_got, s_got, steps_got) = runs["ffma"], runs[gates]
    computed = slice(8, n - 3)
    assert s_want[0, :, 3, computed].isnan().all() and s_want[0, :, 0, computed].isfinite().all(), \
        "the premise: layer 0's unit 3 is NaN (its unit 0 finite) where the net computes Inf - Inf"
    assert u_want[computed].isnan().all() and u_want[1:3].isnan().all()
    assert_nan_kept(u_got, u_want, "update")
    assert_nan_kept(s_got, s_want, "new_state")
    for k, (want, got) in enumerate(zip(steps_want, steps_got)):
        for name, w, g in zip(("param", "state", "param (bf16 state)", "bf16 state"), want, got):
            assert_nan_kept(g, w, f"step {k + 1}: {name}")


@pytest.mark.parametrize("backward", ["mma", "mma_wgrad"])
def test_nan_computed_inside_backward(emu, gen, monkeypatch, backward):
    """The same inputs through the backward on tensor cores (backward_mma.h, backward_mma_body.h: every operand split
    with lo unrounded, so a NaN stays in lo) against the FFMA backward's emulation: d grad, d state and every weight
    gradient NaN at the same places (a NaN coordinate makes the weight gradients NaN), the finite rest within the
    float32 table."""
    from tolerances import assert_elementwise_close

    emu.configure(forward_threads=32, forward_blocks=3, backward_blocks=3, smem_limit=227 * 1024,
                  forward_smem_limit=48 * 1024, mma_threads=64)
    grad, state, weights, up_u, up_s = nan_inside_inputs(45, gen, 1)
    runs = {}
    for variant in ("ffma", backward):
        monkeypatch.setenv("L2L_FAST_CUDA_BACKWARD", variant)
        before = emu.mma_gates_backward_launches()
        d_grad, d_state, d_weights = emu.lstm_step_backward(up_u, up_s, grad, state, weights, 10.0, 0.1)
        assert (emu.mma_gates_backward_launches() > before) == (variant == "mma")
        runs[variant] = [d_grad, d_state, *d_weights]
    assert runs["ffma"][0][8:42].isnan().all() and runs["ffma"][0][6:8].isfinite().all(), "the premise"
    for k, (got, want) in enumerate(zip(runs[backward], runs["ffma"])):
        assert torch.equal(got.isnan(), want.isnan()), f"output {k}: NaN positions"
        finite = want.isfinite()
        assert_elementwise_close(got[finite].double(), want[finite].double(), torch.float32, f"output {k}")
