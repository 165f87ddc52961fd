"""The CPU kernels' gate products on AMX tiles (set_cpu_products("amx-bf16x3" | "amx-bf16x6"), csrc/cpu/PRODUCTS.md
"AMX tiles").

Every kernel test runs on each tile backend this machine has: "emulated" (amx_tiles.h's model of the tile
instructions, on any CPU with AVX-512 and AVX512_BF16; selected with the test switch L2L_FAST_CPU_AMX_EMULATE=1)
and "hardware" (the real tiles, where the CPU has AMX-TILE and AMX-BF16 and Linux grants the tile state). A backend
this machine lacks is skipped with the reason. The emulator itself is checked against an exact rational model of
the SDM's TDPBF16PS, the kernels against the float64 reference within the bound derived in PRODUCTS.md (bf16x6:
also within the float32 kernels' own tolerances, what "float32-level" means here), and both splits' forward and
backward against their specification, the float64 emulation of the split products (split_step), within the float32
kernels' tolerances (test_backward_against_emulation: the error analysis).
"""
from __future__ import annotations

import contextlib
import functools
import os
import struct
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from conftest import (VARIANTS, WEIGHT_KINDS, generator, moments_for, native_step, random_grad, random_state,
                      random_weights, requires_native, step_grads, variant_id)
from l2l_fast import features as registry
from l2l_fast import ops, reference
from test_bf16_products import (assert_same_special, bound_through_cells, check_multi_step_equals_single_tensor_op,
                                 check_one_and_two_threads, emulated_step, round_bf16, upstream)
from test_nonfinite_policy import make_inputs as nonfinite_inputs
from tolerances import (AMX_FLUSHED, AMX_PRODUCTS, ELEMENTWISE, activation_error_bound, assert_elementwise_close,
                        assert_weight_grads_close, bits, weight_grad_bounds, weight_grad_derived_term)

pytestmark = requires_native
F32 = torch.float32
SPLITS = tuple(AMX_PRODUCTS)
EMULATE = "L2L_FAST_CPU_AMX_EMULATE"


@contextlib.contextmanager
def _emulation(on: bool):
    before = os.environ.get(EMULATE)
    if on:
        os.environ[EMULATE] = "1"
    else:
        os.environ.pop(EMULATE, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(EMULATE, None)
        else:
            os.environ[EMULATE] = before


@contextlib.contextmanager
def products(name: str, backend: str):
    """The CPU kernels with AMX products `name` on `backend` tiles, then the previous settings again."""
    from l2l_fast import _C

    previous = _C.cpu_isa(), _C.cpu_activations(), _C.cpu_products().split(" ")[0]
    _C.set_cpu_products("float32")
    _C.set_cpu_isa("avx512")
    _C.set_cpu_activations("fast")
    try:
        with _emulation(backend == "emulated"):
            got = _C.set_cpu_products(name)
        assert got == (name if backend == "hardware" else f"{name} (emulated)")
        assert ops.cpu_products() == got
        yield
    finally:
        _C.set_cpu_products("float32")
        _C.set_cpu_activations(previous[1])
        _C.set_cpu_isa(previous[0])
        with _emulation(True):  # an emulated choice made before the test comes back as it was
            _C.set_cpu_products(previous[2])


def _unavailable(backend: str) -> str | None:
    if not ops.HAS_NATIVE:
        return f"l2l_fast._C is not built ({ops.NATIVE_IMPORT_ERROR})"
    try:
        with products("amx-bf16x3", backend):
            pass
    except RuntimeError as error:
        return f"no {backend} AMX tiles here: {str(error).splitlines()[0]}"
    return None


UNAVAILABLE = {backend: _unavailable(backend) for backend in ("emulated", "hardware")}

# One step on the real tiles in a child process first: a fault there (SIGILL from a tile configuration or permission
# the OS refused, SIGSEGV from a bad tile address) fails the hardware tests with its message instead of killing the
# whole test run. None where it ran (or where there are no real tiles to run).
_PROBE = """
import sys, torch
sys.path.insert(0, TESTS)
from conftest import random_grad, random_state, random_weights
from l2l_fast import _C, ops
_C.set_cpu_isa("avx512"); _C.set_cpu_activations("fast"); _C.set_cpu_products("amx-bf16x6")
g = torch.Generator().manual_seed(0)
w = random_weights(20, 2, gen=g, dtype=torch.float32)
update, _ = ops.lstm_step(random_grad(100, gen=g, dtype=torch.float32, p=10.0),
                          random_state(2, 20, 100, gen=g, dtype=torch.float32), w, 10.0, 0.1)
assert torch.isfinite(update).all()
print("ok")
""".replace("TESTS", repr(os.path.dirname(os.path.abspath(__file__))))


def _hardware_fault() -> str | None:
    if UNAVAILABLE["hardware"] is not None:
        return None
    env = {k: v for k, v in os.environ.items() if k != EMULATE}
    child = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    if child.returncode == 0 and child.stdout.strip().endswith("ok"):
        return None
    return (f"one step on the real AMX tiles failed in a child process (exit status {child.returncode}; negative: "
            f"the signal): {child.stderr.strip()[-2000:]}")


HARDWARE_FAULT = _hardware_fault()
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(UNAVAILABLE[b] is not None, reason=str(UNAVAILABLE[b])))
            for b in ("emulated", "hardware")]
