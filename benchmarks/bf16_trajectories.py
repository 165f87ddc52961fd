"""What do single-bf16 gate products (l2l_fast.ops.set_cpu_products("bf16"), csrc/cpu/PRODUCTS.md) do to the
trajectories of LearnedOptimizer on real models?

Per model and seed, three copies of the model start from the same weights and see the same mini-batches, each
stepped by its own LearnedOptimizer (the shipped net, default "general"): with the float32 gate products (the
reference run), with the bf16 ones, and, as a control for how far any tiny difference grows, with float32 products
and the precise activations (a perturbation of ~1e-7 per activation, csrc/cpu/ACTIVATIONS.md). Reported per run:
the training loss over the last tenth of the steps (mean), the test loss at the end, their ratio to the reference
run's, and the parameter divergence from the reference run, ||theta - theta_f32|| / ||theta_f32 - theta_0|| (over
all parameters; the largest over the run, checked every 10 steps, and at the end).

    L2L_FAST_DATA=/work/shared/datasets python benchmarks/bf16_trajectories.py --steps 1000 --seeds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import machine  # noqa: E402

from l2l_fast import LearnedOptimizer, ops  # noqa: E402
from l2l_fast.data.mnist import load_mnist  # noqa: E402
from l2l_fast.data.tabular import load_tabular  # noqa: E402

VARIANTS = {"f32": dict(products="float32", activations="fast"), "bf16": dict(products="bf16", activations="fast"),
            "control": dict(products="float32", activations="precise")}


def mnist(data_dir):
    (x, y), (xt, yt) = load_mnist("train", data_dir), load_mnist("test", data_dir)
    return x, y, xt, yt


def digits(_data_dir):
    x, y = load_tabular("digits")
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


# name -> (data, model builder, batch size)
MODELS = {
    "mnist_mlp20_sigmoid": (mnist, lambda: nn.Sequential(nn.Linear(784, 20), nn.Sigmoid(), nn.Linear(20, 10)), 128),
    "mnist_mlp64_relu": (mnist, lambda: nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)), 128),
    "digits_cnn": (digits, lambda: nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                                                 nn.Flatten(), nn.Linear(16 * 4 * 4, 10)), 64),
}


def settings(products: str, activations: str) -> None:
    ops.set_cpu_products("float32")  # the bf16 build has the fast activations only: switch them with float32 on
    from l2l_fast import _C
    _C.set_cpu_activations(activations)
    ops.set_cpu_products(products)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(name: str, seed: int, steps: int, data_dir, pretrained: str) -> dict:
    data, build, batch = MODELS[name]
    x, y, xt, yt = data(data_dir)
    torch.manual_seed(seed)
    first = build()
    models = {v: build() for v in VARIANTS}
    for m in models.values():
        m.load_state_dict(first.state_dict())
    optims = {v: LearnedOptimizer(m.parameters(), pretrained=pretrained) for v, m in models.items()}
    theta0 = flat(first)
    batches = torch.Generator().manual_seed(1000 + seed)
    losses = {v: [] for v in VARIANTS}
    worst = {v: 0.0 for v in VARIANTS}
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=batches)
        for v, m in models.items():
            loss = nn.functional.cross_entropy(m(x[idx]), y[idx])
            optims[v].zero_grad()
            loss.backward()
            settings(**VARIANTS[v])
            optims[v].step()
            losses[v].append(loss.item())
        if step % 10 == 9 or step == steps - 1:
            ref = flat(models["f32"])
            travelled = (ref - theta0).norm().item()
            for v in VARIANTS:
                worst[v] = max(worst[v], (flat(models[v]) - ref).norm().item() / travelled)
    settings("float32", "fast")
    ref = flat(models["f32"])
    out = {}
    with torch.no_grad():
        for v, m in models.items():
            tail = losses[v][-max(1, steps // 10):]
            out[v] = dict(train=statistics.fmean(tail), test=nn.functional.cross_entropy(m(xt), yt).item(),
                          acc=(m(xt).argmax(1) == yt).double().mean().item(), worst=worst[v],
                          final=(flat(m) - ref).norm().item() / (ref - theta0).norm().item(),
                          diverged=not all(map(lambda l: l == l and l < 1e6, losses[v])))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrained", default="general")
    parser.add_argument("--data-dir", default=None, help="MNIST's folder (default: L2L_FAST_DATA and the usual places)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        settings("bf16", "fast")
    except (RuntimeError, ValueError, AttributeError) as error:
        raise SystemExit(f"bf16 products unavailable here: {error}")
    settings("float32", "fast")
    print(f"bf16_trajectories: LearnedOptimizer(pretrained={args.pretrained!r}), {args.steps} steps, seeds "
          f"0..{args.seeds - 1}, {args.threads} thread(s); {machine.cpu_model()}, torch {torch.__version__}")
    print("divergence = ||theta - theta_f32|| / ||theta_f32 - theta_0|| (max over the run / at the end); train = "
          "mean training loss over the last tenth of the steps; control = float32 products, precise activations\n")
    print("| model | seed | train f32 | train bf16 | bf16/f32 | test f32 | test bf16 | bf16/f32 | acc f32 / bf16 | "
          "divergence bf16 (max / end) | control train, test / f32 | control divergence (max / end) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    started, summary = time.perf_counter(), []
    for name in args.models:
        ratios, f32_train, tests = [], [], []
        for seed in range(args.seeds):
            r = run(name, seed, args.steps, args.data_dir, args.pretrained)
            ratios.append(r["bf16"]["train"] / r["f32"]["train"])
            f32_train.append(r["f32"]["train"])
            tests.append((r["bf16"]["test"] / r["f32"]["test"], r["control"]["test"] / r["f32"]["test"]))
            f, b, c = r["f32"], r["bf16"], r["control"]
            flag = " (diverged)" if b["diverged"] or f["diverged"] else ""
            print(f"| {name}{flag} | {seed} | {f['train']:.4g} | {b['train']:.4g} | {b['train'] / f['train']:.3f} | "
                  f"{f['test']:.4g} | {b['test']:.4g} | {b['test'] / f['test']:.3f} | {f['acc']:.4f} / {b['acc']:.4f} | "
                  f"{b['worst']:.2e} / {b['final']:.2e} | {c['train'] / f['train']:.3f}, {c['test'] / f['test']:.3f} | "
                  f"{c['worst']:.2e} / {c['final']:.2e} |", flush=True)
        summary.append(f"- {name}: train loss bf16 / f32 {statistics.fmean(ratios):.4f} on average over the seeds "
                       f"(from {min(ratios):.4f} to {max(ratios):.4f}); for scale, the f32 runs' train loss varies by "
                       f"{max(f32_train) / min(f32_train):.3f}x between seeds (other initialisations and batches); "
                       f"test loss bf16 / f32 {statistics.fmean(t[0] for t in tests):.3f}, control / f32 "
                       f"{statistics.fmean(t[1] for t in tests):.3f}")
    print("\n" + "\n".join(summary))
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"\n{time.perf_counter() - started:.0f} s{load}")


if __name__ == "__main__":
    main()
