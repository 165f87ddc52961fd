"""The CPU kernels' single-bf16 gate products (set_cpu_products("bf16"), csrc/cpu/PRODUCTS.md).

Specification: the float64 reference with every gate product's operands (the weights, each layer's inputs
[features, h_prev]) rounded to bf16, to nearest even, straight-through in the derivative (emulated_step). The kernel
equals it within the float32 tolerances of tests/tolerances.py: what remains once both round the same operands is
float32 accumulation (the pair products are exact in float32, vdpbf16ps rounds its adds as FMAs do) and the
float32 activations, which is what those tolerances were derived for. One caveat makes the comparison layer by
layer: a computed operand (h of the layer below, a feature) that lies within its float32 error of a bf16 rounding
boundary can round to the other neighbour than its float64 value, a 2^-8 relative jump no float32 tolerance holds.
So the emulation rounds layer l + 1's inputs as the kernel rounded them (from the kernel's own new h of layer l,
which the state output holds bit for bit; the derivative still flows through the emulation's own h), and the
features are drawn away from rounding boundaries (BF16_FEATURE_MARGIN). Against the exact reference the kernel is
held to the error bound of PRODUCTS.md instead.

Skipped, with the reason, where the CPU has no AVX512_BF16 or the build no bf16 kernels.
"""
from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys

import pytest
import torch

from conftest import (VARIANTS, WEIGHT_KINDS, generator, moments_for, native_step, random_grad, random_moments,
                      random_state, random_weights, requires_native, step_grads, variant_id)
from l2l_fast import features as registry
from l2l_fast import ops, reference
from test_multi_step import inputs as multi_inputs
from test_multi_step import per_tensor
from test_nonfinite_policy import make_inputs as nonfinite_inputs
from tolerances import (BF16_FEATURE_MARGIN, BF16_GRAD_UNIT, BF16_PRODUCT, REORDERED_SUM,
                        activation_error_bound, assert_close_rel_max, assert_elementwise_close,
                        assert_moments_advanced, assert_weight_grads_close, bits, weight_grad_derived_term)


def _unavailable() -> str | None:
    if not ops.HAS_NATIVE:
        return f"l2l_fast._C is not built ({ops.NATIVE_IMPORT_ERROR})"
    from l2l_fast import _C

    if not hasattr(_C, "set_cpu_products"):
        return "this build of l2l_fast._C has no set_cpu_products"
    previous = _C.cpu_isa(), _C.cpu_activations(), _C.cpu_products()
    try:
        _C.set_cpu_products("float32")
        _C.set_cpu_isa("avx512")
        _C.set_cpu_activations("fast")
        _C.set_cpu_products("bf16")
    except RuntimeError as error:
        return f"no bf16 products here: {str(error).splitlines()[0]}"
    finally:  # as found (L2L_FAST_CPU_* may have chosen them)
        _C.set_cpu_products("float32")
        _C.set_cpu_activations(previous[1])
        _C.set_cpu_isa(previous[0])
        _C.set_cpu_products(previous[2])
    return None


UNAVAILABLE = _unavailable()
requires_bf16 = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))
pytestmark = requires_native
F32 = torch.float32


@contextlib.contextmanager
def products(name: str):
    """The CPU kernels with `name` products (avx512, fast activations), then the previous settings again."""
    from l2l_fast import _C

    previous = _C.cpu_isa(), _C.cpu_activations(), _C.cpu_products()
    _C.set_cpu_products("float32")
    _C.set_cpu_isa("avx512")
    _C.set_cpu_activations("fast")
    try:
        assert _C.set_cpu_products(name) == name
        yield
    finally:
        _C.set_cpu_products("float32")
        _C.set_cpu_activations(previous[1])
        _C.set_cpu_isa(previous[0])
        _C.set_cpu_products(previous[2])


@pytest.fixture
def bf16():
    with products("bf16"):
        yield


# ---------------------------------------------------------------------------------------------
# the specification
def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """x (float64) to the nearest bf16 value, ties to even, as float64: what vcvtne2ps2bf16 does to a float32
    (subnormals become 0; NaN and +-Inf stay)."""
    _, exponent = torch.frexp(x)  # |x| in [2^(e-1), 2^e): bf16's 8 significant bits step by 2^(e-8)
    step = torch.ldexp(torch.ones_like(x), exponent - 8)
    rounded = torch.where(x.abs() < 2.0**-126, torch.zeros_like(x), torch.round(x / step) * step)
    return torch.where(torch.isfinite(x), rounded, x)


