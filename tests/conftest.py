"""Shared helpers of the test suite: seeding, random weights / states / gradients, reference runs.

Every random tensor comes from a ``torch.Generator`` seeded from the test's node id (fixture ``gen``)
or from an explicit seed, so a failing case reproduces by re-running the same test id.

Shapes as in :mod:`l2l_fast.reference`: grad [n], state [L, 2, H, n], weights = the flat list in
``torch.nn.LSTM`` + ``torch.nn.Linear`` order, whose first layer takes the inputs of a feature mask
(``features``, :mod:`l2l_fast.features`; 1 = the paper's preprocessing, the default).

FEATURE_SETS: every registered feature alone and, when there are several, all of them together. The
core test families (float64 vs the reference, gradcheck, opcheck / compile, bad input) are
parametrized over it, so a feature added to the registry is tested without editing the tests.
VARIANTS: every feature set with every output kind (OUTPUTS: 0 update = scale * y, 1 scale * tanh(y));
VARIANTS_ONCE_EACH, for the slow families, each feature set once and both output kinds.
A feature set that reads the running moments gets them from moments_for: random moments as an optimizer
holds them after some steps, advanced with the step's gradient (what the functional ops take).
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import settings

_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("l2l_fast") is None:  # running from a source checkout without an install
    sys.path.insert(0, str(_ROOT))

from l2l_fast import CoordinatewiseLSTM, ops, reference  # noqa: E402
from l2l_fast import features as registry  # noqa: E402
from l2l_fast.net import OUTPUTS as OUTPUT_NAMES  # noqa: E402

# ---------------------------------------------------------------------------------------------
# hypothesis profiles: HYPOTHESIS_PROFILE=thorough pytest tests/test_property.py
# The default (the README's test command, CI) draws new examples each run, so every run searches a little further;
# "fixed" draws the same ones every run (to compare two builds on equal terms), "thorough" searches long.
settings.register_profile("default", max_examples=60, deadline=None, print_blob=True)
settings.register_profile("ci", max_examples=60, deadline=None, print_blob=True)
settings.register_profile("fixed", max_examples=60, deadline=None, print_blob=True, derandomize=True)
settings.register_profile("thorough", max_examples=10_000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# ---------------------------------------------------------------------------------------------
# native extension: skipped when absent, unless L2L_FAST_REQUIRE_NATIVE=1 (CI after a build), where a
# missing extension must fail loudly instead of turning the kernel tests into skips.
if os.environ.get("L2L_FAST_REQUIRE_NATIVE") == "1" and not ops.HAS_NATIVE:
    raise RuntimeError(f"L2L_FAST_REQUIRE_NATIVE=1 but l2l_fast._C failed to import: {ops.NATIVE_IMPORT_ERROR}")

requires_native = pytest.mark.skipif(not ops.HAS_NATIVE,
                                     reason=f"l2l_fast._C is not built ({ops.NATIVE_IMPORT_ERROR})")

DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64"}

FEATURE_SETS = [f.bit for f in registry.REGISTRY.values()] + ([registry.ALL_MASK] if len(registry.ALL) > 1 else [])


def feature_id(mask: int) -> str:
    """Readable test id of a feature mask: "paper", "paper+raw"."""
    return "+".join(registry.names_of(mask))


OUTPUTS = list(range(len(OUTPUT_NAMES)))  # the ops' `output`: 0 linear, 1 tanh
VARIANTS = [(f, o) for f in FEATURE_SETS for o in OUTPUTS]
# For the slow families (torch.compile): every feature set once, the output kinds alternating, the paper's set
# with tanh (paper + linear is what the tests without a variant run).
VARIANTS_ONCE_EACH = [(f, (k + 1) % len(OUTPUTS)) for k, f in enumerate(FEATURE_SETS)]


def variant_id(variant: tuple[int, int]) -> str:
    """Readable test id of (features, output): "paper-linear", "paper+moments-tanh"."""
    features, output = variant
    return f"{feature_id(features)}-{OUTPUT_NAMES[output]}"


available_cpu_isas = ops.available_cpu_isas  # the tests' name for it (from conftest import ...)


@pytest.fixture
def cpu_isa(request):
    """Runs the test with the CPU kernels of instruction set request.param, then restores the previous one."""
    from l2l_fast import _C

    if not hasattr(_C, "set_cpu_isa"):
        yield _C.cpu_isa() if hasattr(_C, "cpu_isa") else "default"
        return
    previous = _C.cpu_isa()
    assert _C.set_cpu_isa(request.param) == request.param
    try:
        yield request.param
    finally:
        _C.set_cpu_isa(previous)
WEIGHT_KINDS = ("init", "random", "saturating")


# ---------------------------------------------------------------------------------------------
# seeding
def seed_of(text: str) -> int:
    return zlib.crc32(text.encode())


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id: fresh per test, fixed across runs."""
    return generator(seed_of(request.node.nodeid))


