"""ModuleTask: meta-training problems from a user's own nn.Module factory, loss and data. Its batched (vmap)
losses and gradients are those of a plain loop over the P models; models of different shapes make a mixed
batch; vmap falls back to a loop where it cannot run the model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2l_fast.files import load_verified
from l2l_fast.meta.train import MetaTrainConfig, MetaTrainer
from l2l_fast.meta.unroll import run_learned, run_torch_optimizer
from l2l_fast.net import CoordinatewiseLSTM
from l2l_fast.tasks import MixedBatch, ModuleBatch, ModuleTask

X = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(1))


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def random_width_mlp():
    width = int(torch.randint(2, 9, ()))  # drawn under the problem's seeded RNG
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))


def loop_losses_and_grads(task, problems, seed, step, split="train"):
    """Each model on its own: loss_fn(model(x_p), y_p) and its gradient, flattened in named_parameters order."""
    x, y = [], []
    parts = problems.parts if isinstance(problems, MixedBatch) else [problems]
    for part in parts:
        xs, ys = part.batch(step)
        x += list(xs)
        y += list(ys)
    losses, grads = [], []
    for p in range(problems.num_problems):
        model = task.model(seed, split, p)
        loss = task.loss_fn(model(x[p]), y[p])
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([t.grad.reshape(-1) for t in model.parameters()]))
    return torch.stack(losses), torch.cat(grads)


def batched_losses_and_grads(problems, step):
    params = problems.init_params().requires_grad_(True)
    losses = problems.loss(params, step)
    (grad,) = torch.autograd.grad(losses.sum(), params)
    return losses.detach(), grad.reshape(-1)


@pytest.mark.parametrize("vectorize", ["auto", False])
def test_losses_and_gradients_equal_a_loop_over_the_models(vectorize):
    task = ModuleTask(mlp, F.cross_entropy, data=(X, Y), batch_size=16, vectorize=vectorize)
    problems = task.sample(4, seed=3)
    assert isinstance(problems, ModuleBatch) and problems.vectorized == (vectorize == "auto")
    assert problems.param_shape == (4, 6 * 8 + 8 + 8 * 3 + 3)
    for p in range(4):  # theta_0 is each model's own initialisation
        expected = torch.cat([t.detach().reshape(-1) for t in task.model(3, "train", p).parameters()])
        assert torch.equal(problems.init_params()[p], expected)
    losses, grads = batched_losses_and_grads(problems, step=5)
    want_losses, want_grads = loop_losses_and_grads(task, problems, seed=3, step=5)
    torch.testing.assert_close(losses, want_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, want_grads, rtol=1e-5, atol=1e-6)


def test_models_of_different_shapes_make_a_mixed_batch():
    task = ModuleTask(random_width_mlp, F.cross_entropy, data=(X, Y), batch_size=8)
    problems = task.sample(5, seed=0)
    assert isinstance(problems, MixedBatch)
    widths = [task.model(0, "train", p)[0].out_features for p in range(5)]
    assert len(set(widths)) > 1
    assert problems.problem_sizes() == [6 * w + w + w * 3 + 3 for w in widths]
    assert problems.param_shape == (sum(problems.problem_sizes()),)
    losses, grads = batched_losses_and_grads(problems, step=2)
    want_losses, want_grads = loop_losses_and_grads(task, problems, seed=0, step=2)
    torch.testing.assert_close(losses, want_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, want_grads, rtol=1e-5, atol=1e-6)
    # the learned optimizer and a torch optimizer run on it
    net = CoordinatewiseLSTM(hidden_size=4)
    assert torch.isfinite(run_learned(net, problems, 3)).all()
    assert run_torch_optimizer(lambda p: torch.optim.Adam(p, 1e-2), problems, 3).shape == (4, 5)


class DataDependent(nn.Module):
    """Branches on a value of its input: vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x):
        return self.linear(x) if float(x.mean()) > -1e9 else -self.linear(x)


def with_batch_norm():
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("factory, vectorized", [(DataDependent, False), (with_batch_norm, True)],
                         ids=["data-dependent", "batch-norm"])