def straight_through(x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """round_bf16 of `values` (default x) as the value, the identity as the derivative."""
    target = round_bf16((x if values is None else values).detach().double()).to(x.dtype)
    return x + (target - x).detach()


def emulated_step(grad, state, weights, p, scale, features=1, moments=None, output=0, *, hidden=None,
                  rounding=True, inputs=None, operand=None, product=None):
    """reference.lstm_step's math (finite inputs) with the gate products' operands rounded to bf16, straight-through.
    hidden[l] [H, n]: the values whose rounding layer l + 1's input takes (the kernel's own h of layer l); inputs
    [n, I]: likewise the first layer's (the kernel's own features; default: the features computed here).
    The hooks, for other products (test_amx_products' split ones): operand(x, values=None), a layer input as the
    products see it (default straight_through; the identity without rounding), and product(x, w), the gate
    products x @ w.T of such an input (default: with straight_through(w))."""
    identity = lambda x, values=None: x  # noqa: E731
    r = operand if operand is not None else straight_through if rounding else identity
    if product is None:
        product = (lambda x, w: x @ straight_through(w).t()) if rounding else (lambda x, w: x @ w.t())
    layers, out_w, out_b = reference.split_weights(weights)
    x = r(registry.compute(grad, features, p, moments), inputs)
    rows = []
    for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        h, c = state[l, 0].t(), state[l, 1].t()
        gates = product(x, w_ih) + product(r(h), w_hh) + b_ih + b_hh
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        rows.append(torch.stack([h_new.t(), c_new.t()]))
        last = l + 1 == len(layers)
        x = h_new if last else r(h_new, None if hidden is None else hidden[l].t())
    y = (x @ out_w.t() + out_b).squeeze(1)
    return scale * (torch.tanh(y) if output == 1 else y), torch.stack(rows)


def near_boundary(x: torch.Tensor, rel: float) -> torch.Tensor:
    """Entries within rel |x| of a bf16 rounding boundary."""
    return round_bf16(x * (1 + rel)) != round_bf16(x * (1 - rel))


def clear_inputs(n, *, gen, features, p=10.0):
    """grad [n] (float32) and moments (advanced, or None) whose features all lie farther than BF16_FEATURE_MARGIN
    from a bf16 rounding boundary: the float32 and float64 features round alike (module docstring)."""
    grad = random_grad(n, gen=gen, dtype=F32, p=p)
    moments = moments_for(features, grad, gen=gen)
    for _ in range(100):
        x = registry.compute(grad.double(), features, p, None if moments is None else moments.double())
        redo = near_boundary(x, BF16_FEATURE_MARGIN).any(1)
        k = int(redo.sum())
        if k == 0:
            return grad, moments
        fresh = random_grad(k + 2, gen=gen, dtype=F32, p=p)[2:]  # past the two forced coordinates
        grad[redo] = fresh
        if moments is not None:
            moments[:, redo] = moments_for(features, fresh, gen=gen)
    raise AssertionError("could not draw features away from the bf16 rounding boundaries")


def opt64(t):
    return None if t is None else t.detach().double()


def upstream(n, L, H, *, gen):
    return (torch.randn(n, generator=gen, dtype=torch.float64).to(F32),
            torch.randn(L, 2, H, n, generator=gen, dtype=torch.float64).to(F32))


def backward_products_bound(grad, state, weights, p, scale, up_u, up_s, features=1, moments=None, output=0, *,
                            hidden=None, unit=BF16_GRAD_UNIT):
    """Bound on |kernel - emulation| of (d_grad [n], d_state [L, 2, H, n], d_weights) from the backward's bf16 products
    alone (PRODUCTS.md, "The backward's products"): every gate gradient is rounded to bf16 before its products
    (d inputs = sum r(w) r(dgate), d w = sum over coordinates of r(x) r(dgate); r(w), r(x) are bf16 already, so a
    product is off by <= unit |a b|), and the errors propagate linearly through the exact backward of the
    emulation's forward (straight-through), by the absolute values of its factors. Float64, finite inputs."""
    f64 = torch.float64
    grad, state, weights = grad.double(), state.double(), [w.double() for w in weights]
    up_u, up_s = up_u.double(), up_s.double()
    layers, out_w, _ = reference.split_weights(weights)
    g_in = grad.detach().clone().requires_grad_(True)
    features_x = registry.compute(g_in, features, p, opt64(moments))
    slopes = torch.stack([torch.autograd.grad(features_x[:, k].sum(), g_in, retain_graph=True)[0]
                          for k in range(features_x.shape[1])], 1)  # d x_k / d grad per coordinate
    x = round_bf16(features_x.detach())
    saved = []
    for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        h, c = state[l, 0].t(), state[l, 1].t()
        rh, wi, wh = round_bf16(h), round_bf16(w_ih), round_bf16(w_hh)
        i, f, g, o = (x @ wi.t() + rh @ wh.t() + b_ih + b_hh).chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        tc = torch.tanh(c_new)
        saved.append((x, rh, wi, wh, c, i, f, g, o, tc))
        h_new = o * tc
        x = h_new if l + 1 == len(layers) else round_bf16(h_new if hidden is None else hidden[l].t().double())
    y = (x @ out_w.t()).squeeze(1) + weights[-1]
    slope = 1 - torch.tanh(y) ** 2 if output == 1 else torch.ones_like(y)
    dh = (up_u * scale * slope)[:, None] * out_w + up_s[-1, 0].t()
    e_dh = torch.zeros_like(dh)
    d_weights, d_state = [None] * len(weights), torch.zeros_like(state)
    d_weights[-2], d_weights[-1] = torch.zeros_like(out_w), torch.zeros_like(weights[-1])
    tiny = 2.0**-126  # a subnormal gate gradient flushed to 0
    for l in reversed(range(len(layers))):
        x, rh, wi, wh, c, i, f, g, o, tc = saved[l]
        dc = dh * o * (1 - tc**2) + up_s[l, 1].t()
        e_dc = e_dh * (o * (1 - tc**2)).abs()
        dgates = torch.cat([dc * g * i * (1 - i), dc * c * f * (1 - f), dc * i * (1 - g**2), dh * tc * o * (1 - o)], 1)
        e_gates = torch.cat([e_dc * (g * i * (1 - i)).abs(), e_dc * (c * f * (1 - f)).abs(), e_dc * (i * (1 - g**2)).abs(),
                             e_dh * (tc * o * (1 - o)).abs()], 1)
        e_rounded = e_gates + unit * (dgates.abs() + e_gates) + tiny  # |r(dgate') - dgate|
        w_all = torch.cat([wi, wh], 1)
        e_dz = e_rounded @ w_all.abs()
        d_weights[4 * l] = e_rounded.t() @ x.abs()
        d_weights[4 * l + 1] = e_rounded.t() @ rh.abs()
        d_weights[4 * l + 2] = d_weights[4 * l + 3] = e_gates.sum(0)  # float32 sums of the gate gradients
        I = x.shape[1]
        d_state[l, 0] = e_dz[:, I:].t()
        d_state[l, 1] = (e_dc * f).t()
        if l > 0:
            dh = dgates @ w_all[:, :I] + up_s[l - 1, 0].t()
            e_dh = e_dz[:, :I]
    d_grad = (slopes.abs() * e_dz[:, :x.shape[1]]).sum(1)
    return d_grad.to(f64), d_state, d_weights


def check_against_emulation(grad, state, weights, p, scale, up_u, up_s, *, features=1, moments=None, output=0):
    """The bf16 kernel's forward and backward vs the float64 emulation, with the float32 kernels' tolerances (the
    weight gradients: the flash-attention rule against the same emulation run by PyTorch in float32), plus, for the
    backward, the bound of its own bf16 products (backward_products_bound)."""
    variant = dict(features=features, moments=moments, output=output)
    got = step_grads(native_step, grad, state, weights, p, scale, up_u, up_s, **variant)
    hidden = [got[1][l, 0] for l in range(state.shape[0] - 1)]
    spec = functools.partial(emulated_step, hidden=hidden)
    ref = step_grads(spec, grad.double(), state.double(), [w.double() for w in weights], p, scale, up_u.double(),
                     up_s.double(), features, opt64(moments), output)
    ref32 = step_grads(spec, grad, state, weights, p, scale, up_u, up_s, **variant)[4]
    act = activation_error_bound(grad, state, weights, p, scale, **variant)
    e_grad, e_state, e_weights = backward_products_bound(grad, state, weights, p, scale, up_u, up_s, features,
                                                         moments, output, hidden=hidden)
    for name, a, e, ab in zip(("update", "new_state", "d_grad", "d_state"), got[:4], ref[:4],
                              [*act, e_grad, e_state]):
        assert_elementwise_close(a, e, F32, name, activation_bound=ab)
    # the derived term at the reference's values (not the emulation's: their pre-activations differ by ~2^-8 sum |w z|,
    # which moves the term by about as much, relative; as activation_error_bound above)
    derived = weight_grad_derived_term(grad, state, weights, p, scale, up_u, up_s, **variant)
    # the float32 rule with the products' bound added to its derived term
    assert_weight_grads_close(got[4], ref[4], F32, ref32, derived=[t + b for t, b in zip(derived, e_weights)])
    return got


def test_emulation_without_rounding_is_the_reference(gen):
    """The emulation is reference.lstm_step's math: with the rounding off they agree (finite inputs)."""
    H, L, n, p = 5, 3, 50, 10.0
    for features, output in VARIANTS:
        weights = random_weights(H, L, gen=gen, features=features)
        grad = random_grad(n, gen=gen, p=p)
        state, moments = random_state(L, H, n, gen=gen), moments_for(features, grad, gen=gen)
        got = emulated_step(grad, state, weights, p, 0.1, features, moments, output, rounding=False)
        expected = reference.lstm_step(grad, state, weights, p, 0.1, features, moments, output)
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-15)