requires_emulator = pytest.mark.skipif(UNAVAILABLE["emulated"] is not None, reason=str(UNAVAILABLE["emulated"]))


def _use_tiles(request):
    split, backend = request.param[0], request.param[1].values[0]
    reason = UNAVAILABLE[backend]
    if reason is not None:
        pytest.skip(reason)
    if backend == "hardware" and HARDWARE_FAULT is not None:
        pytest.fail(HARDWARE_FAULT)
    with products(split, backend):
        yield split


def _split_id(v):
    return f"{v[0]}-{v[1].values[0]}"


@pytest.fixture(params=[(s, b) for s in SPLITS for b in BACKENDS], ids=_split_id)
def amx(request):
    yield from _use_tiles(request)


@pytest.fixture(params=[("amx-bf16x6", b) for b in BACKENDS], ids=_split_id)
def amx_x6(request):
    """bf16x6 only: the split whose error is float32-level, held to the exact reference's float32 tolerances."""
    yield from _use_tiles(request)


# ---------------------------------------------------------------------------------------------
# the emulator against an exact model of the SDM's TDPBF16PS
def _f32_of_bits(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def _daz(b: int) -> Fraction:
    """fp32 bits -> exact value, denormals read as 0."""
    return Fraction(0) if b & 0x7F800000 == 0 else Fraction(_f32_of_bits(b))


def _round_f32_ftz(q: Fraction) -> Fraction:
    """q to the nearest float32, ties to even, results below 2^-126 flushed to 0 (finite, in range)."""
    if q == 0:
        return q
    a = abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1  # 2^e <= a < 2^(e + 1)
    ulp = Fraction(2) ** (e - 23)
    r = round(a / ulp) * ulp  # Fraction's round: ties to even
    if r < Fraction(2) ** -126:
        return Fraction(0)
    return r if q > 0 else -r


def exact_dpbf16ps(c, a, b):
    """TDPBF16PS as the SDM writes it, in exact rationals: per row m, k, n, two fp32 FMAs (pair's even, then odd
    element), each rounded once to nearest even with FTZ; bf16 and fp32 inputs DAZ. c [16,16] float32, a/b [16,32]
    int16 bits. Returns [16][16] Fractions."""
    cb = c.view(torch.int32).tolist()
    ab, bb = (a.to(torch.int32) & 0xFFFF).tolist(), (b.to(torch.int32) & 0xFFFF).tolist()
    out = []
    for m in range(16):
        row = []
        for n in range(16):
            acc = _daz(cb[m][n])
            for k in range(16):
                for half in (0, 1):
                    prod = _daz(ab[m][2 * k + half] << 16) * _daz(bb[k][2 * n + half] << 16)
                    acc = _round_f32_ftz(acc + prod)
            row.append(acc)
        out.append(row)
    return out


def bf16_bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).view(torch.int16)


@requires_emulator
@pytest.mark.parametrize("case", ["normal", "denormal_inputs", "flushed_results"])
def test_emulator_is_the_sdm_instruction(case):
    from l2l_fast import _C

    gen = generator(11)
    scale = lambda shape, lo, hi: 2.0 ** torch.randint(lo, hi, shape, generator=gen).double()  # noqa: E731
    a = torch.randn(16, 32, generator=gen, dtype=torch.float64) * scale((16, 32), -12, 12)
    b = torch.randn(16, 32, generator=gen, dtype=torch.float64) * scale((16, 32), -12, 12)
    c = (torch.randn(16, 16, generator=gen, dtype=torch.float64) * scale((16, 16), -6, 6)).float()
    a_bits, b_bits = bf16_bits(a), bf16_bits(b)
    if case == "denormal_inputs":  # bf16 denormals (exponent 0) in both operands and an fp32 denormal in c
        a_bits[::3, ::5] = 0x0011
        b_bits[::4, 1::7] = -0x7FF0  # 0x8010: a negative denormal
        c[0, 0] = 1e-40
    if case == "flushed_results":  # products and sums below 2^-126
        a_bits = bf16_bits(torch.full((16, 32), 2.0**-64) * torch.sign(torch.randn(16, 32, generator=gen)))
        b_bits = bf16_bits(torch.full((16, 32), 2.0**-65))
        c = torch.zeros(16, 16)
    got = _C._amx_emulated_dpbf16ps(c, a_bits, b_bits)
    expected = exact_dpbf16ps(c, a_bits, b_bits)
    assert [[Fraction(v) for v in row] for row in got.double().tolist()] == expected
    if case == "flushed_results":
        assert torch.all(got == 0)


