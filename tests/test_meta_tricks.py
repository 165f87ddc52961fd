"""Published meta-training tricks (issue 19): the curriculum over unroll length (Chen et al. 2020) and the PES
meta-gradient (Vicol et al. 2021), in tiny configurations: the schedule's properties, PES's unbiasedness
against the full-unroll gradient, end-to-end runs, resumes bit for bit, refusals."""
from __future__ import annotations

import math

import pytest
import torch

from l2l_fast import CoordinatewiseLSTM
from l2l_fast.cli import main as cli_main
from l2l_fast.meta.pes import PESEpisode, flat_weights
from l2l_fast.meta.train import MetaTrainConfig, MetaTrainer, build_net, run_episode
from l2l_fast.meta.unroll import loss_and_grad, truncation
from l2l_fast.tasks import make_task
from test_meta import nan_quadratic_task


def tiny_config(**overrides) -> MetaTrainConfig:
    base = dict(task="quadratic", task_kwargs={"dim": 3}, epochs=4, horizon=10, unroll=5, meta_batch=3,
                eval_every=2, eval_problems=3)
    base.update(overrides)
    return MetaTrainConfig(**base)


def snapshot(trainer: MetaTrainer) -> tuple[dict, dict, list]:
    adam = {f"{p}.{k}": v for p, s in trainer.meta_optimizer.state_dict()["state"].items() for k, v in s.items()}
    log = [{k: v for k, v in row.items() if k != "seconds"} for row in trainer.log]
    return {k: v.clone() for k, v in trainer.net.state_dict().items()}, adam, log


def assert_same_run(a, b):
    for mine, theirs in zip(a[:2], b[:2]):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key
    assert a[2] == b[2]