def test_round_bf16_matches_torch_on_normal_floats(gen):
    x = torch.randn(100_000, generator=gen, dtype=torch.float64).to(F32) * 10.0 ** torch.randint(-30, 30, (100_000,))
    x = torch.cat([x, torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2.0**-126])])  # ties go to even
    assert torch.equal(round_bf16(x.double()), x.to(torch.bfloat16).double())


# ---------------------------------------------------------------------------------------------
# the kernel against the specification
@requires_bf16
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("n", [1, 63, 65, 1003], ids=lambda n: f"n{n}")
def test_matches_emulation(bf16, gen, n, variant):
    features, output = variant
    H, L, p, scale = 20, 2, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=F32, features=features)
    grad, moments = clear_inputs(n, gen=gen, features=features, p=p)
    state = random_state(L, H, n, gen=gen, dtype=F32)
    check_against_emulation(grad, state, weights, p, scale, *upstream(n, L, H, gen=gen), features=features,
                            moments=moments, output=output)


@requires_bf16
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("hidden_size,num_layers", [(20, 2), (1, 1), (3, 3), (21, 2)], ids=lambda v: str(v))
def test_shapes_and_weight_kinds(bf16, gen, hidden_size, num_layers, kind):
    """Odd hidden sizes give odd K (a zero-padded last pair); H = 1: one pair per layer."""
    n, p, scale = 133, 10.0, 0.1
    weights = random_weights(hidden_size, num_layers, gen=gen, dtype=F32, kind=kind)
    grad, _ = clear_inputs(n, gen=gen, features=1, p=p)
    state = random_state(num_layers, hidden_size, n, gen=gen, dtype=F32)
    check_against_emulation(grad, state, weights, p, scale, *upstream(n, num_layers, hidden_size, gen=gen))


