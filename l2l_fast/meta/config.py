"""MetaTrainConfig: the settings of a meta-training run, each field's meaning written once.

Each field's `metadata` holds its help and, where the default's type is not enough, the argparse type, choices
and metavar of its `l2l-fast meta-train` flag (`--` and the name with dashes). The CLI generates the flags from
it and the README's table of flags is rendered from that parser (`l2l_fast.cli.meta_train_flags_markdown`).
A field with `cli=False` has no flag of its own.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .. import features as features_
from ..argtypes import positive_int
from ..net import OUTPUTS  # the net's output: update = output_scale * y, or output_scale * tanh(y)
from ..tasks.base import seeded

LOSS_SCALES = ("sum", "relative", "initial")
LR_SCHEDULES = ("constant", "cosine")
ESTIMATORS = ("backprop", "pes")


def _flag(default, help: str, *, type=None, choices=None, metavar=None, nargs=None):
    """A field with a meta-train flag. type: argparse's (default: the default's int, float or str)."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "metavar": metavar,
                                            "nargs": nargs})


def _no_flag(default=dataclasses.MISSING, help: str = "", *, why: str, default_factory=dataclasses.MISSING):
    """A field without a meta-train flag of its own; `why` says where it is set instead."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, "cli": False, "why": why})


def feature_names(text: str) -> tuple[str, ...]:
    """argparse type of --features: one word of feature names separated by commas ("paper,moments")."""
    names = tuple(name for name in text.split(",") if name)
    unknown = [name for name in names if name not in features_.REGISTRY]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected feature names among {', '.join(features_.ALL)}, got {text!r}")
    return names


def normalize_features(value) -> tuple[str, ...]:
    """The features of a config as the net keeps them (names in bit order) from names, comma-separated words,
    sequences of them (the flag's words: --features paper moments, --features paper,moments) or a mask."""
    if isinstance(value, int):
        return features_.names_of(value)
    names: list = []
    for item in (value,) if isinstance(value, str) else value:
        if isinstance(item, str):
            names.extend(name for name in item.split(",") if name)
        elif isinstance(item, (tuple, list)):
            names.extend(item)
        else:
            raise ValueError(f"features: expected feature names, got {value!r}")
    return features_.names_of(names)  # ValueError naming features for an unknown or no name


@dataclass
class MetaTrainConfig:
    task: str = _no_flag("quadratic", "the optimizees: a registered task (l2l_fast.tasks.TASKS); mixed samples "
                                      "problems of several families (its families and datasets options)",
                         why="--task and the task's option flags come from the task registry")
    task_kwargs: dict = _no_flag(help="the task's options (its factory's keyword arguments)", default_factory=dict,
                                 why="the task's option flags (--hidden, --activation, --dim, ...)")
    epochs: int = _flag(100, "meta-training epochs: each optimizes fresh problems for a horizon", type=positive_int)
    horizon: int = _flag(100, "optimization steps of an episode; a multiple of --unroll", type=positive_int)
    horizon_min: int = _flag(0, "episodes of random length: each epoch's drawn log-uniform between M and --horizon "
                                "steps (rounded up to a multiple of --unroll; from --seed and the epoch), the LSTM "
                                "state and the parameters carried across its truncations; validation runs --horizon "
                                "steps; 0: every episode --horizon steps (the paper)", metavar="M")
    unroll: int = _flag(20, "steps of a truncation: the meta-gradient flows through them, then Adam updates the "
                            "LSTM (--unroll equal to --horizon: one meta-step through the whole episode)",
                        type=positive_int)
    meta_batch: int = _flag(8, "problems per episode; their coordinates share each kernel call", type=positive_int)
    lr: float = _flag(1e-3, "meta learning rate (Adam's, on the LSTM's weights)")
    clip: float = _flag(1.0, "meta-gradient norm clip (inf: none)")
    eval_every: int = _flag(10, "epochs between evaluations on held-out validation problems, which keep the best "
                                "weights (best.pt)", type=positive_int)
    eval_problems: int = _flag(16, "validation problems per evaluation", type=positive_int)
    checkpoint_every: int = _flag(1, "epochs between checkpoints (the most a killed run loses)", type=positive_int)
    seed: int = _flag(0, "seeds the LSTM's initial weights and every problem and sample the run draws")
    hidden_size: int = _no_flag(20, "LSTM units per layer", why="the LSTM's sizes are the paper's; set from code")
    num_layers: int = _no_flag(2, "LSTM layers", why="the LSTM's sizes are the paper's; set from code")
    preprocess_p: float = _no_flag(10.0, "the gradient preprocessing's p", why="the paper's; set from code")
    output_scale: float = _no_flag(0.1, "the net's update is its output times this", why="the paper's; set from code")
    features: tuple = _flag(features_.DEFAULT, "the LSTM's input features, one or more of: paper (the paper's "
                                               "preprocessed gradient), moments (RNNprop's scale-free inputs: the "
                                               "gradient and its running mean over the root of its running second "
                                               "moment, beta 0.95, bias-corrected; the moments are carried like the "
                                               "LSTM state), long_moments (the same over Adam's long second moment, "
                                               "beta 0.999); words or commas: paper moments, paper,moments",
                            type=feature_names, metavar="NAMES", nargs="+")
    output: str = _flag("linear", "the net's update: linear, output_scale times the LSTM's output (the paper); "
                                  "tanh, output_scale times its tanh (a bounded step)", choices=OUTPUTS)
    progress_input: bool = _flag(False, "the LSTM also reads where the episode is: the fraction done, t / horizon, "
                                        "and the horizon's length, log10(horizon) / 4 (VeLO's horizon inputs), so "
                                        "its steps can depend on both; users then give LearnedOptimizer its "
                                        "total_steps; with --init from a net without them, their columns start at "
                                        "zero")
    out_init_scale: float = _no_flag(0.1, "the output layer's initial weights are scaled by this (small first "
                                          "updates; later work found this helps)", why="set from code")
    loss_scale: str = _flag("sum", "sum: a truncation's meta-loss is the sum of its losses (the paper); relative: "
                                   "each problem's losses divided by its loss at the truncation's start, so late "
                                   "truncations, whose losses are small, weigh as much as the first (on long "
                                   "horizons its meta-gradients explode); initial: each problem's losses divided by "
                                   "its loss at the episode's start, so problems of different loss scales (--task "
                                   "mixed) weigh alike",
                            choices=LOSS_SCALES)
    long_loss_scale: str = _flag("", "with --long-episodes K: the loss scale (as --loss-scale) of the episodes of "
                                     "more than K steps, the others keeping --loss-scale; e.g. --loss-scale initial "
                                     "--long-loss-scale relative trains the first steps' progress and late precision "
                                     "in one run (each epoch one or the other)", choices=("",) + LOSS_SCALES,
                                 metavar="SCALE")
    long_episodes: int = _flag(0, "episodes of more than K steps use --long-loss-scale; 0: every episode uses "
                                  "--loss-scale", metavar="K")
    step_weight_power: float = _flag(0.0, "0: every step's loss counts once (the paper); K > 0: the loss after step t "
                                          "counts (K+1)(t/horizon)^K (mean about 1), leaning the meta-loss toward the "
                                          "loss reached at the end of the horizon", metavar="K")
    lr_schedule: str = _flag("constant", "cosine: the meta learning rate decays from --lr to --lr/100 over --epochs "
                                         "(a function of the epoch alone: a resumed run goes on with it)",
                             choices=LR_SCHEDULES)
    backend: str = _no_flag("auto", "the nets' backend: auto, native or reference",
                            why="auto picks the native kernels where they exist; set from code")
    collapse_patience: int = _flag(5, "stop after E evaluations in a row without progress (score >= 99% of the loss "
                                      "at theta_0, or non-finite): a collapsed or diverged run, which never came "
                                      "back in any run; 0: never stop", metavar="E")
    coordinate_fraction: float = _flag(1.0, "backpropagate each truncation through a fresh random fraction F of the "
                                            "coordinates, scaled by 1/F: an unbiased, cheaper meta-gradient; 1: all, "
                                            "exact (tasks with one parameter group)", metavar="F")
    random_scale: float = _flag(0.0, "rescale each meta-training problem's coordinates by exp(U(-S, S)) (Lv et al. "
                                     "2017), so the optimizer cannot fit one problem family's gradient scales; "
                                     "validation and test problems are never rescaled; 0: off", metavar="S")
    unroll_curriculum: int = _flag(0, "curriculum over the episode length (Chen et al. 2020): the first N epochs' "
                                      "episodes are one truncation (--unroll steps) long, and every N epochs the "
                                      "truncations per episode double, up to --horizon (e.g. 20, 40, 80, 100 steps "
                                      "for --unroll 20 --horizon 100): a fixed schedule of the epoch alone (a resumed "
                                      "run goes on with it; Chen et al. move on when validation stalls); validation "
                                      "always runs --horizon steps; 0: off", metavar="N")
    estimator: str = _flag("backprop", "the meta-gradient: backprop, through each truncation (the paper; biased "
                                       "toward greedy steps: effects beyond the truncation are unseen); pes, "
                                       "persistent evolution strategies (Vicol et al. 2021): antithetic Gaussian "
                                       "perturbations of the LSTM's weights, each particle carrying its own "
                                       "problems' trajectory and the sum of its perturbations across the "
                                       "episode's truncations, an unbiased estimate of the episode's smoothed "
                                       "meta-gradient without backprop (--pes-pairs, --pes-sigma)",
                           choices=ESTIMATORS)
    pes_pairs: int = _flag(4, "with --estimator pes: antithetic pairs of particles (2N copies of the meta-batch "
                              "optimized with perturbed weights: a truncation costs 2N no-grad unrolls)",
                           type=positive_int, metavar="N")
    pes_sigma: float = _flag(0.01, "with --estimator pes: standard deviation of the perturbations of the LSTM's "
                                   "weights (the meta-loss is smoothed over that scale)", metavar="S")
    init: str = _flag("", "start from these weights instead of fresh ones (a fine-tune): pretrained:NAME, an "
                          "exported .pt, or a meta-train run's best.pt / checkpoint.pt; they are scored first, so "
                          "the best kept is never worse", metavar="SPEC")

    def __post_init__(self):
        self.features = normalize_features(self.features)
        if not isinstance(self.progress_input, bool):
            raise ValueError(f"progress_input: expected True or False, got {self.progress_input!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {self.output!r}")
        if self.horizon % self.unroll:
            raise ValueError(f"horizon ({self.horizon}) must be a multiple of unroll ({self.unroll})")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr!r}")
        # clip 0 would zero every meta-gradient and train nothing; inf turns clipping off
        if not (isinstance(self.clip, (int, float)) and self.clip > 0 and not math.isnan(self.clip)):
            raise ValueError(f"clip: expected a number > 0 (inf: no clipping), got {self.clip!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not (math.isfinite(self.step_weight_power) and self.step_weight_power >= 0):
            raise ValueError(f"step_weight_power: expected a finite number >= 0, got {self.step_weight_power!r}")
        if self.loss_scale not in LOSS_SCALES:
            raise ValueError(f"loss_scale: expected one of {LOSS_SCALES}, got {self.loss_scale!r}")
        if self.long_loss_scale not in ("",) + LOSS_SCALES:
            raise ValueError(f"long_loss_scale: expected one of {LOSS_SCALES}, got {self.long_loss_scale!r}")
        if not (isinstance(self.long_episodes, int) and self.long_episodes >= 0):
            raise ValueError(f"long_episodes: expected an int >= 0 (0: off), got {self.long_episodes!r}")
        if bool(self.long_episodes) != bool(self.long_loss_scale):
            raise ValueError("long_episodes and long_loss_scale go together: give both (K > 0 and a scale) or "
                             "neither")
        if self.long_episodes and self.long_episodes >= self.horizon:
            raise ValueError(f"long_episodes ({self.long_episodes}) must be below horizon ({self.horizon}): no "
                             f"episode would be long")
        for name in ("epochs", "horizon", "unroll", "meta_batch", "eval_every", "eval_problems", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)}")
        if not (isinstance(self.horizon_min, int) and 0 <= self.horizon_min <= self.horizon):
            raise ValueError(f"horizon_min: expected an int in [0, horizon = {self.horizon}] (0: a fixed horizon), "
                             f"got {self.horizon_min!r}")
        if not (isinstance(self.coordinate_fraction, (int, float)) and 0 < self.coordinate_fraction <= 1):
            raise ValueError(f"coordinate_fraction: expected a number in (0, 1], got {self.coordinate_fraction!r}")
        if not (math.isfinite(self.random_scale) and self.random_scale >= 0):
            raise ValueError(f"random_scale: expected a finite number >= 0, got {self.random_scale!r}")
        if not (isinstance(self.unroll_curriculum, int) and self.unroll_curriculum >= 0):
            raise ValueError(f"unroll_curriculum: expected an int >= 0 (epochs per stage; 0: off), got "
                             f"{self.unroll_curriculum!r}")
        if self.unroll_curriculum and self.horizon_min:
            raise ValueError("unroll_curriculum and horizon_min both choose the episodes' lengths: use one of them")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {self.estimator!r}")
        if not (isinstance(self.pes_pairs, int) and self.pes_pairs >= 1):
            raise ValueError(f"pes_pairs: expected a positive int, got {self.pes_pairs!r}")
        if not (isinstance(self.pes_sigma, (int, float)) and math.isfinite(self.pes_sigma) and self.pes_sigma > 0):
            raise ValueError(f"pes_sigma: expected a finite number > 0, got {self.pes_sigma!r}")
        if self.estimator == "pes" and self.coordinate_fraction != 1:
            raise ValueError("coordinate_fraction < 1 samples the coordinates that backprop runs through; "
                             "estimator pes runs no backprop: use coordinate_fraction 1 with it")
        if self.collapse_patience < 0:
            raise ValueError(f"collapse_patience: expected an int >= 0, got {self.collapse_patience}")

    def lr_at(self, epoch: int) -> float:
        """The meta learning rate of epoch `epoch` (0-based)."""
        if self.lr_schedule == "constant":
            return self.lr
        progress = min(epoch / self.epochs, 1.0)
        return self.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def episode_horizon(self, epoch: int) -> int:
        """The steps of epoch `epoch`'s episode: --horizon, or with --horizon-min M a log-uniform draw in
        [M, horizon] rounded up to a multiple of unroll, a function of (seed, epoch) alone (a resumed run draws
        the same); with --unroll-curriculum, the curriculum's (curriculum_horizon)."""
        if self.unroll_curriculum:
            return self.curriculum_horizon(epoch)
        if self.horizon_min == 0:
            return self.horizon
        u = torch.rand((), generator=seeded(self.seed, epoch, 5), dtype=torch.float64).item()
        steps = math.exp(math.log(self.horizon_min) + u * (math.log(self.horizon) - math.log(self.horizon_min)))
        return min(self.horizon, max(self.unroll, math.ceil(steps / self.unroll - 1e-9) * self.unroll))

    def episode_loss_scale(self, horizon: int) -> str:
        """The loss scale of an episode of `horizon` steps: --long-loss-scale past --long-episodes, else
        --loss-scale."""
        if self.long_episodes and horizon > self.long_episodes:
            return self.long_loss_scale
        return self.loss_scale

    def curriculum_horizon(self, epoch: int) -> int:
        """The curriculum's episode length at epoch `epoch` (0-based): unroll * 2^(epoch // N) steps, at most
        horizon; a multiple of unroll at every stage, non-decreasing in the epoch, horizon from stage
        ceil(log2(horizon / unroll)) on."""
        truncations = self.horizon // self.unroll
        stage = epoch // self.unroll_curriculum
        return self.unroll * min(truncations, 1 << min(stage, truncations.bit_length()))

    def step_weight(self, step: int, horizon: int | None = None) -> float:
        """The meta-loss weight of the loss after step `step` (1 .. horizon) of an episode of `horizon` steps
        (default --horizon)."""
        k = self.step_weight_power
        return 1.0 if k == 0 else (k + 1) * (step / (horizon or self.horizon)) ** k

    def truncation_step_weights(self, start: int, horizon: int) -> list[float] | None:
        """The weights of the losses after steps start + 1 .. start + unroll of an episode of `horizon` steps; None
        when every step counts once (step_weight_power 0)."""
        if self.step_weight_power == 0:
            return None
        return [self.step_weight(start + j + 1, horizon) for j in range(self.unroll)]

    def net_kwargs(self) -> dict:
        """The CoordinatewiseLSTM's arguments (all but the backend)."""
        return dict(hidden_size=self.hidden_size, num_layers=self.num_layers, preprocess_p=self.preprocess_p,
                    output_scale=self.output_scale, features=self.features, output=self.output,
                    progress_input=self.progress_input)


def flag_fields() -> list[dataclasses.Field]:
    """The fields offered as meta-train flags, in the dataclass's order."""
    return [f for f in dataclasses.fields(MetaTrainConfig) if f.metadata.get("cli", True)]


def flag_type(f: dataclasses.Field):
    """argparse's type for field f: its metadata's, else that of its default (int, float; str needs none)."""
    declared = f.metadata.get("type")
    return declared if declared is not None else (type(f.default) if type(f.default) in (int, float) else None)
