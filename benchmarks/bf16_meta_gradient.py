"""How far the CPU kernels' bf16 products move a meta-gradient (csrc/cpu/PRODUCTS.md).

One truncation of meta-training on a quadratic: theta_{t+1} = theta_t + net(grad_t, state_t) for T steps, the
gradient input detached (first order, as meta/unroll.py does), loss = mean_t f(theta_{t+1}) with
f = sum_i a_i (theta_i - c_i)^2 / n, then .backward() to the net's weights. Run with float64 kernels (the
reference), float32 products, bf16 products, and plain PyTorch float32 (reference backend) as a control; prints
the relative error ||g - g64|| / ||g64|| and the cosine similarity of the whole weight-gradient vector, per seed.

  PYTHONPATH=. python benchmarks/bf16_meta_gradient.py --n 20000 --steps 20 --seeds 3
"""
from __future__ import annotations

import argparse
import copy

import torch

from l2l_fast import ops
from l2l_fast.net import CoordinatewiseLSTM


def meta_gradient(net, n, steps, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    a = torch.empty(n, dtype=torch.float64).uniform_(-3, 3, generator=gen).exp_().to(dtype)  # conditioning e^6
    c = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    theta = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    net = copy.deepcopy(net).to(dtype)
    state = net.init_state(n, dtype=dtype)
    loss = 0
    for _ in range(steps):
        grad = (2 * a * (theta - c) / n).detach()
        update, state = net(grad, state)
        theta = theta + update
        loss = loss + (a * (theta - c) ** 2).sum() / n / steps
    loss.backward()
    return torch.cat([p.grad.flatten().double() for p in net.parameters()]), float(loss.detach())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--save", default=None, help="torch.save the bf16 meta-gradients here (to compare two builds)")
    parser.add_argument("--compare", default=None, help="a --save file of another build: print rel and cos to it")
    parser.add_argument("--net", default=None, help="a pretrained name (quadratic, general, ...); default: a fresh net")
    args = parser.parse_args()
    torch.manual_seed(0)
    native = (CoordinatewiseLSTM(20, 2, backend="native") if args.net is None
              else CoordinatewiseLSTM.from_pretrained(args.net, backend="native"))
    control = copy.deepcopy(native)
    control.backend = "reference"
    products = ops.cpu_products() if hasattr(ops, "cpu_products") else None
    print(f"N = {args.n}, T = {args.steps}, net {args.net or 'fresh (seed 0)'}; products switch: {products is not None}")
    saved, other = {}, None if args.compare is None else torch.load(args.compare)
    for seed in range(args.seeds):
        g64, loss64 = meta_gradient(native, args.n, args.steps, seed, torch.float64)
        rows = []
        for name, net, setting in (("float32 products", native, "float32"), ("bf16 products", native, "bf16"),
                                   ("PyTorch float32", control, None)):
            if setting is not None and products is not None:
                ops.set_cpu_products(setting)
            elif setting == "bf16":
                continue
            g, loss = meta_gradient(net, args.n, args.steps, seed, torch.float32)
            if setting == "bf16":
                saved[seed] = g
                if other is not None:
                    o = other[seed]
                    rows.append(f"bf16 vs --compare: rel {float((g - o).norm() / o.norm()):.2e}, "
                                f"1 - cos {1 - float(g @ o / (g.norm() * o.norm())):.2e}")
            if products is not None:
                ops.set_cpu_products("float32")
            rel = float((g - g64).norm() / g64.norm())
            cos = float(g @ g64 / (g.norm() * g64.norm()))
            rows.append(f"{name}: rel {rel:.2e}, 1 - cos {1 - cos:.2e}, loss rel {abs(loss - loss64) / loss64:.1e}")
        if args.save:
            torch.save(saved, args.save)
        print(f"seed {seed} (loss {loss64:.4e}, |g64| {g64.norm():.3e}): " + "; ".join(rows), flush=True)


if __name__ == "__main__":
    main()
