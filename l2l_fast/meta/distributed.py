"""Meta-training over several processes with torch.distributed: the ranks of a run and what they exchange.

A run of K ranks with --meta-batch B is the one-process run with --meta-batch K*B, spread out: every rank draws
the same global batch of K*B problems and keeps problems [r*B, (r+1)*B) (ProblemBatch.select), backpropagates
their meta-loss scaled by 1 / (unroll * K*B) as the one-process run scales the whole, and one all-reduce (sum)
of the flattened meta-gradient with the meta-loss appended gives every rank the one-process meta-gradient and
meta-loss, the same bits on every rank. Clipping and Adam then see identical inputs, so the weights stay
bit-identical across ranks without ever being sent; a non-finite meta-loss anywhere is non-finite in the sum,
so every rank skips the same truncations. Validation problems are split across the ranks and their losses summed.

Ranks of world size 1 is a plain run: nothing is exchanged and meta-training runs exactly as without this module.

Timeouts: every collective (and the rendezvous) fails after `timeout_s` (default DEFAULT_TIMEOUT_S, or the
L2L_FAST_DIST_TIMEOUT environment variable, or --dist-timeout) when a rank has died or hangs; the others then
raise DistributedError instead of waiting for ever (a rank that exits closes its connections, which the others
usually notice at once). The backend follows the device of the collectives: gloo for the CPU, nccl for CUDA
(cuda:LOCAL_RANK).

Exit: torch's gloo group outlives destroy_process_group (its worker threads keep running), and a worker that
frees a collective's tensor while the interpreter finalizes can abort the process in a destructor (SIGABRT,
"terminate called without an active exception"; pytorch/pytorch#190489, torch 2.13): torchrun then reports a
failed rank although the run ended well and wrote its files. The `l2l-fast` command therefore ends a rank that
succeeded with end_process; a script of your own under torchrun should do the same as its last statement.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Callable, Iterable, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "L2L_FAST_DIST_TIMEOUT"


class DistributedError(RuntimeError):
    """A collective of a distributed run failed: a rank died, hangs, or the ranks disagree on the run."""


def timeout_seconds(value: float | None = None) -> float:
    """The collectives' timeout: `value`, else $L2L_FAST_DIST_TIMEOUT, else DEFAULT_TIMEOUT_S."""
    if value is None:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if not value > 0:
        raise ValueError(f"distributed timeout: expected seconds > 0, got {value!r}")
    return float(value)


def backend_for(device: torch.device) -> str:
    """nccl for collectives on CUDA tensors, gloo for CPU ones."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched_world_size() -> int:
    """The processes torchrun (or another launcher setting WORLD_SIZE) started; 1 for a plain command."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(timeout_s: float | None = None, device: str = "cpu") -> "Ranks":
    """The Ranks of this process: joins the process group that torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) describes, or a plain run (world size 1) without a launcher.
    device: where the collectives run: "cpu" (gloo) or "cuda" (nccl, on cuda:LOCAL_RANK)."""
    timeout = timeout_seconds(timeout_s)
    if launched_world_size() == 1 and not dist.is_initialized():
        return Ranks()
    where = torch.device(device)
    if where.type == "cuda":
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(where), timeout=timedelta(seconds=timeout),
                                device_id=where if where.type == "cuda" else None)
    return Ranks(dist.get_rank(), dist.get_world_size(), where, timeout)