@requires_emulator
def test_emulator_nan_stays_in_its_column():
    """A NaN in B's column n reaches C's column n only: a poisoned coordinate never leaks to its neighbours."""
    from l2l_fast import _C

    gen = generator(12)
    a = bf16_bits(torch.randn(16, 32, generator=gen))
    b = bf16_bits(torch.randn(16, 32, generator=gen))
    b[5, 2 * 3 + 1] = bf16_bits(torch.tensor([float("nan")]))[0]
    got = _C._amx_emulated_dpbf16ps(torch.zeros(16, 16), a, b)
    assert torch.isnan(got[:, 3]).all() and torch.isfinite(got[:, [n for n in range(16) if n != 3]]).all()


# ---------------------------------------------------------------------------------------------
# the kernels against the float64 reference
def split_products_bound(grad, state, weights, p, scale, split, features=1, moments=None, output=0):
    """Bound on |kernel - exact| of (update [n], new_state [L, 2, H, n]) from the split products alone (everything
    else exact), PRODUCTS.md "AMX tiles": per pre-activation (split + (products K + 1) 2^-24) sum |w| |x'| plus the
    flushed pieces, through the cell by the Lipschitz constants as products_error_bound of test_bf16_products."""
    rel_split, count = AMX_PRODUCTS[split]

    def pre_activation_error(x, dx, h, w_ih, w_hh, b_ih, b_hh):
        K = w_ih.shape[1] + w_hh.shape[1]
        rel = rel_split + (count * K + 1) * 2.0**-24 * (1 + rel_split)
        terms = (x.abs() + dx) @ w_ih.abs().t() + h.abs() @ w_hh.abs().t() + (b_ih + b_hh).abs()
        flushed = AMX_FLUSHED * count * (torch.cat([w_ih, w_hh], 1).abs().sum(1) + K)
        return dx @ w_ih.abs().t() + rel * terms + flushed

    return bound_through_cells(grad, state, weights, p, scale, pre_activation_error, features, moments, output)


def problem(gen, H, L, n, features=1, kind="random"):
    """Random float32 inputs of a step and its backward at p = 10 (this file's and test_amx_backward's): (grad [n],
    state [L, 2, H, n], weights, moments [4, n] or None, upstream d update [n], upstream d state [L, 2, H, n])."""
    weights = random_weights(H, L, gen=gen, dtype=F32, features=features, kind=kind)
    grad = random_grad(n, gen=gen, dtype=F32, p=10.0)
    moments = moments_for(features, grad, gen=gen)
    state = random_state(L, H, n, gen=gen, dtype=F32)
    up_u, up_s = upstream(n, L, H, gen=gen)
    return grad, state, weights, moments, up_u, up_s


def check_forward(split, grad, state, weights, p, scale, features=1, moments=None, output=0):
    """update and new_state within: the products' bound + the float32 kernels' tolerance (+ their activations'
    bound); bf16x6 also within the float32 kernels' tolerance alone. Returns (max error / bound) per output."""
    got = native_step(grad, state, weights, p, scale, features, moments, output)
    exact = reference.lstm_step(grad.double(), state.double(), [w.double() for w in weights], p, scale, features,
                                None if moments is None else moments.double(), output)
    act = activation_error_bound(grad, state, weights, p, scale, features=features, moments=moments, output=output)
    prod = split_products_bound(grad, state, weights, p, scale, split, features, moments, output)
    ratios = []
    for name, a, e, ab, pb in zip(("update", "new_state"), got, exact, act, prod):
        assert_elementwise_close(a, e, F32, name, activation_bound=ab + pb)
        if split == "amx-bf16x6":
            assert_elementwise_close(a, e, F32, name, activation_bound=ab)
        ratios.append(((a.double() - e).abs() / pb.clamp_min(1e-300)).max().item())
    return ratios


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("n", [1, 7, 63, 65, 4097], ids=lambda n: f"n{n}")
def test_forward_against_reference(amx, gen, n, variant):
    features, output = variant
    H, L, p, scale = 20, 2, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=F32, features=features)
    grad = random_grad(n, gen=gen, dtype=F32, p=p)
    moments = moments_for(features, grad, gen=gen)
    state = random_state(L, H, n, gen=gen, dtype=F32)
    check_forward(amx, grad, state, weights, p, scale, features, moments, output)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("hidden_size,num_layers", [(20, 2), (1, 1), (3, 3), (21, 2), (9, 1)], ids=lambda v: str(v))
