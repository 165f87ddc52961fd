"""The AMX builds' backward (set_cpu_products("amx-bf16x3" | "amx-bf16x6")): its own products, d inputs = W^T dgate and
the weight gradients dW += dgate Z, on AMX tiles from split bf16 operands (csrc/cpu/amx_backward.h, PRODUCTS.md
"AMX tiles", Backward). On every tile backend this machine has (test_amx_products's `amx` fixture: emulated, and the
real tiles where present, after its child-process probe).

bf16x6 is held to the float32 kernels' own tolerances against the float64 reference (what "float32-level" means).
bf16x3 is held against a float64 emulation of its forward (every gate product the sum of the 3 split products, the
rest exact) with the float32 tolerances plus the linear propagation of the backward's own split products
(AMX_BACKWARD_STAGES in tests/tolerances.py, derived there).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import VARIANTS, WEIGHT_KINDS, native_step, requires_native, step_grads, variant_id
from l2l_fast import features as registry
from l2l_fast import reference
from test_amx_products import (BACKENDS, SPLITS, amx, nonfinite_problem, problem,  # noqa: F401  (amx: the fixture)
                               products)
from test_bf16_products import assert_same_special
from tolerances import (AMX_BACKWARD_STAGES, AMX_PRODUCTS, ELEMENTWISE, REORDERED_SUM, assert_close_rel_max,
                        assert_elementwise_close, assert_weight_grads_close, backward_error_scale,
                        weight_grad_derived_term)

pytestmark = requires_native
F32 = torch.float32
P, SCALE = 10.0, 0.1


# ---------------------------------------------------------------------------------------------
# a float64 emulation of the split forward
def _pieces(t: torch.Tensor, count: int) -> list[torch.Tensor]:
    """t's float32 values split as the kernels split them: x0 = r(x), x1 = r(x - x0), ... (r: bf16, nearest even)."""
    rest, out = t.detach().float(), []
    for _ in range(count):
        piece = rest.to(torch.bfloat16).float()
        out.append(piece.double())
        rest = rest - piece  # exact in float32
    return out


def _split_matmul(x: torch.Tensor, w: torch.Tensor, pieces: int) -> torch.Tensor:
    xs, ws = _pieces(x, pieces), _pieces(w, pieces)
    return sum(xs[a] @ ws[b].t() for a in range(pieces) for b in range(pieces) if a + b <= pieces - 1)


def emulated_step(split):
    """lstm_step in float64 whose gate pre-activations are the split products' sum (straight-through: the backward
    is the exact one at the emulated forward's values). Finite inputs only."""
    pieces = 2 if split == "amx-bf16x3" else 3

    def step(grad, state, weights, p, scale, features=1, moments=None, output=0):
        layers, out_w, out_b = reference.split_weights(weights)
        x = registry.compute(grad, features, p, moments)
        rows = []
        for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
            h, c = state[l, 0].t(), state[l, 1].t()
            inputs, w = torch.cat([x, h], 1), torch.cat([w_ih, w_hh], 1)
            exact = inputs @ w.t()
            gates = exact + (_split_matmul(inputs, w, pieces) - exact).detach() + b_ih + b_hh
            i, f, g, o = gates.chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            rows.append(torch.stack([h_new.t(), c_new.t()]))
            x = h_new
        y = (x @ out_w.t() + out_b).squeeze(1)
        return scale * (torch.tanh(y) if output == 1 else y), torch.stack(rows)

    return step