@requires_bf16
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_step_inplace_and_moments(bf16, gen, variant):
    """lstm_step_ (the direct-state path of full tiles, tails, the moments advanced in place) is lstm_step with the
    moments it advanced, bit for bit: param + update, new_state."""
    features, output = variant
    H, L, n, p, scale = 20, 2, 1003, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=F32, features=features)
    grad = random_grad(n, gen=gen, dtype=F32, p=p)
    state = random_state(L, H, n, gen=gen, dtype=F32)
    moments = random_moments(n, gen=gen, dtype=F32) if registry.reads_moments(features) else None
    param = torch.randn(n, generator=gen, dtype=torch.float64).to(F32)
    param_, state_, moments_ = param.clone(), state.clone(), None if moments is None else moments.clone()
    ops.lstm_step_(param_, grad, state_, weights, p, scale, features, moments_, output)
    if moments is not None:
        assert_moments_advanced(moments_, grad, registry.advance_moments(grad, moments))
    update, new_state = ops.lstm_step(grad, state, weights, p, scale, features, moments_, output)
    assert torch.equal(param_, param + update)
    assert torch.equal(state_, new_state)


@requires_bf16
@pytest.mark.parametrize("n", [7, 1000], ids=lambda n: f"n{n}")
def test_non_contiguous_inputs(bf16, gen, n):
    """Strided grad, a state stored coordinates-last-but-sliced, transposed weights: the contiguous run's bits."""
    H, L, p, scale = 20, 2, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=F32)
    grad, state = random_grad(n, gen=gen, dtype=F32, p=p), random_state(L, H, n, gen=gen, dtype=F32)
    up_u, up_s = upstream(n, L, H, gen=gen)
    grad_nc = torch.zeros(3 * n, dtype=F32)[::3].copy_(grad)
    state_nc = torch.zeros(L, 2, H, 2 * n, dtype=F32)[..., ::2].copy_(state)
    weights_nc = [w.t().contiguous().t() if w.dim() == 2 else w for w in weights]
    got = step_grads(native_step, grad_nc, state_nc, weights_nc, p, scale, up_u, up_s)
    expected = step_grads(native_step, grad, state, weights, p, scale, up_u, up_s)
    for a, e in zip([*got[:4], *got[4]], [*expected[:4], *expected[4]]):
        assert torch.equal(a, e)