# ---------------------------------------------------------------------------------------------
# random inputs
def weight_shapes(hidden_size: int, num_layers: int, features: int = 1) -> list[tuple[int, ...]]:
    H = hidden_size
    shapes = []
    for layer in range(num_layers):
        inputs = registry.input_size(features) if layer == 0 else H
        shapes += [(4 * H, inputs), (4 * H, H), (4 * H,), (4 * H,)]
    return shapes + [(1, H), (1,)]


def random_weights(hidden_size: int, num_layers: int, *, gen: torch.Generator, dtype=torch.float64,
                   kind: str = "random", features: int = 1) -> list[torch.Tensor]:
    """Weights in op order.

    kind: "init"       U(-1/sqrt(H), 1/sqrt(H)) everywhere, the distribution of torch.nn.LSTM's own init;
          "random"     N(0, 1) / sqrt(fan-in) and N(0, 0.5) biases: typical trained-net magnitudes;
          "saturating" N(0, 4^2) everywhere: most gates sit deep in sigmoid/tanh saturation.
    """
    H = hidden_size
    out = []
    for shape in weight_shapes(hidden_size, num_layers, features):
        if kind == "init":
            w = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(H)
        elif kind == "random":
            w = torch.randn(shape, generator=gen, dtype=torch.float64)
            w = w / math.sqrt(shape[1]) if len(shape) == 2 else 0.5 * w
        elif kind == "saturating":
            w = 4 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            raise ValueError(kind)
        out.append(w.to(dtype))
    return out


def random_grad(n: int, *, gen: torch.Generator, dtype=torch.float64, p: float = 10.0, lo: float = 1e-12,
                hi: float = 1e3) -> torch.Tensor:
    """Gradient with log-uniform magnitudes in [lo, hi] and random signs.

    With n >= 2 the first two coordinates are forced onto the two preprocessing branches
    (|g| < e^-p and |g| >= e^-p) so small draws still exercise both.
    """
    exponent = torch.rand(n, generator=gen, dtype=torch.float64) * (math.log10(hi) - math.log10(lo)) + math.log10(lo)
    sign = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    g = sign * torch.pow(10.0, exponent)
    if n >= 2:
        g[0] = -0.01 * math.exp(-p)
        g[1] = 50.0 * math.exp(-p)
    return g.to(dtype)


def random_moments(n: int, *, gen: torch.Generator, dtype=torch.float64, grad: torch.Tensor | None = None,
                   lo: float = 1e-12, hi: float = 1e3) -> torch.Tensor:
    """Running moments [4, n] as an optimizer holds them after 1..50 steps, advanced with `grad` when given
    (features.advance_moments, in `dtype`).

    Per coordinate a magnitude s log-uniform in [lo, hi]; m_hat ~ N(0, s^2) and v_hat = m_hat^2 + s^2 U(0.1, 1.1),
    so m_hat^2 <= v_hat as for real moving averages; the long u_hat = v_hat 10^U(-2, 2) (the gradient has fallen
    or grown since the long average began); m, v, u carry the bias 1 - beta^t of their step count t.
    With n >= 3 the first coordinate is fresh (zeros): after the advance, the first step's moments.
    """
    t = torch.randint(1, 51, (n,), generator=gen).double()
    s = torch.pow(10.0, torch.rand(n, generator=gen, dtype=torch.float64) * (math.log10(hi) - math.log10(lo))
                  + math.log10(lo))
    m_hat = s * torch.randn(n, generator=gen, dtype=torch.float64)
    v_hat = m_hat**2 + s**2 * (0.1 + torch.rand(n, generator=gen, dtype=torch.float64))
    u_hat = v_hat * torch.pow(10.0, 4 * torch.rand(n, generator=gen, dtype=torch.float64) - 2)
    moments = torch.stack([m_hat * (1 - registry.BETA1**t), v_hat * (1 - registry.BETA2**t), t,
                           u_hat * (1 - registry.BETA_LONG**t)])
    if n >= 3:
        moments[:, 0] = 0
    moments = moments.to(dtype)
    return moments if grad is None else registry.advance_moments(grad, moments)


