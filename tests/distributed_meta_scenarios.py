"""What each rank runs for tests/test_meta_distributed.py (a plain module: spawned processes import it).

World of 2 CPU processes, gloo, FileStore rendezvous. Meta-training in float64 (so that the comparison with the
one-process run sees only the reduction's rounding) on tiny quadratics, each rank with --meta-batch 2, random
scaling and a coordinate fraction on (both must cut the global batch consistently):
- straight: 4 epochs; the weights, Adam's state, the log, and what each rank wrote;
- resumed: 2 epochs, then a new trainer resumes to 4 from rank 0's checkpoint;
- poisoned: one episode whose only non-finite problem is rank 1's: both ranks must skip alike;
- pes: 3 epochs with the PES estimator and a curriculum (the same perturbations on every rank);
- mismatch: rank 1 asks for another --lr: both ranks must refuse to start;
- hang, then dead: with a 3 s timeout, rank 1 first sleeps through a collective, then exits: rank 0 must raise
  DistributedError within the timeout each time (rank 1 saves its results before dying).
run_nccl: the straight run with nccl on one GPU per rank, joined through torchrun's environment variables.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from spawn_ranks import reporting_errors

from l2l_fast.meta.distributed import DistributedError, Ranks, init_from_env
from l2l_fast.meta.train import MetaTrainConfig, MetaTrainer, build_net, run_episode
from l2l_fast.tasks import make_task

PER_RANK = 2
FAULT_TIMEOUT_S = 3.0


def config(**overrides) -> MetaTrainConfig:
    """The run every rank makes (meta_batch: per rank); 3 validation problems split 1 + 2."""
    base = dict(task="quadratic", task_kwargs={"dim": 3}, epochs=4, horizon=10, unroll=5, meta_batch=PER_RANK,
                eval_every=2, eval_problems=3, random_scale=1.0, coordinate_fraction=0.5, lr=3e-3)
    base.update(overrides)
    return MetaTrainConfig(**base)


def snapshot(trainer: MetaTrainer) -> dict:
    return dict(net={k: v.clone() for k, v in trainer.net.state_dict().items()},
                adam=trainer.meta_optimizer.state_dict(), log=list(trainer.log), best_score=trainer.best_score)


def straight(rank: int, out_dir: str) -> dict:
    out = os.path.join(out_dir, f"straight_rank{rank}")  # each rank its own: rank 1 must write nothing
    trainer = MetaTrainer(config(), out, progress=False)
    summary = trainer.run()
    return dict(snapshot(trainer), summary=summary, wrote=sorted(os.listdir(out)) if os.path.exists(out) else [])


def resumed(rank: int, out_dir: str) -> dict:
    out = os.path.join(out_dir, f"resumed_rank{rank}")  # rank 1 has no files: it resumes from what rank 0 read
    MetaTrainer(config(epochs=2), out, progress=False).run()
    trainer = MetaTrainer(config(), out, resume=True, progress=False)
    started_at = trainer.epoch
    trainer.run()
    return dict(snapshot(trainer), started_at=started_at)


class PoisonedQuadratics:
    """The quadratic task whose training problem 3 (rank 1's second) has a NaN target."""

    def __init__(self):
        self.task = make_task("quadratic", dim=3)

    def sample(self, num_problems, seed, split="train"):
        problems = self.task.sample(num_problems, seed, split)
        if split == "train":
            problems.y[3, 0] = float("nan")
        return problems


def poisoned(rank: int) -> dict:
    cfg = config(random_scale=0.0, coordinate_fraction=1.0)
    net = build_net(cfg)
    adam = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    rows = [run_episode(net, adam, PoisonedQuadratics(), cfg, epoch, Ranks.current()) for epoch in range(2)]
    return dict(rows=rows, net=net.state_dict())


def pes(rank: int, out_dir: str) -> dict:
    """The PES estimator with a curriculum: each rank runs its slice with the same perturbations."""
    trainer = MetaTrainer(pes_config(), os.path.join(out_dir, f"pes_rank{rank}"), progress=False)
    trainer.run()
    return snapshot(trainer)


def pes_config(**overrides) -> MetaTrainConfig:
    return config(estimator="pes", pes_pairs=2, pes_sigma=0.05, coordinate_fraction=1.0, unroll_curriculum=1,
                  epochs=3, **overrides)


def mismatch(rank: int, out_dir: str) -> str:
    try:
        MetaTrainer(config(lr=1e-3 if rank == 0 else 2e-3), os.path.join(out_dir, f"mismatch{rank}"), progress=False)
    except DistributedError as error:
        return str(error)
    return "started"


def fault(rank: int, world: int, out_dir: str, kind: str, results: dict) -> dict | None:
    """A fresh group with a short timeout; rank 1 hangs (sleeps until rank 0 gave up) or dies (after saving)."""
    store = dist.FileStore(os.path.join(out_dir, f"store_{kind}"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=FAULT_TIMEOUT_S))
    done = os.path.join(out_dir, f"{kind}_done")
    if rank == 1:
        if kind == "dead":
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
            os._exit(0)  # no goodbye: its sockets close with the process
        deadline = time.monotonic() + 120
        while not os.path.exists(done) and time.monotonic() < deadline:  # hangs until rank 0 gave up
            time.sleep(0.1)
        _leave()
        return None
    ranks = Ranks(rank, world, "cpu", FAULT_TIMEOUT_S)
    started = time.monotonic()
    try:
        MetaTrainer(config(), os.path.join(out_dir, f"{kind}_rank0"), progress=False, ranks=ranks).run()
        outcome = "finished"
    except DistributedError as error:
        outcome = str(error)
    seconds = time.monotonic() - started
    open(done, "w").close()
    _leave()
    return dict(outcome=outcome, seconds=seconds)


def _leave() -> None:
    try:
        dist.destroy_process_group()
    except Exception:  # a group whose peer is gone may not close cleanly: nothing to keep from it
        pass


def run(rank: int, world: int, out_dir: str) -> None:
    with reporting_errors(out_dir, rank):
        torch.set_num_threads(1)  # two ranks on a 2-core machine
        torch.set_default_dtype(torch.float64)
        store = dist.FileStore(os.path.join(out_dir, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
        results = dict(straight=straight(rank, out_dir), resumed=resumed(rank, out_dir), poisoned=poisoned(rank),
                       pes=pes(rank, out_dir), mismatch=mismatch(rank, out_dir))
        dist.barrier()
        dist.destroy_process_group()
        results["hang"] = fault(rank, world, out_dir, "hang", results)
        results["dead"] = fault(rank, world, out_dir, "dead", results)  # rank 1 saves and exits in there
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def run_nccl(rank: int, world: int, out_dir: str, port: int) -> None:
    """The straight run through init_from_env as torchrun would start it, collectives on cuda:LOCAL_RANK (nccl)."""
    with reporting_errors(out_dir, rank):
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        ranks = init_from_env(60, device="cuda")
        assert dist.get_backend() == "nccl" and ranks.device == torch.device("cuda", rank)
        trainer = MetaTrainer(config(epochs=2), os.path.join(out_dir, f"nccl_rank{rank}"), progress=False,
                              ranks=ranks)
        trainer.run()
        torch.save(snapshot(trainer), os.path.join(out_dir, f"rank{rank}.pt"))
        ranks.close()