# ---------------------------------------------------------------------------------------------
# what the option changes: a bound (csrc/cpu/PRODUCTS.md), and more than float32 rounding
def products_error_bound(grad, state, weights, p, scale, features=1, moments=None, output=0):
    """Bound on |kernel - exact| of (update [n], new_state [L, 2, H, n]) from the bf16 operands alone (everything
    else exact; PRODUCTS.md): rigorous, by the Lipschitz constants sigmoid' <= 1/4, tanh' <= 1 and the ranges
    |sigmoid| <= 1, |tanh| <= 1, at the reference's values (float64, finite inputs)."""
    def pre_activation_error(x, dx, h, w_ih, w_hh, b_ih, b_hh):
        # |rw rx' - w x| <= |w| |x' - x| + BF16_PRODUCT |w| |x'|, with |x'| <= |x| + dx
        return dx @ w_ih.abs().t() + BF16_PRODUCT * ((x.abs() + dx) @ w_ih.abs().t() + h.abs() @ w_hh.abs().t())

    return bound_through_cells(grad, state, weights, p, scale, pre_activation_error, features, moments, output)


def bound_through_cells(grad, state, weights, p, scale, pre_activation_error, features=1, moments=None, output=0):
    """(update [n], new_state [L, 2, H, n]) bounds from a bound on each layer's pre-activation error,
    pre_activation_error(x, dx, h, w_ih, w_hh, b_ih, b_hh) -> dz [n, 4 H] (x: the layer's input at the reference's
    values, dx: the bound on its error so far), carried through the cells by the Lipschitz constants
    sigmoid' <= 1/4, tanh' <= 1 and the ranges |sigmoid| <= 1, |tanh| <= 1 (float64, finite inputs)."""
    grad, state, weights = grad.double(), state.double(), [w.double() for w in weights]
    layers, out_w, _ = reference.split_weights(weights)
    x = registry.compute(grad, features, p, opt64(moments))
    dx = torch.zeros_like(x)
    rows = []
    for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        h, c = state[l, 0].t(), state[l, 1].t()
        z = x @ w_ih.t() + h @ w_hh.t() + b_ih + b_hh
        dz = pre_activation_error(x, dx, h, w_ih, w_hh, b_ih, b_hh)
        zi, zf, zg, zo = z.chunk(4, dim=1)
        di, df, dg, do = dz.chunk(4, dim=1)
        di, df, do = (torch.clamp(d / 4, max=1.0) for d in (di, df, do))
        dg = torch.clamp(dg, max=2.0)
        i, g, o = torch.sigmoid(zi), torch.tanh(zg), torch.sigmoid(zo)
        c_new = torch.sigmoid(zf) * c + i * g
        dc = c.abs() * df + g.abs() * di + torch.clamp(i + di, max=1.0) * dg
        tc = torch.tanh(c_new)
        dh = tc.abs() * do + torch.clamp(o + do, max=1.0) * torch.clamp(dc, max=2.0)
        rows.append(torch.stack([dh.t(), dc.t()]))
        x, dx = o * tc, dh
    dy = (dx @ out_w.abs().t()).squeeze(1)
    return abs(scale) * (torch.clamp(dy, max=2.0) if output == 1 else dy), torch.stack(rows)


