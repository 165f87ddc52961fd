"""The three CPU ops alone at one N: forward (new state out), backward, in-place step (median of --calls).

Separates the kernels from autograd, and shows what the output cache saves:
  for v in 0 2048; do L2L_FAST_CPU_CACHE_MB=$v python benchmarks/bench_ops.py --n 1e6; done
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench_step import make_inputs
from l2l_fast import CoordinatewiseLSTM


def median_ms(fn, calls: int) -> float:
    fn()  # warm-up (first-touch of the outputs, thread pool)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=float, default=1e6)
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = int(args.n)
    net = CoordinatewiseLSTM()
    param, grad, state = make_inputs(net, n)  # the step benchmark's inputs: both preprocessing branches
    weights = [w.detach() for w in net.weights()]
    gen = torch.Generator().manual_seed(2)
    grad_update, grad_state = torch.randn(n, generator=gen), torch.randn(state.shape, generator=gen)
    ops = torch.ops.l2l_fast
    rows = {
        "forward (lstm_step)": lambda: ops.lstm_step(grad, state, weights, 10.0, 0.1),
        "backward (lstm_step_backward)": lambda: ops.lstm_step_backward(grad_update, grad_state, grad, state, weights,
                                                                        10.0, 0.1),
        "in-place step (lstm_step_)": lambda: ops.lstm_step_(param, grad, state, weights, 10.0, 0.1),
    }
    cache = os.environ.get("L2L_FAST_CPU_CACHE_MB", "default (2048)")
    print(f"N = {n:,}, {args.threads} threads, L2L_FAST_CPU_CACHE_MB = {cache}, median of {args.calls} calls")
    for name, fn in rows.items():
        print(f"  {name:32s} {median_ms(fn, args.calls):9.1f} ms")


if __name__ == "__main__":
    main()
