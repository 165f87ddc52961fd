"""Tolerances of the kernel-vs-reference comparisons: one table per dtype of the kernel's inputs.

The expected values are always the float64 reference run on the same (rounded) inputs.

Element-wise quantities (update, new_state, d_grad, d_state):
    |actual - expected| <= atol_rel * max|expected| + rtol * |expected| + atol
``atol_rel`` scales with the tensor's largest entry because the LSTM cell cancels (f*c + i*g, and
1 - tanh^2 in saturation): an entry can be much smaller than the rounding error it inherits from its
inputs. Measured for plain PyTorch float32 vs float64 on H=20, L=2, n=65539 (tests/conftest.py inputs):
the worst entry error relative to the tensor's max is 1e-7..4e-7 with "init"/"random" weights, up to
1.1e-5 (d_state) with "saturating" weights; float32 allows 5e-5, about 4x the worst case.

Weight gradients (sums over all n coordinates) follow flash-attention's rule instead:
    max|kernel - ref64| <= 2 * max|ref_same_dtype - ref64| + floor_rel * max|ref64|
i.e. the kernel may be at most twice as far from the float64 reference as plain PyTorch in the same dtype.
For float64 there is no higher-precision reference; the table bounds the error directly.
"""
from __future__ import annotations

import torch

ELEMENTWISE = {
    # both sides compute in double; differences are operation order and libm vs vectorised exp/tanh.
    torch.float64: dict(rtol=1e-9, atol_rel=1e-11, atol=1e-15),
    torch.float32: dict(rtol=1e-5, atol_rel=5e-5, atol=1e-8),
}

WEIGHT_GRAD = {
    # float64: sums of up to 2^16 terms in a different order than the reference's matmuls.
    torch.float64: dict(atol_rel=1e-10),
    # float32: floor of the flash-attention rule (relative to the gradient's largest entry). Plain PyTorch
    # float32 itself is 1e-7..5e-6 away, so the floor only matters where PyTorch happens to be exact.
    torch.float32: dict(floor_rel=1e-6),
}


def _finite_max(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def assert_elementwise_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """actual (kernel, any dtype) vs expected (float64 reference); same shape, NaN nowhere."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    tol = ELEMENTWISE[dtype]
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{name}: kernel produced non-finite values at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}"
    bound = tol["atol_rel"] * _finite_max(e) + tol["rtol"] * e.abs() + tol["atol"]
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


def assert_within_rule(actual: torch.Tensor, expected: torch.Tensor, same_dtype: torch.Tensor, dtype: torch.dtype,
                       name: str, scale: float | None = None) -> None:
    """flash-attention's rule: max|actual - expected| <= 2 * max|same_dtype - expected| + floor_rel * scale.

    expected: float64 reference; same_dtype: the reference run in `dtype` on the same inputs;
    scale: magnitude the floor is relative to (default max|expected|).
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    a64, e64 = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a64).all(), f"{name}: non-finite entries"
    err = (a64 - e64).abs().max().item()
    ref_err = (same_dtype.detach().double() - e64).abs().max().item()
    scale = _finite_max(e64) if scale is None else scale
    bound = 2 * ref_err + WEIGHT_GRAD[dtype]["floor_rel"] * scale
    assert err <= bound, (f"{name} ({dtype}): kernel error {err:.3e} > 2 * PyTorch {dtype} error {ref_err:.3e} "
                          f"+ floor = {bound:.3e} (max|ref| {scale:.3e})")


def assert_weight_grads_close(kernel: list[torch.Tensor], ref64: list[torch.Tensor], dtype: torch.dtype,
                              ref_same_dtype: list[torch.Tensor] | None = None) -> None:
    """Weight gradients: flash-attention rule for float32, the float64 table for float64.

    The float32 floor is relative to the largest weight gradient of all: a small tensor such as out.bias's
    gradient (one sum of n terms, often much smaller than its terms) has a rounding error set by its terms,
    and a single entry gives no stable "2 x PyTorch" comparison of its own.
    """
    assert len(kernel) == len(ref64), f"d_weights: {len(kernel)} tensors, expected {len(ref64)}"
    global_scale = max((_finite_max(e.detach().double()) for e in ref64), default=0.0)
    for k, (a, e) in enumerate(zip(kernel, ref64)):
        assert a.shape == e.shape, f"d_weights[{k}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == dtype, f"d_weights[{k}]: dtype {a.dtype}, expected {dtype}"
        if a.numel() == 0:
            continue
        if dtype == torch.float64:
            a64, e64 = a.detach().double(), e.detach().double()
            assert torch.isfinite(a64).all(), f"d_weights[{k}]: non-finite entries"
            err, scale = (a64 - e64).abs().max().item(), _finite_max(e64)
            bound = WEIGHT_GRAD[dtype]["atol_rel"] * scale
            assert err <= bound, f"d_weights[{k}] (float64): max error {err:.3e} > {bound:.3e} (max|ref| {scale:.3e})"
        else:
            assert ref_same_dtype is not None, "the float32 rule needs the reference run in float32"
            assert_within_rule(a, e, ref_same_dtype[k], dtype, f"d_weights[{k}]", scale=global_scale)


def assert_close_rel_max(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str) -> None:
    """max|actual - expected| <= rel * max|expected|: for two kernel runs whose sums differ only in order."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * _finite_max(expected.double())
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


# Relative-to-max bound of assert_close_rel_max for the same kernel summing in another order (other n).
REORDERED_SUM = {torch.float64: 1e-11, torch.float32: 1e-5}