@requires_bf16
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_within_the_products_bound_and_not_float32(gen, variant, kind):
    """Against the exact reference the bf16 kernel is within the PRODUCTS.md bound (plus the float32 kernels'
    tolerance); and it is really another computation: farther from the reference than the float32 kernel."""
    features, output = variant
    H, L, n, p, scale = 20, 2, 2000, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=F32, kind=kind, features=features)
    grad = random_grad(n, gen=gen, dtype=F32, p=p)
    state = random_state(L, H, n, gen=gen, dtype=F32)
    moments = moments_for(features, grad, gen=gen)
    variant = (features, moments, output)
    with products("bf16"):
        got = ops.lstm_step(grad, state, weights, p, scale, *variant)
    with products("float32"):
        f32 = ops.lstm_step(grad, state, weights, p, scale, *variant)
    exact = reference.lstm_step(grad.double(), state.double(), [w.double() for w in weights], p, scale, features,
                                opt64(moments), output)
    bounds = products_error_bound(grad, state, weights, p, scale, *variant)
    act = activation_error_bound(grad, state, weights, p, scale, *variant)
    for name, a, b, e, bound, ab in zip(("update", "new_state"), got, f32, exact, bounds, act):
        assert_elementwise_close(a, e, F32, name, activation_bound=bound + ab)
        bf16_err, f32_err = (a.double() - e).abs().max(), (b.double() - e).abs().max()
        assert bf16_err > 10 * f32_err, f"{name}: bf16 error {bf16_err:.2e} vs float32 {f32_err:.2e}"


# ---------------------------------------------------------------------------------------------
# what must not change: the non-finite policy, float64, threads, the multi-tensor op
def assert_same_special(a, b, name):
    """Same NaN positions and the same +-Inf entries."""
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN positions differ"
    assert torch.equal(torch.isposinf(a), torch.isposinf(b)) and torch.equal(torch.isneginf(a), torch.isneginf(b)), (
        f"{name}: +-Inf positions differ")


