"""Worst error / bound of the float32 kernels' elementwise outputs (update, new_state, d_grad, d_state) under
tests/tolerances.py's ELEMENTWISE rule, over random problems of test_nonfinite_policy's kind (non-finite gradients,
states and moments included), per (ISA, output, features): "rule" without and "with slopes" with d grad's
feature_slope_bound (what the tests assert). A ratio above 1 fails. Also the largest error relative to the tensor's
max beyond rtol and atol (what atol_rel alone would have to cover). Prints the problem of any ratio above 0.5.

    python scripts/measure_elementwise_excess.py SEED COUNT     # from the repository root, e.g. 1 1500 (~3 min)
"""
import collections
import random
import sys

sys.path.insert(0, "tests")
import torch  # noqa: E402

import test_nonfinite_policy as T  # noqa: E402
from conftest import available_cpu_isas  # noqa: E402
from l2l_fast import _C, ops, reference  # noqa: E402
from tolerances import ELEMENTWISE, feature_slope_bound  # noqa: E402

TOL = ELEMENTWISE[torch.float32]
rng = random.Random(int(sys.argv[1]))
count = int(sys.argv[2])
worst = collections.defaultdict(lambda: [0.0, 0.0, 0.0, None])  # excess / max, ratio by the rule, with slopes, problem
for isa in available_cpu_isas():
    _C.set_cpu_isa(isa)
    for _ in range(count):
        pr = dict(n=rng.randint(1, 40), hidden=rng.randint(1, 6), layers=rng.randint(1, 3), bad_grads=rng.randint(0, 3),
                  bad_states=rng.randint(0, 3), bad_moments=rng.randint(0, 3), bad_weight=None,
                  kind=rng.choice(["init", "random"]), features=rng.choice(T.FEATURE_SETS), output=rng.choice(T.OUTPUTS),
                  seed=rng.randrange(2**32))
        grad, state, weights, up_u, up_s, previous = T.make_inputs(pr, torch.float32)
        moments = T.advanced(grad, previous)
        variant = dict(features=pr["features"], moments=moments, output=pr["output"])
        got = T.step_grads(lambda *a: ops.lstm_step(*a), grad, state, weights, 10.0, 0.1, up_u, up_s, **variant)
        ref = T.step_grads(reference.lstm_step, grad.double(), state.double(), [w.double() for w in weights], 10.0,
                           0.1, up_u.double(), up_s.double(), pr["features"], T.to64(moments), pr["output"])
        slopes = feature_slope_bound(grad, state, weights, 10.0, 0.1, up_u, up_s, **variant)
        for name, a, e in zip(("update", "new_state", "d_grad", "d_state"), got[:4], ref[:4]):
            a = a.double()
            ok = torch.isfinite(e) & torch.isfinite(a)
            if not ok.any():
                continue
            m = e[ok].abs().max().item()
            if m == 0:
                continue
            err = (a - e).abs()[ok]
            rule = TOL["atol_rel"] * m + TOL["rtol"] * e[ok].abs() + TOL["atol"]
            extra = slopes[ok] if name == "d_grad" else torch.zeros_like(rule)
            row = worst[(isa, name, "moments" if moments is not None else "paper")]
            row[0] = max(row[0], ((err - rule + TOL["atol_rel"] * m).max().item()) / m)
            row[1] = max(row[1], (err / rule).max().item())
            ratio = (err / (rule + extra)).max().item()
            if ratio > row[2]:
                row[2], row[3] = ratio, pr
for k, (excess, rule, slopes, pr) in sorted(worst.items()):
    print(k, f"excess/max {excess:.2e}  rule {rule:.2f}  with slopes {slopes:.2f}", pr if slopes > 0.5 else "")
