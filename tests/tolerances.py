"""Tolerances of the kernel-vs-reference comparisons: one table per dtype of the kernel's inputs.

The expected values are always the float64 reference run on the same (rounded) inputs.

Element-wise quantities (update, new_state, d_grad, d_state), table ELEMENTWISE:
    |actual - expected| <= atol_rel * max|expected| + rtol * |expected| + atol   (+ term_rel * error scale)
(d grad: + the feature slopes' term below; float32 forwards: + the activations' propagated error)
``atol_rel`` scales with the tensor's largest entry because the LSTM cell cancels (f*c + i*g, and
1 - tanh^2 in saturation): an entry can be much smaller than the rounding error it inherits from its
inputs. Measured for plain PyTorch float32 vs float64 on H=20, L=2, n=65539 (tests/conftest.py inputs):
the worst entry error relative to the tensor's max is 1e-7..4e-7 with "init"/"random" weights, up to
1.1e-5 (d_state) with "saturating" weights; the native float32 kernels (polynomial exp, refined
reciprocal) measured up to 1.6e-5. float32 allows 5e-5.

Weight gradients (sums over all n coordinates), table WEIGHT_GRAD:
- float32, per entry: flash-attention's rule for the rounding plus a derived term for the kernels' activations:
    |kernel - ref64| <= factor * max|ref_float32 - ref64| + derived term (weight_grad_derived_term)
  i.e. the kernel may be at most `factor` (2) times as far from the float64 reference as plain PyTorch float32, plus
  what its sigmoid / tanh error (ACTIVATION_ABS_ERROR) can move that entry, bounded through the forward and the
  backward (tests/activation_error.py), plus, for out.bias alone, its own float32 summation (WEIGHT_GRAD's comment).
- float64 (nothing more precise to hold PyTorch against): per entry, atol_rel * max|ref| + term_rel * its
  error scale (backward_error_scale below).

The moments feature and the tanh output need no elementwise tolerance of their own. The moments feature's
inputs are bounded: with moments advanced with g (what the ops see), v_hat >= (1 - b2) g^2 / (1 - b2^t) >=
(1 - b2) g^2, so |x0| = |g| / (sqrt(v_hat) + eps) <= 1 / sqrt(1 - b2) ~ 4.5, and |x1| = |m_hat| / sqrt(v_hat)
stays O(1) (m_hat^2 <= v_hat for moving averages); the long moment's likewise, |x0| <= 1 / sqrt(1 - 0.999) ~ 32.
In float32 each of the bias correction 1 - b^t, sqrt and the divisions is within a few ulp relative: the kernels
compute 1 - b^t = 1 - e^x (x = t log b) as the Taylor series -x (1 + x/2 (1 + ...)) for |x| < 1/4, where
1 - e^x would cancel (by b / (1 - b): 19 for 0.95, 999 for 0.999, i.e. 1e-4 relative in float32; measured before
the series: d grad off by 6.4e-5 of its max at t = 1), and as 1 - e^x beyond (cancellation at most 4.5x). So x0
and x1 are within ~1e-6 relative: an input error like the paper feature's (log|g| / p, ulp-relative), far inside
ELEMENTWISE's 5e-5 of the tensor's max once through the LSTM. d grad = dx0 * inv adds
an ulp-relative product to the error dx0 brings from the LSTM's backward (carried per coordinate, below). The tanh output is one more activation:
backward_error_scale floors its derivative like the cell's (saturated |y| rounds tanh next to 1 in both).
The moments' larger inputs (~4.5) saturate more gates than the paper's; the float32 weight gradients' derived term
covers what that does to the activations' derivatives (no separate allowance).

d grad gets one more term, feature_slope_bound: d grad_i = sum_k dx[i, k] * s_k(i) carries the net's input gradient
dx (bounded like every backward output, by atol_rel * max|dx|) through each coordinate's own feature slopes, which
span decades for the moment features (1 / (sqrt(v_hat) + eps)); atol_rel * max|d grad| alone missed that (found
2026-12-07 by a random hypothesis draw: 6.2e-5 of max|d grad| on avx512, 1.1e-4 generic). Measured over 4,500
random problems (`python scripts/measure_elementwise_excess.py 1 1500`, AMD Zen 5): worst error / bound of d grad
with moments 2.02 (generic) by the old rule, 0.04 with the slope term; every other output <= 0.5 of its bound.
"""
from __future__ import annotations

