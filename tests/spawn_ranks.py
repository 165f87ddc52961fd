"""Spawning a world of CPU ranks for the distributed tests, and collecting what each rank saved.

A rank function run(rank, world, out_dir, *args) saves its results to out_dir/rank{r}.pt and, when it fails,
its traceback to out_dir/error{r}.txt (`reporting_errors`), which spawn_ranks shows in the test's failure.

A rank whose function returned leaves with os._exit, without finalizing the interpreter: torch's gloo group
outlives destroy_process_group (its worker threads keep running), and a worker that drops the last reference to a
collective's tensor (a tensor Python had let go of) just as the interpreter starts finalizing waits for the GIL,
is ended by pthread_exit inside a destructor and aborts the process (SIGABRT, "terminate called without an active
exception"; pytorch/pytorch#190489). Everything the test reads is saved by then.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp


@contextlib.contextmanager
def reporting_errors(out_dir: str, rank: int):
    """Leaves the traceback of whatever escapes the block in out_dir/error{rank}.txt, then re-raises it."""
    try:
        yield
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_rank(rank: int, run, world: int, out_dir: str, *args) -> None:
    """What a spawned process runs: run(rank, world, out_dir, *args), then leave_without_finalizing.
    An exception propagates as before (torch's spawn records it and the process exits with status 1)."""
    run(rank, world, out_dir, *args)
    leave_without_finalizing()


def leave_without_finalizing() -> None:
    """Ends this process at once (status 0): no interpreter finalization for gloo's threads to race with."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(run, world: int, out_dir: str, timeout_s: float, args: tuple = ()) -> list:
    """Runs run(rank, world, out_dir, *args) in `world` spawned processes; returns each rank's rank{r}.pt.
    A rank that fails, or ranks still running after timeout_s, fail the test with every rank's traceback."""
    context = mp.start_processes(run_rank, args=(run, world, out_dir, *args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ranks did not finish in {timeout_s} s")
    except Exception as error:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.startswith("error")]
        raise AssertionError(f"distributed run failed: {error}\n" + "\n".join(errors)) from error
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
