"""Is one build of the kernels faster than another, measured alternately on a machine whose load drifts?

Each round runs, for every checkout given, one child process with that checkout first on sys.path (its own
l2l_fast and _C), which times the fused step_ and fwd+bwd of bench_step.py (same weights, inputs and timer)
at one N; rounds alternate the checkouts, so a load that comes and goes hits all of them alike. Prints every
sample, then per checkout the median over rounds and the speed-up of each checkout over the first.

  git worktree add ../l2l-main main && (cd ../l2l-main && python setup.py build_ext --inplace)
  python benchmarks/ab_builds.py ../l2l-main . --sizes 1e6 --rounds 3 --threads 2
  python benchmarks/ab_builds.py ../l2l-base .@float32 .@bf16 --sizes 1e6 --rounds 5   # products per checkout
  python benchmarks/ab_builds.py . .@float32 .@amx-bf16x3 .@amx-bf16x6 --sizes 1e6 --rounds 5   # on an AMX CPU

A checkout written PATH@PRODUCTS runs its child with L2L_FAST_CPU_PRODUCTS=PRODUCTS (float32, bf16, amx-bf16x3 or
amx-bf16x6: the child must report exactly that, so emulated AMX tiles are refused, never timed); a plain
PATH runs with that variable removed (its build's default; builds without the switch ignore it).

--optimizer times, in the same children, the drop-in LearnedOptimizer's opt.step() on bench_optimizer.py's
11.6M-parameter transformer (150 tensors, gradients of one backward kept; float32 and bfloat16 state) instead of
step_ and fwd+bwd at N: what a user of the optimizer gets from a build.

  python benchmarks/ab_builds.py ../l2l-base .@float32 .@bf16 --optimizer --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, os, sys, torch
sys.path.insert(0, {bench!r})
import bench_step, machine
import l2l_fast
from l2l_fast import _C
torch.set_num_threads({threads})
net = bench_step.make_net(20, 2, "cpu", "native")
out = {{"activations": _C.cpu_activations() if hasattr(_C, "cpu_activations") else "precise (build without the switch)",
       "products": _C.cpu_products() if hasattr(_C, "cpu_products") else "float32 (build without the switch)",
       "isa": _C.cpu_isa(), "where": os.path.dirname(os.path.dirname(os.path.abspath(l2l_fast.__file__)))}}
for name, build in (("step_", bench_step.step_fn), ("fwd+bwd", bench_step.fwdbwd_fn)):
    fn = build(net, {n})
    fn()
    out[name] = machine.timeit(fn, threads={threads}, min_run_time={min_run_time}).median
    del fn
out["size"] = {n}
out["load"] = os.getloadavg()[0]
print(json.dumps(out))
"""

# The drop-in optimizer instead: opt.step() on bench_optimizer's transformer (its default sizes), gradients kept.
OPTIMIZER_CHILD = r"""
import argparse, json, os, sys, torch
sys.path.insert(0, {bench!r})
import bench_optimizer, machine
import l2l_fast
from l2l_fast import CoordinatewiseLSTM, LearnedOptimizer, _C
torch.set_num_threads({threads})
args = bench_optimizer.parse_args([])
batch = bench_optimizer.make_batch(args)
net = CoordinatewiseLSTM.from_pretrained("mnist")
out = {{"activations": _C.cpu_activations() if hasattr(_C, "cpu_activations") else "precise (build without the switch)",
       "products": _C.cpu_products() if hasattr(_C, "cpu_products") else "float32 (build without the switch)",
       "isa": _C.cpu_isa(), "where": os.path.dirname(os.path.dirname(os.path.abspath(l2l_fast.__file__)))}}
for name, dtype in (("opt.step fp32 state", torch.float32), ("opt.step bf16 state", torch.bfloat16)):
    model = bench_optimizer.make_model(args)
    out["size"] = sum(p.numel() for p in model.parameters())
    opt = LearnedOptimizer(model.parameters(), net, state_dtype=dtype)
    bench_optimizer.loss_of(model, batch).backward()
    opt.step()
    out[name] = machine.timeit(opt.step, threads={threads}, min_run_time={min_run_time}).median
    del opt, model
out["load"] = os.getloadavg()[0]
print(json.dumps(out))
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="+", help="repository roots (each with its built l2l_fast/_C)")
    parser.add_argument("--sizes", type=float, default=1e6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--optimizer", action="store_true",
                        help="time the drop-in LearnedOptimizer's step on bench_optimizer's transformer instead")
    args = parser.parse_args(argv)
    n = int(args.sizes)
    samples = {c: [] for c in args.checkouts}
    names = ("opt.step fp32 state", "opt.step bf16 state") if args.optimizer else ("step_", "fwd+bwd")
    print(f"ab_builds: {'the drop-in optimizer on the transformer' if args.optimizer else f'N = {n:,}'}, {args.threads} threads, {args.rounds} rounds over {len(args.checkouts)} checkouts")
    for r in range(args.rounds):
        for checkout in args.checkouts:
            path, _, products = checkout.partition("@")
            root = os.path.abspath(path)
            code = (OPTIMIZER_CHILD if args.optimizer else CHILD).format(bench=HERE, threads=args.threads, n=n,
                                                                         min_run_time=args.min_run_time)
            env = dict(os.environ, PYTHONPATH=root)
            env.pop("L2L_FAST_CPU_PRODUCTS", None)
            env.pop("L2L_FAST_CPU_AMX_EMULATE", None)  # time real tiles only
            if products:
                env["L2L_FAST_CPU_PRODUCTS"] = products
            result = json.loads(subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True,
                                               capture_output=True, text=True).stdout.strip().splitlines()[-1])
            samples[checkout].append(result)
            if products and result["products"] != products:
                raise SystemExit(f"{checkout}: the child ran with {result['products']} products")
            print(f"round {r + 1} {checkout} ({result['isa']}, {result['activations']} activations, "
                  f"{result['products']} products): "
                  + ", ".join(f"{name} {result[name] * 1e3:.1f} ms" for name in names) + f", load {result['load']:.2f}",
                  flush=True)
    first = args.checkouts[0]
    print(f"load average: {samples[first][0]['load']:.2f} after the first sample, "
          f"{samples[args.checkouts[-1]][-1]['load']:.2f} after the last")
    for name in names:
        base = statistics.median(s[name] for s in samples[first])
        for checkout in args.checkouts:
            med = statistics.median(s[name] for s in samples[checkout])
            ratios = [b[name] / s[name] for b, s in zip(samples[first], samples[checkout])]
            size = samples[checkout][0]["size"]  # coordinates, or the model's parameters
            print(f"{name:8s} {checkout}: median {med * 1e3:.1f} ms, {size / med / 1e6:.2f} Mcoord/s, speed-up over "
                  f"{first} {base / med:.3f}x (per round {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