def moments_for(features: int, grad: torch.Tensor, *, gen: torch.Generator, **kwargs) -> torch.Tensor | None:
    """random_moments advanced with grad, in grad's dtype, when the features read moments; else None."""
    if not registry.reads_moments(features):
        return None
    return random_moments(grad.shape[0], gen=gen, dtype=grad.dtype, grad=grad, **kwargs)


def branch_counts(grad: torch.Tensor, p: float) -> tuple[int, int]:
    """(coordinates on the log branch |g| >= e^-p, coordinates on the linear branch), finite ones only."""
    g = grad.double()
    finite = torch.isfinite(g)
    big = (g.abs() >= math.exp(-p)) & finite
    return int(big.sum()), int((finite & ~big).sum())


def random_state(num_layers: int, hidden_size: int, n: int, *, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Nonzero state [L, 2, H, n]: h in (-1, 1) as an LSTM makes it, c of a few units."""
    h = torch.tanh(2 * torch.randn(num_layers, 1, hidden_size, n, generator=gen, dtype=torch.float64))
    c = 2 * torch.randn(num_layers, 1, hidden_size, n, generator=gen, dtype=torch.float64)
    return torch.cat([h, c], dim=1).to(dtype)


def load_weights(net: CoordinatewiseLSTM, weights) -> CoordinatewiseLSTM:
    with torch.no_grad():
        for dst, src in zip(net.weights(), weights, strict=True):
            dst.copy_(src)
    return net


def make_net(hidden_size: int = 20, num_layers: int = 2, *, gen: torch.Generator, dtype=torch.float64,
             kind: str = "random", backend: str = "auto", preprocess_p: float = 10.0,
             output_scale: float = 0.1, features: int = 1, output: int = 0) -> CoordinatewiseLSTM:
    net = CoordinatewiseLSTM(hidden_size, num_layers, preprocess_p, output_scale, backend=backend,
                             features=features, output=OUTPUT_NAMES[output]).to(dtype)
    return load_weights(net, random_weights(hidden_size, num_layers, gen=gen, dtype=dtype, kind=kind,
                                            features=features))


def copy_net(net: CoordinatewiseLSTM, *, backend: str, dtype=None) -> CoordinatewiseLSTM:
    """The same weights in a new net with another backend (and optionally dtype)."""
    other = CoordinatewiseLSTM(net.hidden_size, net.num_layers, net.preprocess_p, net.output_scale, backend=backend,
                               features=net.features, output=net.output)
    other.to(net.out.weight.dtype).load_state_dict(net.state_dict())  # load at the source dtype: no rounding
    return other.to(dtype or net.out.weight.dtype)


# ---------------------------------------------------------------------------------------------
# reference runs
def to64(tensors):
    if isinstance(tensors, torch.Tensor):
        return tensors.detach().double()
    return [t.detach().double() for t in tensors]


def reference_forward64(grad, state, weights, p, scale, chunk: int = 1 << 17, features: int = 1, moments=None,
                        output: int = 0):
    """Float64 reference on the (possibly lower-precision) inputs, in coordinate chunks to bound memory."""
    grad, state, weights = to64(grad), to64(state), to64(weights)
    moments = None if moments is None else to64(moments)
    updates, states = [], []
    for start in range(0, max(grad.shape[0], 1), chunk):
        sl = slice(start, start + chunk)
        u, s = reference.lstm_step(grad[sl], state[..., sl], weights, p, scale, features,
                                   None if moments is None else moments[:, sl], output)
        updates.append(u)
        states.append(s)
    return torch.cat(updates), torch.cat(states, dim=-1)


def step_grads(step_fn, grad, state, weights, p, scale, up_update, up_state, features: int = 1, moments=None,
               output: int = 0):
    """(update, new_state, d_grad, d_state, d_weights) of one step under upstream grads (up_update, up_state).

    The inputs are detached copies with requires_grad set (the moments, data, without), so the caller's tensors
    are left alone.
    """
    grad = grad.detach().clone().requires_grad_(True)
    state = state.detach().clone().requires_grad_(True)
    weights = [w.detach().clone().requires_grad_(True) for w in weights]
    moments = None if moments is None else moments.detach().clone()
    update, new_state = step_fn(grad, state, weights, p, scale, features, moments, output)
    d = torch.autograd.grad([update, new_state], [grad, state, *weights], [up_update, up_state])
    return update.detach(), new_state.detach(), d[0], d[1], list(d[2:])


def native_step(grad, state, weights, p, scale, features=1, moments=None, output=0):
    return ops.lstm_step(grad, state, weights, p, scale, features, moments, output)


def reference_step(grad, state, weights, p, scale, features=1, moments=None, output=0):
    return reference.lstm_step(grad, state, weights, p, scale, features, moments, output)


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()
