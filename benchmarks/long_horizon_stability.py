"""Does a learned optimizer stay stable far past its meta-training horizon? Runs it on entries of a suite for
`--steps` steps (issue 19: at least 10x its longest training episode) on the suite's test problems and reports,
per entry, its diverged runs (the suite's rule: a loss NaN or infinite, or above 10x the initial loss, at any
step), its final loss over its initial loss and the step of its lowest mean loss. No baseline is run: this
measures stability, not quality (the suite does that).

    L2L_FAST_DATA=../shared/datasets python benchmarks/long_horizon_stability.py --optimizer pretrained:general \
        --steps 20000 --entries linreg_10_2000 teacher_mse_2000 mnist_20_relu_2000 --out runs/stability.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import cpu_model

from l2l_fast.cli import load_optimizer_spec
from l2l_fast.meta.suite import SEED, diverged_runs, get_suite
from l2l_fast.meta.unroll import run_learned
from l2l_fast.tasks import get_task


def stability(spec: str, suite: str, labels: list[str], steps: int, problems: int, data_dir=None) -> list[dict]:
    entries = {e.label: e for e in get_suite(suite).entries}
    unknown = [label for label in labels if label not in entries]
    if unknown:
        raise SystemExit(f"entries {unknown} are not in suite {suite!r}: {sorted(entries)}")
    rows = []
    for label in labels:
        e = entries[label]
        task = get_task(e.task).make(e.kwargs, data_dir=data_dir)
        _, net = load_optimizer_spec(spec, task)
        test = task.sample(problems, seed=SEED, split="test")
        started = time.perf_counter()
        losses = run_learned(net, test, steps).double()  # [steps + 1, P]
        mean = losses.mean(1)
        rows.append({"entry": label, "steps": steps, "problems": problems,
                     "diverged_runs": int(diverged_runs(losses).sum()),
                     "final_over_initial": (losses[-1] / losses[0]).tolist(),
                     "max_over_initial": (losses.max(0).values / losses[0]).tolist(),
                     "best_mean_step": int(mean.argmin()), "final_mean": mean[-1].item(),
                     "best_mean": mean.min().item(), "seconds": round(time.perf_counter() - started, 1)})
        print(f"{label}: {rows[-1]['diverged_runs']}/{problems} diverged over {steps} steps; final mean loss "
              f"{rows[-1]['final_mean']:.4g} (lowest {rows[-1]['best_mean']:.4g} at step {rows[-1]['best_mean_step']}), "
              f"{rows[-1]['seconds']} s", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", default="pretrained:general", help="pretrained:NAME or a weight file")
    parser.add_argument("--suite", default="general")
    parser.add_argument("--entries", nargs="+", required=True, help="suite entry labels")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = stability(args.optimizer, args.suite, args.entries, args.steps, args.problems, args.data_dir)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"optimizer": args.optimizer, "machine": cpu_model(),
                                        "threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