@requires_bf16
@pytest.mark.parametrize("seed", range(40))
def test_non_finite_policy_as_float32(seed):
    """NaN / +-Inf gradients, state values, moments and weights: every output and gradient of the bf16 kernels has
    the float32 kernels' NaN and Inf positions; a non-finite gradient's coordinate keeps its state bit for bit
    (lstm_step_ too). A NaN operand stays NaN in bf16 and in vdpbf16ps (NaN * 0 = NaN), and the poison is applied
    from the float32 inputs anyway, so no rounding or flushing can clean a lane."""
    gen = generator(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    features, output = VARIANTS[draw(0, len(VARIANTS) - 1)]
    pr = dict(n=draw(1, 70), hidden=draw(1, 6), layers=draw(1, 3), bad_grads=draw(0, 4), bad_states=draw(0, 4),
              bad_moments=draw(0, 3), bad_weight=[None, None, None, float("nan"), float("inf")][draw(0, 4)],
              kind="random", features=features, output=output, seed=seed)
    grad, state, weights, up_u, up_s, moments = nonfinite_inputs(pr, F32)
    advanced = None if moments is None else registry.advance_moments(grad, moments)
    runs = {}
    for name in ("bf16", "float32"):
        with products(name):
            step = step_grads(native_step, grad, state, weights, 10.0, 0.1, up_u, up_s, features, advanced, output)
            param, state_ = torch.zeros_like(grad), state.clone()
            moments_ = None if moments is None else moments.clone()
            ops.lstm_step_(param, grad, state_, weights, 10.0, 0.1, features, moments_, output)
            runs[name] = [*step[:4], *step[4], param, state_]
    for k, (a, b) in enumerate(zip(runs["bf16"], runs["float32"])):
        assert_same_special(a, b, f"output {k}")
    bad = ~torch.isfinite(grad)
    for name in runs:
        update, new_state, param, state_ = runs[name][0], runs[name][1], runs[name][-2], runs[name][-1]
        assert torch.all(update[bad] == 0) and torch.all(param[bad] == 0)
        assert torch.equal(bits(new_state[..., bad]), bits(state[..., bad]))
        assert torch.equal(bits(state_[..., bad]), bits(state[..., bad]))


@requires_bf16
@pytest.mark.parametrize("hidden_size,num_layers", [(3, 1), (3, 2)], ids=lambda v: str(v))
def test_padding_pair_is_zero(bf16, gen, hidden_size, num_layers):
    """Odd K: the last pair's missing operand must be 0, not the workspace row after the inputs (the top h, or the
    next layer's inputs, of the previous tile, NaN where that tile was poisoned: 0 weight x NaN = NaN)."""
    H, L, p = hidden_size, num_layers, 10.0
    weights = random_weights(H, L, gen=gen, dtype=F32)
    grad, state = random_grad(192, gen=gen, dtype=F32, p=p), random_state(L, H, 192, gen=gen, dtype=F32)
    state[0, 1, 0, :64] = float("nan")  # the first tile poisoned, lane by lane
    update, new_state = ops.lstm_step(grad, state, weights, p, 0.1)
    assert torch.isnan(update[:64]).all() and torch.isfinite(update[64:]).all()
    alone = ops.lstm_step(grad[64:], state[..., 64:].contiguous(), weights, p, 0.1)
    assert torch.equal(update[64:], alone[0]) and torch.equal(new_state[..., 64:], alone[1])


@requires_bf16
def test_subnormal_operands_do_not_poison(bf16, gen):
    """Subnormal weights and state values are flushed to 0 by the bf16 conversion: finite results, no NaN."""
    H, L, n, p = 20, 2, 200, 10.0
    weights = random_weights(H, L, gen=gen, dtype=F32)
    weights[0][:, 0] = 1e-40
    state = random_state(L, H, n, gen=gen, dtype=F32)
    state[:, 0, :, ::3] = -3e-41
    grad = random_grad(n, gen=gen, dtype=F32, p=p)
    update, new_state = ops.lstm_step(grad, state, weights, p, 0.1)
    assert torch.isfinite(update).all() and torch.isfinite(new_state).all()


@requires_bf16
def test_float64_unchanged(bf16, gen):
    """The option is for float32 only: float64 forward and backward are the float32-products build's, bit for bit."""
    H, L, n, p, scale = 20, 2, 1003, 10.0, 0.1
    weights = random_weights(H, L, gen=gen)
    grad, state = random_grad(n, gen=gen, p=p), random_state(L, H, n, gen=gen)
    up_u, up_s = (t.double() for t in upstream(n, L, H, gen=gen))
    got = step_grads(native_step, grad, state, weights, p, scale, up_u, up_s)
    with products("float32"):
        expected = step_grads(native_step, grad, state, weights, p, scale, up_u, up_s)
    for a, e in zip([*got[:4], *got[4]], [*expected[:4], *expected[4]]):
        assert torch.equal(a, e)


@requires_bf16
def test_same_result_for_one_and_two_threads(bf16, gen):
    """Forward and lstm_step_ bit for bit; the backward's per-coordinate outputs too, the weight gradients (sums in
    another chunking) within REORDERED_SUM."""
    check_one_and_two_threads(gen)


def check_one_and_two_threads(gen):
    """The products in use (this file's and test_amx_products'): forward and lstm_step_ bit for bit at 1 and 2
    threads, the backward's per-coordinate outputs too, the weight gradients within REORDERED_SUM."""
    H, L, n, p, scale = 20, 2, 40_003, 10.0, 0.1  # > 2 x 16384: two chunks
    weights = random_weights(H, L, gen=gen, dtype=F32)
    grad, state = random_grad(n, gen=gen, dtype=F32, p=p), random_state(L, H, n, gen=gen, dtype=F32)
    up_u, up_s = upstream(n, L, H, gen=gen)
    runs, previous = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            param, state_ = torch.zeros(n), state.clone()
            ops.lstm_step_(param, grad, state_, weights, p, scale)
            runs.append((step_grads(native_step, grad, state, weights, p, scale, up_u, up_s), param, state_))
    finally:
        torch.set_num_threads(previous)
    (one, param1, state1), (two, param2, state2) = runs
    assert torch.equal(param1, param2) and torch.equal(state1, state2)
    for a, b in zip(one[:4], two[:4]):
        assert torch.equal(a, b)
    for k, (a, b) in enumerate(zip(one[4], two[4])):
        assert_close_rel_max(a, b, REORDERED_SUM[F32], f"d_weights[{k}]")


@requires_bf16
@pytest.mark.parametrize("state_dtype", [F32, torch.bfloat16], ids=["state_f32", "state_bf16"])
def test_multi_step_equals_single_tensor_op(bf16, gen, state_dtype):
    """lstm_multi_step_ runs the same bf16 kernel: bit for bit lstm_step_ tensor by tensor."""
    check_multi_step_equals_single_tensor_op(gen, state_dtype)


def check_multi_step_equals_single_tensor_op(gen, state_dtype=F32):
    """lstm_multi_step_ with the products in use: bit for bit lstm_step_ tensor by tensor."""
    sizes = [3, 4097, 1, 40000, 5, 0, 33]
    params, grads, state, weights = multi_inputs(gen, sizes, F32, state_dtype=state_dtype)
    expected_params, expected_state, _ = per_tensor(params, grads, state, weights)
    ops.lstm_multi_step_(params, grads, state, weights, 10.0, 0.1)
    for a, e in zip(params, expected_params):
        assert torch.equal(a, e)
    assert torch.equal(state, expected_state)


# ---------------------------------------------------------------------------------------------
# the setting
@requires_bf16
def test_setting_switches_reports_and_refuses(bf16):
    from l2l_fast import _C

    assert (_C.cpu_products(), ops.cpu_products(), _C.cpu_isa(), _C.cpu_activations()) == ("bf16", "bf16", "avx512",
                                                                                         "fast")
    with pytest.raises(ValueError, match="products: expected 'float32' or 'bf16'"):
        ops.set_cpu_products("bfloat16")
    for isa in ("generic", "avx2"):
        with pytest.raises(RuntimeError, match="'bf16' runs on the avx512 kernels only"):
            _C.set_cpu_isa(isa)
    with pytest.raises(RuntimeError, match="fast activations only"):
        _C.set_cpu_activations("precise")
    assert (_C.cpu_products(), _C.cpu_isa(), _C.cpu_activations()) == ("bf16", "avx512", "fast")  # nothing changed
    assert _C.set_cpu_isa("auto") == "avx512" and _C.cpu_products() == "bf16"
    assert ops.set_cpu_products("float32") == "float32" and _C.cpu_isa() == "avx512"
    _C.set_cpu_isa("avx2")
    with pytest.raises(RuntimeError, match="avx512 kernels only"):
        ops.set_cpu_products("bf16")
    assert (_C.cpu_products(), _C.cpu_isa()) == ("float32", "avx2")


def _run_with_env(env: dict, code: str) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("L2L_FAST_CPU_")}
    full = {**inherited, **env, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)