import torch

from activation_error import forward_errors, weight_grad_activation_bound
from l2l_fast import features as registry
from l2l_fast import reference

ELEMENTWISE = {
    # both sides compute in double; differences are operation order and libm vs vectorised exp/tanh.
    torch.float64: dict(rtol=1e-9, atol_rel=1e-11, atol=1e-15),
    # float32: the rounding part (plain PyTorch float32 measured at up to 1.1e-5 of the max, see the docstring).
    # The kernels' activations add their own error on top, per element, where a float32 forward is compared with
    # the reference (assert_elementwise_close(..., activation_bound=activation_error_bound(...))): the first-order
    # propagation of ACTIVATION_ABS_ERROR through the cell (csrc/cpu/ACTIVATIONS.md). Evaluated on the tests'
    # inputs it is 4e-6 .. 2e-5 of the tensor's max, so this rule alone would have room for it too.
    torch.float32: dict(rtol=1e-5, atol_rel=5e-5, atol=1e-8),
}

WEIGHT_GRAD = {
    # float64, per entry: atol_rel * max|ref| of the tensor + term_rel * backward_error_scale(...).
    # A gradient entry can be far smaller than its own rounding error in two ways that a scale relative to
    # the tensor's max does not see: cancellation of the n per-coordinate terms, and saturated gates, where
    # sigma' = s (1 - s) and 1 - tanh^2 are computed from activations rounded next to 1 (absolute error
    # ~eps, relative error unbounded). backward_error_scale propagates |.| of every factor and adds
    # `derivative_floor` = eps / term_rel to each activation derivative, so term_rel * scale is
    # term_rel * (sum of |terms|) + eps * (the terms with that derivative's eps error).
    torch.float64: dict(atol_rel=1e-10, term_rel=1e-12, derivative_floor=torch.finfo(torch.float64).eps / 1e-12),
    # float32, per entry: factor * max|PyTorch float32 - ref64| (flash-attention's rule: the kernel's float32
    # rounding, its products and sums, is taken to be at most twice PyTorch's on the same terms) + the derived term
    # of weight_grad_derived_term, which bounds what the rounding rule cannot see:
    # - the activations' error (ACTIVATION_ABS_ERROR of the CPU instruction set and activations under test; CUDA:
    #   ACTIVATION_BOUND, tests/cuda_cases.py), through the forward into every term (a value off by e_s / e_t and
    #   the layers above it) and into the derivatives computed from those values (s (1 - s) off by |1 - 2s| d + d^2,
    #   1 - t^2 by 2|t| d + d^2, + 2^-24 for the rounding of t t next to 1: the saturated case, where PyTorch rounds
    #   tanh to exactly +-1 and is exact by luck). tests/activation_error.py derives it: |.| of every factor,
    #   products bounded exactly (prod(|v| + d) - prod|v|), the activations' curvature bounded; sound for any errors
    #   within e_s, e_t with everything else exact (tests/test_activation_error.py: a float64 emulation with +-e_s,
    #   +-e_t reaches 0.99999 of the bound, never more);
    # - out.bias = sum of gu = up_u scale (1 - ty^2): one entry, whose terms carry no activation with the linear
    #   output, so PyTorch's error can be 0 (n = 1) or cancel. Its bound is derived in full: the kernel's float32
    #   sum (kFlushTiles, csrc/cpu/kernel_body.inc: a lane adds <= kFlushTiles NV vectors, then the lanes in double;
    #   CUDA: a block's float sum over its tile, <= n terms, then double) and the terms' own 4 roundings (scale to
    #   float32, up_u scale, times the slope, 1 - t t), gamma(d) sum |gu|, gamma(d) = d u / (1 - d u).
    # Assumed, not derived: the factor on the rounding (flash-attention's premise; out.bias aside). Measured, max /
    # median / min of max-entry error / bound per problem (`scripts/measure_weight_grad_floor.py 11 120`, AMD EPYC):
    # 1,041 problems of test_nonfinite_policy's distribution (n 1..40, H 1..6, L 1..3, <= 4 non-finite gradients;
    # init/random/saturating weights, both feature kinds and outputs; generic/avx2/avx512): 0.56 / 0.068 / 0.005
    # (the measured floors' rule on such problems: 0.19 / 0.03). Large n (`... 12 6 --n-range 1000,65539
    # --hidden-range 20,20`, 54 problems): 0.073 / 0.006 / 0.0012; the term is a worst case over independent
    # per-coordinate errors, so it grows like n where the errors grow like sqrt n (floors' rule: median 0.02).
    # Sensitivity: every gradient times 1 + 1e-5 fails 88-95% of the small problems (1e-6: 7-20%); at large n 0-2 of
    # 18 per ISA.
    torch.float32: dict(factor=2.0),
}

