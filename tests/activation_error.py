"""What the float32 kernels' own sigmoid and tanh error does to the step: bounds, evaluated in float64.

Each activation the kernels evaluate is off by at most e_s (sigmoid) / e_t (tanh) absolute (tolerances.py's
ACTIVATION_ABS_ERROR, derived in csrc/cpu/ACTIVATIONS.md); everything else is taken exact here (its rounding is the
float32 rules' business). The bounds carry those errors through the cell with |.| of every factor (no cancellation
is assumed), at the reference's own values on the kernel's inputs: sound for any errors within e_s, e_t, not only
to first order (tests/test_activation_error.py holds them against a float64 emulation).

Forward (csrc/cpu/ACTIVATIONS.md, "Through the cell"; per coordinate, s' = s (1 - s), t' = 1 - t^2):
    d z = |W_ih| d x  (x: the layer's input; features, old state exact),  d i = e_s + s'(z_i) d z_i + d z_i^2 / 20
    (f, o alike; 1/20 >= max|s''| / 2),  d g = e_t + t'(z_g) d z_g + 0.4 d z_g^2 (0.4 >= max|t''| / 2),
    d c_new = |c| d f + d(i g),  d tanh c_new like d g,  d h_new = d(o tanh c_new),  d y = |w_out| d h_top,
    where d(a b) = (|a| + d a)(|b| + d b) - |a||b| (exact for products of values off by <= d a, d b).

Backward (the kernels' cell_backward, csrc/lstm_cell.h, on the recomputed forward, i.e. the values above):
    dcell = dc_up + dh o (1 - tc^2);  G_o = dh tc o (1 - o);  G_i = dcell g i (1 - i);  G_g = dcell i (1 - g^2);
    G_f = dcell c f (1 - f);  dh of the layer below = W_ih^T G + its dh_up;  output: gu = up_u scale (1 - ty^2)
    (tanh output; 1 for the linear one), dh_top = gu w_out + dh_up.
A derivative from a value off by d: |s(1 - s) - s~(1 - s~)| <= |1 - 2s| d + d^2 and |t^2 - t~^2| <= 2|t| d + d^2;
1 - t t also rounds t t next to 1, where it cancels: + u = 2^-24 absolute (the saturated case, where PyTorch's
own tanh may round to exactly +-1 and its derivative be exact by luck). 1 - s needs no such term (exact for
s >= 1/2 by Sterbenz, a relative rounding below). The weight gradients are sums over the coordinates of
G x (W_ih), G h_old (W_hh), G (biases), gu h_top (out.weight), gu (out.bias): their bound is the sum of the terms'
d(a b), every product in the backward likewise.
"""
from __future__ import annotations

import torch

from l2l_fast import features as registry
from l2l_fast import reference

U32 = 2.0**-24  # float32 unit roundoff


def sound_inputs(grad, state, moments=None):
    """float64 copies with every non-finite coordinate's values zeroed, and the mask of the finite coordinates
    (the only ones that reach the weight gradients and the checked outputs)."""
    grad, state = grad.detach().double(), state.detach().double()
    keep = torch.isfinite(grad) & torch.isfinite(state).flatten(0, 2).all(0)
    if moments is not None:
        moments = moments.detach().double()
        keep = keep & torch.isfinite(moments).all(0)
        moments = torch.where(keep, moments, torch.zeros_like(moments))
    zero = lambda t: torch.where(keep, t, torch.zeros_like(t))  # noqa: E731
    return zero(grad), zero(state), moments, keep


# |f(z + d) - f(z)| <= f'(z) |d| + (max |f''| / 2) d^2: sigmoid's max |s''| = 1 / (6 sqrt 3), tanh's 4 / (3 sqrt 3)
_CURVE_S, _CURVE_T = 0.05, 0.4


def _mul(*factors):
    """(product, bound on |product of (v + e) - product of v| for |e| <= d): prod(|v| + d) - prod |v|, exact."""
    value, upper, lower = 1.0, 1.0, 1.0
    for v, d in factors:
        value, upper, lower = value * v, upper * (v.abs() + d), lower * v.abs()
    return value, upper - lower


