"""Meta-training throughput: the same truncated-unroll loop on the fused native op and on the eager
pure-PyTorch reference, measured side by side in one run.

    .venv/bin/python benchmarks/bench_meta.py --task mnist --meta-batch 4 --truncations 3

Rows with a coordinate fraction F < 1 backpropagate each truncation through a random fraction F of
the coordinates (`--coordinate-fraction` of `l2l-fast meta-train`); their ratio is still against the
exact reference loop.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from machine import machine_lines  # noqa: E402

from l2l_fast.meta.train import MetaTrainConfig, build_net  # noqa: E402
from l2l_fast.meta.unroll import CoordinateSample, loss_and_grad, truncation  # noqa: E402
from l2l_fast.tasks import TASKS, get_task  # noqa: E402


def truncations_per_second(backend: str, task, args, fraction: float = 1.0) -> tuple[float, int]:
    config = MetaTrainConfig(task=args.task, unroll=args.unroll, horizon=args.unroll, backend=backend)
    net = build_net(config)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    problems = task.sample(args.meta_batch, seed=0)
    params = problems.init_params()
    state = net.init_state(params.numel())
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    times = []
    generator = torch.Generator().manual_seed(0)
    for index in range(args.truncations + 1):  # the first one warms up
        start = time.perf_counter()
        sample = None if fraction == 1 else CoordinateSample(params.numel(), fraction, generator)
        meta_loss, _, params, grad, state = truncation(net, problems, params, grad, state, index * args.unroll,
                                                       args.unroll, sample=sample)
        optimizer.zero_grad()
        meta_loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    median = sorted(times[1:])[len(times[1:]) // 2]
    return 1.0 / median, params.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mnist", choices=list(TASKS))
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--truncations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25],
                        help="coordinate fractions (< 1) for extra native rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for line in machine_lines("cpu", args.threads):
        print(line)
    task = get_task(args.task).make({}, data_dir=args.data_dir)
    rows = {}
    for backend in ("native", "reference"):
        rows[backend] = truncations_per_second(backend, task, args)
    for fraction in args.fractions:
        rows[f"native, coordinate fraction {fraction:g}"] = truncations_per_second("native", task, args, fraction)
    coords = rows["native"][1]
    print(f"\ntask {args.task}, meta-batch {args.meta_batch} ({coords:,} coordinates), unroll {args.unroll}")
    print("| backend | truncations/s | meta-training steps/s | ratio |")
    print("|---|---|---|---|")
    for backend, (rate, _) in rows.items():
        print(f"| {backend} | {rate:.3f} | {rate * args.unroll:.2f} | {rate / rows['reference'][0]:.1f}x |")


if __name__ == "__main__":
    main()