# Absolute error of the CPU kernels' float32 activations over every float32 input, per (instruction set,
# activations). Fast: the first-order bounds derived in csrc/cpu/ACTIVATIONS.md (they hold for any rcp14ps / rcpps
# within its documented error), each above the maximum scripts/scan_activations.py measured over all 2^32 inputs on
# the AMD EPYC machine (in the comment). Precise (kept for A/B runs, and the generic build's): the scanned maximum
# plus 25%, rounded up. tests/test_activations.py checks them all on a dense set of inputs.
ACTIVATION_ABS_ERROR = {
    ("avx512", "fast"): dict(sigmoid=1.8e-7, tanh=3.5e-7),  # scanned 1.020e-7, 1.760e-7
    ("avx2", "fast"): dict(sigmoid=3.2e-7, tanh=6.4e-7),  # scanned 1.675e-7, 3.095e-7
    ("avx512", "precise"): dict(sigmoid=1.9e-7, tanh=3.7e-7),  # scanned 1.450e-7, 2.900e-7
    ("avx2", "precise"): dict(sigmoid=2.6e-7, tanh=5.2e-7),  # scanned 2.069e-7, 4.138e-7
    ("generic", "precise"): dict(sigmoid=1.2e-7, tanh=2.3e-7),  # scanned 8.931e-8, 1.786e-7
}
# what the float32 forward tolerances add for the activations (activation_error_bound): the largest bound of any
# build, so one tolerance holds whichever instruction set and activations a test runs on
ACTIVATION_BOUND = {f: max(b[f] for b in ACTIVATION_ABS_ERROR.values()) for f in ("sigmoid", "tanh")}

# bf16 gate products (csrc/cpu/PRODUCTS.md): the unit roundoff of a bf16 operand (8-bit significand, rounded to
# nearest even): |round(x) - x| <= BF16_UNIT |x|, so a product of two rounded operands is off by <= BF16_PRODUCT |w z|.
BF16_UNIT = 2.0**-8
BF16_PRODUCT = 2 * BF16_UNIT + BF16_UNIT**2
# The backward's products round only the gate gradients (their other operands, the rounded weights and inputs, are
# bf16 values already): a product is off by <= BF16_GRAD_UNIT |a b|.
BF16_GRAD_UNIT = BF16_UNIT
# A float32 feature within this relative distance of a bf16 rounding boundary may round to the other neighbour than
# its float64 value: the kernels' features are within ~1e-6 relative of the reference's (the docstring), 2^-16 = 1.5e-5.
BF16_FEATURE_MARGIN = 2.0**-16

# Relative-to-max bound of assert_close_rel_max for the same kernel summing in another order (other n).
REORDERED_SUM = {torch.float64: 1e-11, torch.float32: 1e-5}


