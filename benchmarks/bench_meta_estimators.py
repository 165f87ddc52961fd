"""How close is PES's meta-gradient to the whole episode's gradient, against truncated backprop's, and at what
cost? One episode of fresh problems with the weights held fixed (no Adam step), every meta-train flag as in
`l2l-fast meta-train`:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_meta_estimators.py --repeats 8 -- --task mixed \\
        --families quadratic convex logistic mlp --features moments --output tanh --horizon 100 --unroll 20 \\
        --meta-batch 8 --loss-scale initial --random-scale 2 --pes-pairs 4 --pes-sigma 0.01 [--init best.pt]

Rows: the gradient of the whole episode's meta-loss by backprop through all its steps (the target: what
neither estimator sees in one truncation), the sum over the episode's truncations of truncated backprop's
meta-gradients, and the same sum of PES's (one episode of --pes-pairs pairs per repeat): cosine with the
target, relative error, and seconds per truncation.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from machine import machine_lines  # noqa: E402

from l2l_fast.cli import _build_parser, _config_from_args  # noqa: E402
from l2l_fast.meta.pes import PESEpisode  # noqa: E402
from l2l_fast.meta.rescale import RescaledProblems  # noqa: E402
from l2l_fast.meta.train import build_net, load_initial_weights  # noqa: E402
from l2l_fast.meta.unroll import initial_state, loss_and_grad, problem_weights, truncation  # noqa: E402
from l2l_fast.tasks import get_task  # noqa: E402
from l2l_fast.tasks.base import seeded  # noqa: E402


def backprop_sum(net, problems, config, lengths: list[int], scale: float) -> tuple[torch.Tensor, float]:
    """Summed meta-gradients of truncations of `lengths` steps (float64 [d]) and seconds per truncation."""
    params = problems.init_params()
    state = initial_state(net, params.numel())
    losses, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    initial, start, total, seconds = losses.detach(), 0, 0, 0.0
    for steps in lengths:
        began = time.perf_counter()
        weights = problem_weights(config.loss_scale, losses, initial)
        net.zero_grad()
        meta_loss, history, params, grad, state = truncation(net, problems, params, grad, state, start, steps,
                                                             weights)
        (meta_loss * scale).backward()
        seconds += time.perf_counter() - began
        losses, start = history[-1], start + steps
        total = total + torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double()
    return total, seconds / len(lengths)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b / (a.norm() * b.norm())).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8, help="PES episodes (independent perturbations)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    args, rest = parser.parse_known_args()
    rest = [word for word in rest if word != "--"]
    torch.set_num_threads(args.threads)
    config = _config_from_args(_build_parser()[0].parse_args(["meta-train", *rest]))
    task = get_task(config.task).make(config.task_kwargs, data_dir=args.data_dir)
    problems = task.sample(config.meta_batch, seed=config.seed * 1_000_003, split="train")
    if config.random_scale > 0:
        problems = RescaledProblems.random(problems, config.random_scale, seeded(config.seed, 0, 4))
    shape = task.sample(1, seed=config.seed, split="val")
    net = build_net(config, shape.groups, shape.dim)
    if config.init:
        load_initial_weights(net, config.init, shape.groups, shape.dim)
    scale = 1.0 / (config.unroll * config.meta_batch)
    truncations = config.horizon // config.unroll
    full, full_seconds = backprop_sum(net, problems, config, [config.horizon], scale)
    tbptt, tbptt_seconds = backprop_sum(net, problems, config, [config.unroll] * truncations, scale)
    sums, pes_seconds = [], 0.0
    for repeat in range(args.repeats):
        episode = PESEpisode(net, problems, config.pes_pairs, config.pes_sigma)
        total = 0
        for index in range(truncations):
            began = time.perf_counter()
            result = episode.truncation(index * config.unroll, config.unroll, seeded(config.seed, repeat, index, 7),
                                        loss_scale=config.loss_scale, scale=scale)
            pes_seconds += time.perf_counter() - began
            total = total + result.gradient
        sums.append(total)
    sums = torch.stack(sums)
    mean = sums.mean(0)
    print("\n".join(machine_lines("cpu", args.threads)))
    print(f"task {config.task} {config.task_kwargs}, features {config.features}, output {config.output}, "
          f"horizon {config.horizon} in truncations of {config.unroll}, meta-batch {config.meta_batch}, "
          f"loss scale {config.loss_scale}, weights {config.init or 'fresh'}; PES {config.pes_pairs} pairs, sigma "
          f"{config.pes_sigma}, {args.repeats} episodes; |full gradient| {full.norm():.4g}\n")
    print("| estimator (sum over the episode) | cosine with full | relative error | s / truncation |")
    print("|---|---:|---:|---:|")
    print(f"| backprop through all {config.horizon} steps (target) | 1 | 0 | {full_seconds / truncations:.3f} |")
    print(f"| truncated backprop ({config.unroll} steps) | {cosine(tbptt, full):.3f} | "
          f"{((tbptt - full).norm() / full.norm()).item():.3f} | {tbptt_seconds:.3f} |")
    one = [cosine(s, full) for s in sums]
    errors = [((s - full).norm() / full.norm()).item() for s in sums]
    print(f"| PES, one episode of {config.pes_pairs} pairs (mean over {args.repeats}) | "
          f"{sum(one) / len(one):.3f} | {sum(errors) / len(errors):.3f} | "
          f"{pes_seconds / (args.repeats * truncations):.3f} |")
    print(f"| PES, mean of {args.repeats} episodes ({args.repeats * config.pes_pairs} pairs) | "
          f"{cosine(mean, full):.3f} | {((mean - full).norm() / full.norm()).item():.3f} | |")
    spread = sums.std(0).norm() / math.sqrt(args.repeats) / full.norm()
    print(f"\nstandard error of that mean, relative to |full|: {spread:.3f}")


if __name__ == "__main__":
    main()
