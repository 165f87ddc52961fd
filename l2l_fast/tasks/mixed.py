"""The meta-training sampler over problem families: each problem of a batch draws its family and the family's
hyperparameters from a seeded generator, and the problems, of different shapes, make one MixedBatch (their
coordinates share each kernel call).

Families (each also a task on its own): mlp (width, depth, activation, initialisation; MNIST downsampled,
scikit-learn's digits / iris / breast_cancer, random teachers for classification and regression), cnn (8x8
digits, 14x14 MNIST), logistic (logistic regression: convex), convex (RNNprop's clipped square), quadratic
(the paper's), charlm (a character-level LSTM on fortune cookies).

HELD_OUT names what the sampler never draws, so that an evaluation on it measures generalization:
`held_out_tasks()` gives a task of each for the evaluation suite.
"""
from __future__ import annotations

import math

import torch

from .base import MixedBatch, Task, check_split, derive_seed, seeded
from .datasets import DATASETS, IMAGES, TEACHERS
from .registry import TaskOption, get_task, register_task

FAMILIES = ("mlp", "cnn", "logistic", "convex", "quadratic", "charlm")
# What the sampler never draws (name: what), held out for evaluation.
HELD_OUT = {
    "gelu": "the GELU activation (mlp, cnn): the sampler draws sigmoid, tanh and ReLU",
    "wine": "the wine dataset (mlp, logistic)",
    "deep": "MLPs of 3 or more hidden layers: the sampler draws 1 or 2",
    "wide": "hidden layers wider than 64 units (mlp; LSTMs wider than 32): the sampler draws 4-64 (8-32)",
    "mnist28": "full-resolution 28x28 MNIST, the paper's task: the sampler draws MNIST at 7x7 and 14x14",
    "attention": "transformers (the chartransformer task), an architecture family the sampler never draws",
}
TRAIN_DATASETS = tuple(d for d in DATASETS if d != "wine")
TRAIN_NONLINEARITIES = ("sigmoid", "tanh", "relu")
_SPLIT_SALT = {"train": 90, "val": 91, "test": 92}


def held_out_tasks() -> dict[str, tuple[str, dict]]:
    """{name: (registered task, its options)}: one task for each entry of HELD_OUT."""
    return {
        "mlp_gelu": ("mlp", {"dataset": "digits", "hidden": (32,), "nonlinearity": "gelu"}),
        "cnn_gelu": ("cnn", {"dataset": "digits", "channels": (8, 8), "nonlinearity": "gelu"}),
        "mlp_wine": ("mlp", {"dataset": "wine", "hidden": (32,), "nonlinearity": "relu"}),
        "logistic_wine": ("logistic", {"dataset": "wine"}),
        "mlp_deep": ("mlp", {"dataset": "mnist", "hidden": (32, 32, 32), "nonlinearity": "relu"}),
        "mlp_wide": ("mlp", {"dataset": "mnist", "hidden": (128,), "nonlinearity": "tanh"}),
        "charlm_wide": ("charlm", {"hidden": (64,)}),
        "mnist28": ("mnist", {"hidden": (20,), "activation": "sigmoid"}),
        "attention": ("chartransformer", {"d_model": 32}),
    }


