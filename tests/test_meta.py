"""Meta-training, evaluation, checkpoints and the CLI, in small fast configurations."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from l2l_fast import CoordinatewiseLSTM
from l2l_fast.cli import load_optimizer_spec, main as cli_main
from l2l_fast.files import CheckpointError, load_verified, save_atomic
from l2l_fast.meta.evaluate import Curve, compare, final_ratio, markdown_table, plot_curves, tune_learning_rate
from l2l_fast.meta.train import MetaTrainConfig, MetaTrainer, build_net, run_episode
from l2l_fast.meta.unroll import CoordinateSample, loss_and_grad, run_learned, truncation
from l2l_fast.pretrained import available, load_pretrained, save_pretrained
from l2l_fast.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "datasets"


def tiny_config(**overrides) -> MetaTrainConfig:
    base = dict(task="quadratic", epochs=3, horizon=10, unroll=5, meta_batch=4, eval_every=2, eval_problems=4)
    base.update(overrides)
    return MetaTrainConfig(**base)


def test_meta_gradient_native_equals_reference_in_float64():
    """The whole truncation (optimizee losses, detached gradients, fused op, theta += update) gives the
    same meta-gradient through the native kernels as through the pure-PyTorch reference."""
    problems = make_task("quadratic").sample(3, seed=5)
    grads = {}
    for backend in ("native", "reference"):
        torch.manual_seed(0)
        net = CoordinatewiseLSTM(hidden_size=6, backend=backend).double()
        params = problems.init_params().double()
        problems.W, problems.y = problems.W.double(), problems.y.double()
        state = net.init_state(params.numel())
        _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
        meta_loss, history, *_ = truncation(net, problems, params, grad, state, 0, 6)
        meta_loss.backward()
        grads[backend] = [p.grad.clone() for p in net.parameters()]
        assert history.shape == (6, 3)
    for native, ref in zip(grads["native"], grads["reference"]):
        torch.testing.assert_close(native, ref, rtol=1e-9, atol=1e-12)


def four_step_truncation(problems, **weighting):
    """A 4-step float64 truncation of a fixed small net: (meta_loss, losses [4, P], the net's gradients)."""
    torch.manual_seed(0)
    net = CoordinatewiseLSTM(hidden_size=5).double()
    problems.W, problems.y = problems.W.double(), problems.y.double()
    params = problems.init_params().double()
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    meta_loss, history, *_ = truncation(net, problems, params, grad, net.init_state(params.numel()), 0, 4,
                                        **weighting)
    meta_loss.backward()
    return meta_loss.detach(), history, [p.grad.clone() for p in net.parameters()]


def test_truncation_weights_scale_each_problems_losses():
    """loss_scale='relative' weighs problem p's losses by a constant w[p]: the meta-loss is sum_t sum_p
    w[p] loss[t, p], and its gradient is that weighted sum's (not the unweighted one's)."""
    problems = make_task("quadratic").sample(3, seed=7)
    weights = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    plain = four_step_truncation(problems)
    weighted = four_step_truncation(problems, weights=weights)
    torch.testing.assert_close(plain[0], plain[1].sum())
    torch.testing.assert_close(weighted[0], (weighted[1] * weights).sum())
    assert not torch.allclose(plain[2][0], weighted[2][0])


def test_step_weights_scale_each_steps_losses():
    """step_weights[j] multiplies the losses after update j: the meta-loss is sum_j sw[j] sum_p loss[j, p],
    and its gradient differs from the unweighted one."""
    problems = make_task("quadratic").sample(2, seed=9)
    step_weights = [0.25, 0.5, 1.5, 3.0]
    plain = four_step_truncation(problems)
    weighted = four_step_truncation(problems, step_weights=step_weights)
    expected = (weighted[1].sum(1) * torch.tensor(step_weights, dtype=torch.float64)).sum()
    torch.testing.assert_close(weighted[0], expected)
    assert not torch.allclose(plain[2][0], weighted[2][0])


def test_step_weight_power_config(tmp_path):
    assert [tiny_config(step_weight_power=1).step_weight(t) for t in (1, 5, 10)] == pytest.approx([0.2, 1.0, 2.0])
    assert tiny_config(step_weight_power=2).step_weight(5) == pytest.approx(0.75)  # horizon 10
    assert tiny_config().step_weight(7) == 1.0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="step_weight_power"):
            tiny_config(step_weight_power=bad)
    config = tiny_config(step_weight_power=2)
    summary = MetaTrainer(config, tmp_path, progress=False).run()
    assert math.isfinite(summary["best_score"])


