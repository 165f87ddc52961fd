"""LearnedOptimizer with a moments net under FSDP2 (2 CPU processes, gloo): each rank keeps the moments of its
shards only, as DTensors placed like the parameters one dim right (Shard(d) -> Shard(d + 1)); the sharded step is
the unsharded one bit for bit, and a distributed checkpoint save / load in the middle continues bit-identically."""
from __future__ import annotations

import pytest
import torch

import distributed_moments_scenarios as scenarios
from conftest import requires_native
from distributed_scenarios import STEPS, make_model
from spawn_ranks import spawn_ranks
from l2l_fast import LearnedOptimizer

pytestmark = [requires_native,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")]

WORLD = 2
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("distributed_moments"))
    return spawn_ranks(scenarios.run, WORLD, out_dir, TIMEOUT_S)


def unsharded(grads_per_step):
    """The single-process run replaying the gradients FSDP reduced: (params, LSTM states, moments)."""
    model = make_model()
    params = list(model.parameters())
    opt = LearnedOptimizer(params, scenarios.make_net())
    for step in range(STEPS):
        for p, g in zip(params, grads_per_step[step]):
            p.grad = g.clone()
        opt.step()
    return ([p.detach() for p in params], [opt.state[p]["lstm_state"] for p in params],
            [opt.state[p]["moments"] for p in params])


def assert_all_equal(actual, expected, name):
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape and torch.equal(a, e), f"{name}[{k}]: max difference {(a - e).abs().max():.3e}"


def test_each_rank_holds_its_shards_moments_as_dtensors(ranks):
    for rank, results in enumerate(ranks):
        local = results["local"]
        assert all(local["moments_are_dtensors"]) and set(local["moments_dtypes"]) == {torch.float64}
        for param_shape, moments_shape in zip(local["param_local_shapes"], local["moments_local_shapes"]):
            assert moments_shape == (4, *param_shape), f"rank {rank}"
        for param, moments in zip(local["param_placements"], local["moments_placements"]):
            assert param == (("Shard", 0),) and moments == (("Shard", 1),), f"rank {rank}"
        assert local["fused_moments_numel"] == 4 * sum(torch.Size(s).numel() for s in local["param_local_shapes"])
    shards = [r["local"]["param_local_shapes"] for r in ranks]
    assert shards[0] != shards[1], "uneven shards: the test must cover them"


def test_the_sharded_step_is_the_unsharded_one(ranks):
    expected = unsharded(ranks[0]["grads"])
    for results in ranks:
        for name, actual, wanted in zip(("params", "LSTM states", "moments"), results["final"], expected):
            assert_all_equal(actual, wanted, name)
    assert all((m[2] == STEPS).all() for m in expected[2])


def test_a_distributed_checkpoint_round_trip_is_bit_identical(ranks):
    for results in ranks:
        for name, actual, wanted in zip(("params", "LSTM states", "moments"), results["resumed"], results["final"]):
            assert_all_equal(actual, wanted, name)
