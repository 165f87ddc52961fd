"""Golden trajectories of the shipped nets: what the redesign (and any later refactor) must reproduce bit for bit.

    python tests/golden/record.py      # rewrites tests/golden/trajectories.pt (only when behaviour is meant to change)

Each case runs one shipped net on a fixed small problem and keeps every tensor it produced:
  optimizer  LearnedOptimizer on a 5-7-3 tanh MLP (odd sizes, a bias without gradient, a transposed weight),
             6 steps, per CPU instruction set, float32 and bfloat16 LSTM state;
  forward    the differentiable net(grad, state) twice in a row and its backward (the meta-training path),
             per instruction set, float32 and float64;
  reference  the same forward with backend="reference" in float64 (instruction-set independent).
The CPU kernels give results independent of the thread count, so one file serves every machine whose
instruction sets it records (generic, avx2, avx512).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("trajectories.pt")
NETS = ("mnist", "quadratic")
STEPS = 6


def _mlp(seed: int):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.nn.Parameter(torch.randn(7, 5, generator=g) * 0.5)
    b1 = torch.nn.Parameter(torch.randn(7, generator=g) * 0.1)
    w2t = torch.nn.Parameter((torch.randn(7, 3, generator=g) * 0.5))  # used as w2t.t(): stepped non-contiguous view
    b2 = torch.nn.Parameter(torch.zeros(3))  # never in the loss: no gradient
    x = torch.randn(32, 5, generator=g)
    y = torch.randint(3, (32,), generator=g)
    params = [w1, b1, w2t, b2]

    def loss():
        h = torch.tanh(x @ w1.t() + b1)
        return torch.nn.functional.cross_entropy(h @ w2t, y)

    return params, loss


def optimizer_case(name: str, state_dtype) -> dict:
    import l2l_fast

    params, loss = _mlp(7)
    net = l2l_fast.CoordinatewiseLSTM.from_pretrained(name)
    opt = l2l_fast.LearnedOptimizer(params, net=net, state_dtype=state_dtype)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        losses.append(value.detach())
    return {"params": [p.detach().clone() for p in params], "losses": torch.stack(losses),
            "states": [opt.state[p]["lstm_state"].detach().clone() for p in params]}


def forward_case(name: str, dtype, backend: str) -> dict:
    import l2l_fast

    net = l2l_fast.CoordinatewiseLSTM.from_pretrained(name, backend=backend).to(dtype)
    g = torch.Generator().manual_seed(11)
    n = 37
    grads = [torch.randn(n, generator=g, dtype=torch.float64).mul(10.0 ** torch.randint(-8, 2, (n,), generator=g))
             .to(dtype) for _ in range(2)]
    state = net.init_state(n)
    updates = []
    for grad in grads:
        update, state = net(grad, state)
        updates.append(update)
    total = sum((u * (k + 1)).sum() for k, u in enumerate(updates)) + state.square().sum()
    weight_grads = torch.autograd.grad(total, list(net.parameters()))
    return {"updates": [u.detach() for u in updates], "state": state.detach(), "weight_grads": list(weight_grads)}


def record() -> dict:
    from l2l_fast import _C

    cases = {}
    previous = _C.cpu_isa()
    try:
        for isa in ("generic", "avx2", "avx512"):
            try:
                _C.set_cpu_isa(isa)
            except (RuntimeError, ValueError):
                continue
            for name in NETS:
                for state_dtype in (None, torch.bfloat16):
                    cases[f"optimizer/{isa}/{name}/{state_dtype}"] = optimizer_case(name, state_dtype)
                for dtype in (torch.float32, torch.float64):
                    cases[f"forward/{isa}/{name}/{dtype}"] = forward_case(name, dtype, "native")
    finally:
        _C.set_cpu_isa(previous)
    for name in NETS:
        cases[f"reference/{name}"] = forward_case(name, torch.float64, "reference")
    return cases


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    torch.set_num_threads(2)
    cases = record()
    torch.save(cases, GOLDEN)
    print(f"{len(cases)} cases written to {GOLDEN}")
