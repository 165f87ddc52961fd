"""Every CUDA kernel once, on small inputs, checked against the reference: the program that
scripts/gpu_run.sh runs under compute-sanitizer (memcheck, racecheck), so it must stay small and quick.

Covers: the compiled-in size (hidden 20, 2 layers) and the run-time-sized kernels (hidden 3 and 33),
float32 and float64, a backward whose blocks loop over several tiles (n > blocks x 128), the in-place
step, and the multi-tensor step with mixed parameter dtypes, bfloat16 state and more tensors than one
launch takes. Exits non-zero on a mismatch.

  python scripts/cuda_smoke.py [--n-backward 40000]
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from l2l_fast import ops, reference


def weights_for(H, L, dtype, gen):
    out = []
    for l in range(L):
        inputs = 2 if l == 0 else H
        out += [torch.randn(4 * H, inputs, generator=gen) / math.sqrt(inputs), torch.randn(4 * H, H, generator=gen) / math.sqrt(H),
                0.5 * torch.randn(4 * H, generator=gen), 0.5 * torch.randn(4 * H, generator=gen)]
    out += [torch.randn(1, H, generator=gen) / math.sqrt(H), 0.5 * torch.randn(1, generator=gen)]
    return [w.to(dtype).cuda() for w in out]


def inputs(n, H, L, dtype, gen):
    grad = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 6)
    if n > 10:
        grad[3], grad[7] = math.nan, math.inf
    state = torch.cat([torch.tanh(torch.randn(L, 1, H, n, generator=gen)), torch.randn(L, 1, H, n, generator=gen)], 1)
    return grad.to(dtype).cuda(), state.to(dtype).cuda(), weights_for(H, L, dtype, gen)


def close(name, got, expected, tol):
    err = (got.double().cpu() - expected.double().cpu()).abs().max().item() if got.numel() else 0.0
    scale = max(expected.double().abs().max().item() if expected.numel() else 0.0, 1e-30)
    ok = err <= tol * scale
    print(f"  {name:<38} max err {err:.2e} (rel {err / scale:.1e}) {'ok' if ok else 'MISMATCH'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-backward", type=int, default=40_000)
    args = parser.parse_args()
    assert torch.cuda.is_available() and "cuda" in ops.native_devices(), "needs a GPU and the CUDA kernels"
    gen = torch.Generator().manual_seed(0)
    p, scale, ok = 10.0, 0.1, True
    for H, L, dtype, n in [(20, 2, torch.float32, args.n_backward), (20, 2, torch.float64, 300),
                           (3, 2, torch.float32, 500), (33, 3, torch.float32, 300)]:
        print(f"H={H} L={L} {dtype} n={n}")
        tol = 1e-4 if dtype == torch.float32 else 1e-9
        grad, state, weights = inputs(n, H, L, dtype, gen)
        up_u, up_s = torch.randn_like(grad), torch.randn_like(state)
        update, new_state = ops.lstm_step(grad, state, weights, p, scale)
        d_grad, d_state, d_w = torch.ops.l2l_fast.lstm_step_backward(up_u, up_s, grad, state, weights, p, scale)
        g64, s64 = grad.double().requires_grad_(True), state.double().requires_grad_(True)
        w64 = [w.double().requires_grad_(True) for w in weights]
        e_update, e_state = reference.lstm_step(g64, s64, w64, p, scale)
        e = torch.autograd.grad([e_update, e_state], [g64, s64, *w64], [up_u.double(), up_s.double()])
        ok &= close("update", update, e_update, tol)
        ok &= close("new_state", new_state, e_state, tol)
        ok &= close("d_grad", d_grad, e[0], tol)
        ok &= close("d_state", d_state, e[1], tol)
        ok &= all([close(f"d_weights[{j}]", a, b, tol) for j, (a, b) in enumerate(zip(d_w, e[2:]))])
        param = torch.randn_like(grad)
        expected_param = param.double() + e_update.detach()
        ops.lstm_step_(param, grad, state, weights, p, scale)
        ok &= close("param (step_)", param, expected_param, tol)
        ok &= close("state (step_)", state, e_state, tol)

    print("lstm_multi_step_: 60 tensors (2 launches), f32/bf16/f16 params, f32 and bf16 state")
    weights = weights_for(20, 2, torch.float32, gen)
    sizes = [(k * 13) % 97 for k in range(60)]
    for state_dtype in (torch.float32, torch.bfloat16):
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
        params = [torch.randn(n, generator=gen).to(dtypes[k % 3]).cuda() for k, n in enumerate(sizes)]
        grads = [torch.randn(n, generator=gen).to(dtypes[k % 3]).cuda() for k, n in enumerate(sizes)]
        state = inputs(sum(sizes), 20, 2, torch.float32, gen)[1].to(state_dtype)
        before = [t.clone() for t in params], state.clone()
        torch.ops.l2l_fast.lstm_multi_step_(params, grads, state, weights, p, scale)
        e_update, e_state = reference.lstm_step(torch.cat(grads).double(), before[1].double(),
                                                [w.double() for w in weights], p, scale)
        got = torch.cat([a.double() for a in params])
        expected = torch.cat([b.double() for b in before[0]]) + e_update
        ok &= close(f"params ({state_dtype} state)", got, expected, 2.0**-7)  # 16-bit params: rounded sums
        ok &= close(f"state ({state_dtype})", state, e_state, 1e-2 if state_dtype == torch.bfloat16 else 1e-4)
    torch.cuda.synchronize()
    print("cuda_smoke:", "all ok" if ok else "MISMATCHES above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
