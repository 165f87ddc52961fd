"""What each rank runs for tests/test_optimizer_moments_distributed.py (a plain module: spawned processes import it).

World of 2 CPU processes, gloo, a FileStore rendezvous. Each rank trains the float64 MLP of
tests/distributed_scenarios.py under FSDP2 with a net that reads the gradient's moments (and a tanh output),
with a distributed-checkpoint save / load in the middle, and saves what the test compares to rank{r}.pt; a
failure leaves its traceback in error{r}.txt.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from distributed_scenarios import CHECKPOINT_AFTER, STEPS, make_model, record_grads_of, shard, train_steps
from spawn_ranks import reporting_errors

from l2l_fast import CoordinatewiseLSTM, LearnedOptimizer

HIDDEN = 8


def make_net() -> CoordinatewiseLSTM:
    torch.manual_seed(3)
    return CoordinatewiseLSTM(hidden_size=HIDDEN, features=("paper", "moments"), output="tanh")


def placements(t) -> tuple:
    """A DTensor's placements as (kind, dim) pairs: (("Shard", 0),)."""
    return tuple((type(pl).__name__, getattr(pl, "dim", None)) for pl in t.placements)


def full(model, opt):
    params = list(model.parameters())
    return ([p.full_tensor() for p in params], [opt.state[p]["lstm_state"].full_tensor() for p in params],
            [opt.state[p]["moments"].full_tensor() for p in params])


def fsdp(rank: int, world: int, out_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    model = shard(make_model(), mesh)
    opt = LearnedOptimizer(model.parameters(), make_net())
    grads = []
    train_steps(model, opt, range(CHECKPOINT_AFTER), rank, world, grads)
    checkpoint = os.path.join(out_dir, "checkpoint")
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    train_steps(model, opt, range(CHECKPOINT_AFTER, STEPS), rank, world, grads)

    params = list(model.parameters())
    local = dict(
        param_local_shapes=[tuple(p.to_local().shape) for p in params],
        param_placements=[placements(p) for p in params],
        moments_are_dtensors=[isinstance(opt.state[p]["moments"], DTensor) for p in params],
        moments_placements=[placements(opt.state[p]["moments"]) for p in params],
        moments_local_shapes=[tuple(opt.state[p]["moments"].to_local().shape) for p in params],
        moments_dtypes=[opt.state[p]["moments"].dtype for p in params],
        fused_moments_numel=sum(part.moments.numel() for parts in opt._fused for part in parts))
    final = full(model, opt)

    resumed = shard(make_model(seed=1), mesh)
    resumed_opt = LearnedOptimizer(resumed.parameters(), make_net())
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    set_state_dict(resumed, resumed_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    train_steps(resumed, resumed_opt, range(CHECKPOINT_AFTER, STEPS), rank, world)
    return dict(final=final, grads=grads, local=local, resumed=full(resumed, resumed_opt))


def run(rank: int, world: int, out_dir: str) -> None:
    with reporting_errors(out_dir, rank):
        torch.set_num_threads(1)
        store = dist.FileStore(os.path.join(out_dir, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
        torch.save(fsdp(rank, world, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
