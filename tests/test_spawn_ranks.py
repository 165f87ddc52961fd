"""The spawn harness of the distributed tests (tests/spawn_ranks.py): a rank that returned leaves without
finalizing the interpreter (where gloo's leftover worker threads can abort it), and a rank that fails still fails
the run with its traceback. Its rank functions live here: spawned processes import this module."""
from __future__ import annotations

import atexit
import os

import pytest
import torch

from spawn_ranks import reporting_errors, spawn_ranks

WORLD = 2
TIMEOUT_S = 120


def mark_finalizing(path: str) -> None:
    open(path, "w").close()


def saves_and_returns(rank: int, world: int, out_dir: str) -> None:
    atexit.register(mark_finalizing, os.path.join(out_dir, f"finalized{rank}"))  # runs only if the rank finalizes
    torch.save({"rank": rank, "world": world}, os.path.join(out_dir, f"rank{rank}.pt"))


def rank_1_fails(rank: int, world: int, out_dir: str) -> None:
    with reporting_errors(out_dir, rank):
        if rank == 1:
            raise ValueError("rank 1 found a wrong result")
        torch.save({"rank": rank}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_a_rank_that_returned_leaves_without_finalizing_the_interpreter(tmp_path):
    results = spawn_ranks(saves_and_returns, WORLD, str(tmp_path), TIMEOUT_S)
    assert results == [{"rank": r, "world": WORLD} for r in range(WORLD)]
    assert not any(name.startswith("finalized") for name in os.listdir(tmp_path))


def test_a_rank_that_fails_still_fails_the_run_with_its_traceback(tmp_path):
    with pytest.raises(AssertionError, match="distributed run failed") as failure:
        spawn_ranks(rank_1_fails, WORLD, str(tmp_path), TIMEOUT_S)
    assert "ValueError: rank 1 found a wrong result" in str(failure.value)
