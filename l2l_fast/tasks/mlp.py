"""MLPs of any width, depth and activation, and logistic regression (an MLP without hidden layers: convex),
on MNIST (downsampled), scikit-learn's bundled datasets or a random teacher per problem.

Each problem's parameters: per layer the weight [fan_in, fan_out] then the bias [fan_out], layer by layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..argtypes import positive_int
from .base import Task, check_split
from .datasets import DATASETS, IMAGE_SIZES, check_dataset, source
from .layout import WEIGHT_INITS, Entry, LayoutBatch
from .registry import TaskOption, register_task

NONLINEARITIES = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}
_SPLIT_SALT = {"train": 40, "val": 41, "test": 42}
_LOGISTIC_SALT = {"train": 60, "val": 61, "test": 62}

DATASET_OPTION = TaskOption("dataset", str, "the examples: MNIST (downsampled to --image-size), scikit-learn's "
                            "digits, iris, wine, breast_cancer, or a random MLP teacher per problem labelling Gaussian "
                            "inputs (classification, or regression with a squared error)", choices=DATASETS,
                            label=True)
NONLINEARITY_OPTION = TaskOption("nonlinearity", str, "the hidden layers' activation", choices=tuple(NONLINEARITIES),
                                 label=True)
WEIGHT_INIT_OPTION = TaskOption("weight_init", str, "default: PyTorch's (U(+-1/sqrt(fan_in))); small: N(0, 0.01^2), "
                                "the paper's", choices=WEIGHT_INITS, label=True)
IMAGE_SIZE_OPTION = TaskOption("image_size", int, "MNIST's side after average pooling", choices=IMAGE_SIZES)


def check_options(dataset: str, image_size: int, datasets=DATASETS) -> None:
    check_dataset(dataset, datasets)
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size: expected one of {IMAGE_SIZES}, got {image_size!r}")


def check_family(nonlinearity: str, weight_init: str) -> None:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity: expected one of {tuple(NONLINEARITIES)}, got {nonlinearity!r}")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"weight_init: expected one of {WEIGHT_INITS}, got {weight_init!r}")


class MLPFamilyBatch(LayoutBatch):
    """P MLPs of one shape: params [P, D]; hidden () is a linear model (logistic regression)."""

    def __init__(self, data, hidden: tuple[int, ...], nonlinearity: str, weight_init: str, batch_size: int,
                 num_problems: int, seed: int, salt: int):
        sizes = [data.features, *hidden, data.outputs]
        self.shapes = list(zip(sizes[:-1], sizes[1:]))
        entries = []
        for layer, (fan_in, fan_out) in enumerate(self.shapes):
            entries += [Entry(f"{layer}.weight", (fan_in, fan_out), fan_in), Entry(f"{layer}.bias", (fan_out,), fan_in)]
        self._set_up(data, entries, NONLINEARITIES[nonlinearity], weight_init, batch_size, num_problems, seed, salt)

    def forward(self, params: Tensor, x: Tensor) -> Tensor:
        """params [P, D], x [P, B, features] -> outputs [P, B, outputs]."""
        named = self.layout.split(params)
        for layer in range(len(self.shapes)):
            x = torch.baddbmm(named[f"{layer}.bias"].unsqueeze(1), x, named[f"{layer}.weight"])
            if layer + 1 < len(self.shapes):
                x = self.activation(x)
        return x


@register_task("mlp", needs_data=True, help="an MLP of any width, depth and activation on MNIST, scikit-learn's "
               "datasets or a random teacher", options=[
                   DATASET_OPTION, TaskOption("hidden", positive_int, "hidden layer sizes", nargs="+", label=True),
                   NONLINEARITY_OPTION, WEIGHT_INIT_OPTION, IMAGE_SIZE_OPTION])
class MLPTask(Task):
    def __init__(self, dataset: str = "digits", hidden=(20,), nonlinearity: str = "sigmoid",
                 weight_init: str = "default", image_size: int = 14, batch_size: int = 64, data_dir=None):
        check_family(nonlinearity, weight_init)
        hidden = tuple(int(h) for h in hidden)
        kwargs = {"dataset": dataset, "hidden": hidden, "nonlinearity": nonlinearity, "weight_init": weight_init,
                  "image_size": image_size, "batch_size": batch_size}
        super().__init__("mlp", kwargs)
        check_options(dataset, image_size)
        self.options, self.data_dir = kwargs, data_dir

    def sample(self, num_problems: int, seed: int, split: str = "train") -> MLPFamilyBatch:
        check_split(split)
        o = self.options
        salt = _SPLIT_SALT[split]
        data = source(o["dataset"], split, num_problems, seed, salt, self.data_dir, o["image_size"])
        return MLPFamilyBatch(data, o["hidden"], o["nonlinearity"], o["weight_init"], o["batch_size"], num_problems,
                              seed, salt)


@register_task("logistic", needs_data=True, help="logistic regression (a convex problem) on MNIST, scikit-learn's "
               "datasets or a random teacher's classes", options=[DATASET_OPTION, WEIGHT_INIT_OPTION,
                                                                  IMAGE_SIZE_OPTION])
class LogisticTask(Task):
    def __init__(self, dataset: str = "digits", weight_init: str = "default", image_size: int = 14,
                 batch_size: int = 64, data_dir=None):
        if dataset == "teacher_regression":
            raise ValueError("dataset: logistic regression needs classes; teacher_regression is a regression")
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init: expected one of {WEIGHT_INITS}, got {weight_init!r}")
        kwargs = {"dataset": dataset, "weight_init": weight_init, "image_size": image_size, "batch_size": batch_size}
        super().__init__("logistic", kwargs)
        check_options(dataset, image_size)
        self.options, self.data_dir = kwargs, data_dir

    def sample(self, num_problems: int, seed: int, split: str = "train") -> MLPFamilyBatch:
        check_split(split)
        o = self.options
        salt = _LOGISTIC_SALT[split]
        data = source(o["dataset"], split, num_problems, seed, salt, self.data_dir, o["image_size"])
        return MLPFamilyBatch(data, (), "sigmoid", o["weight_init"], o["batch_size"], num_problems, seed, salt)