def check_backward(split, grad, state, weights, moments, up_u, up_s, features=1, output=0):
    """The kernel's (d_grad, d_state, d_weights) within the tolerances above. Returns the largest error / bound of
    each output (bf16x3: of the split products' term alone, after the float32 allowance) for the records."""
    got = step_grads(native_step, grad, state, weights, P, SCALE, up_u, up_s, features, moments, output)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    args64 = (grad.double(), state.double(), [w.double() for w in weights], P, SCALE, up_u.double(), up_s.double(),
              features, d64(moments), output)
    ref = step_grads(reference.lstm_step, *args64)
    ref32 = step_grads(reference.lstm_step, grad, state, weights, P, SCALE, up_u, up_s, features, moments, output)
    # at the reference's values, with the instruction set the split runs (avx512, fast activations)
    derived = weight_grad_derived_term(grad, state, weights, P, SCALE, up_u, up_s, features, moments, output)
    if split == "amx-bf16x6":
        for name, a, e in zip(("d_grad", "d_state"), got[2:4], ref[2:4]):
            assert_elementwise_close(a, e, F32, name)
        assert_weight_grads_close(got[4], ref[4], F32, ref32[4], derived=derived)
        return []
    emul = step_grads(emulated_step(split), *args64)
    # the float32 rule's own allowance: PyTorch float32's distance from the exact reference, moved onto the emulation
    shifted32 = [e + (r32.double() - r) for e, r32, r in zip(emul[4], ref32[4], ref[4])]
    scale = backward_error_scale(grad, state, weights, P, SCALE, up_u, up_s, derivative_floor=0.0, features=features,
                                 moments=moments, output=output)
    rel = AMX_BACKWARD_STAGES((len(weights) - 2) // 4) * AMX_PRODUCTS[split][0]
    ratios = []
    for name, a, e, s in zip(("d_grad", "d_state"), got[2:4], emul[2:4], scale[:2]):
        assert_elementwise_close(a, e, F32, name, activation_bound=rel * s)
        tol = ELEMENTWISE[F32]
        allowance = tol["atol_rel"] * e.abs().max() + tol["rtol"] * e.abs() + tol["atol"]
        ratios.append((((a.double() - e).abs() - allowance).clamp_min(0) / (rel * s).clamp_min(1e-300)).max().item())
    # the float32 rule with the split products' bound added to its derived term
    assert_weight_grads_close(got[4], emul[4], F32, shifted32, derived=[t + rel * s for t, s in zip(derived, scale[2])])
    return ratios


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("n", [1, 7, 63, 65, 1003], ids=lambda n: f"n{n}")
def test_backward_against_reference(amx, gen, n, variant):
    features, output = variant
    grad, state, weights, moments, up_u, up_s = problem(gen, 20, 2, n, features)
    check_backward(amx, grad, state, weights, moments, up_u, up_s, features, output)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("hidden_size,num_layers", [(20, 2), (1, 1), (3, 3), (21, 2), (9, 1), (10, 2)],
                         ids=lambda v: str(v))
def test_backward_shapes_and_weight_kinds(amx, gen, hidden_size, num_layers, kind):
    """H not a multiple of 4 and 8 (part-empty 16-gate blocks, 32-gate blocks padded with zero rows), odd K, K > 32
    (H = 21: layer 2 has K = 42, three 16-input blocks; H = 20: K = 40), one unit."""
    grad, state, weights, moments, up_u, up_s = problem(gen, hidden_size, num_layers, 133, kind=kind)
    check_backward(amx, grad, state, weights, moments, up_u, up_s)


def test_one_and_two_threads(amx, gen):
    """d grad, d state bit for bit; each thread's range sums its weight gradients in its tiles' order alone (the
    ranges are whole tiles; the float sums flushed every 16 tiles of the range), so 2 threads differ from 1 only by
    where the ranges' double sums meet; two runs on 2 threads are bit for bit the same."""
    n = 40_003  # > 2 x 16384: two ranges
    grad, state, weights, _, up_u, up_s = problem(gen, 20, 2, n)
    runs, previous = [], torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            runs.append(step_grads(native_step, grad, state, weights, P, SCALE, up_u, up_s))
    finally:
        torch.set_num_threads(previous)
    one, two, again = runs
    for a, b in zip(one[:4], two[:4]):
        assert torch.equal(a, b)
    for k, (a, b, c) in enumerate(zip(one[4], two[4], again[4])):
        assert torch.equal(b, c), f"d_weights[{k}]: two runs on 2 threads differ"
        assert_close_rel_max(a, b, REORDERED_SUM[F32], f"d_weights[{k}]")


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_non_finite_positions(split, backend, seed):
    """NaN / +-Inf gradients, states, moments, weights over more tiles and gate blocks than test_amx_products's
    policy test (n up to 300, H up to 9: 36 gate rows, two 32-gate blocks): d grad, d state and every weight
    gradient NaN / Inf exactly where the float32 kernel's are."""
    features, output, (grad, state, weights, up_u, up_s, moments), advanced = nonfinite_problem(
        seed, n=300, hidden=9, bad_states=3, bad_weights=[None, None, None, None, float("nan")], draw_offset=1000)
    runs = {}
    for name in (split, "float32"):
        with products(split, backend) if name == split else contextlib.nullcontext():
            runs[name] = step_grads(native_step, grad, state, weights, P, SCALE, up_u, up_s, features, advanced,
                                    output)
    got, f32 = runs[split], runs["float32"]
    for name, a, b in [("d_grad", got[2], f32[2]), ("d_state", got[3], f32[3])] + [
            (f"d_weights[{k}]", a, b) for k, (a, b) in enumerate(zip(got[4], f32[4]))]:
        assert_same_special(a, b, name)


def test_poisoned_tile_leaves_the_next_sound(amx, gen):
    """A poisoned first tile (NaN gate gradients and inputs in the shared buffers) leaves the second tile's d grad and
    d state bit for bit as computed alone: the gate rows past 4H and the inputs past K are zeros in every tile (never
    written after their allocation)."""
    H, L, n = 9, 2, 192  # 36 gate rows: the second 32-gate block mostly padding
    grad, state, weights, _, up_u, up_s = problem(gen, H, L, n)
    state[0, 1, 0, :64] = float("nan")
    got = step_grads(native_step, grad, state, weights, P, SCALE, up_u, up_s)
    assert torch.isnan(got[2][:64]).all() and torch.isfinite(got[2][64:]).all()
    alone = step_grads(native_step, grad[64:], state[..., 64:].contiguous(), weights, P, SCALE, up_u[64:],
                       up_s[..., 64:].contiguous())
    assert torch.equal(got[2][64:], alone[2]) and torch.equal(got[3][..., 64:], alone[3])
    assert all(torch.isnan(w).all() for w in got[4][:-2])  # every gate weight's and bias' gradient: the NaN lane's


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_runs_on_the_tiles(split, backend, gen):
    """The backward's products are the tiles' (not the float32 FMAs): d grad and the first layer's gate weight
    gradients differ from the float32 kernel's (a guard against the AMX branch of layer_backward not being taken)."""
    grad, state, weights, _, up_u, up_s = problem(gen, 20, 2, 1003)
    f32 = step_grads(native_step, grad, state, weights, P, SCALE, up_u, up_s)
    with products(split, backend):
        got = step_grads(native_step, grad, state, weights, P, SCALE, up_u, up_s)
    assert not torch.equal(got[2], f32[2])
    assert all(not torch.equal(a, b) for a, b in zip(got[4][:2], f32[4][:2]))
