"""The CPU kernels' float32 sigmoid and tanh stay within the absolute error bounds that the float32 tolerances
rest on (tolerances.ACTIVATION_ABS_ERROR, derived in csrc/cpu/ACTIVATIONS.md), on a dense set of inputs: every
float32 exponent (subnormals included) with both signs and a spread of mantissas, a fine grid where the errors
peak (|x| < 16), every float next to the clamps (where 2^t would leave the float range) and far in the
saturation regions, +-0 and +-inf; NaN gives NaN (a poisoned lane stays NaN). Every instruction set this CPU
runs, with the fast and the precise activations. The whole 2^32-input scan is scripts/scan_activations.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import available_cpu_isas, generator, random_grad, random_state, random_weights, requires_native
from l2l_fast import ops, reference
from tolerances import ACTIVATION_ABS_ERROR, assert_elementwise_close

pytestmark = requires_native

ISAS = available_cpu_isas()
REFERENCE = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}


def from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int64).to(torch.int32).view(torch.float32)


def bits_of(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32).item())


def dense_inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(21)
    mantissas = torch.cat([torch.tensor([0, 1, 2, 3, 0x400000, 0x7FFFFD, 0x7FFFFE, 0x7FFFFF]),
                           torch.randint(0, 1 << 23, (120,), generator=gen)])
    exponents = torch.arange(0, 255)  # 0: zero and subnormals; 255 (inf, NaN) comes below
    magnitude = (exponents[:, None] << 23 | mantissas[None, :]).flatten()
    parts = [from_bits(magnitude), -from_bits(magnitude), torch.linspace(-16, 16, 400_001)]
    # every float32 within 4096 ulps of the clamps: sigmoid's t = -x log2(e) reaches 126 at x = -87.34 (AVX-512),
    # |x| = 87.34 (AVX2); tanh's at |x| = 43.67; and of the precise exp's clamps (-87, 88)
    for edge in (87.33654475, 43.66827238, 87.0, 88.0):
        centre = bits_of(edge)
        around = from_bits(torch.arange(centre - 4096, centre + 4096))
        parts += [around, -around, around / 2, -around * 2]
    return torch.cat(parts)


INPUTS = dense_inputs()


def variants():
    for isa in ISAS:
        for activations in ("fast", "precise"):
            if isa == "generic" and activations == "fast":
                continue  # the generic build has only the precise activations
            for which in ("sigmoid", "tanh"):
                yield pytest.param(isa, activations, which, id=f"{isa}-{activations}-{which}")


@pytest.mark.parametrize("isa,activations,which", list(variants()))
def test_activation_within_bound(isa, activations, which):
    from l2l_fast import _C

    previous = _C.cpu_isa(), _C.cpu_activations()
    try:
        _C.set_cpu_isa(isa)
        assert _C.set_cpu_activations(activations) == activations
        y = _C.cpu_activation_f32(INPUTS, which)
        special_in = torch.tensor([0.0, -0.0, math.inf, -math.inf])
        special = _C.cpu_activation_f32(special_in, which)
        nans = from_bits(torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC00000, 0xFF800001, 0xFFFFFFFF]))
        nan_out = _C.cpu_activation_f32(nans, which)
    finally:
        _C.set_cpu_isa(previous[0])
        _C.set_cpu_activations(previous[1])
    bound = ACTIVATION_ABS_ERROR[(isa, activations)][which]
    err = (y.double() - REFERENCE[which](INPUTS.double())).abs()
    assert not torch.isnan(err).any(), f"NaN output for finite input {INPUTS[torch.isnan(err)][:4].tolist()}"
    worst = int(torch.argmax(err))
    assert err[worst] <= bound, (f"{isa}/{activations} {which}: error {err[worst].item():.3e} at x = "
                                 f"{INPUTS[worst].item()!r} > bound {bound:.1e}")
    lo = 0.0 if which == "sigmoid" else -1.0
    assert ((y >= lo) & (y <= 1.0)).all(), "outside the function's range"
    expected = REFERENCE[which](special_in.double())
    assert ((special.double() - expected).abs() <= bound).all(), f"f(+0, -0, +inf, -inf) = {special.tolist()}"
    assert torch.isnan(nan_out).all(), f"NaN inputs gave {nan_out.tolist()}"


def test_activations_switch_and_reject_unknown():
    """set_cpu_activations keeps the instruction set, reports what is in use, and rejects other names."""
    from l2l_fast import _C

    previous = _C.cpu_activations()
    isa = _C.cpu_isa()
    try:
        expected = "precise" if isa == "generic" else "fast"
        assert _C.set_cpu_activations("fast") == expected
        assert _C.set_cpu_activations("precise") == "precise"
        assert _C.cpu_isa() == isa
        with pytest.raises(ValueError, match="activations"):
            _C.set_cpu_activations("approximate")
    finally:
        _C.set_cpu_activations(previous)


@pytest.mark.parametrize("isa,activations", [(i, a) for i in ISAS for a in ("fast", "precise")],
                         ids=lambda v: str(v))
def test_step_with_either_activations(isa, activations):
    """Both activations, on every instruction set, give the float32 step within the tolerances (the kernel tests
    run with the default, fast)."""
    from l2l_fast import _C

    gen = generator(4211)
    H, L, n, p, scale = 20, 2, 1000, 10.0, 0.1
    weights = random_weights(H, L, gen=gen, dtype=torch.float32, kind="random")
    grad = random_grad(n, gen=gen, dtype=torch.float32, p=p)
    state = random_state(L, H, n, gen=gen, dtype=torch.float32)
    previous = _C.cpu_isa(), _C.cpu_activations()
    try:
        _C.set_cpu_isa(isa)
        _C.set_cpu_activations(activations)
        update, new_state = ops.lstm_step(grad, state, weights, p, scale)
    finally:
        _C.set_cpu_isa(previous[0])
        _C.set_cpu_activations(previous[1])
    e_update, e_state = reference.lstm_step(grad.double(), state.double(), [w.double() for w in weights], p, scale)
    assert_elementwise_close(update, e_update, torch.float32, "update")
    assert_elementwise_close(new_state, e_state, torch.float32, "new_state")