def test_models_vmap_cannot_run_fall_back_and_buffers_never_change(factory, vectorized):
    """A model vmap refuses is evaluated model by model; batch norm runs under vmap, and its running statistics,
    updated in place by a training-mode forward, stay those of theta_0's problem (the same params give the same
    losses at every call)."""
    task = ModuleTask(factory, F.cross_entropy, data=(X, Y), batch_size=8)
    problems = task.sample(3, seed=1)
    assert problems.vectorized == vectorized
    before = {k: v.clone() for k, v in problems.buffers.items()}
    losses, grads = batched_losses_and_grads(problems, step=0)
    assert torch.equal(problems.loss(problems.init_params(), 0), losses)
    assert all(torch.equal(before[k], v) for k, v in problems.buffers.items())
    want_losses, want_grads = loop_losses_and_grads(task, problems, seed=1, step=0)
    torch.testing.assert_close(losses, want_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, want_grads, rtol=1e-5, atol=1e-6)


def test_minibatches_are_deterministic_per_seed_step_and_split():
    def sampler(generator, batch_size):
        x = torch.randn(batch_size, 6, generator=generator)
        return x, (x.sum(1) > 0).long()

    for data in [(X, Y), sampler, {"train": (X, Y), "val": (X[:50], Y[:50])}]:
        task = ModuleTask(mlp, F.cross_entropy, data=data, batch_size=8)
        a, b = task.sample(2, seed=4), task.sample(2, seed=4)
        params = a.init_params()
        assert torch.equal(a.loss(params, 3), b.loss(params, 3))
        assert not torch.equal(a.loss(params, 3), a.loss(params, 4))
        assert not torch.equal(a.init_params(), task.sample(2, seed=5).init_params())
        assert not torch.equal(a.init_params(), task.sample(2, seed=4, split="val").init_params())
    full = ModuleTask(mlp, F.cross_entropy, data=(X, Y), batch_size=None).sample(2, seed=0)
    assert full.batch(0)[0].shape == (2, 200, 6)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="data"):
        ModuleTask(mlp, F.cross_entropy, data=X)
    with pytest.raises(ValueError, match="train"):
        ModuleTask(mlp, F.cross_entropy, data={"val": (X, Y)})
    with pytest.raises(ValueError, match="vectorize"):
        ModuleTask(mlp, F.cross_entropy, data=(X, Y), vectorize="yes")
    with pytest.raises(TypeError, match="got a model"):
        ModuleTask(mlp(), F.cross_entropy, data=(X, Y))
    with pytest.raises(TypeError, match="callables"):
        ModuleTask(mlp, "cross-entropy", data=(X, Y))


def test_meta_training_on_a_module_task_runs_and_resumes(tmp_path):
    task = ModuleTask(mlp, F.cross_entropy, data=(X, Y), batch_size=16)
    config = MetaTrainConfig(task="my-mlp", epochs=2, horizon=6, unroll=3, meta_batch=3, eval_every=1,
                             eval_problems=2, hidden_size=4)
    summary = MetaTrainer(config, tmp_path, progress=False, task=task).run()
    assert math.isfinite(summary["best_score"])
    config.epochs = 3
    resumed = MetaTrainer(config, tmp_path, progress=False, task=task, resume=True)
    assert resumed.epoch == 2 and resumed.run()["epochs"] == 3
    assert load_verified(tmp_path / "checkpoint.pt")["config"]["task"] == "my-mlp"


def test_the_readme_example(tmp_path):
    """README's "your own model" example, with a tiny run."""
    import l2l_fast

    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))

    def make_model():
        width = int(torch.randint(16, 65, ()))
        return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4))

    task = ModuleTask(make_model, F.cross_entropy, data=(x, y), batch_size=64)
    config = MetaTrainConfig(task="my-mlps", epochs=1, horizon=4, unroll=2, meta_batch=3, eval_problems=2,
                             loss_scale="initial")
    trainer = MetaTrainer(config, tmp_path / "my-mlps", task=task, progress=False)
    trainer.run()
    model = make_model()
    opt = l2l_fast.LearnedOptimizer(model.parameters(), trainer.best_net())
    F.cross_entropy(model(x), y).backward()
    opt.step()
