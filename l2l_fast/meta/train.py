"""Meta-training (the paper's procedure): each epoch optimizes fresh problems for `horizon` steps (or a
random length: horizon_min; or a length growing with the epochs: unroll_curriculum) in truncations of `unroll`
steps; after each truncation Adam updates the LSTM's weights from the meta-gradient of the sum of the optimizee
losses, backpropagated through the truncation or estimated by persistent evolution strategies (pes.py).
Held-out evaluation every `eval_every` epochs keeps the best weights.

Across processes (torchrun): every rank optimizes its slice of the global meta-batch and the meta-gradients are
summed every meta-step, so that K ranks with --meta-batch B are the one-process run with --meta-batch K*B; rank 0
alone writes the run's files (distributed.py).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from .. import __version__
from .. import features as features_
from ..files import CheckpointError, load_verified, save_atomic, write_text_atomic
from ..grouped import GroupedLSTM
from ..net import PROGRESS_WIDTH, CoordinatewiseLSTM
from ..pretrained import load_pretrained
from ..tasks import TASKS, get_task
from ..tasks.base import seeded
from .config import MetaTrainConfig, normalize_features
from .distributed import Ranks
from .pes import PESEpisode, write_gradient
from .rescale import RescaledProblems
from .unroll import (CoordinateSample, initial_state, loss_and_grad, problem_weights, run_learned,
                     truncation)

LOG_FIELDS = ["epoch", "horizon", "meta_loss", "skipped", "grad_norm", "val_score", "best_score", "seconds"]


def build_net(config: MetaTrainConfig, groups=None, dim: int = 0):
    """One CoordinatewiseLSTM, or one per parameter group (a GroupedLSTM) when the task has several."""
    torch.manual_seed(config.seed)
    names = [g.name for g in groups] if groups and len(groups) > 1 else [None]
    nets = {}
    for name in names:
        net = CoordinatewiseLSTM(**config.net_kwargs(), backend=config.backend)
        with torch.no_grad():
            net.out.weight.mul_(config.out_init_scale)
            net.out.bias.zero_()
        nets[name] = net
    if names == [None]:
        return nets[None]
    return GroupedLSTM(nets, groups, dim)


def net_kwargs(net) -> dict:
    """The constructor arguments of the run's nets (build_net makes every group's alike), as its files record
    them: what the loader of pretrained optimizers builds the nets from (it reads no MetaTrainConfig)."""
    first = next(iter(net.nets.values())) if isinstance(net, GroupedLSTM) else net
    return first.size_kwargs()


def load_initial_weights(net, spec: str, groups, dim: int) -> None:
    """Loads the weights named by `spec` (see MetaTrainConfig.init) into `net`. A file with one LSTM
    initialises every parameter group's LSTM of a multi-group task (e.g. cifar10's conv and fc)."""
    source = load_pretrained(spec, groups=groups if len(groups) > 1 else None, dim=dim)
    targets = dict(net.nets) if isinstance(net, GroupedLSTM) else {None: net}
    for group, target in targets.items():
        part = source.nets[group] if isinstance(source, GroupedLSTM) else source
        if part.size_kwargs() == target.size_kwargs():
            target.load_state_dict(part.state_dict())
        elif widens(part, target):
            load_widened(target, part)
        else:
            raise ValueError(f"init: {spec} was built with {part.size_kwargs()}, this run with "
                             f"{target.size_kwargs()}: its weights do not fit; start from a file of the same sizes "
                             "(or of a subset of this run's inputs)")


def widens(source, target) -> bool:
    """Whether target is source with more inputs: more input features, or the progress input added, or both
    (everything else the same)."""
    a, b = dict(source.size_kwargs()), dict(target.size_kwargs())
    fewer, more = set(a.pop("features")), set(b.pop("features"))
    had, has = a.pop("progress_input", False), b.pop("progress_input", False)
    return a == b and fewer <= more and had <= has and (fewer < more or had < has)


def load_widened(target, source) -> None:
    """source's weights into target, a net of the same sizes with more inputs: each of source's features (and its
    progress input) keeps its input weights (at its columns in target's order), the new inputs' columns start at
    zero, so that target computes exactly what source did until training moves them. ValueError unless
    widens(source, target)."""
    if not widens(source, target):
        raise ValueError(f"{target.size_kwargs()} is not {source.size_kwargs()} with more input features")
    with torch.no_grad():
        state = source.state_dict()
        weight = state["lstm.weight_ih_l0"]
        widened = torch.zeros_like(target.lstm.weight_ih_l0)
        column = 0
        for name in target.features:
            width = features_.REGISTRY[name].width
            if name in source.features:
                at = sum(features_.REGISTRY[n].width for n in source.features[: source.features.index(name)])
                widened[:, column : column + width] = weight[:, at : at + width]
            column += width
        if source.reads_progress:  # the last columns in both
            widened[:, -PROGRESS_WIDTH:] = weight[:, -PROGRESS_WIDTH:]
        state["lstm.weight_ih_l0"] = widened
        target.load_state_dict(state)


def evaluate_learned(net, task, config: MetaTrainConfig, ranks: Ranks | None = None) -> float:
    """Validation score (lower is better): the mean loss over the last tenth of the horizon on fixed
    validation problems. It selects for where the comparison with hand-designed optimizers is made
    (the loss reached at the end), averaged over a few steps against minibatch noise. Problems of different
    scales (a mixed batch: relative_scores) count each loss relative to the problem's loss at theta_0.
    ranks: several split the problems and sum their losses (in float64): the same score on every rank."""
    problems = task.sample(config.eval_problems, seed=config.seed, split="val")
    tail = max(1, config.horizon // 10)
    if ranks is not None and ranks.distributed:
        start, stop = ranks.split(config.eval_problems)
        total, count = 0.0, 0
        if stop > start:  # fewer problems than ranks leaves some ranks without any
            losses = _validation_losses(net, problems.select(start, stop), config.horizon)[-tail:]
            total, count = losses.double().sum().item(), losses.numel()
        total, count = ranks.sum_values([total, count])
        score = total / count
    else:
        score = _validation_losses(net, problems, config.horizon)[-tail:].mean().item()
    return score if math.isfinite(score) else math.inf


def _validation_losses(net, problems, horizon: int):
    """Losses [horizon + 1, P], relative to theta_0's for problems of different scales."""
    losses = run_learned(net, problems, horizon)
    if problems.relative_scores:
        losses = losses / losses[0].clamp_min(1e-12)
    return losses


def initial_validation_loss(task, config: MetaTrainConfig) -> float:
    """The validation problems' mean loss at theta_0: what an optimizer that makes no progress scores."""
    problems = task.sample(config.eval_problems, seed=config.seed, split="val")
    if problems.relative_scores:
        return 1.0  # scores relative to the loss at theta_0
    with torch.no_grad():
        return problems.loss(problems.init_params(), 0).mean().item()


def run_episode(net, meta_optimizer, task, config: MetaTrainConfig, epoch: int, ranks: Ranks | None = None) -> dict:
    """One epoch: fresh problems, horizon // unroll truncations (the episode's horizon: config.episode_horizon),
    an Adam step after each on the meta-gradient of config.estimator.

    ranks: K ranks draw the global batch of K * meta_batch problems and each optimizes its slice (select); their
    meta-gradients and meta-losses are summed before each Adam step (the one-process run's, on every rank)."""
    ranks = ranks or Ranks()
    global_batch = config.meta_batch * ranks.world
    problems = task.sample(global_batch, seed=config.seed * 1_000_003 + epoch, split="train")
    if config.random_scale > 0:
        problems = RescaledProblems.random(problems, config.random_scale, seeded(config.seed, epoch, 4))
    coordinates = math.prod(problems.param_shape)
    mine = (ranks.rank * config.meta_batch, (ranks.rank + 1) * config.meta_batch)
    window = problems.coordinate_range(*mine) if ranks.distributed else None
    problems = problems.select(*mine)
    horizon = config.episode_horizon(epoch)
    scale = 1.0 / (config.unroll * global_batch)
    if config.estimator == "pes":
        meta_losses = _pes_meta_losses(net, problems, config, epoch, horizon, scale)
    else:
        meta_losses = _backprop_meta_losses(net, problems, config, epoch, horizon, scale, coordinates, window)
    total, skipped, norms = 0.0, 0, []
    for meta_loss in meta_losses:  # each truncation's, with its meta-gradient in the parameters' .grad
        if ranks.distributed:  # every rank gets the sums: all decide alike below
            meta_loss = ranks.sum_meta_gradient(net.parameters(), meta_loss)
        if not torch.isfinite(meta_loss):
            skipped += 1  # a diverged problem: drop this truncation's update, keep the weights
            meta_optimizer.zero_grad(set_to_none=True)
            break
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), config.clip)
        if not torch.isfinite(norm):
            skipped += 1
            meta_optimizer.zero_grad(set_to_none=True)
            continue
        meta_optimizer.step()
        total += meta_loss.item()
        norms.append(norm.item())
    done = horizon // config.unroll - skipped
    return {"horizon": horizon, "meta_loss": total / max(done, 1), "skipped": skipped,
            "grad_norm": max(norms, default=0.0)}


