"""Excess of the float32 kernels' weight-gradient error over 2x PyTorch float32's, relative to the largest weight
gradient, over random problems of test_nonfinite_policy's distribution (no non-finite values): what the float32
rule's floor_rel in tests/tolerances.py (WEIGHT_GRAD) must cover. Prints the worst per (ISA, features, output).

    python scripts/measure_weight_grad_floor.py SEED COUNT     # from the repository root, e.g. 1 400
"""
import random, sys, collections
sys.path.insert(0, "tests")
import torch
from l2l_fast import ops, reference, _C
import test_nonfinite_policy as T
from conftest import available_cpu_isas

rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
count = int(sys.argv[2]) if len(sys.argv) > 2 else 300
worst = collections.defaultdict(float)
for isa in [i for i in available_cpu_isas()]:
    _C.set_cpu_isa(isa)
    for _ in range(count):
        pr = dict(n=rng.randint(1, 40), hidden=rng.randint(1, 6), layers=rng.randint(1, 3), bad_grads=0, bad_states=0,
                  bad_moments=0, bad_weight=None, kind=rng.choice(["init", "random"]),
                  features=rng.choice(T.FEATURE_SETS), output=rng.choice(T.OUTPUTS), seed=rng.randrange(2**32))
        grad, state, weights, up_u, up_s, previous = T.make_inputs(pr, torch.float32)
        moments = T.advanced(grad, previous)
        variant = dict(features=pr["features"], moments=moments, output=pr["output"])
        got = T.step_grads(lambda *a: ops.lstm_step(*a), grad, state, weights, 10.0, 0.1, up_u, up_s, **variant)[4]
        ref64 = T.step_grads(reference.lstm_step, grad.double(), state.double(), [w.double() for w in weights],
                             10.0, 0.1, up_u.double(), up_s.double(), pr["features"], T.to64(moments),
                             pr["output"])[4]
        ref32 = T.step_grads(reference.lstm_step, grad, state, weights, 10.0, 0.1, up_u, up_s, **variant)[4]
        scale = max(e.abs().max().item() for e in ref64)
        for a, e, r in zip(got, ref64, ref32):
            err = (a.double() - e).abs().max().item()
            rerr = (r.double() - e).abs().max().item()
            key = (isa, "moments" if moments is not None else "paper", pr["output"])
            worst[key] = max(worst[key], (err - 2 * rerr) / scale)
for k, v in sorted(worst.items()):
    print(k, f"{v:.3e}")
