"""How a distributed `l2l-fast meta-train` rank ends (l2l_fast/cli.py entry, meta/distributed.py end_process).

Pins a bug: a rank whose run ended well finalized the interpreter, where torch's gloo group (which outlives
destroy_process_group) can abort it in a destructor (SIGABRT; pytorch/pytorch#190489), and torchrun then reported
a failed rank although every file was written. The abort is a race; what the fix guarantees, and the tests check,
is that such a rank leaves without finalizing (an atexit handler never runs) with status 0, its files complete and
its output flushed, while a rank that fails keeps its non-zero status.

Two ranks are started the way torchrun starts its workers (RANK, WORLD_SIZE, MASTER_ADDR, ... in the
environment; `python -m l2l_fast.cli`), without torchrun's agent in between, so that each rank's status is seen.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import requires_native
from l2l_fast.files import load_verified

pytestmark = [requires_native,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")]

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2

# `python -m l2l_fast.cli ARGS` with an atexit handler that marks a finalizing interpreter
RANK_MAIN = ("import atexit, os, runpy, sys\n"
             "atexit.register(lambda: open(os.environ['FINALIZED_MARK'], 'w').close())\n"
             "sys.argv = ['l2l_fast.cli', *sys.argv[1:]]\n"
             "runpy.run_module('l2l_fast.cli', run_name='__main__', alter_sys=True)\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, args: list[str]) -> list[subprocess.CompletedProcess]:
    """`l2l-fast ARGS` on 2 ranks of one gloo group; each rank's finished process."""
    base = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "L2L_FAST_DIST_TIMEOUT": "60"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_MAIN, *args], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r),
                                   "FINALIZED_MARK": str(tmp_path / f"finalized{r}")})
             for r in range(2)]
    try:
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()


def meta_train(out: Path, *extra: str) -> list[str]:
    return ["meta-train", "--task", "quadratic", "--dim", "3", "--epochs", str(EPOCHS), "--horizon", "10",
            "--unroll", "5", "--meta-batch", "2", "--eval-every", "1", "--eval-problems", "2", "--threads", "1",
            "--no-progress", "--out", str(out), *extra]


def test_ranks_that_succeeded_exit_0_without_finalizing(tmp_path):
    out, export = tmp_path / "run", tmp_path / "best.pt"
    done = run_ranks(tmp_path, meta_train(out, "--export", str(export)))
    for rank, process in enumerate(done):
        assert process.returncode == 0, f"rank {rank}: status {process.returncode}\n{process.stderr[-3000:]}"
    assert not list(tmp_path.glob("finalized*")), "a rank that succeeded finalized its interpreter"
    # rank 0's files and output are complete: written and flushed before the process ended
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "checkpoint.pt", "log.csv", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["epochs"] == EPOCHS
    with open(out / "log.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, EPOCHS + 1))
    assert load_verified(out / "checkpoint.pt")["epoch"] == EPOCHS and export.is_file()
    assert json.loads(done[0].stdout.split("best optimizer written")[0])["epochs"] == EPOCHS
    assert f"best optimizer written to {export}" in done[0].stdout
    assert done[1].stdout == ""  # rank 0 alone prints


def test_a_rank_that_fails_after_the_run_keeps_its_status(tmp_path):
    """--export onto a directory: rank 0 fails after the distributed run ended (status 2, its message), while
    rank 1, which has nothing to export, succeeds."""
    out, export = tmp_path / "run", tmp_path / "taken"
    export.mkdir()
    done = run_ranks(tmp_path, meta_train(out, "--export", str(export)))
    assert done[0].returncode == 2, f"rank 0: status {done[0].returncode}\n{done[0].stderr[-3000:]}"
    assert "l2l-fast meta-train: error:" in done[0].stderr
    assert done[1].returncode == 0, done[1].stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["epochs"] == EPOCHS


def test_the_console_script_is_the_entry():
    """The installed `l2l-fast` runs entry (which ends a distributed rank as above), not main alone."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["l2l-fast"] == "l2l_fast.cli:entry"