def _finite_max(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# error scale of the backward: the reference's backward with |.| of every factor
class _AbsLinear(torch.autograd.Function):
    """x [n, k] @ w.T [k, m]; backward with |w| and |x|."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w.abs(), g.t() @ x.abs()


class _AbsMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g * b.abs(), g * a.abs()


class _FlooredActivation(torch.autograd.Function):
    """sigmoid or tanh; backward by |derivative| + floor (the absolute error of a derivative from a rounded value)."""

    @staticmethod
    def forward(ctx, z, is_tanh, floor):
        y = torch.tanh(z) if is_tanh else torch.sigmoid(z)
        ctx.save_for_backward(y)
        ctx.is_tanh, ctx.floor = is_tanh, floor
        return y

    @staticmethod
    def backward(ctx, g):
        y, = ctx.saved_tensors
        d = 1 - y * y if ctx.is_tanh else y * (1 - y)
        return g * (d.abs() + ctx.floor), None, None


class _AbsFeatures(torch.autograd.Function):
    """The input features [n] -> [n, I] (each coordinate's from its own gradient); backward by |d feature / d grad|,
    taken from autograd through the registry's reference functions."""

    @staticmethod
    def forward(ctx, grad, p, features, moments):
        ctx.save_for_backward(grad, moments)
        ctx.p, ctx.features = p, features
        return registry.compute(grad, features, p, moments)

    @staticmethod
    def backward(ctx, g):
        grad, moments = ctx.saved_tensors
        return (g * feature_slopes(grad, ctx.features, ctx.p, moments).abs()).sum(1), None, None, None


def feature_slopes(grad, features, p, moments=None) -> torch.Tensor:
    """[n, I]: d x_k / d grad_i, each coordinate's own derivative of its input feature k (moments held fixed)."""
    with torch.enable_grad():
        x = grad.detach().requires_grad_(True)
        out = registry.compute(x, features, p, moments)
        # coordinatewise: d out[:, k].sum() / d grad is each coordinate's own derivative of input k
        return torch.stack([torch.autograd.grad(out[:, k].sum(), x, retain_graph=True, allow_unused=True,
                                                materialize_grads=True)[0] for k in range(out.shape[1])], 1)


def backward_error_scale(grad, state, weights, p, scale, up_u, up_s, derivative_floor=None, features=1, moments=None,
                         output=0):
    """Error scale of (d_grad [n], d_state [L, 2, H, n], d_weights) for upstream gradients (up_u, up_s).

    The reference's backward with the absolute value of every factor (so no cancellation, neither
    across coordinates nor across hidden units) and `derivative_floor` added to every activation
    derivative. All float64; non-finite coordinates contribute nothing. Only a tolerance scale: the
    expected values always come from l2l_fast.reference itself.
    """
    floor = WEIGHT_GRAD[torch.float64]["derivative_floor"] if derivative_floor is None else derivative_floor
    grad, state = grad.detach().double(), state.detach().double().requires_grad_(True)
    up_u, up_s = up_u.detach().double(), up_s.detach().double()
    weights = [w.detach().double().requires_grad_(True) for w in weights]
    finite = torch.isfinite(grad)
    keep = finite.double()
    g = torch.where(finite, grad, torch.zeros_like(grad)).requires_grad_(True)
    if moments is not None:
        moments = torch.where(finite, moments.detach().double(), torch.zeros_like(moments, dtype=torch.float64))
    layers, out_w, out_b = reference.split_weights(weights)
    x = _AbsFeatures.apply(g, p, features, moments)
    rows = []
    for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        h, c = state[l, 0].t(), state[l, 1].t()
        z = _AbsLinear.apply(x, w_ih) + _AbsLinear.apply(h, w_hh) + b_ih + b_hh
        zi, zf, zg, zo = z.chunk(4, dim=1)
        i, f = _FlooredActivation.apply(zi, False, floor), _FlooredActivation.apply(zf, False, floor)
        gg, o = _FlooredActivation.apply(zg, True, floor), _FlooredActivation.apply(zo, False, floor)
        c_new = _AbsMul.apply(f, c) + _AbsMul.apply(i, gg)
        x = _AbsMul.apply(o, _FlooredActivation.apply(c_new, True, floor))
        rows.append(torch.stack([x.t(), c_new.t()]))
    raw_update = (_AbsLinear.apply(x, out_w) + out_b).squeeze(1)
    if output == 1:
        raw_update = _FlooredActivation.apply(raw_update, True, floor)
    d = torch.autograd.grad([raw_update, torch.stack(rows)], [g, state, *weights],
                            [up_u.abs() * abs(scale) * keep, up_s.abs() * keep], allow_unused=True,
                            materialize_grads=True)
    return d[0], d[1], list(d[2:])


# ---------------------------------------------------------------------------------------------
# d grad: the backward's error at the net's inputs, carried through each coordinate's feature slopes
def feature_slope_bound(grad, state, weights, p, scale, up_u, up_s, features=1, moments=None, output=0,
                        dtype=torch.float32) -> torch.Tensor:
    """Bound [n] on |kernel - ref| of d grad beyond ELEMENTWISE's rule on d grad itself.

    d grad_i = sum_k dx[i, k] * s_k(i): dx [n, I] the gradient at the net's input features (a backward output like
    d state's h rows: dz @ W_ih where those are dz @ W_hh), s_k(i) = d x_k / d grad_i each coordinate's own slope,
    computed to a few ulp. ELEMENTWISE bounds a backward output's error by atol_rel * its tensor's max, so dx's
    by atol_rel * max|dx|, and d grad_i's by atol_rel * max|dx| * sum_k |s_k(i)|. The rule on d grad alone,
    atol_rel * max|d grad|, misses this where the slopes vary across coordinates more than the d grad they make:
    the moment features' s = 1 / (sqrt(v_hat) + eps) spans decades, and a coordinate with a large slope but a
    small (cancelled) dx_i has a small d grad_i and dx_i's error times the large slope (measured before this bound:
    6.2e-5 and, generic ISA, 1.1e-4 of max|d grad|; the docstring's "Known gap").
    float64 inputs, the reference's values; non-finite coordinates (of grad, state or moments) get 0 and do not
    count in max|dx| (the kernels' d grad is 0 or NaN there, checked exactly elsewhere).
    """
    f64 = torch.float64
    grad, state, up_u, up_s = (t.detach().to(f64) for t in (grad, state, up_u, up_s))
    weights = [w.detach().to(f64) for w in weights]
    sound = torch.isfinite(grad) & torch.isfinite(state).flatten(0, 2).all(0)
    if moments is not None:
        moments = moments.detach().to(f64)
        sound = sound & torch.isfinite(moments).all(0)
        moments = torch.where(sound, moments, torch.zeros_like(moments))
    g = torch.where(sound, grad, torch.zeros_like(grad))
    state = torch.where(sound, state, torch.zeros_like(state))
    slopes = feature_slopes(g, features, p, moments)
    with torch.enable_grad():
        x = registry.compute(g, features, p, moments).requires_grad_(True)
        update, new_state = reference.lstm_from_inputs(x, state, weights, scale, output)
        dx, = torch.autograd.grad([update, new_state], [x], [up_u * sound, up_s * sound])
    dx_max = _finite_max(torch.where(sound[:, None], dx, torch.zeros_like(dx)))
    bound = ELEMENTWISE[dtype]["atol_rel"] * dx_max * slopes.abs().sum(1)
    return torch.where(sound, bound, torch.zeros_like(bound))


# ---------------------------------------------------------------------------------------------
# what the activations' own error does to the forward's outputs
def activation_error_bound(grad, state, weights, p, scale, features=1, moments=None, output=0,
                           eps=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bound on |kernel - exact| of (update [n], new_state [L, 2, H, n]) caused by sigmoid and tanh
    evaluations that are each off by at most eps = {"sigmoid": e_s, "tanh": e_t} (absolute; default
    ACTIVATION_BOUND), everything else exact (csrc/cpu/ACTIVATIONS.md, "Through the cell").

    Per coordinate, in float64 at the reference's own values (z: pre-activations, s' = s (1 - s), t' = 1 - t^2):
        d z      = |W_ih| d x                       (x: the layer's input, h of the layer below; the old state is exact)
        d i      = e_s + s'(z_i) d z_i,  likewise f and o;   d g = e_t + t'(z_g) d z_g
        d c_new  = |c| d f + |g| d i + |i| d g
        d h_new  = |tanh c_new| d o + |o| (e_t + t'(c_new) d c_new)
        d update = |scale| |w_out| d h_top          (tanh output: |scale| (e_t + t'(y) |w_out| d h_top))
    A coordinate with a non-finite gradient keeps its state: 0 there. (activation_error.forward_errors; it bounds the
    products i g, o tanh c exactly and the activations' curvature too, a second-order addition.)
    """
    eps = ACTIVATION_BOUND if eps is None else eps
    grad, state = grad.detach().double(), state.detach().double()
    weights = [w.detach().double() for w in weights]
    finite = torch.isfinite(grad)
    g0 = torch.where(finite, grad, torch.zeros_like(grad))
    if moments is not None:
        moments = torch.where(finite, moments.detach().double(), torch.zeros_like(moments, dtype=torch.float64))
    saved, _, _, y, dy = forward_errors(registry.compute(g0, features, p, moments), state, weights, eps)
    d_raw = dy
    if output == 1:
        d_raw = eps["tanh"] + (1 - torch.tanh(y) ** 2) * d_raw
    d_update = abs(scale) * d_raw
    d_state = torch.stack([torch.stack([v["dh"].t(), v["dc"].t()]) for v in saved])
    return torch.where(finite, d_update, torch.zeros_like(d_update)), torch.where(finite, d_state, torch.zeros_like(d_state))


# ---------------------------------------------------------------------------------------------
# float32 weight gradients: what the flash-attention factor cannot see (WEIGHT_GRAD's float32 comment)
def cpu_activation_error() -> dict:
    """ACTIVATION_ABS_ERROR of the CPU kernels in use now (instruction set and activations; the bf16 and AMX
    products run the avx512 fast ones)."""
    from l2l_fast import _C

    return ACTIVATION_ABS_ERROR[(_C.cpu_isa(), _C.cpu_activations())]


# the CPU kernels' float32 tiles per instruction set (csrc/cpu/kernel_*.cpp): (lanes W, vectors per tile NV)
CPU_TILES = {"generic": (4, 2), "avx2": (8, 2), "avx512": (16, 4)}


def cpu_sum_roundings(n: int) -> int:
    """Roundings a term of the CPU kernels' float32 weight-gradient sums goes through, at most: its product (1), its
    lane's recursive float sum (<= ceil(n / W) terms and <= flush NV: the flush is every kFlushTiles = 16 tiles, 64
    with the bf16 products), the float tree over the lanes (log2 W, avx512's sum_lanes_16; the others sum the lanes
    in double), and 1 for all the double adds (their 2^-53 per add stays below 2^-24 for n < 2^29)."""
    from l2l_fast import _C

    W, NV = CPU_TILES[_C.cpu_isa()]
    flush = 64 if _C.cpu_products() == "bf16" else 16
    return 1 + min(flush * NV, -(-n // W)) + W.bit_length() - 1 + 1


def cuda_sum_roundings(n: int) -> int:
    """The CUDA kernels' (backward_body.h): a term's product (1), a block's float sum over its tile (<= n terms), the
    double adds (1); + 4 for the tensor-core path's 3xTF32 split (2^-22 relative per product, backward_mma.h)."""
    return 1 + n + 1 + 4


def gamma32(d: int) -> float:
    """Higham's gamma_d for float32: a sum whose terms go through <= d roundings is off by <= gamma_d sum |terms|."""
    u = 2.0**-24
    return d * u / (1 - d * u)


def weight_grad_derived_term(grad, state, weights, p, scale, up_u, up_s, features=1, moments=None, output=0,
                             eps=None, roundings=None) -> list[torch.Tensor]:
    """Per entry of every weight gradient: the activations' propagated error (activation_error; eps default
    cpu_activation_error(): call it with the instruction set under test set) and, on out.bias, its float32 sum's
    and terms' roundings (roundings default cpu_sum_roundings(n))."""
    act, terms = weight_grad_activation_bound(grad, state, weights, p, scale, up_u, up_s,
                                              cpu_activation_error() if eps is None else eps, features, moments, output)
    d = (cpu_sum_roundings(grad.shape[0]) if roundings is None else roundings) + 4  # + the terms' own 4
    act[-1] = act[-1] + gamma32(d) * terms[-1]
    return act


def weight_grad_bounds(ref64, ref32, derived) -> list[torch.Tensor]:
    """Per entry, the float32 rule's bound on |kernel - ref64|: factor * max|ref32 - ref64| (per tensor) + derived."""
    out = []
    for e, r, t in zip(ref64, ref32, derived):
        e = e.detach().double()
        ref_err = (r.detach().double() - e).abs().max().item() if e.numel() else 0.0
        out.append(WEIGHT_GRAD[torch.float32]["factor"] * ref_err + t.double())
    return out


# ---------------------------------------------------------------------------------------------
# assertions
def assert_elementwise_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str,
                             error_scale: torch.Tensor | None = None,
                             activation_bound: torch.Tensor | None = None,
                             slope_bound: torch.Tensor | None = None) -> None:
    """actual (kernel, any dtype) vs expected (float64 reference); same shape, NaN nowhere.

    error_scale (float64 only, from backward_error_scale) adds term_rel * error_scale to the bound;
    activation_bound (from activation_error_bound, same shape) adds what the float32 activations may contribute;
    slope_bound (d grad only, from feature_slope_bound) what the net's input gradient carries through the features.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    tol = ELEMENTWISE[dtype]
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{name}: kernel produced non-finite values at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}"
    bound = tol["atol_rel"] * _finite_max(e) + tol["rtol"] * e.abs() + tol["atol"]
    if error_scale is not None:
        bound = bound + WEIGHT_GRAD[torch.float64]["term_rel"] * error_scale
    if activation_bound is not None:
        bound = bound + activation_bound.double()
    if slope_bound is not None:
        bound = bound + slope_bound.double()
    err = (a - e).abs()
    bad = err > bound
    if bad.any():
        idx = torch.nonzero(bad)[0].tolist()
        worst = torch.argmax(err / bound)
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {a.numel()} entries outside tolerance {tol}; "
            f"first at {idx}: got {a[tuple(idx)].item()!r}, expected {e[tuple(idx)].item()!r}; "
            f"worst error {err.flatten()[worst].item():.3e} at flat index {worst.item()} "
            f"(max|expected| = {_finite_max(e):.3e})")


def assert_weight_grads_close(kernel: list[torch.Tensor], ref64: list[torch.Tensor], dtype: torch.dtype,
                              ref_same_dtype: list[torch.Tensor] | None = None,
                              error_scale: list[torch.Tensor] | None = None,
                              derived: list[torch.Tensor] | None = None) -> None:
    """Weight gradients: for float32 the rule of WEIGHT_GRAD (ref_same_dtype: the reference run in float32; derived:
    weight_grad_derived_term's); for float64 its bound (error_scale from backward_error_scale; without it only the
    atol_rel part)."""
    assert len(kernel) == len(ref64), f"d_weights: {len(kernel)} tensors, expected {len(ref64)}"
    bounds = None
    if dtype != torch.float64:
        assert ref_same_dtype is not None and derived is not None, \
            "the float32 rule needs the reference run in float32 and the derived term (weight_grad_derived_term)"
        bounds = weight_grad_bounds(ref64, ref_same_dtype, derived)
    for k, (a, e) in enumerate(zip(kernel, ref64)):
        assert a.shape == e.shape, f"d_weights[{k}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == dtype, f"d_weights[{k}]: dtype {a.dtype}, expected {dtype}"
        if a.numel() == 0:
            continue
        a64, e64 = a.detach().double(), e.detach().double()
        if dtype == torch.float64:
            tol = WEIGHT_GRAD[dtype]
            bound = tol["atol_rel"] * _finite_max(e64) + 1e-300
            if error_scale is not None:
                bound = bound + tol["term_rel"] * error_scale[k]
        else:
            bound = bounds[k]
        assert torch.isfinite(a64).all(), f"d_weights[{k}]: non-finite entries"
        err = (a64 - e64).abs()
        if (err > bound).any():
            j = torch.argmax(err / bound)
            raise AssertionError(
                f"d_weights[{k}] ({dtype}): {int((err > bound).sum())} entries outside tolerance; worst at flat "
                f"index {j.item()}: got {a64.flatten()[j].item()!r}, expected {e64.flatten()[j].item()!r}, "
                f"bound {bound.flatten()[j].item():.3e}, max|ref| {_finite_max(e64):.3e}")


def assert_close_rel_max(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str,
                         scale: float | None = None) -> None:
    """max|actual - expected| <= rel * scale (default max|expected|): two kernel runs that differ in summation order."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * (_finite_max(expected.double()) if scale is None else scale)
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def assert_moments_advanced(got, grad, expected):
    """Moments advanced in place as features.advance_moments advanced them to `expected`: the step counts exactly,
    a coordinate with a non-finite gradient bit for bit, m and v within 2 ulp of their terms' magnitudes
    b |m| + (1 - b) |g| and b v + (1 - b) g^2 (the kernels may fuse the multiply-add; m may cancel); non-finite
    moments (a poisoned coordinate's) where the expected ones are."""
    assert got.dtype == expected.dtype, f"moments: dtype {got.dtype}, expected {expected.dtype}"
    assert torch.equal(got[2].nan_to_num(-1.0), expected[2].nan_to_num(-1.0)), "moments: t"
    bad = ~torch.isfinite(grad)
    assert torch.equal(bits(got[:, bad]), bits(expected[:, bad])), "moments of a non-finite gradient changed"
    special = ~torch.isfinite(expected[:2])
    assert torch.equal(special, ~torch.isfinite(got[:2])), "moments: non-finite m, v elsewhere than expected"
    assert torch.equal(got[:2][special].nan_to_num(0.0), expected[:2][special].nan_to_num(0.0)), "moments: +-Inf"
    g = torch.where(bad, torch.zeros_like(grad), grad).double()
    m, v = expected[0].double(), expected[1].double()  # the terms' magnitudes, to a relative eps
    terms = torch.stack([m.abs() + 2 * (1 - registry.BETA1) * g.abs(), v + 2 * (1 - registry.BETA2) * g * g])
    err = (got[:2].double() - expected[:2].double()).abs()[~special]
    bound = 2 * torch.finfo(got.dtype).eps * terms[~special]
    assert (err <= bound).all(), f"moments: m, v max error {err.max().item():.3e}"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (NaN payloads included): equality bit for bit."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

# AMX products (set_cpu_products("amx-bf16x3" | "amx-bf16x6"), csrc/cpu/PRODUCTS.md "AMX tiles"): each operand split
# into bf16 pieces (|piece error| <= BF16_UNIT of what it rounds), the products of low order summed. Dropped part of
# one product w x, relative to |w| |x| (DAZ of pieces below 2^-126 adds at most AMX_FLUSHED absolute per operand):
#   bf16x3 (2 pieces, w0 x0 + w0 x1 + w1 x0):            u^2 (3 + 2u + 4u^2)
#   bf16x6 (3 pieces, the 6 products of order <= 2):     u^3 (4 + 5u + 4u^2 + 4u^3)  (0 for normal floats' x - x0 - x1 - x2)
# plus the float32 adds of the products in any order: n_products K + 1 roundings of 2^-24 of the running |sum|.
AMX_BF16X3_SPLIT = BF16_UNIT**2 * (3 + 2 * BF16_UNIT + 4 * BF16_UNIT**2)
AMX_BF16X6_SPLIT = BF16_UNIT**3 * (4 + 5 * BF16_UNIT + 4 * BF16_UNIT**2 + 4 * BF16_UNIT**3)
AMX_PRODUCTS = {"amx-bf16x3": (AMX_BF16X3_SPLIT, 3), "amx-bf16x6": (AMX_BF16X6_SPLIT, 6)}  # (split, products per w x)
AMX_FLUSHED = 2.0**-126
# The AMX backward (amx_backward.h): its d inputs (sum over gates of w dgate) and weight gradients (sum over coordinates
# of dgate z) are split products too, off by <= split |a| |b| each (AMX_PRODUCTS' split; the float32 adds are the
# float32 rule's). Propagated linearly through the backward by the absolute values of its factors
# (backward_error_scale, derivative floor 0): an output of layer l's backward passes the d-input products of the
# layers above it and of its own (<= L stages) and, for a weight gradient, its own product (1 stage); the forward's
# split is emulated exactly (test_amx_backward.emulated_step) except where the emulation's float64 values and the
# kernel's float32 ones round to different bf16 pieces, off by the same split per product again (<= L more stages).
# So |kernel - emulation| <= the float32 rule + AMX_BACKWARD_STAGES(L) * split * error scale, per entry.
AMX_BACKWARD_STAGES = lambda layers: 2 * layers + 1  # noqa: E731