def test_shapes_and_weight_kinds(amx, gen, hidden_size, num_layers, kind):
    """H not a multiple of 4 (a part-empty unit group), odd K (a zero half pair), K > 32 (two k-blocks, H = 21)."""
    n, p, scale = 133, 10.0, 0.1
    weights = random_weights(hidden_size, num_layers, gen=gen, dtype=F32, kind=kind)
    grad = random_grad(n, gen=gen, dtype=F32, p=p)
    state = random_state(num_layers, hidden_size, n, gen=gen, dtype=F32)
    check_forward(amx, grad, state, weights, p, scale)


@pytest.mark.parametrize("variant", VARIANTS[::3], ids=variant_id)
def test_backward_against_reference(amx_x6, gen, variant):
    """bf16x6's backward against the exact reference. The backward recomputes the forward on the tiles and runs its
    own products there too (amx_backward.h), split as the forward's: held to the float32 kernels' tolerances (the
    split errors, 2.4e-7 |w||x| per product, are far below them for bf16x6). bf16x3's split error (~800 float32
    roundings) is not float32-level: its backward is held to its specification instead (test_backward_against_
    emulation, as bf16x6's is too)."""
    features, output = variant
    p, scale = 10.0, 0.1
    grad, state, weights, moments, up_u, up_s = problem(gen, 20, 2, 1003, features)
    got = step_grads(native_step, grad, state, weights, p, scale, up_u, up_s, features, moments, output)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = step_grads(reference.lstm_step, grad.double(), state.double(), [w.double() for w in weights], p, scale,
                     up_u.double(), up_s.double(), features, d64(moments), output)
    ref32 = step_grads(reference.lstm_step, grad, state, weights, p, scale, up_u, up_s, features, moments, output)
    for name, a, e in zip(("d_grad", "d_state"), got[2:4], ref[2:4]):
        assert_elementwise_close(a, e, F32, name)
    derived = weight_grad_derived_term(grad, state, weights, p, scale, up_u, up_s, features, moments, output)
    assert_weight_grads_close(got[4], ref[4], F32, ref32[4], derived=derived)


# ---------------------------------------------------------------------------------------------
# the kernels against their specification: the float64 emulation of the split products
# (emulated_step of test_bf16_products, with the split as its `product` hook)
SPLIT_ORDER = {  # (weight piece, input piece) of each product, in the order amx_gates.h accumulates them
    "amx-bf16x3": ((1, 0), (0, 1), (0, 0)),
    "amx-bf16x6": ((2, 0), (1, 1), (0, 2), (1, 0), (0, 1), (0, 0)),
}


def split_pieces(x: torch.Tensor, pieces: int) -> list[torch.Tensor]:
    """x's bf16 pieces, in x's dtype: x0 = r(x), x1 = r(x - x0), x2 = r(x - x0 - x1) (r: round_bf16, to nearest
    even, below 2^-126 to 0), what pack_amx_inputs / pack_amx_weights do to a float32 operand (every remainder is
    exact in float32, and in float64)."""
    out, rest = [], x
    for _ in range(pieces):
        piece = round_bf16(rest.double()).to(x.dtype)
        out.append(piece)
        rest = rest - piece
    return out


class _SplitProduct(torch.autograd.Function):
    """x [n, k] @ w.T [k, m] with the value of the split products (the sum over `order` of x_b @ w_a.T), and the
    derivative of x @ w.T (straight-through: the split treated as the identity) computed as the AMX backward does:
    the incoming gradient split into pieces too, with the weights' (d x) and the inputs' (d w) pieces (amx_backward.h)."""

    @staticmethod
    def forward(ctx, x, w, order):
        ctx.save_for_backward(x, w)
        ctx.order = order
        pieces = 1 + max(max(o) for o in order)
        xs, ws = split_pieces(x, pieces), split_pieces(w, pieces)
        value = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)
        for a, b in order:
            value = value + xs[b] @ ws[a].t()
        return value

    @staticmethod
    def backward(ctx, g):
        # the AMX backward's own products are split too (amx_backward.h): the gate gradients, rounded to float32 as
        # the kernel holds them, in pieces with the weights (d inputs) and with the inputs (weight gradients)
        x, w = ctx.saved_tensors
        order = ctx.order
        pieces = 1 + max(max(o) for o in order)
        gs = split_pieces(g.float().to(g.dtype), pieces)
        xs, ws = split_pieces(x, pieces), split_pieces(w, pieces)
        dx = sum(gs[b] @ ws[a] for a, b in order)
        dw = sum(gs[a].t() @ xs[b] for a, b in order)
        return dx, dw, None


