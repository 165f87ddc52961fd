"""Meta-training and evaluating a net that reads the gradient's running moments (features "moments") or bounds
its steps (output "tanh"): the unroll advances the moments before each step and carries them with the LSTM state
across truncations, an episode starts them at zero, the evaluation loop gives the truncation's and the optimizer's
trajectory, and a run records its features and output, resumes bit-identically and refuses other ones."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from l2l_fast import CoordinatewiseLSTM, LearnedOptimizer
from l2l_fast.cli import main as cli_main
from l2l_fast.files import CheckpointError, load_verified
from l2l_fast.meta import train as train_module
from l2l_fast.meta.train import MetaTrainConfig, MetaTrainer, build_net
from l2l_fast.meta.unroll import CoordinateSample, initial_state, loss_and_grad, run_learned, truncation
from l2l_fast.pretrained import load_pretrained
from l2l_fast.tasks import make_task

MOMENTS = ("paper", "moments")


def quadratic_problems_float64(count, seed):
    problems = make_task("quadratic").sample(count, seed=seed)
    problems.W, problems.y = problems.W.double(), problems.y.double()
    return problems


def moments_net(features=MOMENTS, output="tanh", backend="auto", seed=0):
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(hidden_size=5, features=features, output=output, backend=backend).double()


def tiny_config(**overrides) -> MetaTrainConfig:
    base = dict(task="quadratic", epochs=3, horizon=10, unroll=5, meta_batch=4, eval_every=2, eval_problems=4,
                features=MOMENTS, output="tanh")
    base.update(overrides)
    return MetaTrainConfig(**base)


def test_the_carried_state_holds_zero_moments_for_a_moments_net_only():
    net = moments_net()
    state, moments = initial_state(net, 7)
    assert state.shape == (2, 2, 5, 7) and moments.shape == (4, 7) and moments.dtype == torch.float64
    assert not state.any() and not moments.any()
    plain = CoordinatewiseLSTM(hidden_size=5)
    assert isinstance(initial_state(plain, 7), torch.Tensor)


@pytest.mark.parametrize("features, output", [(MOMENTS, "tanh"), (("moments",), "linear")])
def test_truncations_carry_the_moments(features, output):
    """Two truncations of 3 steps, the carried state of the first passed to the second, give the 6-step
    truncation's values bit for bit; the moments count the steps taken. Starting the second from the LSTM state
    alone (moments back at zero) gives another trajectory: the moments matter and are carried."""
    problems = quadratic_problems_float64(3, seed=4)
    net = moments_net(features, output)
    params = problems.init_params()
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    n = params.numel()
    _, whole, end_params, _, (end_state, end_moments) = truncation(net, problems, params, grad,
                                                                    initial_state(net, n), 0, 6)
    _, first, mid_params, mid_grad, carried = truncation(net, problems, params, grad, initial_state(net, n), 0, 3)
    state, moments = carried
    assert not state.requires_grad and not moments.requires_grad
    assert torch.equal(moments[2], torch.full((n,), 3.0, dtype=torch.float64))
    _, second, last_params, _, (last_state, last_moments) = truncation(net, problems, mid_params, mid_grad, carried,
                                                                       3, 3)
    assert torch.equal(torch.cat([first, second]), whole)
    assert torch.equal(last_params, end_params) and torch.equal(last_state, end_state)
    assert torch.equal(last_moments, end_moments) and torch.equal(end_moments[2], torch.full((n,), 6.0).double())
    _, forgot, *_ = truncation(net, problems, mid_params, mid_grad, state, 3, 3)  # a bare state: moments at zero
    assert not torch.allclose(forgot, second)


def test_each_step_reads_the_moments_advanced_with_its_gradient():
    """The first step of a truncation is net(g, 0-state, advance_moments(g, zeros)): written out by hand."""
    problems = quadratic_problems_float64(2, seed=6)
    net = moments_net(backend="reference")
    params = problems.init_params()
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    _, history, *_ = truncation(net, problems, params, grad, initial_state(net, params.numel()), 0, 1)
    g = grad.reshape(-1)
    moments = net.advance_moments(g, net.init_moments(g.numel()))
    update, _ = net(g, net.init_state(g.numel()), moments)
    expected = problems.loss(params + update.view(params.shape), 1)
    torch.testing.assert_close(history[0], expected.detach(), rtol=1e-14, atol=0)


def test_run_learned_matches_the_differentiable_path_and_the_optimizer():
    """The evaluation loop (in place, the net's step_ advancing the moments) gives the truncation's losses and
    those of LearnedOptimizer stepping the same problems' parameters."""
    problems = quadratic_problems_float64(3, seed=2)
    net = moments_net()
    losses = run_learned(net, problems, 6)
    params = problems.init_params()
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    _, history, *_ = truncation(net, problems, params, grad, initial_state(net, params.numel()), 0, 6)
    torch.testing.assert_close(losses[1:], history, rtol=1e-12, atol=1e-14)
    theta = nn.Parameter(problems.init_params().clone())
    opt = LearnedOptimizer([theta], net)
    optimized = []
    for t in range(6):
        opt.zero_grad()
        problems.loss(theta, t).sum().backward()
        opt.step()
        optimized.append(problems.loss(theta, t + 1).detach())
    torch.testing.assert_close(torch.stack(optimized), losses[1:], rtol=1e-12, atol=1e-14)


def sampled(problems, sample):
    net = moments_net(output="linear")
    params = problems.init_params()
    _, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    state, moments = initial_state(net, params.numel())
    state.normal_(generator=torch.Generator().manual_seed(3))  # a mid-run state and moments, not zeros
    moments[:2].normal_(generator=torch.Generator().manual_seed(4))
    moments[1].abs_()
    moments[2].fill_(4.0)
    meta_loss, history, params, grad, carried = truncation(net, problems, params, grad, (state, moments), 0, 5,
                                                           sample=sample)
    meta_loss.backward()
    return [meta_loss.detach(), history, params, grad, carried], [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("fraction", [0.4, 1.0])
def test_a_coordinate_sample_carries_the_moments_of_every_coordinate(fraction):
    """Backpropagating through a sample of the coordinates changes no value (losses, params, state, moments);
    a full sample gives the exact meta-gradient."""
    problems = quadratic_problems_float64(3, seed=11)
    n = problems.num_problems * problems.dim
    exact, exact_grads = sampled(problems, None)
    part, part_grads = sampled(problems, CoordinateSample(n, fraction, torch.Generator().manual_seed(5)))
    torch.testing.assert_close(part, exact, rtol=1e-12, atol=1e-12)
    assert torch.equal(part[4][1][2], torch.full((n,), 9.0, dtype=torch.float64))
    if fraction == 1.0:
        torch.testing.assert_close(part_grads, exact_grads, rtol=1e-10, atol=1e-12)


def test_each_episode_starts_the_moments_at_zero_and_carries_them(monkeypatch):
    """run_episode passes every truncation the moments of the steps taken so far in this episode."""
    seen = []
    real = train_module.truncation

    def spy(net, problems, params, grad, state, start, steps, *args, **kwargs):
        seen.append((start, state[1][2].clone()))
        return real(net, problems, params, grad, state, start, steps, *args, **kwargs)

    monkeypatch.setattr(train_module, "truncation", spy)
    config = tiny_config(epochs=2, horizon=9, unroll=3)
    net = build_net(config)
    meta_optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    task = make_task("quadratic")
    for epoch in range(2):
        train_module.run_episode(net, meta_optimizer, task, config, epoch)
    assert [start for start, _ in seen] == [0, 3, 6] * 2
    for start, t in seen:
        assert torch.equal(t, torch.full_like(t, float(start)))


def cli(out, epochs, *more, export=None):
    argv = ["meta-train", "--task", "quadratic", "--epochs", str(epochs), "--horizon", "10", "--unroll", "5",
            "--meta-batch", "2", "--eval-every", "1", "--eval-problems", "2", "--features", "paper,moments",
            "--output", "tanh", "--out", str(out), "--no-progress", *more]
    if export:
        argv += ["--export", str(export)]
    return cli_main(argv)


def test_cli_run_with_moments_and_tanh_saves_resumes_bit_identically_and_loads(tmp_path, capsys):
    assert cli(tmp_path / "straight", 4, export=tmp_path / "opt.pt") == 0
    assert cli(tmp_path / "split", 2) == 0
    assert cli(tmp_path / "split", 4, "--resume") == 0
    straight, split = (load_verified(tmp_path / name / "checkpoint.pt") for name in ("straight", "split"))
    for payload in (straight, split):
        assert payload["config"]["features"] == MOMENTS and payload["config"]["output"] == "tanh"
        assert payload["net_kwargs"]["features"] == MOMENTS and payload["net_kwargs"]["output"] == "tanh"
        assert [row["epoch"] for row in payload["log"]] == [1, 2, 3, 4]
    for key in straight["net"]:
        assert torch.equal(straight["net"][key], split["net"][key]), key
    assert straight["best_score"] == split["best_score"] and math.isfinite(straight["best_score"])
    for path in (tmp_path / "straight" / "best.pt", tmp_path / "split" / "checkpoint.pt", tmp_path / "opt.pt"):
        net = load_pretrained(str(path))
        assert net.features == MOMENTS and net.output == "tanh" and net.reads_moments, path
        assert net.weights()[0].shape == (4 * 20, 4)  # paper's 2 inputs and the moments' 2
    # the exported optimizer evaluates (run_learned carries its moments) and drives LearnedOptimizer
    assert cli_main(["evaluate", "--task", "quadratic", "--optimizer", str(tmp_path / "opt.pt"), "--optimizer", "sgd",
                     "--steps", "5", "--problems", "2", "--tune-problems", "2", "--out", str(tmp_path / "eval")]) == 0
    theta = nn.Parameter(torch.randn(10))
    opt = LearnedOptimizer([theta], pretrained=str(tmp_path / "opt.pt"))
    theta.grad = torch.randn(10)
    opt.step()
    assert opt.state[theta]["moments"].shape == (4, 10)
    capsys.readouterr()
    # resuming with other features or another output is refused, the checkpoint untouched
    for other in (["--features", "paper"], ["--output", "linear"]):
        argv = ["meta-train", "--task", "quadratic", "--epochs", "6", "--horizon", "10", "--unroll", "5",
                "--meta-batch", "2", "--eval-every", "1", "--eval-problems", "2", "--features", "paper,moments",
                "--output", "tanh", "--out", str(tmp_path / "split"), "--no-progress", "--resume"]
        flag = argv.index(other[0])
        argv[flag + 1] = other[1]
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "different configuration" in err and other[0][2:] in err
    assert load_verified(tmp_path / "split" / "checkpoint.pt")["epoch"] == 4


def test_a_paper_run_resumes_as_before(tmp_path):
    """A checkpoint whose config predates the fields (no features, no output) resumes with the defaults."""
    MetaTrainer(MetaTrainConfig(task="quadratic", epochs=1, horizon=4, unroll=2, meta_batch=2, eval_every=1,
                                eval_problems=2), tmp_path, progress=False).run()
    payload = load_verified(tmp_path / "checkpoint.pt")
    del payload["config"]["features"], payload["config"]["output"]
    from l2l_fast.files import save_atomic

    save_atomic(payload, tmp_path / "checkpoint.pt")
    trainer = MetaTrainer(MetaTrainConfig(task="quadratic", epochs=2, horizon=4, unroll=2, meta_batch=2,
                                          eval_every=1, eval_problems=2), tmp_path, resume=True, progress=False)
    assert trainer.epoch == 1 and trainer.net.features == ("paper",) and trainer.net.output == "linear"
    with pytest.raises(CheckpointError, match="features"):
        MetaTrainer(tiny_config(epochs=2, horizon=4, unroll=2, meta_batch=2, eval_every=1, eval_problems=2),
                    tmp_path, resume=True, progress=False)


def test_the_run_builds_its_net_with_its_features_and_output():
    net = build_net(tiny_config(features=("moments",), output="linear"))
    assert net.features == ("moments",) and net.output == "linear" and net.reads_moments
    assert net.size_kwargs()["features"] == ("moments",)
    net = build_net(tiny_config(features=MOMENTS, output="tanh"))
    assert net.features == MOMENTS and net.output == "tanh"


def test_init_from_weights_of_other_features_is_refused(tmp_path):
    with pytest.raises(ValueError, match="init: .*do not fit"):
        MetaTrainer(tiny_config(init="pretrained:quadratic"), tmp_path, progress=False)


@pytest.mark.parametrize("source_features,target_features", [(("moments",), ("moments", "long_moments")),
                                                             (("long_moments",), MOMENTS + ("long_moments",)),
                                                             (("paper",), MOMENTS)])
def test_init_from_fewer_features_widens_with_zero_input_weights(tmp_path, gen, source_features, target_features):
    """--init from a net with a subset of the run's features: its input weights land at its features' columns,
    the new ones start at zero, so the run's first net steps exactly as the file's (updates, states)."""
    from l2l_fast import features as registry
    from l2l_fast.pretrained import save_pretrained

    source = moments_net(features=source_features, seed=3)
    with torch.no_grad():
        for w in source.parameters():
            w.normal_(0, 0.5, generator=gen)
    save_pretrained(source, tmp_path / "source.pt", record={"note": "test"})
    trainer = MetaTrainer(tiny_config(features=target_features, hidden_size=5, init=str(tmp_path / "source.pt")),
                          tmp_path / "run", progress=False)
    net = trainer.net
    assert net.features == registry.names_of(target_features)
    n = 64
    grad = torch.randn(n, generator=gen, dtype=torch.float64) * torch.pow(10.0, torch.rand(n, generator=gen) * 6 - 5)
    moments = registry.advance_moments(grad, torch.rand(4, n, generator=gen, dtype=torch.float64)
                                       * torch.tensor([[1.0], [1.0], [20.0], [1.0]], dtype=torch.float64))
    state = 0.3 * torch.randn(2, 2, 5, n, generator=gen, dtype=torch.float64)
    source = load_pretrained(str(tmp_path / "source.pt")).double()  # as the file holds it (float32)
    expected = source(grad, state, moments if source.reads_moments else None)
    got = net.double()(grad, state, moments)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-15)
    new_columns = [k for k, name in enumerate(name for name in net.features
                                               for _ in range(registry.REGISTRY[name].width))
                   if name not in source.features]
    assert new_columns and torch.count_nonzero(net.lstm.weight_ih_l0[:, new_columns]) == 0


def test_init_from_more_features_is_refused(tmp_path):
    from l2l_fast.pretrained import save_pretrained

    with pytest.raises(ValueError, match="is not .* with more input features"):
        train_module.load_widened(moments_net(features=("moments",)), moments_net(features=MOMENTS))

    save_pretrained(moments_net(features=MOMENTS + ("long_moments",)), tmp_path / "wide.pt", record={})
    with pytest.raises(ValueError, match="init: .*do not fit"):
        MetaTrainer(tiny_config(hidden_size=5, init=str(tmp_path / "wide.pt")), tmp_path / "run", progress=False)


def test_a_task_of_several_parameter_groups_carries_each_groups_moments(tmp_path):
    """cifar10 (conv and fc LSTMs, a GroupedLSTM) with the moments feature and tanh output: both nets read
    moments and train, its best weights load per group with the features and evaluate."""
    from test_data import cifar_batches, cifar_tarball

    from l2l_fast.grouped import GroupedLSTM

    (tmp_path / "cifar-10-python.tar.gz").write_bytes(cifar_tarball(cifar_batches(seed=0, n=40)))
    config = tiny_config(task="cifar10", epochs=1, horizon=4, unroll=2, meta_batch=2, eval_every=1, eval_problems=2)
    straight = MetaTrainer(config, tmp_path / "straight", progress=False, data_dir=str(tmp_path))
    assert isinstance(straight.net, GroupedLSTM) and straight.net.reads_moments
    assert all(net.features == MOMENTS and net.output == "tanh" for net in straight.net.nets.values())
    before = {k: v.clone() for k, v in straight.net.state_dict().items()}
    straight.run()
    changed = {k.split(".")[1] for k, v in straight.net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"conv", "fc"}
    shape = straight.task.sample(1, seed=0, split="val")
    loaded = load_pretrained(str(tmp_path / "straight" / "best.pt"), groups=shape.groups, dim=shape.dim)
    assert all(net.features == MOMENTS and net.output == "tanh" for net in loaded.nets.values())
    losses = run_learned(loaded, straight.task.sample(2, seed=0, split="test"), 3)
    assert losses.shape == (4, 2) and torch.isfinite(losses).all()
