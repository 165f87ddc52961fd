"""The float32 kernels' weight-gradient error against PyTorch float32's at large n: per problem, per weight tensor,
max|kernel - ref64| / max|ref32 - ref64| (tests/tolerances.py's WEIGHT_GRAD rule allows 2, plus a derived term). The
small-n distribution is scripts/measure_weight_grad_floor.py's; this one runs the shipped size (H = 20, L = 2) at
n up to 262,147, where the kernel's float chains (csrc/cpu/kernel_body.inc, "float products' backward") and
PyTorch's GEMM sums are longest.

    python scripts/weight_grad_error_large_n.py [SEED]     # from the repository root; ~4 min on 2 cores

Columns: n, feature mask, weight kind, then the ratio for each weight tensor (the net's packed order).
"""
import random
import sys

sys.path.insert(0, "tests")
import torch

from l2l_fast import ops, reference
import test_nonfinite_policy as T

torch.set_num_threads(2)
rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
worst_excess = 0.0
for n in [1025, 16411, 65539, 262147]:
    for trial in range(3):
        for features in T.FEATURE_SETS[:2]:
            pr = dict(n=n, hidden=20, layers=2, bad_grads=0, bad_states=0, bad_moments=0, bad_weight=None,
                      kind=rng.choice(["init", "random"]), features=features, output=0, seed=rng.randrange(2**32))
            grad, state, weights, up_u, up_s, previous = T.make_inputs(pr, torch.float32)
            moments = T.advanced(grad, previous)
            variant = dict(features=features, moments=moments, output=0)
            got = T.step_grads(lambda *a: ops.lstm_step(*a), grad, state, weights, 10.0, 0.1, up_u, up_s, **variant)[4]
            ref64 = T.step_grads(reference.lstm_step, grad.double(), state.double(), [w.double() for w in weights],
                                 10.0, 0.1, up_u.double(), up_s.double(), features, T.to64(moments), 0)[4]
            ref32 = T.step_grads(reference.lstm_step, grad, state, weights, 10.0, 0.1, up_u, up_s, **variant)[4]
            scale = max(e.abs().max().item() for e in ref64)
            ratios = []
            for a, e, r in zip(got, ref64, ref32):
                err, ref_err = (a.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
                ratios.append(err / max(ref_err, 1e-30))
                worst_excess = max(worst_excess, (err - 2 * ref_err) / scale)
            print(n, features, pr["kind"], " ".join(f"{x:.2f}" for x in ratios), flush=True)
print(f"largest excess over 2x PyTorch's error, relative to the largest weight gradient: {worst_excess:.3e}")