class _Substitute(torch.autograd.Function):
    """The value `values` (the kernel's own operand, float32), the derivative of x (the identity)."""

    @staticmethod
    def forward(ctx, x, values):
        return values.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


def kernel_operand(x, values=None):
    return x if values is None else _Substitute.apply(x, values.detach())


def split_step(split: str, **kwargs):
    """emulated_step with `split`'s products: every gate product's operands (weights; features, h) split into bf16
    pieces, the products of SPLIT_ORDER summed, the derivative x @ w.T's; layer inputs as the kernel holds them
    (kwargs hidden=, inputs=: its own h and features)."""
    order = SPLIT_ORDER[split]
    return functools.partial(emulated_step, operand=kernel_operand,
                             product=lambda x, w: _SplitProduct.apply(x, w, order), **kwargs)


def kernel_features(grad, features, p, moments, *, gen):
    """The kernel's own float32 features [n, I] of grad (and the advanced moments), read bit for bit from its
    backward: at n = 1, d b_ih[j] = dgate_j and d w_ih[j, k] = fl32(dgate_j x_k) (one float32 product into a zero
    sum), so x_k is the float32 x with fl32(dgate_j x) = d w_ih[j, k] for all 4H gates j of a readout net (H = 20,
    one layer, the current kernels). Asserted unique (among the float32 x near d w / dgate) where it matters: values
    that split alike (all pieces flushed below 2^-126) may tie. Plain PyTorch float32 features are not these bits
    (the moments' bias correction, log): measured different in most coordinates with moments."""
    H, n = 20, grad.shape[0]
    weights = random_weights(H, 1, gen=gen, dtype=F32, kind="random", features=features)
    state = random_state(1, H, 1, gen=gen, dtype=F32)
    up_u, up_s = upstream(1, 1, H, gen=gen)
    rows = []
    for i in range(n):
        m = None if moments is None else moments[:, i:i + 1].contiguous()
        from l2l_fast import _C
        current = _C.cpu_products()
        _C.set_cpu_products("float32")
        try:
            d = step_grads(native_step, grad[i:i + 1], state, weights, p, 1.0, up_u, up_s, features, m)[4]
        finally:
            with _emulation("emulated" in current):
                _C.set_cpu_products(current.split(" ")[0])
        dw, db = d[0], d[2]  # [4H, I], [4H]
        j = int(db.abs().argmax())
        first = dw[j] / db[j]
        candidates, up, down = [first], first, first
        for _ in range(4):
            up, down = torch.nextafter(up, torch.full_like(up, float("inf"))), torch.nextafter(
                down, torch.full_like(down, float("-inf")))
            candidates += [up, down]
        c = torch.stack(candidates)  # [9, I]
        match = ((db[None, :, None] * c[:, None, :]) == dw[None]).all(1)  # [9, I]
        tie_ok = (c.abs() < 2.0**-126) | ~match
        assert match.any(0).all() and ((match.sum(0) == 1) | tie_ok.all(0)).all(), (
            f"coordinate {i}: the kernel's features not read back uniquely from its weight gradient")
        rows.append(c[match.to(torch.int8).argmax(0), torch.arange(c.shape[1])])
    return torch.stack(rows)