@requires_bf16
def test_environment_variable():
    probe = "from l2l_fast import _C; print(_C.cpu_isa(), _C.cpu_activations(), _C.cpu_products())"
    run = _run_with_env({"L2L_FAST_CPU_PRODUCTS": "bf16"}, probe)
    assert run.returncode == 0 and run.stdout.split() == ["avx512", "fast", "bf16"], run.stderr
    run = _run_with_env({"L2L_FAST_CPU_PRODUCTS": "bf16", "L2L_FAST_CPU_ISA": "avx2"}, probe)
    assert run.returncode != 0 and "'bf16' runs on the avx512 kernels only" in run.stderr
    run = _run_with_env({"L2L_FAST_CPU_PRODUCTS": "half"}, probe)
    assert run.returncode != 0 and "products: expected 'float32' or 'bf16'" in run.stderr


@pytest.mark.skipif(UNAVAILABLE is None, reason="this CPU and build run the bf16 products")
def test_refused_where_unavailable():
    """Where the CPU lacks AVX512_BF16 (or AVX-512) the option fails loudly, naming what is missing."""
    from l2l_fast import _C

    if not hasattr(_C, "set_cpu_products"):
        pytest.skip("this build has no set_cpu_products")
    with pytest.raises(RuntimeError, match="AVX512_BF16|AVX-512|avx512|no bf16 kernels"):
        _C.set_cpu_products("bf16")
    assert _C.cpu_products() == "float32"
