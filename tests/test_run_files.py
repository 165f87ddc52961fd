"""A meta-training run's files (checkpoint.pt, best.pt): those written before the redesign still load and resume;
new ones record the nets' constructor arguments, which the loader passes on as they are.

tests/fixtures/meta_runs_v1 holds two runs written at commit 1ee303a (before the redesign; their files have no
"net_kwargs" entry, the loader read the net sizes through MetaTrainConfig):
  quadratic  l2l-fast meta-train --task quadratic --epochs 2 --horizon 4 --unroll 2 --meta-batch 2
             --eval-every 1 --eval-problems 2 --seed 3
  cifar10    MetaTrainConfig(task="cifar10", epochs=1, horizon=4, unroll=2, meta_batch=2, eval_every=1,
             eval_problems=2, hidden_size=3) on the synthetic tarball cifar_batches(seed=0, n=40)
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

import l2l_fast.pretrained as pretrained
from l2l_fast import CoordinatewiseLSTM
from l2l_fast.cli import main as cli_main
from l2l_fast.files import load_verified, save_atomic
from l2l_fast.grouped import GroupedLSTM
from l2l_fast.meta.train import MetaTrainConfig, MetaTrainer
from l2l_fast.pretrained import load_pretrained
from test_data import cifar_batches, cifar_tarball

FIXTURES = Path(__file__).parent / "fixtures" / "meta_runs_v1"
QUADRATIC_FLAGS = ["--task", "quadratic", "--horizon", "4", "--unroll", "2", "--meta-batch", "2", "--eval-every", "1",
                   "--eval-problems", "2", "--seed", "3", "--no-progress"]
CIFAR_CONFIG = dict(task="cifar10", horizon=4, unroll=2, meta_batch=2, eval_every=1, eval_problems=2, hidden_size=3)


@pytest.fixture
def cifar_dir(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(cifar_tarball(cifar_batches(seed=0, n=40)))
    return tmp_path


def cifar_shape(data_dir):
    from l2l_fast.tasks import make_task

    shape = make_task("cifar10", data_dir=str(data_dir)).sample(1, seed=0, split="val")
    return shape.groups, shape.dim


def test_the_fixtures_are_in_the_old_layout():
    for run in ("quadratic", "cifar10"):
        for name in ("checkpoint.pt", "best.pt"):
            payload = load_verified(FIXTURES / run / name)
            assert "net_kwargs" not in payload and "hidden_size" in payload["config"]


@pytest.mark.parametrize("name", ["best.pt", "checkpoint.pt"])
def test_an_old_run_loads_as_its_best_optimizer(name):
    best = load_verified(FIXTURES / "quadratic" / "best.pt")
    net = load_pretrained(str(FIXTURES / "quadratic" / name))
    assert isinstance(net, CoordinatewiseLSTM) and net.size_kwargs() == CoordinatewiseLSTM().size_kwargs()
    assert net.record["validation_score"] == best["score"]
    for key, value in best["net"].items():
        assert torch.equal(net.state_dict()[key], value), key


def test_an_old_grouped_run_loads_with_its_sizes(cifar_dir):
    groups, dim = cifar_shape(cifar_dir)
    best = load_verified(FIXTURES / "cifar10" / "best.pt")
    net = load_pretrained(str(FIXTURES / "cifar10" / "checkpoint.pt"), groups=groups, dim=dim)
    assert isinstance(net, GroupedLSTM) and sorted(net.nets) == ["conv", "fc"]
    assert all(part.hidden_size == 3 for part in net.nets.values())
    for key, value in best["net"].items():
        assert torch.equal(net.state_dict()[key], value), key


def test_an_old_run_resumes_through_the_cli(tmp_path):
    """--resume with the run's own flags: its config (task_kwargs {} then, the quadratic's dim since) is
    accepted, the run goes on from epoch 2 and ends near an uninterrupted run (bit for bit on the machine
    that wrote the fixture; other instruction sets round the first two epochs differently)."""
    out = tmp_path / "old"
    shutil.copytree(FIXTURES / "quadratic", out)
    assert cli_main(["meta-train", *QUADRATIC_FLAGS, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    resumed = load_verified(out / "checkpoint.pt")
    assert resumed["epoch"] == 3 and [row["epoch"] for row in resumed["log"]] == [1, 2, 3]
    assert resumed["net_kwargs"] == CoordinatewiseLSTM().size_kwargs()
    assert cli_main(["meta-train", *QUADRATIC_FLAGS, "--epochs", "3", "--out", str(tmp_path / "new")]) == 0
    straight = load_verified(tmp_path / "new" / "checkpoint.pt")
    for key, value in straight["net"].items():
        torch.testing.assert_close(resumed["net"][key], value, rtol=1e-4, atol=1e-6)
    with pytest.raises(SystemExit):  # another setting is still refused
        cli_main(["meta-train", *QUADRATIC_FLAGS, "--epochs", "4", "--lr", "0.5", "--out", str(out), "--resume"])


def test_an_old_grouped_run_resumes(tmp_path, cifar_dir):
    out = tmp_path / "old"
    shutil.copytree(FIXTURES / "cifar10", out)
    trainer = MetaTrainer(MetaTrainConfig(**CIFAR_CONFIG, epochs=2), out, resume=True, progress=False,
                          data_dir=str(cifar_dir))
    assert trainer.epoch == 1
    assert trainer.run()["epochs"] == 2


def test_new_run_files_record_the_nets_arguments(tmp_path, cifar_dir):
    config = MetaTrainConfig(**CIFAR_CONFIG, epochs=1)
    trainer = MetaTrainer(config, tmp_path / "run", progress=False, data_dir=str(cifar_dir))
    trainer.run()
    expected = trainer.net.nets["conv"].size_kwargs()
    assert expected["hidden_size"] == 3
    for name in ("checkpoint.pt", "best.pt"):
        assert load_verified(tmp_path / "run" / name)["net_kwargs"] == expected


def test_the_recorded_arguments_win_over_the_config(tmp_path):
    """A file's "net_kwargs" build the net, not its config's entries (which a newer run may not have)."""
    net = CoordinatewiseLSTM(hidden_size=5, num_layers=1, output_scale=0.3)
    config = dataclasses.asdict(MetaTrainConfig())  # says hidden_size 20, 2 layers
    save_atomic({"config": config, "net_kwargs": net.size_kwargs(), "net": net.state_dict(), "score": 1.5,
                 "epoch": 7}, tmp_path / "best.pt")
    loaded = load_pretrained(str(tmp_path / "best.pt"))
    assert loaded.size_kwargs() == net.size_kwargs() and loaded.record["epoch"] == 7
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("recorded", [False, True], ids=["old-config-entry", "net_kwargs"])
def test_every_net_argument_of_a_file_is_passed_on(tmp_path, monkeypatch, recorded):
    """A net argument the loader does not know by name (`features`, which CoordinatewiseLSTM is gaining) reaches
    the net's constructor, from a file's "net_kwargs" and from an old run's config."""
    seen = []

    class Net(CoordinatewiseLSTM):
        def __init__(self, features=None, **kwargs):
            seen.append(features)
            super().__init__(**kwargs)

    monkeypatch.setattr(pretrained, "CoordinatewiseLSTM", Net)
    net = CoordinatewiseLSTM(hidden_size=4)
    config = {**dataclasses.asdict(MetaTrainConfig(hidden_size=4)), "features": "scale-free"}
    payload = {"config": config, "net": net.state_dict(), "score": 1.0, "epoch": 1}
    if recorded:
        payload["net_kwargs"] = {**net.size_kwargs(), "features": "scale-free"}
    save_atomic(payload, tmp_path / "best.pt")
    assert load_pretrained(str(tmp_path / "best.pt")).hidden_size == 4 and seen == ["scale-free"]