def check_against_split_emulation(split, grad, state, weights, p, scale, up_u, up_s, *, features=1, moments=None,
                                  output=0, backward=True, gen):
    """The kernel's forward and backward vs the float64 emulation of its split products (split_step) fed the
    kernel's own features and h (kernel_features; the new_state output), with the float32 kernels' tolerances:
    ELEMENTWISE (+ activation_error_bound for the forward, as check_against_emulation of test_bf16_products) and,
    for the weight gradients, the float32 rule (the flash-attention factor against the same emulation run by PyTorch
    in float32, + the derived term).
    Returns max |kernel - emulation| / tolerance of (update, new_state, d_grad, d_state) and max |kernel -
    emulation| / the rule's bound over the weight gradients."""
    variant = dict(features=features, moments=moments, output=output)
    got = step_grads(native_step, grad, state, weights, p, scale, up_u, up_s, **variant)
    hidden = [got[1][l, 0] for l in range(state.shape[0] - 1)]
    spec = split_step(split, hidden=hidden, inputs=kernel_features(grad, features, p, moments, gen=gen))
    ref = step_grads(spec, grad.double(), state.double(), [w.double() for w in weights], p, scale, up_u.double(),
                     up_s.double(), features, None if moments is None else moments.double(), output)
    act = activation_error_bound(grad, state, weights, p, scale, **variant)
    ratios = []
    for name, a, e, ab in zip(("update", "new_state", "d_grad", "d_state"), got[:4], ref[:4], [*act, None, None]):
        if name.startswith("d_") and not backward:
            continue
        assert_elementwise_close(a, e, F32, name, activation_bound=ab)
        ratios.append(_ratio(a, e, ab))
    if backward:
        ref32 = step_grads(spec, grad, state, weights, p, scale, up_u, up_s, **variant)[4]
        # the derived term at the reference's values, as activation_error_bound above
        derived = weight_grad_derived_term(grad, state, weights, p, scale, up_u, up_s, **variant)
        assert_weight_grads_close(got[4], ref[4], F32, ref32, derived=derived)
        ratios.append(_rule_ratio(got[4], ref[4], ref32, derived))
    return ratios


def _ratio(a, e, activation_bound=None):
    """max |a - e| / assert_elementwise_close's float32 bound."""
    tol = ELEMENTWISE[F32]
    a, e = a.double(), e.double()
    bound = tol["atol_rel"] * e.abs().max() + tol["rtol"] * e.abs() + tol["atol"]
    if activation_bound is not None:
        bound = bound + activation_bound
    return ((a - e).abs() / bound).max().item()


def _rule_ratio(kernel, ref64, ref32, derived):
    """max over the weight gradients' entries of |kernel - ref64| / the float32 rule's bound (weight_grad_bounds)."""
    return max(((a.double() - e.double()).abs() / b).max().item()
               for a, e, b in zip(kernel, ref64, weight_grad_bounds(ref64, ref32, derived)) if a.numel())


def test_split_pieces_are_the_kernels(gen):
    """split_pieces of float32 values: the pieces add up to x (x2 ends the split: 24 bits in three pieces of 8)
    and each is a bf16 value (torch's conversion, to nearest even, of the remainder)."""
    exponents = torch.randint(-25, 30, (100_000,))  # pieces above 2^-126 (else flushed)
    x = (torch.randn(100_000, generator=gen, dtype=torch.float64) * 10.0**exponents).to(F32)
    pieces = split_pieces(x, 3)
    assert torch.equal(sum(piece.double() for piece in pieces), x.double())
    rest = x
    for piece in pieces:
        assert torch.equal(piece, rest.to(torch.bfloat16).to(F32))
        rest = rest - piece


@pytest.mark.parametrize("split", SPLITS)
def test_split_emulation_without_split_is_the_reference(gen, split):
    """With float64 pieces as they are (the split's identity: one piece, its only product) split_step is
    reference.lstm_step's math; and the split's value is the operands' within its bound."""
    H, L, n, p = 5, 3, 50, 10.0
    features, output = VARIANTS[-1]
    weights = random_weights(H, L, gen=gen, features=features)
    grad = random_grad(n, gen=gen, p=p)
    state, moments = random_state(L, H, n, gen=gen), moments_for(features, grad, gen=gen)
    expected = reference.lstm_step(grad, state, weights, p, 0.1, features, moments, output)
    exact = functools.partial(emulated_step, operand=kernel_operand, product=lambda x, w: x @ w.t())
    for a, e in zip(exact(grad, state, weights, p, 0.1, features, moments, output), expected):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-15)
    x, w = torch.randn(7, 30, generator=gen, dtype=torch.float64), torch.randn(9, 30, generator=gen, dtype=torch.float64)
    err = (_SplitProduct.apply(x, w, SPLIT_ORDER[split]) - x @ w.t()).abs()
    assert (err <= AMX_PRODUCTS[split][0] * (x.abs() @ w.abs().t())).all()


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_backward_against_emulation(amx, gen, variant):
    """Both splits' forward and backward against their specification (check_against_split_emulation), n odd (a
    tail tile), every feature set (moments included) and output.

    Error analysis (what remains between kernel and emulation once both split the same float32 operands: the
    weights, the old h, the kernel's own h of the layer below and its own features, which round_bf16 splits as
    vcvtne2ps2bf16 does): each product of two bf16 pieces is exact in float32 (8 x 8 significant bits), except
    that TDPBF16PS flushes results below 2^-126 (< 2^-126 each, far below atol); so the tiles' pre-activation
    differs from the emulation's (float64, exact to 2^-53) only by the float32 roundings of their sum: per
    k-block of 32 inputs, products in SPLIT_ORDER, the k-blocks in turn, then the bias add. Those are n_products
    K + 1 roundings of a partial sum (3K + 1 for bf16x3, 6K + 1 for bf16x6, where the float32 kernels do K + 1),
    each <= 2^-24 of sum |w| |x|: at K = 40, <= 7.2e-6 (bf16x3) / 1.4e-5 (bf16x6) of it worst case, and like the
    float32 kernels' K + 1 roundings a random walk in practice (sqrt of the count: ~1.7x / 2.4x theirs). Then the
    float32 cell with the kernels' fast activations, as in the float32 kernels. So the float32 kernels' tolerances
    hold: ELEMENTWISE (5e-5 of the max; the float32 kernels measured <= 1.6e-5) with activation_error_bound for
    the forward, and for the weight gradients the flash-attention rule (the backward's own products run on the tiles
    too, the gate gradients split as the operands are, and _SplitProduct's backward splits them alike: again exact
    piece products, with n_products times the float32 kernels' roundings per sum; the derivative is
    straight-through). The emulation's operands are the kernel's bits, so no feature need keep away from a rounding
    boundary (a float64 feature's second piece would differ from the kernel's float32 one in
    ~40% of entries: its rounding step, 2^-16 |x|, is ~16 float32 ulps). Measured ratios (max error / tolerance)
    in csrc/cpu/PRODUCTS.md, "AMX tiles"."""
    features, output = variant
    grad, state, weights, moments, up_u, up_s = problem(gen, 20, 2, 1003, features)
    check_against_split_emulation(amx, grad, state, weights, 10.0, 0.1, up_u, up_s, features=features,
                                  moments=moments, output=output, gen=gen)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("hidden_size,num_layers", [(20, 2), (1, 1), (3, 3), (21, 2), (9, 1)], ids=lambda v: str(v))
