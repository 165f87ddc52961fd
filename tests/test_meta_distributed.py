"""Meta-training across processes (issue 20): 2 CPU ranks with gloo against the one-process run.

One spawn of 2 ranks runs every scenario (tests/distributed_meta_scenarios.py): the ranks hold bit-identical
weights and Adam states after every run; 2 ranks with --meta-batch 2 equal the one-process run with --meta-batch 4
(float64, up to the reduction's rounding); a run stopped after a checkpoint and resumed equals the uninterrupted
one bit for bit; a non-finite meta-loss on one rank makes both skip; the PES estimator (with a curriculum)
keeps the ranks bit-identical and equals the one-process run; ranks with different settings refuse to
start; a rank that hangs or dies makes the other raise within the timeout. Then `torchrun -m l2l_fast.cli
meta-train` end to end: killed with SIGKILL after a checkpoint and resumed, also on one process (a global
meta-batch split otherwise).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distributed_meta_scenarios as scenarios
from conftest import requires_native
from spawn_ranks import spawn_ranks
from l2l_fast.cli import main as cli_main
from l2l_fast.files import load_verified
from l2l_fast.meta.distributed import DEFAULT_TIMEOUT_S, Ranks, backend_for, timeout_seconds
from l2l_fast.meta.train import MetaTrainer, build_net, run_episode

pytestmark = [requires_native,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")]

WORLD = 2
TIMEOUT_S = 240
ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(scenarios.run, WORLD, str(tmp_path_factory.mktemp("meta_distributed")), TIMEOUT_S)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run with the global meta-batch (2 x 2), in float64 like the ranks."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trainer = MetaTrainer(scenarios.config(meta_batch=WORLD * scenarios.PER_RANK),
                              tmp_path_factory.mktemp("one_process"), progress=False)
        trainer.run()
        return scenarios.snapshot(trainer)
    finally:
        torch.set_default_dtype(default)


def assert_equal_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what} {key}: max difference {(a[key] - b[key]).abs().max():.3e}"


def without_seconds(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in log]


def adam_tensors(state_dict: dict) -> dict:
    return {f"{p}.{k}": v for p, s in state_dict["state"].items() for k, v in s.items()}


@pytest.mark.parametrize("run", ["straight", "resumed"])
def test_ranks_hold_bit_identical_weights_and_adam_states(ranks, run):
    first, second = ranks[0][run], ranks[1][run]
    assert_equal_tensors(first["net"], second["net"], "weights")
    assert_equal_tensors(adam_tensors(first["adam"]), adam_tensors(second["adam"]), "Adam state")
    assert without_seconds(first["log"]) == without_seconds(second["log"])
    initial = build_net(scenarios.config()).state_dict()
    assert any(not torch.equal(first["net"][k], initial[k]) for k in initial), "training must move the weights"


def test_two_ranks_equal_one_process_with_the_global_meta_batch(ranks, one_process):
    """Same problems (random scales, coordinate samples and validation problems cut from the global batch),
    same meta-gradient up to rounding. The ranks sum two halves of the per-coordinate terms where one process sums
    them all: the sums differ by a few ulps (float64: ~1e-16 relative to the gradient's terms); clipping and Adam
    are smooth in the gradient away from zero and Adam's step is lr * m / sqrt(v), so each meta-step's update
    differs by about as much relative to lr, and the 8 meta-steps here leave the weights within a few ulps (measured:
    at most 6e-17, 1 ulp of weights ~0.25). The tolerance leaves room for other BLAS and instruction sets; in float32
    the same argument gives ~1e-7 relative per step (a one-process run with --meta-batch K*B is this run's
    reference up to that, not bit for bit)."""
    two = ranks[0]["straight"]
    for key, value in one_process["net"].items():
        torch.testing.assert_close(two["net"][key], value, rtol=1e-12, atol=1e-14)
    for got, want in zip(two["log"], one_process["log"], strict=True):
        for field in ("meta_loss", "grad_norm", "val_score", "best_score"):
            if want[field] != "":
                assert got[field] == pytest.approx(want[field], rel=1e-12), field
    assert two["summary"]["processes"] == 2 and two["summary"]["global_meta_batch"] == 4


def test_rank_zero_alone_writes_the_runs_files(ranks):
    assert ranks[0]["straight"]["wrote"] == ["best.pt", "checkpoint.pt", "log.csv", "summary.json"]
    assert ranks[1]["straight"]["wrote"] == []


def test_stopped_and_resumed_run_equals_the_straight_run_bit_for_bit(ranks):
    for rank in ranks:
        assert rank["resumed"]["started_at"] == 2
        assert_equal_tensors(rank["resumed"]["net"], rank["straight"]["net"], "weights")
        assert_equal_tensors(adam_tensors(rank["resumed"]["adam"]), adam_tensors(rank["straight"]["adam"]), "Adam")


def test_a_nonfinite_meta_loss_on_one_rank_makes_every_rank_skip(ranks):
    """Only rank 1 holds the NaN problem; both skip every episode's first truncation (so nothing trains), as
    the one-process run does."""
    cfg = scenarios.config(random_scale=0.0, coordinate_fraction=1.0)
    for rank in ranks:
        assert [row["skipped"] for row in rank["poisoned"]["rows"]] == [1, 1]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        net = build_net(cfg)
        initial = {k: v.clone() for k, v in net.state_dict().items()}
        single = scenarios.config(random_scale=0.0, coordinate_fraction=1.0, meta_batch=4)
        rows = [run_episode(net, torch.optim.Adam(net.parameters(), lr=cfg.lr), scenarios.PoisonedQuadratics(),
                            single, epoch) for epoch in range(2)]
    finally:
        torch.set_default_dtype(default)
    assert [row["skipped"] for row in rows] == [1, 1]
    for rank in ranks:
        assert_equal_tensors(rank["poisoned"]["net"], initial, "weights")


def test_pes_on_two_ranks_equals_one_process_with_the_global_meta_batch(ranks, tmp_path):
    """Every rank perturbs the weights alike and estimates from its slice; the estimates are linear in the problems'
    losses, so their sum is the one-process estimate. Bit-identical across ranks; against one process up to
    rounding, which PES amplifies: a pair's estimate divides the difference of its two meta-losses (each summed in
    another order on 2 ranks: ~1e-16 relative) by 2 sigma^2 (sigma 0.05), so the gradient carries ~1e-16 *
    L / (L+ - L-) ~ 1e-14 relative error per meta-step. Measured: the weights at most 1.7e-15 apart after 7
    meta-steps (the backprop run's: 6e-17); asserted at 1e-10 relative, 1e-12 absolute."""
    assert_equal_tensors(ranks[0]["pes"]["net"], ranks[1]["pes"]["net"], "weights")
    assert_equal_tensors(adam_tensors(ranks[0]["pes"]["adam"]), adam_tensors(ranks[1]["pes"]["adam"]), "Adam state")
    assert [row["horizon"] for row in ranks[0]["pes"]["log"]] == [5, 10, 10]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trainer = MetaTrainer(scenarios.pes_config(meta_batch=WORLD * scenarios.PER_RANK), tmp_path, progress=False)
        trainer.run()
    finally:
        torch.set_default_dtype(default)
    for key, value in trainer.net.state_dict().items():
        torch.testing.assert_close(ranks[0]["pes"]["net"][key], value, rtol=1e-10, atol=1e-12)
    initial = build_net(scenarios.pes_config()).state_dict()
    assert any(not torch.equal(value, initial[key]) for key, value in trainer.net.state_dict().items())


def test_ranks_with_different_settings_refuse_to_start(ranks):
    for rank in ranks:
        message = rank["mismatch"]
        assert "disagree" in message and "lr (0.001 on rank 0, 0.002 on rank 1)" in message, message


@pytest.mark.parametrize("kind", ["hang", "dead"])
def test_a_hanging_or_dead_rank_makes_the_other_raise_within_the_timeout(ranks, kind):
    outcome = ranks[0][kind]
    assert outcome["outcome"] != "finished"
    assert "rank 0 of 2" in outcome["outcome"] and f"{scenarios.FAULT_TIMEOUT_S:g} s" in outcome["outcome"]
    # the timeout, plus building the task and net before the first collective on a loaded machine
    assert outcome["seconds"] < scenarios.FAULT_TIMEOUT_S + 5, outcome


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl across ranks needs a GPU per rank (2)")
def test_nccl_ranks_step_identically(tmp_path):
    """The same code path with the collectives on cuda:LOCAL_RANK: nccl, as init_from_env picks for CUDA."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = spawn_ranks(scenarios.run_nccl, WORLD, str(tmp_path), TIMEOUT_S, args=(port,))
    assert_equal_tensors(results[0]["net"], results[1]["net"], "weights")
    assert_equal_tensors(adam_tensors(results[0]["adam"]), adam_tensors(results[1]["adam"]), "Adam state")


def test_timeout_and_backend_choices(monkeypatch):
    monkeypatch.delenv("L2L_FAST_DIST_TIMEOUT", raising=False)
    assert timeout_seconds() == DEFAULT_TIMEOUT_S == 300
    monkeypatch.setenv("L2L_FAST_DIST_TIMEOUT", "7.5")
    assert timeout_seconds() == 7.5 and timeout_seconds(2) == 2
    with pytest.raises(ValueError, match="timeout"):
        timeout_seconds(0)
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 1)) == "nccl"
    assert [Ranks(r, 3).split(7) for r in range(3)] == [(0, 2), (2, 4), (4, 7)]
    assert [Ranks(r, 3).split(2) for r in range(3)] == [(0, 0), (0, 1), (1, 2)]


# ---------------------------------------------------------------------------------------------
# torchrun, the command line
def meta_train(out: Path, epochs: int, meta_batch: int, *extra: str) -> list[str]:
    return ["meta-train", "--task", "quadratic", "--dim", "3", "--epochs", str(epochs), "--horizon", "10", "--unroll",
            "5", "--meta-batch", str(meta_batch), "--eval-every", "50", "--eval-problems", "4", "--out", str(out),
            "--no-progress", *extra]


def torchrun(nproc: int, args: list[str]) -> list[str]:
    return [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", "-m", "l2l_fast.cli", *args, "--threads", "1"]


def children(pid: int) -> list[int]:
    """The processes `pid` started (torchrun's workers, each in its own session)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not TORCHRUN.exists() or not sys.platform.startswith("linux"),
                    reason="torchrun not installed beside the interpreter (or no /proc)")
def test_torchrun_meta_train_killed_and_resumed(tmp_path, capsys):
    """2 ranks under torchrun: one rank SIGKILLed after a checkpoint ends the job (torchrun stops the other),
    --resume on 2 ranks continues it; then one process resumes it with the same global meta-batch (accepted)
    and refuses another one."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(torchrun(2, meta_train(out, 400, 2)), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    workers = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoint.pt").exists() and job.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)
        workers = children(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        for pid in [job.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert job.returncode != 0 and "SIGKILL" in job.stderr.read().decode()
    assert not any(alive(pid) for pid in workers), "torchrun must stop the surviving rank"
    killed_at = load_verified(out / "checkpoint.pt")["epoch"]
    assert 1 <= killed_at < 400

    resumed = subprocess.run(torchrun(2, meta_train(out, killed_at + 2, 2, "--resume")), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count('"best_score"') == 1, "rank 0 alone prints the summary"
    saved = load_verified(out / "checkpoint.pt")
    assert [row["epoch"] for row in saved["log"]] == list(range(1, killed_at + 3)) and saved["world_size"] == 2

    with pytest.raises(SystemExit):
        cli_main(meta_train(out, killed_at + 3, 2, "--resume"))  # 1 x 2 problems: another run
    assert "same global meta-batch (--meta-batch 4 on 1 process(es))" in capsys.readouterr().err
    assert cli_main(meta_train(out, killed_at + 3, 4, "--resume")) == 0  # 1 x 4 problems: the same run
    saved = load_verified(out / "checkpoint.pt")
    assert saved["epoch"] == killed_at + 3 and saved["world_size"] == 1