def end_process(code: int = 0) -> NoReturn:
    """Ends this process at once with exit status `code`, without finalizing the interpreter (where gloo's
    leftover threads can abort it: the module's docstring, "Exit"). For the last line of a distributed script
    whose run ended well, after Ranks.close (or destroy_process_group) and after its files are written:

        summary = MetaTrainer(config, out, ranks=init_from_env()).run()
        ...  # write, print
        end_process(0)

    stdout, stderr and the logging module's handlers are flushed first; a stdout that cannot be flushed turns
    status 0 into 120, as the interpreter's own exit does. atexit handlers and object finalizers do not run:
    close what the script opened before. The library never calls it: your script decides when its process
    ends (the `l2l-fast` command calls it under torchrun). Leave a failure as usual (an exception, a non-zero
    sys.exit): its status must reach torchrun."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream
            code = code or 120
    os._exit(code)


class Ranks:
    """The processes of one meta-training run: this one's rank, their number, where their collectives run.

    Ranks() is a plain run (rank 0 of 1). `current()` reads an initialized default process group.
    """

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                 timeout_s: float | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank: expected 0 <= rank < world ({world}), got {rank}")
        self.rank, self.world, self.device, self.timeout_s = rank, world, torch.device(device), timeout_s

    @classmethod
    def current(cls, timeout_s: float | None = None) -> "Ranks":
        """This process in the default process group (a plain run when there is none)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device, timeout_s)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Rank 0 alone writes the run's files and prints."""
        return self.rank == 0

    def split(self, count: int) -> tuple[int, int]:
        """This rank's share [start, stop) of `count` items, as even as can be (empty when count < world)."""
        return count * self.rank // self.world, count * (self.rank + 1) // self.world

    def _collective(self, what: str, run: Callable):
        try:
            return run()
        except DistributedError:
            raise
        except RuntimeError as error:  # gloo / nccl: a peer closed its connection, or the timeout passed
            limit = f"{self.timeout_s:g} s" if self.timeout_s else "the process group's timeout"
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed: another rank died, hangs or cannot be reached "
                f"(collectives give up after {limit}; --dist-timeout or ${TIMEOUT_ENV} sets it): {error}") from error

    def agree(self, identity: dict) -> None:
        """Refuses to start unless every rank runs with the same `identity` (its settings and versions):
        every rank raises the same DistributedError naming the keys that differ."""
        if not self.distributed:
            return
        gathered: list = [None] * self.world
        self._collective("comparing the ranks' settings",
                         lambda: dist.all_gather_object(gathered, identity))
        reference = gathered[0]
        for rank, other in enumerate(gathered[1:], start=1):
            differing = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
            if differing:
                shown = ", ".join(f"{k} ({reference.get(k)!r} on rank 0, {other.get(k)!r} on rank {rank})"
                                  for k in differing)
                raise DistributedError(f"the ranks of this run disagree on its settings: {shown}; start every "
                                       f"rank with the same command and versions")

    def from_writer(self, make: Callable):
        """make() run on rank 0 alone (reading the run's files); its result, or the exception it raised, on
        every rank, so that all of them go on, or fail, alike."""
        if not self.distributed:
            return make()
        box = [None]
        if self.writer:
            try:
                box[0] = ("value", make())
            except Exception as error:  # raised below on every rank
                box[0] = ("error", error)
        self._collective("sharing rank 0's start of the run", lambda: dist.broadcast_object_list(box, src=0))
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def sum_meta_gradient(self, params: Iterable[Tensor], meta_loss: Tensor) -> Tensor:
        """Sums every rank's .grad of `params` (a missing one counts as zeros) and meta-loss in one all-reduce,
        writes the sums into .grad and returns the summed meta-loss: the same bits on every rank."""
        params = list(params)
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        flat = torch.cat(pieces + [meta_loss.detach().reshape(1).to(pieces[0].dtype)]).to(self.device)
        self._collective("summing the meta-gradient", lambda: dist.all_reduce(flat))
        flat = flat.to(params[0].device)
        for p, piece in zip(params, flat[:-1].split([p.numel() for p in params])):
            p.grad = piece.view_as(p)
        return flat[-1]

    def sum_values(self, values: list[float]) -> list[float]:
        """Sums a few numbers across ranks (in float64)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._collective("summing the validation losses", lambda: dist.all_reduce(tensor))
        return tensor.tolist()

    def close(self) -> None:
        """Leaves the process group after a run that ended well (after a failure the process just exits). gloo's
        threads may outlive it: end the process with end_process (the module's docstring, "Exit")."""
        if self.distributed and dist.is_initialized():
            # all ranks in step first: a rank that tears gloo down while rank 0 still writes the run's last files
            # can abort in gloo's teardown (std::terminate, seen under load)
            self._collective("leaving the process group", dist.barrier)
            dist.destroy_process_group()
