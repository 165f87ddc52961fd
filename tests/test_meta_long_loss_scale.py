"""--long-episodes K --long-loss-scale S: episodes of more than K steps use loss scale S, the others --loss-scale
(one run trains both the first steps' progress and late precision). Checked against runs with one loss scale:
an epoch is bit for bit the run of the scale its length selects, for both meta-gradient estimators."""
from __future__ import annotations

import pytest
import torch

from l2l_fast.cli import main as cli_main
from l2l_fast.files import load_verified
from l2l_fast.meta.train import MetaTrainConfig, build_net, run_episode
from l2l_fast.tasks import make_task


def config_of(**overrides) -> MetaTrainConfig:
    base = dict(task="quadratic", task_kwargs={"dim": 3}, epochs=12, horizon=12, horizon_min=3, unroll=3,
                meta_batch=3, eval_every=2, eval_problems=3, seed=2)
    base.update(overrides)
    return MetaTrainConfig(**base)


def test_the_episode_length_picks_the_loss_scale():
    config = config_of(loss_scale="initial", long_loss_scale="relative", long_episodes=6)
    lengths = [config.episode_horizon(epoch) for epoch in range(config.epochs)]
    assert {length <= 6 for length in lengths} == {True, False}  # both kinds drawn: the test below sees both
    for length in lengths:
        assert config.episode_loss_scale(length) == ("relative" if length > 6 else "initial")
    assert config_of(loss_scale="sum").episode_loss_scale(12) == "sum"  # off: --loss-scale everywhere


def one_epoch(config: MetaTrainConfig, epoch: int) -> dict:
    task = make_task(config.task, **config.task_kwargs)
    torch.manual_seed(0)
    problems = task.sample(1, seed=0, split="val")
    net = build_net(config, problems.groups, problems.dim)
    meta_optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    run_episode(net, meta_optimizer, task, config, epoch)
    return {k: v.clone() for k, v in net.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("estimator", ["backprop", "pes"])
def test_each_epoch_is_the_run_of_the_scale_its_length_selects(estimator):
    mixed = config_of(loss_scale="initial", long_loss_scale="relative", long_episodes=6, estimator=estimator,
                      pes_pairs=2)
    short_only, long_only = (config_of(loss_scale=scale, estimator=estimator, pes_pairs=2)
                             for scale in ("initial", "relative"))
    lengths = {epoch: mixed.episode_horizon(epoch) for epoch in range(mixed.epochs)}
    short = next(e for e, n in lengths.items() if n <= 6)
    long = next(e for e, n in lengths.items() if n > 6 and n // mixed.unroll >= 3)
    for epoch, expected, other in ((short, short_only, long_only), (long, long_only, short_only)):
        got = one_epoch(mixed, epoch)
        assert same(got, one_epoch(expected, epoch)), epoch
        assert not same(got, one_epoch(other, epoch)), epoch  # the two scales differ here: the check can fail


@pytest.mark.parametrize("overrides, message", [
    (dict(long_episodes=6), "long_episodes and long_loss_scale go together"),
    (dict(long_loss_scale="relative"), "long_episodes and long_loss_scale go together"),
    (dict(long_loss_scale="relative", long_episodes=12), r"long_episodes \(12\) must be below horizon"),
    (dict(long_loss_scale="relative", long_episodes=-1), "long_episodes: expected an int >= 0"),
    (dict(long_loss_scale="log", long_episodes=6), "long_loss_scale: expected one of"),
])
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_of(**overrides)


def test_the_cli_passes_both_flags_and_refuses_one_alone(tmp_path, capsys):
    argv = ["meta-train", "--task", "quadratic", "--epochs", "2", "--horizon", "6", "--horizon-min", "2",
            "--unroll", "2", "--meta-batch", "2", "--eval-every", "2", "--eval-problems", "2", "--no-progress",
            "--threads", "1"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--out", str(tmp_path / "refused"), "--long-episodes", "3"])
    assert exit_info.value.code == 2 and "go together" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    cli_main([*argv, "--out", str(tmp_path / "run"), "--loss-scale", "initial", "--long-loss-scale", "relative",
              "--long-episodes", "3"])
    saved = load_verified(tmp_path / "run" / "checkpoint.pt")["config"]
    assert (saved["long_episodes"], saved["long_loss_scale"], saved["loss_scale"]) == (3, "relative", "initial")
