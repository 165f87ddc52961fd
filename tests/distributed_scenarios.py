"""What each rank runs for tests/test_optimizer_distributed.py (a plain module: spawned processes import it).

World of 2 CPU processes, gloo, a FileStore rendezvous (no ports). Each rank trains the same float64 MLP on its
half of every global batch, under DDP and under FSDP2 (with a distributed-checkpoint save / load in the
middle), and saves what the test compares to rank{r}.pt; a failure leaves its traceback in error{r}.txt.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from spawn_ranks import reporting_errors

from l2l_fast import CoordinatewiseLSTM, LearnedOptimizer

STEPS = 4
CHECKPOINT_AFTER = 2
GLOBAL_BATCH = 8


def make_model(seed: int = 0) -> nn.Module:
    """Odd sizes: under FSDP2 every parameter is sharded unevenly over 2 ranks (17 rows -> 9 + 8, 5 -> 3 + 2)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 17), nn.Tanh(), nn.Linear(17, 5)).double()


def make_net() -> CoordinatewiseLSTM:
    return CoordinatewiseLSTM.from_pretrained("mnist")


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(GLOBAL_BATCH, 13, generator=gen, dtype=torch.float64),
            torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen))


def local_batch(step: int, rank: int, world: int):
    x, y = global_batch(step)
    part = GLOBAL_BATCH // world
    return x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part]


def train_steps(model, opt, steps, rank, world, record_grads=None):
    for step in steps:
        x, y = local_batch(step, rank, world)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # mean over the local half: DDP / FSDP average
        if record_grads is not None:
            record_grads.append(record_grads_of(model))
        opt.step()


def record_grads_of(model):
    from torch.distributed.tensor import DTensor

    return [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.detach().clone() for p in model.parameters()]


def ddp(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    wrapped = DistributedDataParallel(model)
    opt = LearnedOptimizer(wrapped.parameters(), make_net())
    grads = []
    train_steps(wrapped, opt, range(STEPS), rank, world, grads)
    return dict(params=[p.detach().clone() for p in model.parameters()], grads=grads,
                states=[opt.state[p]["lstm_state"].clone() for p in model.parameters()])


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(model, opt):
    return ([p.full_tensor() for p in model.parameters()],
            [opt.state[p]["lstm_state"].full_tensor() for p in model.parameters()])


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

    local = dict(  # what this rank holds
        param_local_shapes=[tuple(p.to_local().shape) for p in model.parameters()],
        state_is_dtensor=[isinstance(opt.state[p]["lstm_state"], DTensor) for p in model.parameters()],
        state_local_shapes=[tuple(opt.state[p]["lstm_state"].to_local().shape) for p in model.parameters()],
        fused_state_numel=sum(part.state.numel() for parts in opt._fused for part in parts))
    params, states = full(model, opt)

    # a fresh model (other init) and optimizer, restored from the checkpoint, then the same last steps
    resumed = shard(make_model(seed=1), mesh)
    resumed_opt = LearnedOptimizer(resumed.parameters(), make_net())
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    set_state_dict(resumed, resumed_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    train_steps(resumed, resumed_opt, range(CHECKPOINT_AFTER, STEPS), rank, world)
    resumed_params, resumed_states = full(resumed, resumed_opt)
    return dict(params=params, states=states, grads=grads, local=local, resumed_params=resumed_params,
                resumed_states=resumed_states)


def run(rank: int, world: int, out_dir: str) -> None:
    with reporting_errors(out_dir, rank):
        torch.set_num_threads(1)  # two ranks on a 2-core machine
        store = dist.FileStore(os.path.join(out_dir, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
        results = dict(ddp=ddp(rank, world), fsdp=fsdp(rank, world, out_dir))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
