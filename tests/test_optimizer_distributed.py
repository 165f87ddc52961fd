"""LearnedOptimizer under DDP and FSDP2 (fully_shard, DTensor shards), 2 CPU processes with gloo.

One spawn of 2 ranks runs every scenario (tests/distributed_scenarios.py); the tests compare its results with
single-process runs here: DDP ranks step identically and equal the single-process run on the global batch;
FSDP2 ranks hold only their shards' LSTM states, equal the unsharded run, and a distributed checkpoint
save / load in the middle continues bit-identically.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distributed_scenarios as scenarios
from conftest import requires_native
from spawn_ranks import spawn_ranks
from l2l_fast import LearnedOptimizer

pytestmark = [requires_native,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")]

WORLD = 2
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs the scenarios on 2 spawned ranks; returns each rank's results."""
    out_dir = str(tmp_path_factory.mktemp("distributed"))
    return spawn_ranks(scenarios.run, WORLD, out_dir, TIMEOUT_S)


def single_process(grads_per_step=None):
    """The unsharded, single-process run on the global batches; with grads_per_step, replays those gradients."""
    model = scenarios.make_model()
    opt = LearnedOptimizer(model.parameters(), scenarios.make_net())
    for step in range(scenarios.STEPS):
        opt.zero_grad()
        if grads_per_step is None:
            x, y = scenarios.global_batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
        else:
            for p, g in zip(model.parameters(), grads_per_step[step]):
                p.grad = g.clone()
        opt.step()
    return [p.detach() for p in model.parameters()], [opt.state[p]["lstm_state"] for p in model.parameters()]


def assert_all_equal(actual, expected, name):
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape and torch.equal(a, e), f"{name}[{k}]: max difference {(a - e).abs().max():.3e}"


def assert_all_close(actual, expected, name):
    """Gradients averaged across ranks round differently from the full-batch mean (float64: ~1e-16 relative);
    the optimizer's update is smooth in them, so after 4 steps the parameters agree to ~1e-13."""
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{name}[{k}]: {m}")


# ---------------------------------------------------------------------------------------------
# DDP
def test_ddp_ranks_step_identically(ranks):
    assert_all_equal(ranks[1]["ddp"]["params"], ranks[0]["ddp"]["params"], "params")
    assert_all_equal(ranks[1]["ddp"]["states"], ranks[0]["ddp"]["states"], "LSTM states")


def test_ddp_equals_single_process_on_the_global_batch(ranks):
    params, states = single_process()
    assert_all_close(ranks[0]["ddp"]["params"], params, "params")
    assert_all_close(ranks[0]["ddp"]["states"], states, "LSTM states")
    initial = [p.detach() for p in scenarios.make_model().parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(params, initial)), "training must move every parameter"


def test_ddp_step_is_the_single_process_step_on_the_averaged_gradients(ranks):
    """Given the gradients DDP averaged, the step is exactly the single-process one."""
    params, states = single_process(ranks[0]["ddp"]["grads"])
    assert_all_equal(ranks[0]["ddp"]["params"], params, "params")
    assert_all_equal(ranks[0]["ddp"]["states"], states, "LSTM states")


# ---------------------------------------------------------------------------------------------
# FSDP2
def test_fsdp_each_rank_holds_only_its_shards_state(ranks):
    for rank, results in enumerate(ranks):
        local = results["fsdp"]["local"]
        assert all(local["state_is_dtensor"])
        for param_shape, state_shape in zip(local["param_local_shapes"], local["state_local_shapes"]):
            assert state_shape == (2, 2, 20, *param_shape), f"rank {rank}"
        assert local["fused_state_numel"] == 80 * sum(torch.Size(s).numel() for s in local["param_local_shapes"])
    shards = [r["fsdp"]["local"]["param_local_shapes"] for r in ranks]
    assert shards[0] != shards[1], "uneven shards (17 = 9 + 8 rows): the test must cover them"
    full_numel = sum(p.numel() for p in scenarios.make_model().parameters())
    assert sum(torch.Size(s).numel() for r in shards for s in r) == full_numel


def test_fsdp_equals_unsharded_run(ranks):
    params, states = single_process()
    for results in ranks:
        assert_all_close(results["fsdp"]["params"], params, "params")
        assert_all_close(results["fsdp"]["states"], states, "LSTM states")


def test_fsdp_sharded_step_is_exact(ranks):
    """The optimizer is coordinatewise: stepping shards gives exactly the unsharded step on the same (reduced)
    gradients, bit for bit."""
    params, states = single_process(ranks[0]["fsdp"]["grads"])
    assert_all_equal(ranks[0]["fsdp"]["params"], params, "params")
    assert_all_equal(ranks[0]["fsdp"]["states"], states, "LSTM states")


def test_fsdp_distributed_checkpoint_round_trip_is_bit_identical(ranks):
    """Save with torch.distributed.checkpoint after 2 steps, load into a fresh (differently initialised) sharded
    model and optimizer, run the last 2 steps: the same bits as the uninterrupted run."""
    for results in ranks:
        assert_all_equal(results["fsdp"]["resumed_params"], results["fsdp"]["params"], "params")
        assert_all_equal(results["fsdp"]["resumed_states"], results["fsdp"]["states"], "LSTM states")