def test_shapes_and_weight_kinds_against_emulation(amx, gen, hidden_size, num_layers, kind):
    """The shapes of test_shapes_and_weight_kinds x the three weight kinds against the specification, forward and
    backward."""
    n, p, scale = 133, 10.0, 0.1
    weights = random_weights(hidden_size, num_layers, gen=gen, dtype=F32, kind=kind)
    grad = random_grad(n, gen=gen, dtype=F32, p=p)
    state = random_state(num_layers, hidden_size, n, gen=gen, dtype=F32)
    check_against_split_emulation(amx, grad, state, weights, p, scale, *upstream(n, num_layers, hidden_size, gen=gen),
                                  gen=gen)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_step_inplace_and_non_contiguous(amx, gen, variant):
    """lstm_step_ (direct-state tiles, tails, moments in place) is lstm_step bit for bit; strided inputs give the
    contiguous run's bits."""
    features, output = variant
    H, L, n, p, scale = 20, 2, 1003, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=F32, features=features)
    grad = random_grad(n, gen=gen, dtype=F32, p=p)
    state = random_state(L, H, n, gen=gen, dtype=F32)
    moments = moments_for(features, grad, gen=gen)
    param = torch.randn(n, generator=gen, dtype=torch.float64).to(F32)
    param_, state_ = param.clone(), state.clone()
    moments_ = None if moments is None else moments.clone()
    ops.lstm_step_(param_, grad, state_, weights, p, scale, features, moments_, output)
    update, new_state = ops.lstm_step(grad, state, weights, p, scale, features, moments_, output)
    assert torch.equal(param_, param + update) and torch.equal(state_, new_state)
    grad_nc = torch.zeros(3 * n, dtype=F32)[::3].copy_(grad)
    state_nc = torch.zeros(L, 2, H, 2 * n, dtype=F32)[..., ::2].copy_(state)
    weights_nc = [w.t().contiguous().t() if w.dim() == 2 else w for w in weights]
    got = ops.lstm_step(grad_nc, state_nc, weights_nc, p, scale, features, moments_, output)
    assert torch.equal(got[0], update) and torch.equal(got[1], new_state)


def test_same_result_for_one_and_two_threads(amx, gen):
    check_one_and_two_threads(gen)


def test_multi_step_equals_single_tensor_op(amx, gen):
    check_multi_step_equals_single_tensor_op(gen)


