"""Meta-training across processes: meta-steps per second of one global meta-batch on 1 process x 1 thread,
1 process x 2 threads and 2 processes x 1 thread (gloo), and the meta-gradient exchange by one flat all-reduce
(what l2l_fast ships) against DDP on the net, side by side in one run.

    L2L_FAST_DATA=../shared/datasets .venv/bin/python benchmarks/bench_meta_distributed.py --task mnist
    L2L_FAST_DATA=../shared/datasets .venv/bin/python benchmarks/bench_meta_distributed.py --task mixed

A meta-step is one truncation of --unroll steps of every problem of the global batch, its backward, the
exchange and the Adam step (run_episode, as `l2l-fast meta-train` runs it); the processes split the global batch
(--meta-batch G / K each). Each row runs in fresh processes: --warmup episodes, then --episodes timed ones
(ranks in step: a barrier before each). "exchange" is the time per meta-step spent in the all-reduce, waiting
for the slower rank included (for DDP only its all-reduce of the meta-loss: DDP reduces the gradient inside the
backward); "all-reduce alone" one all-reduce of the flat gradient with the ranks in step (the link's latency); "bytes" what one rank sends per meta-step in a ring all-reduce, 2 (K-1)/K x 4 B x
(weights + 1).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from machine import machine_lines  # noqa: E402

from l2l_fast.meta.distributed import Ranks  # noqa: E402
from l2l_fast.meta.train import MetaTrainConfig, build_net, run_episode  # noqa: E402
from l2l_fast.tasks import TASKS, get_task  # noqa: E402


class TimedRanks(Ranks):
    """Ranks that add up the time spent in the meta-gradient exchange."""

    exchange_s = 0.0

    def sum_meta_gradient(self, params, meta_loss):
        start = time.perf_counter()
        try:
            return super().sum_meta_gradient(params, meta_loss)
        finally:
            self.exchange_s += time.perf_counter() - start


class DDPRanks(TimedRanks):
    """The DDP alternative: DDP all-reduces (averages) the gradients during the backward; this turns the average
    back into the sum and all-reduces the meta-loss on its own (DDP carries no extra value)."""

    def sum_meta_gradient(self, params, meta_loss):
        start = time.perf_counter()
        loss = meta_loss.detach().reshape(1).clone()
        dist.all_reduce(loss)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self.world)
        self.exchange_s += time.perf_counter() - start
        return loss[0]


class DDPNet:
    """The net's verbs, its forward through DistributedDataParallel (whose backward hooks all-reduce)."""

    def __init__(self, ddp):
        self._ddp = ddp

    def __call__(self, *args, **kwargs):
        return self._ddp(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._ddp.module, name)