class Draws:
    """Hyperparameter draws from one seeded generator, in the order they are asked for."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def uniform(self) -> float:
        return torch.rand((), generator=self.generator, dtype=torch.float64).item()

    def choice(self, options):
        return options[min(int(self.uniform() * len(options)), len(options) - 1)]

    def log_int(self, low: int, high: int) -> int:
        """An int in [low, high], log-uniform."""
        value = math.exp(math.log(low) + self.uniform() * (math.log(high + 1) - math.log(low)))
        return min(int(value), high)


def draw_problem(draws: Draws, families, datasets) -> tuple[str, dict]:
    """One problem's (family, options), from the families and datasets allowed."""
    family = draws.choice(families)
    if family == "mlp":
        dataset = draws.choice(datasets)
        hidden = tuple(draws.log_int(4, 64) for _ in range(draws.choice((1, 2))))
        return family, {"dataset": dataset, "hidden": hidden, "nonlinearity": draws.choice(TRAIN_NONLINEARITIES),
                        "weight_init": draws.choice(("default", "small")),
                        "image_size": draws.choice((7, 14)) if dataset == "mnist" else 14}
    if family == "cnn":
        channels = tuple(draws.log_int(4, 16) for _ in range(draws.choice((1, 2))))
        return family, {"dataset": draws.choice([d for d in datasets if d in IMAGES]), "channels": channels,
                        "nonlinearity": draws.choice(TRAIN_NONLINEARITIES),
                        "weight_init": draws.choice(("default", "small")), "image_size": 14}
    if family == "logistic":
        dataset = draws.choice([d for d in datasets if d != "teacher_regression"])
        return family, {"dataset": dataset, "weight_init": draws.choice(("default", "small")),
                        "image_size": draws.choice((7, 14)) if dataset == "mnist" else 14}
    if family == "convex":
        return family, {"dim": draws.log_int(5, 50)}
    if family == "quadratic":
        return family, {"dim": draws.log_int(2, 20)}
    return family, {"hidden": (draws.log_int(8, 32),), "weight_init": draws.choice(("default", "small"))}


@register_task("mixed", needs_data=True, help="problems of several families and shapes in one batch, each drawn "
               "with its hyperparameters (l2l_fast/tasks/mixed.py; never the held-out ones)", options=[
                   TaskOption("families", str, "the families drawn from, uniformly", nargs="+", choices=FAMILIES),
                   TaskOption("datasets", str, "the datasets the mlp, cnn and logistic problems draw from (wine is "
                              "held out)", nargs="+", choices=DATASETS)])
class MixedTask(Task):
    def __init__(self, families=FAMILIES, datasets=TRAIN_DATASETS, data_dir=None):
        families, datasets = tuple(dict.fromkeys(families)), tuple(dict.fromkeys(datasets))
        if not families or any(f not in FAMILIES for f in families):
            raise ValueError(f"families: expected some of {FAMILIES}, got {families}")
        held = [d for d in datasets if d not in TRAIN_DATASETS]
        if held:
            raise ValueError(f"datasets: {', '.join(held)} held out of meta-training (HELD_OUT); "
                             f"expected some of {TRAIN_DATASETS}")
        if not datasets and {"mlp", "cnn", "logistic"} & set(families):
            raise ValueError("datasets: the mlp, cnn and logistic families need at least one")
        if "cnn" in families and not set(datasets) & set(IMAGES):
            raise ValueError(f"datasets: the cnn family needs an image dataset ({', '.join(IMAGES)})")
        if "logistic" in families and not set(datasets) - {"teacher_regression"}:
            raise ValueError("datasets: the logistic family needs a classification dataset")
        super().__init__("mixed", {"families": families, "datasets": datasets})
        self.families, self.datasets, self.data_dir = families, datasets, data_dir

    def draw(self, num_problems: int, seed: int, split: str = "train") -> list[tuple[str, dict]]:
        """The (family, options) of each problem of the sample (seed, split)."""
        check_split(split)
        draws = Draws(seeded(seed, _SPLIT_SALT[split], 7))
        return [draw_problem(draws, self.families, self.datasets) for _ in range(num_problems)]

    def sample(self, num_problems: int, seed: int, split: str = "train") -> MixedBatch:
        """Problems of one (family, options) are sampled together as one part (batched), parts in the order of
        their first draw; part k's problems from seed derive_seed(seed, salt, 5, k)."""
        specs = self.draw(num_problems, seed, split)
        groups: dict = {}
        for family, options in specs:
            key = (family, tuple(sorted(options.items())))
            groups.setdefault(key, []).append((family, options))
        parts, ordered = [], []
        for k, members in enumerate(groups.values()):
            family, options = members[0]
            spec = get_task(family)
            task = spec.factory(**options, **({"data_dir": self.data_dir} if spec.needs_data else {}))
            parts.append(task.sample(len(members), seed=derive_seed(seed, _SPLIT_SALT[split], 5, k), split=split))
            ordered += members
        return MixedBatch(parts, specs=ordered)