def _backprop_meta_losses(net, problems, config: MetaTrainConfig, epoch: int, horizon: int, scale: float,
                          coordinates: int, window):
    """Truncated backprop: yields each truncation's meta-loss (detached) after backpropagating it into .grad
    (none when it is not finite: the caller skips it). Stops when the caller does."""
    params = problems.init_params()
    state = initial_state(net, params.numel())  # the LSTM state, with the moments of a net that reads them
    losses, grad = loss_and_grad(problems, params, 0, keep_graph=False)
    initial = losses.detach()
    loss_scale = config.episode_loss_scale(horizon)
    for start in range(0, horizon, config.unroll):
        weights = problem_weights(loss_scale, losses, initial)
        step_weights = config.truncation_step_weights(start, horizon)
        sample = None if config.coordinate_fraction == 1 else CoordinateSample(
            coordinates, config.coordinate_fraction, seeded(config.seed, epoch, start, 3), params.device, window)
        meta_loss, history, params, grad, state = truncation(net, problems, params, grad, state, start,
                                                             config.unroll, weights, step_weights, sample, horizon)
        losses = history[-1]
        meta_loss = meta_loss * scale
        for p in net.parameters():
            p.grad = None
        if torch.isfinite(meta_loss) and meta_loss.requires_grad:
            meta_loss.backward()
        yield meta_loss.detach()


