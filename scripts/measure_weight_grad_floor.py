"""The float32 kernels' weight-gradient error against the float32 rule of tests/tolerances.py (WEIGHT_GRAD,
assert_weight_grads_close): per problem, max over the entries of |kernel - ref64| / bound, over random problems of
test_nonfinite_policy's distribution (n 1..40, H 1..6, L 1..3, every feature set and output; finite inputs, some
non-finite gradients) with "init", "random" and "saturating" weights, on every instruction set this CPU runs.
Prints max / median / min of the ratio per (ISA, weights, features, output), and, for the sensitivity of the rule,
how many problems fail when the kernel's gradients are moved by `--perturb` relative (each entry times 1 + rel)
or by an added `--perturb` times max|ref64| of the tensor.

    python scripts/measure_weight_grad_floor.py SEED COUNT [--perturb 1e-3,1e-5] [--n-range 1,40]   # repository root
"""
import argparse
import collections
import statistics
import sys

sys.path.insert(0, "tests")
import torch  # noqa: E402

import test_nonfinite_policy as T  # noqa: E402
from conftest import available_cpu_isas  # noqa: E402
from l2l_fast import _C, ops, reference  # noqa: E402
from tolerances import weight_grad_bounds, weight_grad_derived_term  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("seed", type=int, nargs="?", default=0)
parser.add_argument("count", type=int, nargs="?", default=100, help="problems per ISA and weight kind")
parser.add_argument("--perturb", default="1e-3,1e-5,1e-6")
parser.add_argument("--isas", default=",".join(available_cpu_isas()))
parser.add_argument("--kinds", default="init,random,saturating")
parser.add_argument("--bad-grads", type=int, default=4, help="up to this many non-finite gradients")
parser.add_argument("--n-range", default="1,40", help="n uniform in this range (the tests' large n: 1000,65539)")
parser.add_argument("--hidden-range", default="1,6")
parser.add_argument("--worst", type=int, default=3, help="print this many worst problems")
args = parser.parse_args()
perturb = [float(x) for x in args.perturb.split(",") if x]
n_range, hidden_range = ([int(x) for x in r.split(",")] for r in (args.n_range, args.hidden_range))

import random  # noqa: E402

rng = random.Random(args.seed)
ratios = collections.defaultdict(list)
failed = collections.Counter()
worst = []
skipped = 0
for isa in args.isas.split(","):
    _C.set_cpu_isa(isa)
    for kind in args.kinds.split(","):
        for _ in range(args.count):
            pr = dict(n=rng.randint(*n_range), hidden=rng.randint(*hidden_range), layers=rng.randint(1, 3),
                      bad_grads=rng.randint(0, args.bad_grads), bad_states=0, bad_moments=0, bad_weight=None,
                      kind=kind, features=rng.choice(T.FEATURE_SETS), output=rng.choice(T.OUTPUTS),
                      seed=rng.randrange(2**32))
            grad, state, weights, up_u, up_s, previous = T.make_inputs(pr, torch.float32)
            moments = T.advanced(grad, previous)
            variant = dict(features=pr["features"], moments=moments, output=pr["output"])
            args32 = (grad, state, weights, 10.0, 0.1, up_u, up_s)
            got = T.step_grads(lambda *a: ops.lstm_step(*a), *args32, **variant)[4]
            ref64 = T.step_grads(reference.lstm_step, grad.double(), state.double(), [w.double() for w in weights],
                                 10.0, 0.1, up_u.double(), up_s.double(), pr["features"], T.to64(moments),
                                 pr["output"])[4]
            ref32 = T.step_grads(reference.lstm_step, *args32, **variant)[4]
            if not any(e.abs().max() > 0 for e in ref64 if e.numel()):
                skipped += 1  # every coordinate's gradient non-finite: nothing to compare
                continue
            bounds = weight_grad_bounds(ref64, ref32, weight_grad_derived_term(*args32, **variant))
            r = max(((a.double() - e).abs() / b).nan_to_num(0.0, posinf=float("inf")).max().item()
                    for a, e, b in zip(got, ref64, bounds) if a.numel())
            key = (isa, kind, "moments" if moments is not None else "paper", ("linear", "tanh")[pr["output"]])
            ratios[key].append(r)
            worst.append((r, key, pr))
            for rel in perturb:
                for how in ("relative", "absolute"):
                    moved = [a.double() * (1 + rel) if how == "relative" else a.double() + rel * e.abs().max()
                             for a, e in zip(got, ref64)]
                    if any(((m - e).abs() > b).any() for m, e, b in zip(moved, ref64, bounds) if m.numel()):
                        failed[(isa, how, rel)] += 1
print(f"{'isa':8} {'weights':10} {'features':8} {'output':6} {'count':>5} {'max':>8} {'median':>8} {'min':>8}")
for key, rs in sorted(ratios.items()):
    print(f"{key[0]:8} {key[1]:10} {key[2]:8} {key[3]:6} {len(rs):5} {max(rs):8.3f} {statistics.median(rs):8.3f} "
          f"{min(rs):8.4f}")
allr = [r for rs in ratios.values() for r in rs]
print(f"all: {len(allr)} problems ({skipped} without a finite coordinate skipped), max {max(allr):.3f}, median {statistics.median(allr):.3f}, min {min(allr):.4f}")
per_isa = collections.Counter(k[0] for k in ratios for _ in ratios[k])
for (isa, how, rel), count in sorted(failed.items()):
    print(f"perturbed {how} {rel:g} on {isa}: {count} of {per_isa[isa]} problems fail")
for r, key, pr in sorted(worst, key=lambda w: -w[0])[:args.worst]:
    print(f"worst {r:.3f} {key} {pr}")