def forward_errors(x, state, weights, eps):
    """Per layer the reference's values and the bounds d* of the forward above; then (h_top, d h_top, y, d y).
    x [n, I] the input features, state [L, 2, H, n], weights float64."""
    e_s, e_t = eps["sigmoid"], eps["tanh"]
    layers, out_w, out_b = reference.split_weights(weights)
    dx = torch.zeros_like(x)
    saved = []
    for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        h, c = state[l, 0].t(), state[l, 1].t()
        zi, zf, zg, zo = (x @ w_ih.t() + h @ w_hh.t() + b_ih + b_hh).chunk(4, dim=1)
        dzi, dzf, dzg, dzo = (dx @ w_ih.abs().t()).chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg), torch.sigmoid(zo)
        di, df, do = (e_s + s * (1 - s) * d + _CURVE_S * d * d for s, d in ((i, dzi), (f, dzf), (o, dzo)))
        dg = e_t + (1 - g * g) * dzg + _CURVE_T * dzg * dzg
        ig, dig = _mul((i, di), (g, dg))
        c_new, dc = f * c + ig, c.abs() * df + dig
        tc = torch.tanh(c_new)
        dtc = e_t + (1 - tc * tc) * dc + _CURVE_T * dc * dc
        h_new, dh = _mul((o, do), (tc, dtc))
        saved.append(dict(x=x, dx=dx, h=h, c=c, i=i, f=f, g=g, o=o, di=di, df=df, dg=dg, do=do, c_new=c_new, dc=dc,
                          tc=tc, dtc=dtc, dh=dh))
        x, dx = h_new, dh
    y = (x @ out_w.t() + out_b).squeeze(1)
    dy = (dx @ out_w.abs().t()).squeeze(1)
    return saved, x, dx, y, dy


def _sigmoid_slope(s, d):
    """s (1 - s) and the bound on its change when s moves by <= d: |(1 - 2s) e - e^2| <= |1 - 2s| d + d^2."""
    return s * (1 - s), (1 - 2 * s).abs() * d + d * d


def _tanh_slope(t, d):
    """1 - t^2 and the bound on its change when t moves by <= d (|2 t e + e^2| <= 2|t| d + d^2), plus the rounding of
    t t next to 1, where 1 - t t cancels (u: the saturated case, where PyTorch's own tanh may round to exactly +-1)."""
    return 1 - t * t, 2 * t.abs() * d + d * d + U32


def weight_grad_activation_bound(grad, state, weights, p, scale, up_u, up_s, eps, features=1, moments=None,
                                 output=0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per entry of every weight gradient, in weight order: the bound above on |kernel - exact| that the activations'
    errors eps = {"sigmoid": e_s, "tanh": e_t} cause, and the sum over the coordinates of its terms' |.| (the scale
    of the sum's own rounding). float64; non-finite coordinates add 0."""
    g0, state, moments, keep = sound_inputs(grad, state, moments)
    weights = [w.detach().double() for w in weights]
    up_u = torch.where(keep, up_u.detach().double(), torch.zeros_like(g0))
    up_s = torch.where(keep, up_s.detach().double(), torch.zeros_like(state))
    layers, out_w, _ = reference.split_weights(weights)
    saved, h_top, dh_top, y, dy = forward_errors(registry.compute(g0, features, p, moments), state, weights, eps)
    gu, dgu = up_u * scale, torch.zeros_like(up_u)
    if output == 1:
        ty = torch.tanh(y)
        gu, dgu = _mul((up_u * scale, 0.0), _tanh_slope(ty, eps["tanh"] + (1 - ty * ty) * dy + _CURVE_T * dy * dy))
    bounds, terms = [None] * len(weights), [None] * len(weights)
    bounds[-2] = (gu.abs() + dgu) @ (h_top.abs() + dh_top) - gu.abs() @ h_top.abs()
    bounds[-2], bounds[-1] = bounds[-2][None, :], dgu.sum(0, keepdim=True)
    terms[-2], terms[-1] = (gu.abs() @ h_top.abs())[None, :], gu.abs().sum(0, keepdim=True)
    dh, ddh = gu[:, None] * out_w + up_s[-1, 0].t(), dgu[:, None] * out_w.abs()
    for l in reversed(range(len(layers))):
        v = saved[l]
        i, f, g, o, c, tc = (v[k] for k in "i f g o c tc".split())
        a = _mul((v["o"], v["do"]), _tanh_slope(tc, v["dtc"]))
        dha = _mul((dh, ddh), a)
        dcell = (up_s[l, 1].t() + dha[0], dha[1])
        G = [_mul(dcell, (g, v["dg"]), _sigmoid_slope(i, v["di"])),
             _mul(dcell, (c, 0.0), _sigmoid_slope(f, v["df"])),
             _mul(dcell, (i, v["di"]), _tanh_slope(g, v["dg"])),
             _mul((dh, ddh), (tc, v["dtc"]), _sigmoid_slope(o, v["do"]))]
        G, dG = torch.cat([q[0] for q in G], 1) * keep[:, None], torch.cat([q[1] for q in G], 1) * keep[:, None]
        x, dx = v["x"].abs(), v["dx"]
        bounds[4 * l] = (G.abs() + dG).t() @ (x + dx) - G.abs().t() @ x
        bounds[4 * l + 1] = dG.t() @ v["h"].abs()
        bounds[4 * l + 2] = bounds[4 * l + 3] = dG.sum(0)
        terms[4 * l], terms[4 * l + 1] = G.abs().t() @ x, G.abs().t() @ v["h"].abs()
        terms[4 * l + 2] = terms[4 * l + 3] = G.abs().sum(0)
        if l > 0:
            w_ih = layers[l][0]
            dh, ddh = G @ w_ih + up_s[l - 1, 0].t(), dG @ w_ih.abs()
    return bounds, terms
