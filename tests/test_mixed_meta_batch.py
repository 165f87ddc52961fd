"""Meta-batches of problems of different shapes (MixedBatch): one net call steps all their coordinates, and each
problem's updates, losses and meta-gradient terms are those it gets alone; [P, D] batches take the same path
unchanged. Random-length episodes, the per-episode loss scale, and a mixed run's resume."""
from __future__ import annotations

import math

import pytest
import torch

from l2l_fast.cli import main as cli_main
from l2l_fast.files import load_verified
from l2l_fast.meta.config import MetaTrainConfig
from l2l_fast.meta.rescale import RescaledProblems
from l2l_fast.meta.train import MetaTrainer, build_net, run_episode
from l2l_fast.meta.unroll import loss_and_grad, run_learned, run_torch_optimizer, truncation
from l2l_fast.net import CoordinatewiseLSTM
from l2l_fast.tasks import MixedBatch, make_task
from l2l_fast.tasks.convex import ClippedSquareBatch
from l2l_fast.tasks.quadratic import QuadraticBatch

# no dataset files needed: random teachers, quadratics, the clipped square
FAMILIES = ["--families", "mlp", "convex", "quadratic", "--datasets", "teacher_classification", "teacher_regression"]
MIXED = {"families": ("mlp", "convex", "quadratic"), "datasets": ("teacher_classification", "teacher_regression")}


def parts_float64():
    """Three problem batches of different shapes, float64: quadratics [2, 3], a clipped square [1, 7], [2, 4]."""
    g = torch.Generator().manual_seed(0)
    return [QuadraticBatch(torch.randn(2, 3, 3, generator=g, dtype=torch.float64),
                           torch.randn(2, 3, generator=g, dtype=torch.float64)),
            ClippedSquareBatch(torch.rand(1, 7, generator=g, dtype=torch.float64) * 2 - 1),
            QuadraticBatch(torch.randn(2, 4, 4, generator=g, dtype=torch.float64),
                           torch.randn(2, 4, generator=g, dtype=torch.float64))]


def small_net():
    torch.manual_seed(0)
    return CoordinatewiseLSTM(hidden_size=5).double()


def run_truncation(net, problems, steps=4):
    params = problems.init_params()
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    meta_loss, history, params, grad, state = truncation(net, problems, params, grad, net.init_state(params.numel()),
                                                         0, steps)
    meta_loss.backward()
    return meta_loss.detach(), history, params, state, [p.grad.clone() for p in net.parameters()]


def test_one_net_call_steps_every_problem_as_it_would_alone():
    parts = parts_float64()
    mixed = MixedBatch(parts)
    assert mixed.param_shape == (2 * 3 + 7 + 2 * 4,) and mixed.problem_sizes() == [3, 3, 7, 4, 4]
    net = small_net()
    calls = []
    step = net.step_
    net.step_ = lambda param, grad, state: (calls.append(param.numel()), step(param, grad, state))
    together = run_learned(net, mixed, 5)
    assert calls == [21] * 5  # one call per step over all N coordinates
    alone = torch.cat([run_learned(net, part, 5) for part in parts], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)


def test_the_meta_gradient_of_a_mixed_batch_is_the_sum_of_its_problems():
    """Differentiable truncation: the mixed batch's meta-loss and each net weight's gradient are the sums of the
    parts' (each problem's LSTM chains are its own), its losses and carried state the parts' side by side."""
    parts = parts_float64()
    mixed = run_truncation(small_net(), MixedBatch(parts))
    alone = [run_truncation(small_net(), part) for part in parts]
    torch.testing.assert_close(mixed[0], sum(a[0] for a in alone), rtol=1e-12, atol=0)
    torch.testing.assert_close(mixed[1], torch.cat([a[1] for a in alone], dim=1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mixed[2], torch.cat([a[2].reshape(-1) for a in alone]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mixed[3], torch.cat([a[3] for a in alone], dim=-1), rtol=1e-12, atol=1e-14)
    for got, *terms in zip(mixed[4], *(a[4] for a in alone)):
        torch.testing.assert_close(got, sum(terms), rtol=1e-10, atol=1e-13)


def test_a_plain_batch_goes_through_the_mixed_path_unchanged():
    """A [P, D] batch and the same batch as the one part of a MixedBatch ([N]) give the same bits: the engine
    sees both flattened."""
    part = parts_float64()[0]
    plain, mixed = run_truncation(small_net(), part), run_truncation(small_net(), MixedBatch([part]))
    assert torch.equal(plain[0], mixed[0]) and torch.equal(plain[1], mixed[1])
    assert torch.equal(plain[2].reshape(-1), mixed[2]) and torch.equal(plain[3], mixed[3])
    assert all(torch.equal(a, b) for a, b in zip(plain[4], mixed[4]))


def test_torch_optimizers_run_a_mixed_batch_problem_by_problem():
    parts = parts_float64()
    adam = lambda params: torch.optim.Adam(params, lr=0.05)  # noqa: E731
    together = run_torch_optimizer(adam, MixedBatch(parts), 6)
    alone = torch.cat([run_torch_optimizer(adam, part, 6) for part in parts], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)


def test_a_mixed_batch_rescales_and_samples_coordinates(tmp_path):
    problems = make_task("mixed", **MIXED).sample(4, seed=0)
    rescaled = RescaledProblems.random(problems, 1.0, torch.Generator().manual_seed(1))
    assert rescaled.param_shape == problems.param_shape and rescaled.relative_scores
    assert torch.isfinite(run_learned(build_net(MetaTrainConfig(hidden_size=4)), rescaled, 3)).all()
    config = MetaTrainConfig(task="mixed", task_kwargs=MIXED, epochs=1, horizon=4, unroll=2, meta_batch=3,
                             eval_problems=2, hidden_size=4, random_scale=1.0, coordinate_fraction=0.5)
    assert math.isfinite(MetaTrainer(config, tmp_path, progress=False).run()["best_score"])


def test_random_episode_lengths_are_log_uniform_multiples_of_the_unroll_and_seeded():
    config = MetaTrainConfig(horizon=2000, horizon_min=20, unroll=10, seed=3)
    lengths = [config.episode_horizon(epoch) for epoch in range(400)]
    assert lengths == [MetaTrainConfig(horizon=2000, horizon_min=20, unroll=10, seed=3).episode_horizon(e)
                       for e in range(400)]
    assert lengths != [MetaTrainConfig(horizon=2000, horizon_min=20, unroll=10, seed=4).episode_horizon(e)
                       for e in range(400)]
    assert all(20 <= h <= 2000 and h % 10 == 0 for h in lengths)
    logs = torch.tensor(lengths, dtype=torch.float64).log()
    assert abs(logs.median().item() - math.log(200)) < 0.4  # log-uniform: the median is the geometric mean
    assert sum(h <= 100 for h in lengths) > 100 and sum(h >= 1000 for h in lengths) > 50
    assert {MetaTrainConfig(horizon=60, unroll=20).episode_horizon(e) for e in range(20)} == {60}  # the paper's
    for bad in (-1, 70, 2.5):
        with pytest.raises(ValueError, match="horizon_min"):
            MetaTrainConfig(horizon=60, unroll=20, horizon_min=bad)


def test_random_length_episodes_train_deterministically(tmp_path):
    config = MetaTrainConfig(task="mixed", task_kwargs=MIXED, epochs=3, horizon=12, horizon_min=2, unroll=2,
                             meta_batch=3, eval_every=3, eval_problems=2, hidden_size=4, loss_scale="initial")
    runs = [MetaTrainer(config, tmp_path / name, progress=False) for name in ("a", "b")]
    for run in runs:
        run.run()
    logs = [load_verified(tmp_path / name / "checkpoint.pt")["log"] for name in ("a", "b")]
    assert [row["horizon"] for row in logs[0]] == [config.episode_horizon(e) for e in range(3)]
    assert len({row["horizon"] for row in logs[0]}) > 1
    assert [row["meta_loss"] for row in logs[0]] == [row["meta_loss"] for row in logs[1]]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].net.parameters(), runs[1].net.parameters()))


