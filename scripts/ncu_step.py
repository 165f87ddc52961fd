"""One in-place step of the paper's optimizer (hidden 20, 2 layers, float32) over N coordinates, for a profiler:
`calls` steps, so that `ncu --launch-skip` can skip the warm-up ones. The gate kernel is L2L_FAST_CUDA_GATES's
(ffma by default, mma: csrc/cuda/gate_variant.h); with --op backward, `calls` backwards of one step instead
(lstm_step_backward; its variant is L2L_FAST_CUDA_BACKWARD's: ffma, mma, mma_wgrad). scripts/gpu_run.sh runs it
under ncu:

  L2L_FAST_CUDA_GATES=mma ncu --clock-control none -k regex:forward_ --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats python scripts/ncu_step.py --n 1e7
  L2L_FAST_CUDA_BACKWARD=mma ncu ... -k regex:backward_kernel ... python scripts/ncu_step.py --n 1e7 --op backward
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from l2l_fast import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=float, default=1e7)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: the multi-tensor step with a bfloat16 state (one tensor)")
    parser.add_argument("--op", choices=("step", "backward"), default="step",
                        help="backward: lstm_step_backward with random upstream gradients (float32 state)")
    args = parser.parse_args()
    if args.op == "backward" and args.state_dtype != "float32":
        parser.error("--op backward: the backward takes its state in grad's dtype (float32 here)")
    n = int(args.n)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = []
    for inputs in (2, 20):
        weights += [torch.randn(80, inputs, generator=gen, device="cuda") / inputs**0.5,
                    torch.randn(80, 20, generator=gen, device="cuda") / 20**0.5,
                    0.1 * torch.randn(80, generator=gen, device="cuda"),
                    0.1 * torch.randn(80, generator=gen, device="cuda")]
    weights += [torch.randn(1, 20, generator=gen, device="cuda") / 20**0.5, torch.zeros(1, device="cuda")]
    grad = torch.randn(n, generator=gen, device="cuda") * 1e-3
    param = torch.zeros(n, device="cuda")
    state = torch.randn(2, 2, 20, n, generator=gen, device="cuda").clamp_(-1, 1)
    if args.state_dtype == "bfloat16":
        state = state.to(torch.bfloat16)
    if args.op == "backward":
        up_u, up_s = torch.randn_like(grad), torch.randn_like(state)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.calls):
        if args.op == "backward":
            d_weights = torch.ops.l2l_fast.lstm_step_backward(up_u, up_s, grad, state, weights, 10.0, 0.1)[2]
        elif args.state_dtype == "bfloat16":
            torch.ops.l2l_fast.lstm_multi_step_([param], [grad], state, weights, 10.0, 0.1)
        else:
            ops.lstm_step_(param, grad, state, weights, 10.0, 0.1)
    torch.cuda.synchronize()
    variant = (f"backward={os.environ.get('L2L_FAST_CUDA_BACKWARD') or 'ffma'}" if args.op == "backward"
               else f"gates={os.environ.get('L2L_FAST_CUDA_GATES') or 'ffma'}")
    finite = all(bool(torch.isfinite(w).all()) for w in d_weights) if args.op == "backward" else bool(
        torch.isfinite(param).all())
    print(f"ncu_step: {args.calls} {args.op}s, n={n:,}, {args.state_dtype} state, {variant}, "
          f"{(time.perf_counter() - start) / args.calls * 1e3:.2f} ms per {args.op} (wall, profiler overhead included), "
          f"finite: {finite}")


if __name__ == "__main__":
    main()
