"""Worst excess of the float32 kernels' elementwise outputs (update, new_state, d_grad, d_state) over ELEMENTWISE's
rtol and atol, relative to each tensor's max (what atol_rel in tests/tolerances.py must cover), over random problems
of test_nonfinite_policy's kind (non-finite gradients, states and moments included), per (ISA, output, features).
Prints the problem of any excess above 3e-5.

    python scripts/measure_elementwise_excess.py SEED COUNT     # from the repository root, e.g. 1 1500 (~1 min)
"""
import random, sys, collections
sys.path.insert(0, "tests")
import torch
from l2l_fast import ops, reference, _C
import test_nonfinite_policy as T
from conftest import available_cpu_isas
rng = random.Random(int(sys.argv[1])); count = int(sys.argv[2])
worst = collections.defaultdict(lambda: (0.0, None))
for isa in available_cpu_isas():
    _C.set_cpu_isa(isa)
    for _ in range(count):
        pr = dict(n=rng.randint(1, 40), hidden=rng.randint(1, 6), layers=rng.randint(1, 3), bad_grads=rng.randint(0,3), bad_states=rng.randint(0,3),
                  bad_moments=rng.randint(0,3), bad_weight=None, kind=rng.choice(["init", "random"]),
                  features=rng.choice(T.FEATURE_SETS), output=rng.choice(T.OUTPUTS), seed=rng.randrange(2**32))
        grad, state, weights, up_u, up_s, previous = T.make_inputs(pr, torch.float32)
        moments = T.advanced(grad, previous)
        variant = dict(features=pr["features"], moments=moments, output=pr["output"])
        got = T.step_grads(lambda *a: ops.lstm_step(*a), grad, state, weights, 10.0, 0.1, up_u, up_s, **variant)
        ref = T.step_grads(reference.lstm_step, grad.double(), state.double(), [w.double() for w in weights], 10.0, 0.1, up_u.double(), up_s.double(), pr["features"], T.to64(moments), pr["output"])
        for name, a, e in zip(("update","new_state","d_grad","d_state"), got[:4], ref[:4]):
            a = a.double(); ok = torch.isfinite(e) & torch.isfinite(a)
            if not ok.any(): continue
            a, e = a[ok], e[ok]
            m = e.abs().max().item()
            if m == 0: continue
            need = ((a - e).abs() - 1e-5 * e.abs() - 1e-8).max().item() / m
            key = (isa, name, "moments" if moments is not None else "paper")
            if need > worst[key][0]: worst[key] = (need, pr)
for k, (v, pr) in sorted(worst.items()):
    print(k, f"{v:.2e}", pr if v > 3e-5 else "")
