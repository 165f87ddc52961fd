"""The AMX kernels' outputs pinned bit for bit, both splits on the emulated tiles: SHA-256 digests of every output of
a fixed set of problems (forward, in-place step, backward, bf16 state, NaN / Inf, 1 and 2 threads), written by the
build before issue 21's split rework (17d652d). Splitting a float into bf16 pieces is exact arithmetic, so how the
kernels organise the split (one conversion for both layouts of the gate gradients, zero padding rows left unsplit,
the recompute's input pieces reused by the weight gradients) must not move a bit of the pieces or the products.

The kernels' activations refine vrcp14ps, whose 14-bit estimate a CPU of another vendor or generation may round
differently: the digests hold on CPUs whose float32 AVX-512 kernel (no tiles) gives the same bits as the writer's
(`fingerprint`, stored beside them); elsewhere the cases skip, saying so. The AMX results' accuracy is checked on
every CPU by tests/test_amx_products.py and tests/test_amx_backward.py against the float64 reference.

Regenerate only for an intended change of the AMX results, with the build whose results are the new reference:
    PYTHONPATH=<that build> python tests/test_amx_split_bits.py --write
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import VARIANTS, WEIGHT_KINDS, generator, native_step, requires_native, step_grads  # noqa: E402
from l2l_fast import ops  # noqa: E402
from test_amx_products import SPLITS, UNAVAILABLE, nonfinite_problem, problem, products  # noqa: E402
from test_multi_step import inputs as multi_inputs  # noqa: E402

pytestmark = [requires_native, pytest.mark.skipif(UNAVAILABLE["emulated"] is not None,
                                                  reason=str(UNAVAILABLE["emulated"]))]
DIGESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "amx_split_digests.json")
P, SCALE = 10.0, 0.1


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        t = t.detach().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _step_and_inplace(grad, state, weights, moments, up_u, up_s, features=1, output=0, raw_moments=None):
    """(inputs, outputs): step_grads' five outputs (moments: advanced) and the in-place step's param, state, moments
    (it advances raw_moments, else moments, itself)."""
    got = step_grads(native_step, grad, state, weights, P, SCALE, up_u, up_s, features, moments, output)
    param, state_ = torch.zeros_like(grad), state.clone()
    raw_moments = moments if raw_moments is None else raw_moments
    moments_ = None if raw_moments is None else raw_moments.clone()
    ops.lstm_step_(param, grad, state_, weights, P, SCALE, features, moments_, output)
    return [grad, state, *weights, moments, up_u, up_s], [*got[:4], *got[4], param, state_, moments_]


def _variant(features, output):
    gen = generator(2100 + 10 * features + output)
    grad, state, weights, moments, up_u, up_s = problem(gen, 20, 2, 130, features)
    return _step_and_inplace(grad, state, weights, moments, up_u, up_s, features, output)


def _shape(hidden, layers, kind):
    gen = generator(2200 + 100 * hidden + 10 * layers + WEIGHT_KINDS.index(kind))
    grad, state, weights, moments, up_u, up_s = problem(gen, hidden, layers, 133, kind=kind)
    return _step_and_inplace(grad, state, weights, moments, up_u, up_s)


def _nonfinite(seed):
    features, output, (grad, state, weights, up_u, up_s, moments), advanced = nonfinite_problem(
        seed, n=300, hidden=9, bad_states=3, bad_weights=[None, None, None, float("nan"), float("inf")],
        draw_offset=2300)
    ins, outs = _step_and_inplace(grad, state, weights, advanced, up_u, up_s, features, output, moments)
    return ins + [moments], outs


def _threads():
    """two ranges of whole tiles on 2 threads: their own weight-gradient sums"""
    grad, state, weights, _, up_u, up_s = problem(generator(2400), 20, 2, 40_003)
    outs, previous = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = step_grads(native_step, grad, state, weights, P, SCALE, up_u, up_s)
            outs += [*got[:4], *got[4]]
    finally:
        torch.set_num_threads(previous)
    return [grad, state, *weights, up_u, up_s], outs


def _multi_bf16_state():
    params, grads, state, weights = multi_inputs(generator(2500), [3, 4097, 1, 200, 0, 33], torch.float32,
                                                 state_dtype=torch.bfloat16)
    ins = [*params, *grads, state, *weights]
    params, state = [p.clone() for p in params], state.clone()
    ops.lstm_multi_step_(params, grads, state, weights, P, SCALE)
    return ins, [*params, state]


CASES = {f"variant-{f}-{o}": (lambda f=f, o=o: _variant(f, o)) for f, o in VARIANTS}
CASES.update({f"shape-{h}-{l}-{k}": (lambda h=h, l=l, k=k: _shape(h, l, k))
              for h, l in [(20, 2), (1, 1), (3, 3), (21, 2), (9, 1), (10, 2)] for k in WEIGHT_KINDS})
CASES.update({f"nonfinite-{s}": (lambda s=s: _nonfinite(s)) for s in range(8)})
CASES["threads"] = _threads
CASES["multi-bf16-state"] = _multi_bf16_state


def _fingerprint() -> str:
    """the float32 AVX-512 kernel (fast activations, no tiles) on a problem whose gates span the activations'
    range: its bits change with the CPU's vrcp14ps, as the AMX kernels' would"""
    from l2l_fast import _C

    previous = _C.cpu_isa(), _C.cpu_activations(), _C.cpu_products().split(" ")[0]
    try:
        _C.set_cpu_products("float32")
        _C.set_cpu_isa("avx512")
        _C.set_cpu_activations("fast")
        grad, state, weights, moments, up_u, up_s = problem(generator(2600), 20, 2, 4099, 3, kind="saturating")
        return _digest(_step_and_inplace(grad, state, weights, moments, up_u, up_s, 3, 1)[1])
    finally:
        _C.set_cpu_isa(previous[0])
        _C.set_cpu_activations(previous[1])
        _C.set_cpu_products(previous[2])


def _run(case: str, split: str) -> tuple[str, str]:
    with products(split, "emulated"):
        ins, outs = CASES[case]()
    return _digest(ins), _digest(outs)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_are_the_base_builds(case, split):
    with open(DIGESTS) as f:
        expected = json.load(f)
    if _fingerprint() != expected["fingerprint"]:
        pytest.skip("this CPU's vrcp14ps rounds otherwise than the one that wrote the digests (its float32 AVX-512 "
                    "kernel gives other bits): the AMX bits cannot match; accuracy is checked in test_amx_products")
    inputs, outputs = _run(case, split)
    if inputs != expected["inputs"][case]:
        pytest.skip(f"{case}: the test's inputs changed (their generator): regenerate the digests with the base build")
    assert outputs == expected["outputs"][split][case], f"{case} ({split}): not the base build's bits"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    table = {"inputs": {}, "outputs": {s: {} for s in SPLITS}, "fingerprint": _fingerprint()}
    for split in SPLITS:
        for case in CASES:
            table["inputs"][case], table["outputs"][split][case] = _run(case, split)
    with open(DIGESTS, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {DIGESTS} from {ops.__file__}")