def nonfinite_problem(seed, *, n, hidden, bad_states, bad_weights, draw_offset=0):
    """A random problem of test_nonfinite_policy's distribution (this file's and test_amx_backward's policy tests):
    up to n coordinates, `hidden` units, 3 layers, `bad_states` non-finite state values, a weight drawn from
    `bad_weights`, a random variant (drawn from seed + draw_offset). Returns (features, output, its inputs, the
    moments advanced with grad)."""
    gen = generator(draw_offset + seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    features, output = VARIANTS[draw(0, len(VARIANTS) - 1)]
    pr = dict(n=draw(1, n), hidden=draw(1, hidden), layers=draw(1, 3), bad_grads=draw(0, 4),
              bad_states=draw(0, bad_states), bad_moments=draw(0, 3),
              bad_weight=bad_weights[draw(0, len(bad_weights) - 1)], kind="random", features=features, output=output,
              seed=seed)
    inputs = nonfinite_inputs(pr, F32)
    grad, moments = inputs[0], inputs[5]
    return features, output, inputs, None if moments is None else registry.advance_moments(grad, moments)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_policy_as_float32(split, backend, seed):
    """NaN / +-Inf gradients, states, moments, weights: the float32 kernels' NaN and Inf positions everywhere; a
    non-finite gradient's coordinate keeps its state bit for bit."""
    features, output, (grad, state, weights, up_u, up_s, moments), advanced = nonfinite_problem(
        seed, n=140, hidden=6, bad_states=4, bad_weights=[None, None, None, float("nan"), float("inf")])
    runs = {}
    for name in (split, "float32"):
        with products(split, backend) if name == split else contextlib.nullcontext():
            step = step_grads(native_step, grad, state, weights, 10.0, 0.1, up_u, up_s, features, advanced, output)
            param, state_ = torch.zeros_like(grad), state.clone()
            moments_ = None if moments is None else moments.clone()
            ops.lstm_step_(param, grad, state_, weights, 10.0, 0.1, features, moments_, output)
            runs[name] = [*step[:4], *step[4], param, state_]
    for k, (a, b) in enumerate(zip(runs[split], runs["float32"])):
        assert_same_special(a, b, f"output {k}")
    bad = ~torch.isfinite(grad)
    update, new_state, state_ = runs[split][0], runs[split][1], runs[split][-1]
    assert torch.all(update[bad] == 0)
    assert torch.equal(bits(new_state[..., bad]), bits(state[..., bad]))
    assert torch.equal(bits(state_[..., bad]), bits(state[..., bad]))


def test_poisoned_tile_leaves_the_next_sound(amx, gen):
    """A poisoned first tile (NaN inputs in the shared pair rows) leaves the second tile bit for bit as computed
    alone: the pair rows past K are zeros for every layer and tile (each layer's own rows, never written after their
    allocation)."""
    H, L, p = 3, 2, 10.0
    weights = random_weights(H, L, gen=gen, dtype=F32)
    grad, state = random_grad(192, gen=gen, dtype=F32, p=p), random_state(L, H, 192, gen=gen, dtype=F32)
    state[0, 1, 0, :64] = float("nan")
    update, new_state = ops.lstm_step(grad, state, weights, p, 0.1)
    assert torch.isnan(update[:64]).all() and torch.isfinite(update[64:]).all()
    alone = ops.lstm_step(grad[64:], state[..., 64:].contiguous(), weights, p, 0.1)
    assert torch.equal(update[64:], alone[0]) and torch.equal(new_state[..., 64:], alone[1])


# ---------------------------------------------------------------------------------------------
# the setting
@pytest.mark.skipif(UNAVAILABLE["hardware"] is None, reason="this CPU and OS run the AMX tiles")
@pytest.mark.parametrize("split", SPLITS)
def test_refused_without_amx(split):
    """Without AMX (and without the test switch) the choice fails, naming what is missing, and changes nothing."""
    from l2l_fast import _C

    before = _C.cpu_isa(), _C.cpu_activations(), _C.cpu_products()
    with _emulation(False):
        with pytest.raises(RuntimeError, match="AMX"):
            _C.set_cpu_products(split)
    assert (_C.cpu_isa(), _C.cpu_activations(), _C.cpu_products()) == before


@requires_emulator
def test_setting_reports_backend_and_refuses_other_kernels():
    from l2l_fast import _C

    with products("amx-bf16x6", "emulated"):
        assert _C.cpu_products() == "amx-bf16x6 (emulated)"
        for isa in ("generic", "avx2"):
            with pytest.raises(RuntimeError, match="'amx-bf16x6' runs on the avx512 kernels only"):
                _C.set_cpu_isa(isa)
        with pytest.raises(RuntimeError, match="fast activations only"):
            _C.set_cpu_activations("precise")
        assert (_C.cpu_products(), _C.cpu_isa(), _C.cpu_activations()) == ("amx-bf16x6 (emulated)", "avx512", "fast")
    with pytest.raises(ValueError, match="amx-bf16x3"):
        ops.set_cpu_products("amx")