def test_relative_loss_scale_trains_and_rejects_unknown_values(tmp_path):
    with pytest.raises(ValueError, match="loss_scale"):
        tiny_config(loss_scale="log")
    summary = MetaTrainer(tiny_config(loss_scale="relative"), tmp_path, progress=False).run()
    assert math.isfinite(summary["best_score"])


@pytest.mark.parametrize("field, bad", [("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("lr", math.inf),
                                        ("clip", 0.0), ("clip", -1.0), ("clip", math.nan)])
def test_meta_lr_and_clip_must_be_positive(field, bad):
    with pytest.raises(ValueError, match=f"{field}: expected"):
        tiny_config(**{field: bad})


def test_infinite_clip_turns_clipping_off(tmp_path):
    summary = MetaTrainer(tiny_config(clip=math.inf, epochs=2), tmp_path, progress=False).run()
    assert math.isfinite(summary["best_score"])


def test_cosine_meta_lr_schedule(tmp_path):
    config = tiny_config(epochs=4, lr=1e-2, lr_schedule="cosine")
    assert config.lr_at(0) == pytest.approx(1e-2)
    assert config.lr_at(2) == pytest.approx(1e-2 * (0.01 + 0.99 * 0.5))
    assert config.lr_at(4) == pytest.approx(1e-4)
    assert tiny_config(lr=1e-2).lr_at(3) == 1e-2
    trainer = MetaTrainer(config, tmp_path, progress=False)
    trainer.run()
    assert trainer.meta_optimizer.param_groups[0]["lr"] == pytest.approx(config.lr_at(3))
    with pytest.raises(ValueError, match="lr_schedule"):
        tiny_config(lr_schedule="step")


def test_meta_training_improves_on_quadratics(tmp_path):
    config = tiny_config(epochs=40, horizon=20, unroll=10, meta_batch=16, eval_every=40, lr=3e-3, eval_problems=16)
    untrained = build_net(config)
    task = make_task("quadratic")
    from l2l_fast.meta.train import evaluate_learned

    before = evaluate_learned(untrained, task, config)
    summary = MetaTrainer(config, tmp_path, progress=False).run()
    assert summary["best_score"] < 0.8 * before
    assert summary["stopped_early"] is None and summary["epochs"] == 40
    for name in ("checkpoint.pt", "best.pt", "log.csv", "summary.json"):
        assert (tmp_path / name).exists()


@pytest.mark.parametrize("stuck_score", [math.inf, "initial"])
def test_a_run_without_progress_stops_and_keeps_its_best_weights(tmp_path, monkeypatch, capsys, stuck_score):
    """Evaluations 1-2 make progress, then every score is stuck at the loss at theta_0 (a collapsed
    optimizer) or non-finite (a diverged one): the run stops after `collapse_patience` such evaluations."""
    import l2l_fast.meta.train as train

    config = tiny_config(epochs=40, eval_every=2, collapse_patience=3)
    initial = train.initial_validation_loss(make_task("quadratic"), config)
    scores = iter([0.5 * initial, 0.4 * initial] + [math.inf if stuck_score == math.inf else initial] * 100)
    monkeypatch.setattr(train, "evaluate_learned", lambda net, task, cfg: next(scores))
    trainer = MetaTrainer(config, tmp_path, progress=False)
    summary = trainer.run()
    assert summary["epochs"] == 2 * (2 + 3) and "collapsed or diverged" in summary["stopped_early"]
    assert "collapsed or diverged" in capsys.readouterr().err
    assert summary["best_score"] == pytest.approx(0.4 * initial)
    assert load_verified(tmp_path / "best.pt")["epoch"] == 4
    assert load_verified(tmp_path / "checkpoint.pt")["epoch"] == 10  # the stop is checkpointed too


def test_collapse_patience_zero_never_stops(tmp_path, monkeypatch):
    import l2l_fast.meta.train as train

    monkeypatch.setattr(train, "evaluate_learned", lambda net, task, cfg: math.inf)
    summary = MetaTrainer(tiny_config(epochs=8, eval_every=1, collapse_patience=0), tmp_path, progress=False).run()
    assert summary["epochs"] == 8 and summary["stopped_early"] is None
    with pytest.raises(ValueError, match="collapse_patience"):
        tiny_config(collapse_patience=-1)


def nan_quadratic_task(**options):
    """A quadratic task whose every sample has a NaN target in problem 0: its meta-loss is never finite."""
    task = make_task("quadratic", **options)
    original = task.sample

    def poisoned(*args, **kwargs):
        problems = original(*args, **kwargs)
        problems.y[0, 0] = float("nan")
        return problems

    task.sample = poisoned
    return task


def test_nonfinite_meta_loss_is_skipped_and_weights_kept():
    config = tiny_config()
    net = build_net(config)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    task = nan_quadratic_task()
    row = run_episode(net, torch.optim.Adam(net.parameters(), 1e-2), task, config, epoch=0)
    assert row["skipped"] >= 1
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resume_continues_and_rejects_other_config(tmp_path):
    MetaTrainer(tiny_config(epochs=2), tmp_path, progress=False).run()
    with pytest.raises(FileExistsError, match="resume"):
        MetaTrainer(tiny_config(epochs=4), tmp_path, progress=False)
    trainer = MetaTrainer(tiny_config(epochs=4), tmp_path, resume=True, progress=False)
    assert trainer.epoch == 2
    trainer.run()
    assert [row["epoch"] for row in load_verified(tmp_path / "checkpoint.pt")["log"]] == [1, 2, 3, 4]
    with pytest.raises(CheckpointError, match="different configuration"):
        MetaTrainer(tiny_config(epochs=6, lr=0.5), tmp_path, resume=True, progress=False)


def test_resume_without_a_checkpoint_warns_and_starts_fresh(tmp_path):
    with pytest.warns(UserWarning, match="no checkpoint"):
        trainer = MetaTrainer(tiny_config(epochs=1), tmp_path / "new", resume=True, progress=False)
    assert trainer.epoch == 0
    trainer.run()
    assert load_verified(tmp_path / "new" / "checkpoint.pt")["epoch"] == 1


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    MetaTrainer(tiny_config(epochs=4), tmp_path / "straight", progress=False).run()
    MetaTrainer(tiny_config(epochs=2), tmp_path / "split", progress=False).run()
    MetaTrainer(tiny_config(epochs=4), tmp_path / "split", resume=True, progress=False).run()
    straight = load_verified(tmp_path / "straight" / "checkpoint.pt")["net"]
    split = load_verified(tmp_path / "split" / "checkpoint.pt")["net"]
    for key in straight:
        torch.testing.assert_close(straight[key], split[key], rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_corrupt_checkpoint_is_refused(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"x": torch.arange(1000)}, path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        body = bytearray(data)
        body[len(body) // 2] ^= 0xFF
        path.write_bytes(bytes(body))
    else:
        torch.save({"something": 1}, path)
    with pytest.raises(CheckpointError):
        load_verified(path)


def test_sigkill_then_resume_loses_at_most_one_interval(tmp_path):
    """A run killed with SIGKILL mid-training resumes from its last complete checkpoint."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "l2l_fast.cli", "meta-train", "--task", "quadratic", "--epochs", "400",
               "--horizon", "10", "--unroll", "5", "--meta-batch", "4", "--eval-every", "50", "--eval-problems", "4",
               "--out", str(out), "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the run, between or during checkpoint writes
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = load_verified(out / "checkpoint.pt")  # intact despite the kill
    killed_at = saved["epoch"]
    assert 1 <= killed_at < 400
    resume = command[:command.index("--epochs") + 1] + [str(killed_at + 3)] + command[command.index("--epochs") + 2:]
    subprocess.run(resume + ["--resume"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    log = load_verified(out / "checkpoint.pt")["log"]
    assert [row["epoch"] for row in log] == list(range(1, killed_at + 4))


def test_baselines_tuned_and_compared(tmp_path):
    task = make_task("quadratic")
    lr, scores = tune_learning_rate("adam", task, steps=20, num_problems=4, seed=0, grid=(1e-3, 1e-1, 1e3))
    assert lr == min(scores, key=scores.get) and math.isfinite(scores[lr])
    assert scores[1e3] > scores[lr]
    net = build_net(tiny_config())
    curves = compare(task, {"lstm": net}, steps=20, num_problems=5, seed=1, tuned_lrs={"adam": lr, "sgd": 1e-2})
    assert [c.name for c in curves] == ["lstm", "adam", "sgd"]
    assert all(c.losses.shape == (21, 5) for c in curves)
    # all optimizers start from the same problems
    assert torch.equal(curves[0].losses[0], curves[1].losses[0])
    table = markdown_table(curves, "step 20")
    assert "| adam |" in table and "lr=" in table
    # the ratio column: tuned Adam is the reference, every other row gets its ratio and interval
    assert "final / adam (95% CI)" in table
    sgd_row = next(line for line in table.splitlines() if line.startswith("| sgd |"))
    ratio, low, high = final_ratio(curves[2], curves[1])
    assert f"{ratio:.3f} ({low:.3f}-{high:.3f})" in sgd_row
    assert "(95% CI)" not in markdown_table([curves[0], curves[2]], "step 20")  # no Adam, no column
    plot_curves(curves, tmp_path / "plot.png", "test")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def _final_curve(name, finals):
    """A curve whose last row holds the given final losses (one per problem)."""
    return Curve(name, torch.stack([torch.full_like(finals, 2.3), finals]))


def test_final_ratio_is_paired_over_problems():
    generator = torch.Generator().manual_seed(5)
    # problems of very different difficulty (losses over three decades), each shared by both optimizers
    base = torch.exp(3 * torch.randn(40, dtype=torch.float64, generator=generator))
    adam = _final_curve("adam", base)
    exact = final_ratio(_final_curve("x", 2 * base), adam)
    assert exact == pytest.approx((2.0, 2.0, 2.0), rel=1e-12)
    noisy = base * 0.8 * (1 + 0.01 * torch.randn(40, dtype=torch.float64, generator=generator))
    ratio, low, high = final_ratio(_final_curve("x", noisy), adam)
    assert ratio == pytest.approx((noisy.mean() / base.mean()).item())
    assert low < ratio < high
    # resampled in pairs, the shared difficulty cancels: an unpaired bootstrap spans 0.2-3 here
    assert high - low < 0.02
    assert final_ratio(_final_curve("x", noisy), adam, seed=1) != (ratio, low, high)  # resampling is real


def test_final_ratio_errors_and_divergence():
    adam = _final_curve("adam", torch.rand(5) + 0.1)
    with pytest.raises(ValueError, match="different problems"):
        final_ratio(_final_curve("x", torch.rand(4)), adam)
    diverged = final_ratio(_final_curve("x", torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0])), adam)
    assert diverged == (math.inf, math.inf, math.inf)


@pytest.mark.parametrize("argv", [
    ["evaluate", "--optimizer", "adam", "--problems", "0"],
    ["evaluate", "--optimizer", "adam", "--steps", "-3"],
    ["evaluate", "--optimizer", "adam", "--tune-problems", "two"],
    ["evaluate", "--task", "mnist", "--hidden", "20", "0", "--optimizer", "adam"],
    ["demo", "--problems", "0"],
    ["meta-train", "--epochs", "0"],
    ["meta-train", "--meta-batch", "0"],
    ["meta-train", "--threads", "0"],
])
def test_cli_counts_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_run_learned_matches_differentiable_path():
    """The in-place inference loop and the differentiable truncation give the same trajectory."""
    problems = make_task("quadratic").sample(3, seed=2)
    net = build_net(tiny_config())
    losses = run_learned(net, problems, 5)
    params = problems.init_params()
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    _, history, *_ = truncation(net, problems, params, grad, net.init_state(params.numel()), 0, 5)
    torch.testing.assert_close(losses[1:], history, rtol=1e-5, atol=1e-6)


def test_pretrained_round_trip_and_errors(tmp_path):
    net = build_net(tiny_config())
    save_pretrained(net, tmp_path / "opt.pt", {"seed": 3})
    loaded = load_pretrained(str(tmp_path / "opt.pt"))
    assert loaded.record == {"seed": 3}
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    with pytest.raises(ValueError, match="available"):
        CoordinatewiseLSTM.from_pretrained("no-such-optimizer")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a valid"):
        load_pretrained(str(tmp_path / "bad.pt"))


def test_a_meta_training_runs_files_load_as_its_best_optimizer(tmp_path, monkeypatch):
    """best.pt and checkpoint.pt of `meta-train --out DIR` load with load_pretrained / --optimizer PATH,
    both as the best weights (not the last), with where they came from."""
    import l2l_fast.meta.train as train

    scores = iter([3.0, 1.0, 2.0])  # the evaluations at epochs 2, 4, 6: the best is epoch 4's
    monkeypatch.setattr(train, "evaluate_learned", lambda net, task, cfg: next(scores))
    trainer = MetaTrainer(tiny_config(epochs=6, eval_every=2, hidden_size=7), tmp_path, progress=False)
    summary = trainer.run()
    assert summary["best_score"] == 1.0
    best = trainer.best_net().state_dict()
    assert any(not torch.equal(best[k], v) for k, v in trainer.net.state_dict().items())  # best != last
    for name in ("best.pt", "checkpoint.pt"):
        loaded = load_pretrained(str(tmp_path / name))
        assert loaded.hidden_size == 7 and loaded.record["validation_score"] == summary["best_score"]
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in best.items())
    _, net = load_optimizer_spec(str(tmp_path / "best.pt"))  # what `l2l-fast evaluate --optimizer PATH` loads
    assert net.record["source"].endswith("best.pt")
    body = (tmp_path / "best.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(body[: len(body) // 2])
    with pytest.raises(ValueError, match="not a valid l2l_fast optimizer file"):
        load_pretrained(str(tmp_path / "torn.pt"))


@pytest.mark.parametrize("name", ["mnist", "quadratic"])
def test_shipped_optimizers_load_with_their_record(name):
    assert name in available()
    net = CoordinatewiseLSTM.from_pretrained(name)
    for key in ("command", "epochs", "seed", "validation_score"):
        assert key in net.record


def test_mnist_task_losses_and_determinism():
    if not (SHARED_DATA / "mnist").exists():
        pytest.skip(f"full MNIST not found at {SHARED_DATA}")
    task = make_task("mnist", data_dir=str(SHARED_DATA))
    problems = task.sample(3, seed=0, split="val")
    params = problems.init_params()
    losses = problems.loss(params, 0)
    assert torch.allclose(losses, torch.full((3,), math.log(10)), atol=0.02)
    torch.testing.assert_close(problems.loss(params, 7), task.sample(3, seed=0, split="val").loss(params, 7))
    assert not torch.equal(problems.loss(params, 7), problems.loss(params, 8))
    two_layers = make_task("mnist", hidden=(20, 20), activation="relu", data_dir=str(SHARED_DATA)).sample(2, 0)
    assert two_layers.dim == 784 * 20 + 20 + 20 * 20 + 20 + 20 * 10 + 10


def test_cli_meta_train_evaluate(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["meta-train", "--task", "quadratic", "--epochs", "2", "--horizon", "10", "--unroll", "5",
                     "--meta-batch", "2", "--eval-every", "1", "--eval-problems", "2", "--out", str(out),
                     "--export", str(tmp_path / "q.pt"), "--no-progress"]) == 0
    assert cli_main(["evaluate", "--task", "quadratic", "--optimizer", str(tmp_path / "q.pt"), "--optimizer", "sgd",
                     "--steps", "10", "--problems", "3", "--tune-problems", "2", "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "quadratic_10steps.png").exists()
    assert "| sgd |" in (tmp_path / "eval" / "quadratic_10steps.md").read_text()
    rows = json.loads((tmp_path / "eval" / "quadratic_10steps.json").read_text())
    assert [row["optimizer"] for row in rows] == [str(tmp_path / "q.pt"), "sgd"]
    assert all("final_vs_adam" not in row for row in rows)  # no Adam among them
    assert cli_main(["evaluate", "--task", "quadratic", "--optimizer", str(tmp_path / "q.pt"), "--optimizer", "adam",
                     "--steps", "10", "--problems", "3", "--tune-problems", "2", "--out", str(tmp_path / "eval2")]) == 0
    learned, adam = json.loads((tmp_path / "eval2" / "quadratic_10steps.json").read_text())
    ratio = learned["final_vs_adam"]
    assert ratio["ratio"] == pytest.approx(learned["final_mean"] / adam["final_mean"], rel=1e-5)
    assert ratio["ci95_low"] <= ratio["ratio"] <= ratio["ci95_high"]
    assert adam["final_vs_adam"]["ratio"] == 1.0


def test_cli_passes_the_meta_training_estimators_to_the_run(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["meta-train", "--task", "quadratic", "--epochs", "1", "--horizon", "4", "--unroll", "2",
                     "--meta-batch", "2", "--eval-every", "1", "--eval-problems", "2", "--coordinate-fraction", "0.5",
                     "--random-scale", "0.7", "--init", "pretrained:quadratic", "--out", str(out),
                     "--no-progress"]) == 0
    config = load_verified(out / "checkpoint.pt")["config"]
    assert config["coordinate_fraction"] == 0.5 and config["random_scale"] == 0.7
    assert config["init"] == "pretrained:quadratic"


def test_init_starts_from_given_weights_and_keeps_them_unless_beaten(tmp_path, monkeypatch):
    """--init: the run starts from a file's weights, scores them first (epoch 0), keeps them as the best
    while nothing beats them, and a resumed run neither reloads them nor scores them again."""
    import l2l_fast.meta.train as train

    source = build_net(tiny_config(seed=5))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_pretrained(source, tmp_path / "start.pt", {"seed": 5})
    scores = iter([1.0, 2.0, 3.0])  # epoch 0 (the start), 2 and 4: none beats the start
    monkeypatch.setattr(train, "evaluate_learned", lambda net, task, cfg: next(scores))
    config = tiny_config(epochs=4, eval_every=2, init=str(tmp_path / "start.pt"))
    trainer = MetaTrainer(config, tmp_path / "run", progress=False)
    assert all(torch.equal(trainer.net.state_dict()[k], v) for k, v in source.state_dict().items())
    summary = trainer.run()
    assert summary["best_score"] == 1.0 and load_verified(tmp_path / "run" / "best.pt")["epoch"] == 0
    assert all(torch.equal(trainer.best_net().state_dict()[k], v) for k, v in source.state_dict().items())
    last = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    assert any(not torch.equal(last[k], v) for k, v in source.state_dict().items())  # it did train
    assert [r["epoch"] for r in load_verified(tmp_path / "run" / "checkpoint.pt")["log"]] == [0, 1, 2, 3, 4]

    scores = iter([0.5])  # epoch 6 beats the start
    monkeypatch.setattr(train, "evaluate_learned", lambda net, task, cfg: next(scores))
    resumed = MetaTrainer(dataclasses.replace(config, epochs=6), tmp_path / "run", resume=True, progress=False)
    assert all(torch.equal(resumed.net.state_dict()[k], v) for k, v in last.items())
    assert resumed.run()["best_score"] == 0.5
    assert [r["epoch"] for r in load_verified(tmp_path / "run" / "checkpoint.pt")["log"]] == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(CheckpointError, match="different configuration"):
        MetaTrainer(dataclasses.replace(config, init="pretrained:quadratic"), tmp_path / "run", resume=True)


def test_init_by_shipped_name_and_bad_inits(tmp_path):
    trainer = MetaTrainer(tiny_config(init="pretrained:quadratic"), tmp_path / "a", progress=False)
    shipped = CoordinatewiseLSTM.from_pretrained("quadratic").state_dict()
    assert all(torch.equal(trainer.net.state_dict()[k], v) for k, v in shipped.items())
    save_pretrained(build_net(tiny_config(hidden_size=7)), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="do not fit"):
        MetaTrainer(tiny_config(init=str(tmp_path / "small.pt")), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="available"):
        MetaTrainer(tiny_config(init="pretrained:no-such-optimizer"), tmp_path / "c", progress=False)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a valid"):
        MetaTrainer(tiny_config(init=str(tmp_path / "bad.pt")), tmp_path / "d", progress=False)
    with pytest.raises(FileNotFoundError):
        MetaTrainer(tiny_config(init=str(tmp_path / "missing.pt")), tmp_path / "e", progress=False)


def test_init_of_a_multi_group_task_from_one_lstm(tmp_path):
    """A file with one LSTM starts both of cifar10's LSTMs (conv and fc) from its weights."""
    from test_data import cifar_batches, cifar_tarball

    (tmp_path / "cifar-10-python.tar.gz").write_bytes(cifar_tarball(cifar_batches(seed=2, n=40)))
    config = tiny_config(task="cifar10", epochs=1, horizon=4, unroll=2, meta_batch=2, eval_every=1, eval_problems=2,
                         init="pretrained:mnist")
    trainer = MetaTrainer(config, tmp_path / "run", progress=False, data_dir=str(tmp_path))
    shipped = CoordinatewiseLSTM.from_pretrained("mnist").state_dict()
    for group in ("conv", "fc"):
        assert all(torch.equal(trainer.net.nets[group].state_dict()[k], v) for k, v in shipped.items())


def test_cli_demo_falls_back_to_quadratics_without_mnist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("L2L_FAST_MNIST_MIRRORS", "http://127.0.0.1:9/")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("L2L_FAST_DATA", raising=False)
    assert cli_main(["demo", "--data-dir", str(tmp_path / "empty"), "--steps", "5", "--problems", "2",
                     "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "Falling back to the quadratic task" in printed
    assert "| adam |" in printed and "| pretrained:general |" in printed


def test_cifar_task_with_separate_conv_and_fc_optimizers(tmp_path):
    """CIFAR-10 is not obtainable here: a small synthetic tarball of the real format stands in."""
    from test_data import cifar_batches, cifar_tarball

    (tmp_path / "cifar-10-python.tar.gz").write_bytes(cifar_tarball(cifar_batches(seed=0, n=40)))
    config = tiny_config(task="cifar10", epochs=1, horizon=4, unroll=2, meta_batch=2, eval_every=1, eval_problems=2)
    trainer = MetaTrainer(config, tmp_path / "run", progress=False, data_dir=str(tmp_path))
    assert [g.name for g in trainer.groups] == ["conv", "fc"]
    assert sorted(trainer.net.nets) == ["conv", "fc"]
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    trainer.run()
    changed = {k.split(".")[1] for k, v in trainer.net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"conv", "fc"}  # both optimizers were trained
    problems = trainer.task.sample(2, seed=0, split="test")
    losses = run_learned(trainer.best_net(), problems, 3)
    assert losses.shape == (4, 2) and torch.isfinite(losses).all()


def test_cifar_run_exports_and_evaluates_with_one_optimizer_per_group(tmp_path, capsys):
    """meta-train --export and evaluate --optimizer on a cifar10 run keep its conv and fc LSTMs apart."""
    from test_data import cifar_batches, cifar_tarball

    from l2l_fast.grouped import GroupedLSTM

    (tmp_path / "cifar-10-python.tar.gz").write_bytes(cifar_tarball(cifar_batches(seed=1, n=40)))
    common = ["--task", "cifar10", "--data-dir", str(tmp_path)]
    assert cli_main(["meta-train", *common, "--epochs", "2", "--horizon", "4", "--unroll", "2", "--meta-batch", "2",
                     "--eval-every", "1", "--eval-problems", "2", "--out", str(tmp_path / "run"),
                     "--export", str(tmp_path / "cifar.pt"), "--no-progress"]) == 0
    task = make_task("cifar10", data_dir=str(tmp_path))
    shape = task.sample(1, seed=0, split="val")
    exported = load_pretrained(str(tmp_path / "cifar.pt"), groups=shape.groups, dim=shape.dim)
    from_run = load_pretrained(str(tmp_path / "run" / "best.pt"), groups=shape.groups, dim=shape.dim)
    assert isinstance(exported, GroupedLSTM) and sorted(exported.nets) == ["conv", "fc"]
    for key, value in from_run.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value)
    assert not torch.equal(exported.nets["conv"].out.weight, exported.nets["fc"].out.weight)
    with pytest.raises(ValueError, match="one LSTM per parameter group"):
        CoordinatewiseLSTM.from_pretrained(str(tmp_path / "cifar.pt"))
    assert cli_main(["evaluate", *common, "--optimizer", str(tmp_path / "cifar.pt"), "--optimizer", "sgd",
                     "--steps", "3", "--problems", "2", "--tune-problems", "2", "--out", str(tmp_path / "eval")]) == 0
    assert "cifar.pt" in capsys.readouterr().out and (tmp_path / "eval" / "cifar10_3steps.png").exists()


def sampled_truncation_gradients(problems, sample):
    """A 5-step float64 truncation of a fixed small net with `sample` (None: exact):
    (meta_loss, losses, params, grad, state, the net's gradients)."""
    torch.manual_seed(0)
    net = CoordinatewiseLSTM(hidden_size=5).double()
    params = problems.init_params().double()
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    state = net.init_state(params.numel())
    state.normal_(generator=torch.Generator().manual_seed(3))  # a mid-run state, not zeros
    meta_loss, *carried = truncation(net, problems, params, grad, state, 0, 5, sample=sample)
    meta_loss.backward()
    return [meta_loss.detach(), *carried, [p.grad.clone() for p in net.parameters()]]


def quadratic_problems_float64(count, seed):
    problems = make_task("quadratic").sample(count, seed=seed)
    problems.W, problems.y = problems.W.double(), problems.y.double()
    return problems


def swapped(sample):
    """The complementary sample: tracks exactly the coordinates `sample` leaves untracked."""
    other = copy.copy(sample)
    other.tracked, other.untracked = sample.untracked, sample.tracked
    other.inverse = torch.argsort(torch.cat([other.tracked, other.untracked]))
    other.scale = (sample.tracked.numel() + sample.untracked.numel()) / sample.untracked.numel()
    return other


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_sampled_meta_gradient_is_unbiased_and_changes_no_value(fraction):
    """Backpropagating through a fraction of the coordinates: the forward (losses, params, carried state)
    is the exact one, and the meta-gradient decomposes over coordinates, so the gradients of a sample and
    of its complement, weighted by their shares k/n and (n-k)/n, add up to the exact gradient. That is
    the identity behind E[estimate] = exact, checked without sampling noise."""
    problems = quadratic_problems_float64(3, seed=11)
    n = problems.num_problems * problems.dim
    exact = sampled_truncation_gradients(problems, None)
    sample = CoordinateSample(n, fraction, torch.Generator().manual_seed(5))
    part = sampled_truncation_gradients(problems, sample)
    rest = sampled_truncation_gradients(problems, swapped(sample))
    for got, want in zip(part[:5], exact[:5]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    k = sample.tracked.numel()
    assert 0 < k < n
    for g_part, g_rest, g_exact in zip(part[5], rest[5], exact[5]):
        torch.testing.assert_close(k / n * g_part + (n - k) / n * g_rest, g_exact, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(g_part, g_exact)  # one sample alone is an estimate, not the gradient


def test_a_full_sample_gives_the_exact_meta_gradient():
    problems = quadratic_problems_float64(2, seed=12)
    n = problems.num_problems * problems.dim
    exact = sampled_truncation_gradients(problems, None)
    full = sampled_truncation_gradients(problems, CoordinateSample(n, 1.0, torch.Generator().manual_seed(1)))
    for got, want in zip(full[5], exact[5]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_coordinate_fraction_trains_and_rejects_bad_values(tmp_path):
    for bad in (0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="coordinate_fraction"):
            tiny_config(coordinate_fraction=bad)
        with pytest.raises(ValueError, match="fraction"):
            CoordinateSample(10, bad, torch.Generator())
    assert CoordinateSample(7, 0.01, torch.Generator()).tracked.numel() == 1  # never an empty sample
    with pytest.raises(ValueError, match="at least one coordinate"):
        CoordinateSample(0, 0.5, torch.Generator())
    config = tiny_config(coordinate_fraction=0.25)
    summary = MetaTrainer(config, tmp_path / "a", progress=False).run()
    again = MetaTrainer(config, tmp_path / "b", progress=False).run()
    assert math.isfinite(summary["best_score"]) and summary["best_score"] == again["best_score"]  # seeded samples
    from test_data import cifar_batches, cifar_tarball

    (tmp_path / "cifar-10-python.tar.gz").write_bytes(cifar_tarball(cifar_batches(seed=0, n=40)))
    with pytest.raises(ValueError, match="one parameter group"):
        MetaTrainer(tiny_config(task="cifar10", coordinate_fraction=0.5), tmp_path / "c", progress=False,
                    data_dir=str(tmp_path))


def test_rescaled_problems_keep_the_loss_and_scale_the_gradients():
    """theta' = theta / c: same loss at corresponding points, gradient c * grad, start theta_0 / c."""
    from l2l_fast.meta.rescale import RescaledProblems

    base = make_task("quadratic").sample(3, seed=13)
    rescaled = RescaledProblems.random(base, 1.5, torch.Generator().manual_seed(2))
    c = rescaled.scale
    assert c.shape == (3, 10) and c.min() >= math.exp(-1.5) and c.max() <= math.exp(1.5) and c.std() > 0.3
    theta = torch.randn(3, 10, generator=torch.Generator().manual_seed(4))
    base_losses, base_grad = loss_and_grad(base, theta, 0, keep_graph=False)
    losses, grad = loss_and_grad(rescaled, theta / c, 0, keep_graph=False)
    torch.testing.assert_close(losses, base_losses)
    torch.testing.assert_close(grad, c * base_grad)
    torch.testing.assert_close(rescaled.init_params(), base.init_params() / c)
    with pytest.raises(ValueError, match="spread"):
        RescaledProblems.random(base, 0.0, torch.Generator())
    with pytest.raises(ValueError, match="scale: expected shape"):
        RescaledProblems(base, torch.ones(3, 9))


def test_random_scale_trains_and_rejects_bad_values(tmp_path):
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="random_scale"):
            tiny_config(random_scale=bad)
    summary = MetaTrainer(tiny_config(random_scale=1.0), tmp_path / "a", progress=False).run()
    plain = MetaTrainer(tiny_config(), tmp_path / "b", progress=False).run()
    assert math.isfinite(summary["best_score"]) and summary["best_score"] != plain["best_score"]