# ---------------------------------------------------------------------------------------------
# curriculum over unroll length
@pytest.mark.parametrize("horizon, unroll, per_stage", [(100, 20, 3), (10, 5, 1), (60, 4, 2), (7, 7, 5), (96, 1, 4)])
def test_curriculum_doubles_the_truncations_up_to_the_horizon(horizon, unroll, per_stage):
    config = MetaTrainConfig(horizon=horizon, unroll=unroll, unroll_curriculum=per_stage)
    lengths = [config.episode_horizon(epoch) for epoch in range(40 * per_stage)]
    assert lengths[0] == unroll and lengths[-1] == horizon  # starts at one truncation, ends at the horizon
    assert all(length % unroll == 0 for length in lengths)
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))
    for epoch, length in enumerate(lengths):  # stage k: 2^k truncations, at most the horizon's
        assert length == min(horizon, unroll * 2 ** (epoch // per_stage))
    assert config.episode_horizon(10**9) == horizon
    # a pure function of the epoch: another config with the same settings, asked in another order, agrees
    again = MetaTrainConfig(horizon=horizon, unroll=unroll, unroll_curriculum=per_stage)
    assert [again.episode_horizon(epoch) for epoch in reversed(range(len(lengths)))] == lengths[::-1]


def test_curriculum_off_keeps_the_horizon():
    assert {MetaTrainConfig(horizon=100, unroll=20).episode_horizon(e) for e in range(50)} == {100}


def test_curriculum_run_follows_the_schedule_and_validates_at_the_horizon(tmp_path, monkeypatch):
    config = tiny_config(horizon=20, epochs=5, eval_every=5, unroll_curriculum=2)
    seen = []
    import l2l_fast.meta.train as train_module

    original = train_module._validation_losses
    monkeypatch.setattr(train_module, "_validation_losses",
                        lambda net, problems, horizon: seen.append(horizon) or original(net, problems, horizon))
    trainer = MetaTrainer(config, tmp_path, progress=False)
    summary = trainer.run()
    assert [row["horizon"] for row in trainer.log] == [5, 5, 10, 10, 20]
    assert seen == [20] and math.isfinite(summary["best_score"])


def test_curriculum_resume_is_bit_identical(tmp_path):
    """Stopped at epoch 2 (a stage's end, and an evaluation's: a run's last epoch is always evaluated) and resumed
    into the next stages: the weights, Adam's state and the log of the straight run."""
    config = tiny_config(horizon=20, epochs=5, unroll_curriculum=2)
    straight = MetaTrainer(config, tmp_path / "straight", progress=False)
    straight.run()
    MetaTrainer(tiny_config(horizon=20, epochs=2, unroll_curriculum=2), tmp_path / "resumed", progress=False).run()
    resumed = MetaTrainer(config, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.epoch == 2
    resumed.run()
    assert [row["horizon"] for row in resumed.log] == [5, 5, 10, 10, 20]
    assert_same_run(snapshot(resumed), snapshot(straight))


@pytest.mark.parametrize("overrides, message", [
    (dict(unroll_curriculum=-1), "unroll_curriculum: expected an int >= 0"),
    (dict(unroll_curriculum=2.5), "unroll_curriculum: expected an int >= 0"),
    (dict(unroll_curriculum=2, horizon_min=5), "unroll_curriculum and horizon_min"),
])
def test_bad_curriculums_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# ---------------------------------------------------------------------------------------------
# PES
def backprop_gradient(net, problems, lengths) -> torch.Tensor:
    """Summed gradient of truncations of `lengths` steps (state carried, detached between them): one length
    is the full unroll's gradient, several are truncated backprop's."""
    params = problems.init_params()
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    state, start, total = net.init_state(params.numel()), 0, 0
    for steps in lengths:
        net.zero_grad()
        meta_loss, _, params, grad, state = truncation(net, problems, params, grad, state, start, steps)
        meta_loss.backward()
        start += steps
        total = total + torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    return total


def test_pes_is_unbiased_across_truncations_where_truncated_backprop_is_not():
    """A 2-dim quadratic, a net of 22 weights (1 unit, 1 layer), 4 steps in 2 truncations of 2, float64, theta
    held fixed. Summed over the two truncations, E[PES] is the gradient of the smoothed objective
    J(theta) = E[F(theta + eps_1, theta + eps_2)], and grad J = grad F + O(sigma^2 * F''') (the Gaussian's odd
    moments vanish): at sigma = 1e-3 that bias is ~1e-6 of the gradient, far below the standard error of the
    mean over 1,000 pairs (~3% of |grad F| per coordinate). So the mean must lie within a few standard errors of
    the full 4-step backprop gradient: |z| < 4.5 on all 22 coordinates (Bonferroni: a false failure with
    probability ~1.5e-4 under normality). Power: truncated backprop's gradient misses the effect of the first
    truncation's weights on the second's losses (|difference| ~ 0.53 |grad F| here); along that difference the
    PES mean must stand > 6 standard errors from it (measured: 12.5), so a PES that forgot its accumulated
    perturbations (truncated ES, whose mean is truncated backprop's) would fail here."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        problems = make_task("quadratic", dim=2).sample(1, seed=3)
        torch.manual_seed(1)
        net = CoordinatewiseLSTM(hidden_size=1, num_layers=1)
        full, truncated = backprop_gradient(net, problems, [4]), backprop_gradient(net, problems, [2, 2])
        pairs = 1000
        episode = PESEpisode(net, problems, pairs, sigma=1e-3)
        generator = torch.Generator().manual_seed(0)
        estimates = sum(episode.truncation(start, 2, generator).pair_gradients for start in (0, 2))
    finally:
        torch.set_default_dtype(default)
    assert estimates.shape == (pairs, full.numel()) == (pairs, 22)
    mean, standard_error = estimates.mean(0), estimates.std(0) / math.sqrt(pairs)
    z = (mean - full) / standard_error
    assert z.abs().max() < 4.5, z
    direction = (full - truncated) / (full - truncated).norm()
    along = estimates @ direction
    assert (along.mean() - truncated @ direction) / (along.std() / math.sqrt(pairs)) > 6


def test_pes_estimates_of_slices_sum_to_the_whole_batchs():
    """What the distributed path relies on: the same perturbations over problems [0, 2) and [2, 5) give estimates
    and meta-losses that sum to those of all 5 (float64; PES is linear in the problems' losses)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        problems = make_task("quadratic", dim=3).sample(5, seed=4)
        torch.manual_seed(0)
        net = CoordinatewiseLSTM(hidden_size=3)
        results = []
        for part in (problems, problems.select(0, 2), problems.select(2, 5)):
            episode = PESEpisode(net, part, pairs=3, sigma=0.05)
            results.append([episode.truncation(start, 3, torch.Generator().manual_seed(start), loss_scale="initial")
                            for start in (0, 3)])
    finally:
        torch.set_default_dtype(default)
    for whole, first, second in zip(*results):
        torch.testing.assert_close(first.gradient + second.gradient, whole.gradient, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(first.meta_losses + second.meta_losses, whole.meta_losses)


def test_pes_leaves_the_net_untouched_and_pairs_are_antithetic():
    problems = make_task("quadratic", dim=3).sample(2, seed=5)
    net = CoordinatewiseLSTM(hidden_size=4)
    before = flat_weights(net).clone()
    episode = PESEpisode(net, problems, pairs=2, sigma=0.1)
    result = episode.truncation(0, 3, torch.Generator().manual_seed(1))
    assert torch.equal(flat_weights(net), before)
    assert result.meta_losses.shape == (2, 2) and bool((result.meta_losses[:, 0] != result.meta_losses[:, 1]).all())
    # the + and - particles ran the same problems from the same start with weights theta +- eps
    expected = episode.xi * ((result.meta_losses[:, 0] - result.meta_losses[:, 1]) / (2 * 0.1**2))[:, None]
    torch.testing.assert_close(result.pair_gradients, expected)
    assert result.gradient.shape == before.shape and torch.isfinite(result.gradient).all()


@pytest.mark.parametrize("features, output", [(("paper",), "linear"), (("moments",), "tanh")])
def test_pes_meta_trains_end_to_end(tmp_path, features, output):
    config = tiny_config(estimator="pes", pes_pairs=2, pes_sigma=0.02, features=features, output=output,
                         loss_scale="relative", step_weight_power=1.0)
    trainer = MetaTrainer(config, tmp_path, progress=False)
    summary = trainer.run()
    initial = build_net(config).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in trainer.net.state_dict().items()), "weights must move"
    assert math.isfinite(summary["best_score"]) and summary["skipped_truncations"] == 0
    assert all(row["grad_norm"] > 0 for row in trainer.log if row["epoch"])


def test_pes_resume_is_bit_identical(tmp_path):
    config = tiny_config(estimator="pes", pes_pairs=2, unroll_curriculum=1)
    straight = MetaTrainer(config, tmp_path / "straight", progress=False)
    straight.run()
    MetaTrainer(tiny_config(estimator="pes", pes_pairs=2, unroll_curriculum=1, epochs=2), tmp_path / "resumed",
                progress=False).run()
    resumed = MetaTrainer(config, tmp_path / "resumed", resume=True, progress=False)
    resumed.run()
    assert_same_run(snapshot(resumed), snapshot(straight))


def test_pes_skips_a_nonfinite_truncation_and_keeps_the_weights():
    config = tiny_config(estimator="pes", pes_pairs=2)
    net = build_net(config)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    task = nan_quadratic_task(dim=3)
    row = run_episode(net, torch.optim.Adam(net.parameters(), 1e-2), task, config, epoch=0)
    assert row["skipped"] == 1
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("overrides, message", [
    (dict(estimator="es"), "estimator: expected one of"),
    (dict(estimator="pes", pes_pairs=0), "pes_pairs: expected a positive int"),
    (dict(estimator="pes", pes_sigma=0.0), "pes_sigma: expected a finite number > 0"),
    (dict(estimator="pes", pes_sigma=-0.1), "pes_sigma: expected a finite number > 0"),
    (dict(estimator="pes", pes_sigma=math.nan), "pes_sigma: expected a finite number > 0"),
    (dict(estimator="pes", pes_sigma=math.inf), "pes_sigma: expected a finite number > 0"),
    (dict(estimator="pes", coordinate_fraction=0.5), "estimator pes runs no backprop"),
])
def test_bad_pes_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("argv, message", [
    (["--estimator", "pes", "--pes-sigma", "0"], "pes_sigma: expected a finite number > 0"),
    (["--unroll-curriculum", "2", "--horizon-min", "20"], "unroll_curriculum and horizon_min"),
    (["--estimator", "pes", "--coordinate-fraction", "0.5"], "estimator pes runs no backprop"),
    (["--pes-pairs", "0"], "expected a positive integer"),
    (["--estimator", "spsa"], "invalid choice"),
])
def test_the_cli_refuses_bad_trick_settings(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["meta-train", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