def worker(rank: int, world: int, store_dir: str, row: dict, args, results) -> None:
    torch.set_num_threads(row["threads"])
    if world > 1:
        store = dist.FileStore(os.path.join(store_dir, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    task = get_task(args.task).make({}, data_dir=args.data_dir)
    config = MetaTrainConfig(task=args.task, horizon=args.horizon, unroll=args.unroll,
                             meta_batch=args.meta_batch // world, epochs=args.warmup + args.episodes)
    net = build_net(config)
    adam = torch.optim.Adam(net.parameters(), lr=config.lr)
    ranks = (DDPRanks if row["reducer"] == "ddp" else TimedRanks)(rank, world)
    stepped = net
    if row["reducer"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        stepped = DDPNet(DistributedDataParallel(net))
    times = []
    for epoch in range(args.warmup + args.episodes):
        if epoch == args.warmup:
            ranks.exchange_s = 0.0
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        run_episode(stepped, adam, task, config, epoch, ranks)
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - start)
    steps = args.episodes * (args.horizon // args.unroll)
    weights = sum(p.numel() for p in net.parameters())
    latency = []
    if world > 1:  # the all-reduce alone, ranks in step: its latency on this link
        flat = torch.zeros(weights + 1)
        for _ in range(50):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(flat)
            latency.append(time.perf_counter() - start)
    if rank == 0:
        results.put(dict(episode_s=statistics.median(times[args.warmup:]), exchange_ms=1e3 * ranks.exchange_s / steps,
                         weights=weights, allreduce_us=1e6 * statistics.median(latency) if latency else None))
    if world > 1:
        dist.destroy_process_group()


def compare_exchanges(rank: int, world: int, store_dir: str, reps: int, results) -> None:
    """Flat all-reduce against DDP on one small meta-step (quadratics: little compute, so the exchange shows),
    alternating the two every repetition so that the machine's other load drifts into both alike."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(store_dir, "store"), world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    task = get_task("quadratic").make({"dim": 10})
    config = MetaTrainConfig(task="quadratic", horizon=5, unroll=5, meta_batch=2)
    net = build_net(config)
    adam = torch.optim.Adam(net.parameters(), lr=1e-4)
    ways = {"flat": (net, TimedRanks(rank, world)), "ddp": (DDPNet(DistributedDataParallel(net)), DDPRanks(rank, world))}
    times: dict = {name: [] for name in ways}
    for rep in range(reps + 2):
        for name, (stepped, ranks) in ways.items():
            dist.barrier()
            start = time.perf_counter()
            run_episode(stepped, adam, task, config, rep, ranks)
            if rep >= 2:
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        results.put({name: statistics.median(t) for name, t in times.items()})
    dist.destroy_process_group()


def draw_cost(task, global_batch: int, per_rank: int) -> float:
    """Seconds each rank spends per episode drawing the global batch and cutting its slice (its initial params
    and the first minibatch's losses), what grows with the number of ranks at a fixed --meta-batch."""
    start = time.perf_counter()
    problems = task.sample(global_batch, seed=1, split="train")
    part = problems.select(0, per_rank)
    with torch.no_grad():
        part.loss(part.init_params(), 0)
    return time.perf_counter() - start


def measure(row: dict, args) -> dict:
    results = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as store_dir:
        mp.start_processes(worker, args=(row["processes"], store_dir, row, args, results), nprocs=row["processes"],
                           start_method="spawn")
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mnist", choices=list(TASKS))
    parser.add_argument("--meta-batch", type=int, default=4, help="the global meta-batch G (each of K ranks: G / K)")
    parser.add_argument("--horizon", type=int, default=40)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--data-dir", default=os.environ.get("L2L_FAST_DATA"))
    parser.add_argument("--rows", nargs="*", default=["1x1", "1x2", "2x1", "2x1-ddp"],
                        help="PROCESSESxTHREADS[-ddp]")
    parser.add_argument("--draw-sizes", type=int, nargs="*", default=[],
                        help="also time each rank's draw of global batches of these sizes")
    parser.add_argument("--compare-reps", type=int, default=0,
                        help="also time flat all-reduce against DDP on a small meta-step, alternating (0: no)")
    args = parser.parse_args()
    if args.meta_batch % 2:
        parser.error("--meta-batch: the global batch must split over 2 processes (even)")

    print(f"# meta-training across processes: --task {args.task}, global meta-batch {args.meta_batch}, "
          f"horizon {args.horizon}, unroll {args.unroll}, {args.episodes} timed episodes after {args.warmup}")
    for line in machine_lines("cpu", torch.get_num_threads()):
        print("# " + line)
    print("| processes x threads | exchange | meta-steps/s | optimizee steps/s | vs 1x1 | exchange ms / meta-step "
          "| all-reduce alone, us | bytes sent per rank and meta-step |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for spec in args.rows:
        shape, _, reducer = spec.partition("-")
        processes, threads = (int(x) for x in shape.split("x"))
        row = dict(processes=processes, threads=threads, reducer=reducer or "flat")
        result = measure(row, args)
        rate = (args.horizon // args.unroll) / result["episode_s"]
        base = base or rate
        sent = 2 * (processes - 1) / processes * 4 * (result["weights"] + 1)
        alone = "-" if result["allreduce_us"] is None else f"{result['allreduce_us']:.0f}"
        exchange = "-" if processes == 1 else ("DDP" if reducer == "ddp" else "flat all-reduce")
        print(f"| {processes} x {threads} | {exchange} | {rate:.3f} | {rate * args.meta_batch * args.unroll:,.0f} | "
              f"{rate / base:.2f}x | {result['exchange_ms']:.2f} | {alone} | {sent:,.0f} |", flush=True)
    if args.draw_sizes:
        torch.set_num_threads(1)
        task = get_task(args.task).make({}, data_dir=args.data_dir)
        draw_cost(task, 2, 1)  # loads the data
        costs = ", ".join(f"{g} problems {1e3 * min(draw_cost(task, g, 1) for _ in range(3)):.1f} ms"
                          for g in args.draw_sizes)
        print(f"\ndrawing the global batch on each rank (1 thread; per episode, keeping 1 problem): {costs}")
    if args.compare_reps:
        results = mp.get_context("spawn").SimpleQueue()
        with tempfile.TemporaryDirectory() as store_dir:
            mp.start_processes(compare_exchanges, args=(2, store_dir, args.compare_reps, results), nprocs=2,
                               start_method="spawn")
        medians = results.get()
        print(f"\nexchange on one small meta-step (quadratic dim 10, 2 x 2 problems, unroll 5; 2 x 1 thread, "
              f"{args.compare_reps} alternating repetitions): flat all-reduce {1e3 * medians['flat']:.2f} ms, "
              f"DDP {1e3 * medians['ddp']:.2f} ms per meta-step (medians)")


if __name__ == "__main__":
    main()