def _pes_meta_losses(net, problems, config: MetaTrainConfig, epoch: int, horizon: int, scale: float):
    """Persistent evolution strategies (pes.py): yields each truncation's mean meta-loss over the particles after
    writing its estimate into .grad. The perturbations come from (seed, epoch, start): the same on every rank."""
    episode = PESEpisode(net, problems, config.pes_pairs, config.pes_sigma, horizon)
    loss_scale = config.episode_loss_scale(horizon)
    for start in range(0, horizon, config.unroll):
        step_weights = config.truncation_step_weights(start, horizon)
        result = episode.truncation(start, config.unroll, seeded(config.seed, epoch, start, 6),
                                    loss_scale=loss_scale, step_weights=step_weights, scale=scale)
        write_gradient(net, result.gradient)
        yield result.meta_loss.to(next(net.parameters()).dtype)


class MetaTrainer:
    """Owns a run directory: checkpoint.pt (resume state), best.pt (best weights), log.csv, summary.json.

    task: the Task to meta-train on instead of the registered one named by config.task (e.g. a ModuleTask of
    your own model; config.task is then its label in the run's files, and config.task_kwargs are not used).
    ranks: the processes of a distributed run (default: those of torch.distributed's initialized default group,
    else a plain run). Every rank builds a MetaTrainer with the same settings (refused otherwise); rank 0 alone
    reads and writes the run's files and shows progress, and shares what it read with the others.
    """

    def __init__(self, config: MetaTrainConfig, out_dir, *, resume: bool = False, progress: bool = True,
                 data_dir=None, task=None, ranks: Ranks | None = None):
        self.ranks = ranks if ranks is not None else Ranks.current()
        self.config, self.out_dir, self.progress = config, Path(out_dir), progress and self.ranks.writer
        self.ranks.agree({**dataclasses.asdict(config), "resume": resume, "torch": torch.__version__,
                          "l2l_fast": __version__})
        self.task = task if task is not None else get_task(config.task).make(config.task_kwargs, data_dir=data_dir)
        shape = self.task.sample(1, seed=config.seed, split="val")  # the task's parameter groups
        self.groups, self.dim = shape.groups, shape.dim
        if config.coordinate_fraction < 1 and len(self.groups) > 1:
            raise ValueError(f"coordinate_fraction < 1 needs a task with one parameter group; {config.task} has "
                             f"{len(self.groups)} ({', '.join(g.name for g in self.groups)}): use 1")
        self.net = build_net(config, self.groups, self.dim)
        self.meta_optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.epoch, self.best_score, self.best_state, self.log = 0, math.inf, None, []
        self.stalled_evaluations, self.stop_reason, self.initial_loss = 0, None, None
        payload = self.ranks.from_writer(lambda: self._read_start(resume))
        if "checkpoint" in payload:
            self._restore(payload["checkpoint"])
        elif "init" in payload:
            self.net.load_state_dict(payload["init"])

    def _read_start(self, resume: bool) -> dict:
        """What the run starts from (rank 0 reads it for all): {"checkpoint": payload} to resume, {"init": the
        weights of config.init}, or {} for fresh weights."""
        checkpoint = self.out_dir / "checkpoint.pt"
        if resume and checkpoint.exists():
            return {"checkpoint": load_verified(checkpoint)}
        if checkpoint.exists() and not resume:
            raise FileExistsError(f"{checkpoint} exists: pass resume=True (--resume) to continue that run, "
                                  f"or choose another output directory")
        if resume:  # a requeued job passes --resume every time; its first start has nothing to resume
            warnings.warn(f"resume: no checkpoint in {self.out_dir}; starting a new run", stacklevel=3)
        if not self.config.init:
            return {}
        load_initial_weights(self.net, self.config.init, self.groups, self.dim)
        return {"init": self.net.state_dict()}

    def _restore(self, payload: dict) -> None:
        saved = {**dataclasses.asdict(MetaTrainConfig()), **payload["config"]}  # fields added since: defaults
        saved["features"] = normalize_features(saved["features"])
        mine = dataclasses.asdict(self.config)
        if saved["task"] == mine["task"] and mine["task"] in TASKS:  # options added since, or at defaults: same
            complete = get_task(mine["task"]).complete
            saved["task_kwargs"], mine["task_kwargs"] = complete(saved["task_kwargs"]), complete(mine["task_kwargs"])
        free = ("epochs", "collapse_patience")  # may change on resume
        differing = {k for k in mine if k not in free and saved[k] != mine[k]}
        saved_world = payload.get("world_size", 1)  # files from before distributed runs: one process
        if saved_world != self.ranks.world:
            # the global batch defines the problems and the meta-gradient: another split of it is the same run
            was, now = saved["meta_batch"] * saved_world, mine["meta_batch"] * self.ranks.world
            if was != now:
                raise CheckpointError(
                    f"checkpoint was made by {saved_world} process(es) x --meta-batch {saved['meta_batch']} = {was} "
                    f"problems per meta-step; this run has {self.ranks.world} x {mine['meta_batch']} = {now}: resume "
                    f"with the same global meta-batch (--meta-batch {was / self.ranks.world:g} on "
                    f"{self.ranks.world} process(es)) or the same number of processes")
            differing.discard("meta_batch")
        if differing:
            raise CheckpointError(f"checkpoint was made with a different configuration ({sorted(differing)}); "
                                  f"resume with the same settings or use another output directory")
        self.net.load_state_dict(payload["net"])
        self.meta_optimizer.load_state_dict(payload["meta_optimizer"])
        self.epoch, self.best_score = payload["epoch"], payload["best_score"]
        self.stalled_evaluations = payload.get("stalled_evaluations", 0)
        self.best_state, self.log = payload["best_state"], payload["log"]

    def _checkpoint(self) -> None:
        if not self.ranks.writer:
            return
        save_atomic({"config": dataclasses.asdict(self.config), "net_kwargs": net_kwargs(self.net),
                     "net": self.net.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                     "epoch": self.epoch, "best_score": self.best_score, "best_state": self.best_state,
                     "log": self.log, "stalled_evaluations": self.stalled_evaluations,
                     "world_size": self.ranks.world},
                    self.out_dir / "checkpoint.pt")
        # the log is rewritten whole from the checkpoint's rows, so after a resume it never
        # holds epochs the checkpoint does not know
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(self.log)
        write_text_atomic(table.getvalue(), self.out_dir / "log.csv")

    def best_net(self) -> CoordinatewiseLSTM:
        """The weights with the best validation score so far (the current ones before any evaluation)."""
        net = build_net(self.config, self.groups, self.dim)
        net.load_state_dict(self.best_state if self.best_state is not None else self.net.state_dict())
        return net

    def _keep_if_best(self, score: float) -> None:
        if score < self.best_score:
            self.best_score = score
            self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            if not self.ranks.writer:
                return
            save_atomic({"config": dataclasses.asdict(self.config), "net_kwargs": net_kwargs(self.net),
                         "net": self.best_state, "score": score, "epoch": self.epoch}, self.out_dir / "best.pt")

    def _evaluate(self) -> float:
        # a plain run calls evaluate_learned as it always has (tests replace it with 3-argument stand-ins)
        extra = (self.ranks,) if self.ranks.distributed else ()
        return evaluate_learned(self.net, self.task, self.config, *extra)

    def _score_initial_weights(self) -> None:
        """A fine-tune's epoch 0: its starting weights are evaluated and kept as the best so far."""
        t0 = time.perf_counter()
        score = self._evaluate()
        self._keep_if_best(score)
        self.log.append({"epoch": 0, "meta_loss": "", "skipped": 0, "grad_norm": "", "val_score": score,
                         "best_score": self.best_score, "seconds": time.perf_counter() - t0})

    def _check_progress(self, score: float) -> None:
        """Counts evaluations in a row without progress; sets stop_reason when they reach the patience."""
        if self.config.collapse_patience == 0:
            return
        if self.initial_loss is None:
            self.initial_loss = initial_validation_loss(self.task, self.config)
        stalled = not (score < 0.99 * self.initial_loss)  # a NaN/inf score counts as no progress
        self.stalled_evaluations = self.stalled_evaluations + 1 if stalled else 0
        if self.stalled_evaluations >= self.config.collapse_patience:
            self.stop_reason = (
                f"stopped at epoch {self.epoch}: the learned optimizer made no progress on the validation problems "
                f"in {self.stalled_evaluations} evaluations in a row (score {score:.4g} vs {self.initial_loss:.4g} "
                f"at theta_0): meta-training collapsed or diverged. The best weights so far are kept "
                f"(best score {self.best_score:.4g}); try a lower --lr or another --seed.")

    def run(self) -> dict:
        config = self.config
        if self.ranks.writer:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=config.epochs, initial=self.epoch, desc=f"meta-train {config.task}", unit="epoch")
        started = time.perf_counter()
        if config.init and not self.log:
            self._score_initial_weights()
        while self.epoch < config.epochs:
            t0 = time.perf_counter()
            for group in self.meta_optimizer.param_groups:
                group["lr"] = config.lr_at(self.epoch)
            row = run_episode(self.net, self.meta_optimizer, self.task, config, self.epoch, self.ranks)
            self.epoch += 1
            row.update(epoch=self.epoch, val_score="", best_score="")
            if self.epoch % config.eval_every == 0 or self.epoch == config.epochs:
                score = self._evaluate()
                self._keep_if_best(score)
                self._check_progress(score)
                row.update(val_score=score, best_score=self.best_score)
            row["seconds"] = time.perf_counter() - t0
            self.log.append(row)
            if self.epoch % config.checkpoint_every == 0 or self.epoch == config.epochs or self.stop_reason:
                self._checkpoint()
            if bar is not None:
                bar.set_postfix(meta_loss=f"{row['meta_loss']:.4g}", best=f"{self.best_score:.4g}")
                bar.update(1)
            if self.stop_reason:
                break
        if bar is not None:
            bar.close()
        summary = {"config": dataclasses.asdict(config), "epochs": self.epoch, "best_score": self.best_score,
                   "skipped_truncations": sum(int(r["skipped"]) for r in self.log),
                   "seconds_this_session": time.perf_counter() - started, "stopped_early": self.stop_reason}
        if self.ranks.distributed:
            summary.update(processes=self.ranks.world, global_meta_batch=config.meta_batch * self.ranks.world)
        if self.ranks.writer:
            if self.stop_reason:
                print(f"meta-train: {self.stop_reason}", file=sys.stderr)
            write_text_atomic(json.dumps(summary, indent=2), self.out_dir / "summary.json")
        return summary
