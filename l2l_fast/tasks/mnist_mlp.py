"""The paper's MNIST task: an MLP (784 -> 20 -> 10, sigmoid by default) trained on minibatches of 128.

Weights and biases start N(0, 0.01^2). Splits: meta-training problems draw their minibatches from
the first 50,000 training images, validation problems from the last 10,000, test problems from the
10,000 test images, each with its own initialisations.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..argtypes import positive_int
from .base import ClassifierBatch, ParamGroup, Task, check_split, seeded
from .registry import TaskOption, register_task

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}
_SPLIT_SALT = {"train": 10, "val": 11, "test": 12}
TRAIN_IMAGES = 50_000


def mnist_split(split: str, data_dir=None) -> tuple[Tensor, Tensor]:
    """(images [N, 784] float32 in [0, 1], labels [N] int64) of one split."""
    from ..data.mnist import load_mnist  # imported lazily: the quadratic task needs no data

    if split == "test":
        return load_mnist("test", data_dir=data_dir)
    images, labels = load_mnist("train", data_dir=data_dir)
    part = slice(0, TRAIN_IMAGES) if split == "train" else slice(TRAIN_IMAGES, None)
    return images[part], labels[part]


class MLPBatch(ClassifierBatch):
    def __init__(self, images: Tensor, labels: Tensor, sizes: list[int], activation: str, batch_size: int,
                 num_problems: int, seed: int, salt: int):
        super().__init__(images, labels, batch_size, num_problems, seed, salt)
        self.sizes, self.activation = sizes, ACTIVATIONS[activation]
        self.shapes = [(fan_in, fan_out) for fan_in, fan_out in zip(sizes[:-1], sizes[1:])]
        self.dim = sum(i * o + o for i, o in self.shapes)
        self.groups = [ParamGroup("all", 0, self.dim)]

    def init_params(self) -> Tensor:
        generator = seeded(self.seed, self.salt, 1)
        return self.own_rows(0.01 * torch.randn(self.drawn, self.dim, generator=generator))

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        """params [P, D], x [P, B, 784] -> logits [P, B, 10]."""
        # one split (a single concatenation in the backward) instead of a slice per tensor
        sizes = [n for fan_in, fan_out in self.shapes for n in (fan_in * fan_out, fan_out)]
        pieces = params.split(sizes, dim=1)
        for layer, (fan_in, fan_out) in enumerate(self.shapes):
            weight = pieces[2 * layer].reshape(-1, fan_in, fan_out)
            bias = pieces[2 * layer + 1].unsqueeze(1)
            x = torch.baddbmm(bias, x, weight)
            if layer + 1 < len(self.shapes):
                x = self.activation(x)
        return x


@register_task("mnist", needs_data=True, help="an MLP classifying MNIST minibatches", options=[
    TaskOption("hidden", positive_int, "MNIST MLP hidden layer sizes", nargs="+", label=True),
    TaskOption("activation", str, "MNIST MLP activation", choices=tuple(ACTIVATIONS), label=True)])
class MNISTMLPTask(Task):
    """hidden: sizes of the hidden layers ((20,) in the paper; (40,) and (20, 20) are its variants)."""

    def __init__(self, hidden=(20,), activation: str = "sigmoid", batch_size: int = 128, data_dir=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
        hidden = tuple(int(h) for h in hidden)
        super().__init__("mnist", {"hidden": hidden, "activation": activation, "batch_size": batch_size})
        self.hidden, self.activation, self.batch_size, self.data_dir = hidden, activation, batch_size, data_dir

    def sample(self, num_problems: int, seed: int, split: str = "train") -> MLPBatch:
        check_split(split)
        images, labels = mnist_split(split, self.data_dir)
        return MLPBatch(images, labels, [784, *self.hidden, 10], self.activation, self.batch_size, num_problems,
                        seed, _SPLIT_SALT[split])