def test_the_initial_loss_scale_weighs_problems_of_any_scale_alike():
    """loss_scale 'initial': each problem's losses divided by its loss at theta_0, so a truncation's scaled
    meta-loss is about 1 at the start whatever the problems' scales (quadratics ~10-100, classifiers ~1)."""
    task = make_task("mixed", **MIXED)
    config = MetaTrainConfig(task="mixed", horizon=2, unroll=2, meta_batch=6, hidden_size=4, loss_scale="initial")
    net = build_net(config)
    row = run_episode(net, torch.optim.SGD(net.parameters(), lr=0.0), task, config, epoch=0)
    assert 0.5 < row["meta_loss"] < 1.5 and row["horizon"] == 2
    plain = run_episode(net, torch.optim.SGD(net.parameters(), lr=0.0), task, MetaTrainConfig(
        task="mixed", horizon=2, unroll=2, meta_batch=6, hidden_size=4), epoch=0)
    assert plain["meta_loss"] != pytest.approx(row["meta_loss"], rel=0.1)


def test_a_resumed_mixed_run_equals_an_uninterrupted_one(tmp_path):
    common = dict(task="mixed", task_kwargs=MIXED, horizon=8, horizon_min=2, unroll=2, meta_batch=3, eval_every=2,
                  eval_problems=2, hidden_size=4, loss_scale="initial", random_scale=0.5)
    MetaTrainer(MetaTrainConfig(epochs=4, **common), tmp_path / "straight", progress=False).run()
    MetaTrainer(MetaTrainConfig(epochs=2, **common), tmp_path / "split", progress=False).run()
    MetaTrainer(MetaTrainConfig(epochs=4, **common), tmp_path / "split", resume=True, progress=False).run()
    straight = load_verified(tmp_path / "straight" / "checkpoint.pt")
    split = load_verified(tmp_path / "split" / "checkpoint.pt")
    for key in straight["net"]:
        assert torch.equal(straight["net"][key], split["net"][key]), key
    assert straight["best_score"] == split["best_score"]
    assert [r["meta_loss"] for r in straight["log"]] == [r["meta_loss"] for r in split["log"]]


def test_meta_train_task_mixed_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["meta-train", "--task", "mixed", *FAMILIES, "--epochs", "2", "--horizon", "6", "--horizon-min",
                     "2", "--unroll", "2", "--meta-batch", "3", "--eval-every", "1", "--eval-problems", "2",
                     "--loss-scale", "initial", "--out", str(out), "--no-progress"]) == 0
    config = load_verified(out / "checkpoint.pt")["config"]
    assert config["task"] == "mixed" and config["task_kwargs"] == MIXED and config["horizon_min"] == 2
    assert cli_main(["meta-train", "--task", "mixed", *FAMILIES, "--epochs", "3", "--horizon", "6", "--horizon-min",
                     "2", "--unroll", "2", "--meta-batch", "3", "--eval-every", "1", "--eval-problems", "2",
                     "--loss-scale", "initial", "--out", str(out), "--no-progress", "--resume"]) == 0
    assert [row["epoch"] for row in load_verified(out / "checkpoint.pt")["log"]] == [1, 2, 3]
