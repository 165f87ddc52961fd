"""Where the family tasks' examples come from: fixed datasets (MNIST, downsampled; scikit-learn's bundled
ones) or a random MLP teacher per problem labelling Gaussian inputs, each drawing the minibatch of a step
deterministically from (seed, salt, step), like the paper's tasks.

Splits: MNIST as the mnist task's (50,000 train, the last 10,000 training images val, the test set test);
a scikit-learn dataset is split 70 / 15 / 15% by one fixed permutation, its features standardised with the
training part's mean and deviation (digits' pixels divided by 16 instead, so that they stay an image).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.tabular import TABULAR, load_tabular
from .base import seeded
from .mnist_mlp import mnist_split

CLASSIFICATION = ("mnist", "digits", "iris", "wine", "breast_cancer")
TEACHERS = ("teacher_classification", "teacher_regression")
DATASETS = CLASSIFICATION + TEACHERS
IMAGES = ("mnist", "digits")  # the datasets a CNN takes
IMAGE_SIZES = (7, 14, 28)     # MNIST downsampled by average pooling
# a teacher: Gaussian inputs of TEACHER_FEATURES, a tanh layer of TEACHER_HIDDEN, then classes or outputs
TEACHER_FEATURES, TEACHER_HIDDEN, TEACHER_CLASSES, TEACHER_OUTPUTS = 16, 32, 4, 2


def check_dataset(name: str, allowed=DATASETS) -> None:
    if name not in allowed:
        raise ValueError(f"dataset: expected one of {tuple(allowed)}, got {name!r}")


@functools.lru_cache(maxsize=16)
def _mnist(split: str, image_size: int, data_dir) -> tuple[Tensor, Tensor]:
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size: expected one of {IMAGE_SIZES}, got {image_size!r}")
    images, labels = mnist_split(split, data_dir)
    x = images.view(-1, 1, 28, 28)
    if image_size != 28:
        x = F.avg_pool2d(x, 28 // image_size)
    return x.contiguous(), labels


@functools.lru_cache(maxsize=32)
def _tabular(name: str, split: str) -> tuple[Tensor, Tensor]:
    x, y = load_tabular(name)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut1, cut2 = int(0.7 * len(y)), int(0.85 * len(y))
    part = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}[split]
    if name == "digits":
        return (x[part] / 16.0).view(-1, 1, 8, 8), y[part]
    train = x[order[:cut1]]
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (x[part] - mean) / std, y[part]


def examples(name: str, split: str, data_dir=None, image_size: int = 14) -> tuple[Tensor, Tensor, int]:
    """(x [N, C, S, S] for image datasets, [N, F] for the others; labels [N]; number of classes)."""
    check_dataset(name, CLASSIFICATION)
    if name == "mnist":
        x, y = _mnist(split, image_size, None if data_dir is None else str(data_dir))
        return x, y, 10
    x, y = _tabular(name, split)
    return x, y, TABULAR[name][1]


class Examples:
    """Minibatches of a fixed dataset: problem p's batch of step t, drawn from (seed, salt, t)."""

    regression = False

    def __init__(self, x: Tensor, labels: Tensor, classes: int, seed: int, salt: int, flat: bool = True):
        self.x = x.reshape(len(x), -1) if flat else x
        self.labels, self.classes, self.seed, self.salt = labels, classes, seed, salt
        self.features, self.outputs = self.x[0].numel(), classes

    def batch(self, step: int, num_problems: int, batch_size: int, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """x [P, B, ...], labels [P, B]; rows: those of the P problems drawn for."""
        index = torch.randint(len(self.labels), (num_problems, batch_size), generator=seeded(self.seed, self.salt, 2, step))
        index = index[rows]
        return self.x[index], self.labels[index]

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        """out [P, B, classes] -> mean cross-entropy of each problem [P]."""
        P = out.shape[0]
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="none").view(P, -1).mean(1)


class Teacher:
    """A random MLP per problem (Gaussian inputs -> tanh layer -> outputs) labels Gaussian inputs: the argmax
    of its outputs (classification, cross-entropy) or the outputs themselves (regression, mean squared error)."""

    def __init__(self, num_problems: int, regression: bool, seed: int, salt: int):
        g = seeded(seed, salt, 3)
        P, n_in, hidden = num_problems, TEACHER_FEATURES, TEACHER_HIDDEN
        self.regression, self.seed, self.salt = regression, seed, salt
        self.features = n_in
        self.outputs = TEACHER_OUTPUTS if regression else TEACHER_CLASSES
        self.w1 = torch.randn(P, n_in, hidden, generator=g) / n_in**0.5
        self.b1 = 0.1 * torch.randn(P, 1, hidden, generator=g)
        self.w2 = torch.randn(P, hidden, self.outputs, generator=g) / hidden**0.5

    def batch(self, step: int, num_problems: int, batch_size: int, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """x [P, B, features], targets [P, B] (class indices) or [P, B, outputs]; rows: those of the P problems
        (of this teacher) drawn for."""
        x = torch.randn(num_problems, batch_size, self.features, generator=seeded(self.seed, self.salt, 2, step))[rows]
        out = torch.bmm(torch.tanh(torch.baddbmm(self.b1[rows], x, self.w1[rows])), self.w2[rows])
        return x, (out if self.regression else out.argmax(-1))

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        if self.regression:
            return (out - target).pow(2).flatten(1).mean(1)
        P = out.shape[0]
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="none").view(P, -1).mean(1)


def source(name: str, split: str, num_problems: int, seed: int, salt: int, data_dir=None, image_size: int = 14,
           flat: bool = True):
    """The Examples or Teacher of dataset `name` for a batch of problems."""
    check_dataset(name)
    if name in TEACHERS:
        return Teacher(num_problems, name == "teacher_regression", seed, salt)
    x, y, classes = examples(name, split, data_dir, image_size)
    return Examples(x, y, classes, seed, salt, flat=flat)