def test_checkpoint_weights_writes_the_runs_current_weights(tmp_path):
    """benchmarks/checkpoint_weights.py: the weights at the end of a run (checkpoint.pt's "net"), not its
    best-validation ones, as a weight file that loads like best.pt; anything else is refused by name."""
    import runpy
    import sys

    run = tmp_path / "run"
    assert cli_main(["meta-train", *QUADRATIC_FLAGS, "--epochs", "3", "--lr", "0.05", "--out", str(run)]) == 0
    script = str(Path(__file__).parents[1] / "benchmarks" / "checkpoint_weights.py")
    argv = sys.argv
    try:
        sys.argv = [script, str(run / "checkpoint.pt"), str(tmp_path / "final.pt")]
        runpy.run_path(script, run_name="__main__")
        sys.argv = [script, str(tmp_path / "final.pt"), str(tmp_path / "again.pt")]
        with pytest.raises(SystemExit, match="not a meta-train checkpoint"):
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv
    current = load_verified(run / "checkpoint.pt")["net"]
    loaded = load_pretrained(str(tmp_path / "final.pt"))
    assert loaded.record["epoch"] == 3
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in current.items())
    # three epochs of a large meta learning rate move the weights away from the ones scored first
    first = load_pretrained(str(run / "best.pt")).state_dict() if load_verified(run / "best.pt")["epoch"] == 0 else None
    if first is not None:
        assert any(not torch.equal(first[k], v) for k, v in current.items())


def test_interpolate_weights_mixes_two_nets_and_widens_the_first(tmp_path, gen):
    """benchmarks/interpolate_weights.py: (1 - alpha) A + alpha B weight by weight, B's sizes and features; an A
    with a subset of B's features counts its missing input columns as zero; unrelated nets are refused."""
    import importlib.util
    import sys

    from l2l_fast.pretrained import save_pretrained

    def random_net(features):
        net = CoordinatewiseLSTM(hidden_size=4, features=features, output="tanh")
        with torch.no_grad():
            for w in net.parameters():
                w.normal_(0, 1, generator=gen)
        return net

    a, b = random_net(("moments",)), random_net(("moments", "long_moments"))
    save_pretrained(a, tmp_path / "a.pt", record={})
    save_pretrained(b, tmp_path / "b.pt", record={})
    save_pretrained(random_net(("paper",)), tmp_path / "other.pt", record={})
    path = Path(__file__).parents[1] / "benchmarks" / "interpolate_weights.py"
    spec = importlib.util.spec_from_file_location("interpolate_weights", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--alpha", "0.25", "--out", str(tmp_path / "m.pt")])
    mixed = load_pretrained(str(tmp_path / "m.pt"))
    assert mixed.features == b.features and mixed.record["interpolation"]["alpha"] == 0.25
    ma, mb = load_pretrained(str(tmp_path / "a.pt")).state_dict(), load_pretrained(str(tmp_path / "b.pt")).state_dict()
    for key, value in mixed.state_dict().items():
        start = ma[key]
        if key == "lstm.weight_ih_l0":  # a's two moments columns, then zeros for long_moments
            start = torch.cat([start, torch.zeros_like(start)], dim=1)
        torch.testing.assert_close(value, 0.75 * start + 0.25 * mb[key], rtol=1e-6, atol=1e-6)
    with pytest.raises(SystemExit, match="not the same net"):
        script.main([str(tmp_path / "other.pt"), str(tmp_path / "a.pt"), "--alpha", "0.5",
                     "--out", str(tmp_path / "x.pt")])
