"""The paper's CIFAR-10 task: three 5x5 conv layers of 16 channels (ReLU, 2x2 max-pool, batch norm),
a 32-unit fully connected layer and a 10-way output, on minibatches of 128 images.

The P problems run as one grouped convolution (groups = P). Parameters of each problem are laid out
conv first, then fully connected, so the two groups (the paper's separate LSTMs) are column slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ClassifierBatch, ParamGroup, Task, check_split, seeded
from .registry import register_task

_SPLIT_SALT = {"train": 20, "val": 21, "test": 22}
TRAIN_IMAGES = 45_000
CHANNELS, KERNEL, FC = 16, 5, 32


def _conv_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes, in_channels = [], 3
    for layer in range(3):
        shapes += [(f"conv{layer}.weight", (CHANNELS, in_channels, KERNEL, KERNEL)), (f"conv{layer}.bias", (CHANNELS,)),
                   (f"bn{layer}.weight", (CHANNELS,)), (f"bn{layer}.bias", (CHANNELS,))]
        in_channels = CHANNELS
    return shapes


def _fc_shapes() -> list[tuple[str, tuple[int, ...]]]:
    flat = CHANNELS * 4 * 4  # 32 -> 16 -> 8 -> 4 after three pools
    return [("fc.weight", (FC, flat)), ("fc.bias", (FC,)), ("out.weight", (10, FC)), ("out.bias", (10,))]


class CNNBatch(ClassifierBatch):
    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, num_problems: int, seed: int, salt: int):
        super().__init__(images, labels, batch_size, num_problems, seed, salt)
        self.shapes = _conv_shapes() + _fc_shapes()
        self.sizes = [int(torch.Size(shape).numel()) for _, shape in self.shapes]
        self.dim = sum(self.sizes)
        conv = sum(int(torch.Size(s).numel()) for _, s in _conv_shapes())
        self.groups = [ParamGroup("conv", 0, conv), ParamGroup("fc", conv, self.dim)]

    def init_params(self) -> Tensor:
        generator = seeded(self.seed, self.salt, 1)
        pieces = []
        for (name, shape), size in zip(self.shapes, self.sizes):
            if name.startswith("bn") and name.endswith("weight"):
                piece = torch.ones(self.drawn, size)
            elif name.endswith("bias"):
                piece = torch.zeros(self.drawn, size)
            else:  # Kaiming-uniform-like fan-in scaling, as torch.nn's defaults
                fan_in = size // shape[0]
                bound = 1.0 / fan_in**0.5
                piece = (torch.rand(self.drawn, size, generator=generator) * 2 - 1) * bound
            pieces.append(piece)
        return self.own_rows(torch.cat(pieces, dim=1))

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        """params [P, D], x [P, B, 3, 32, 32] -> [P, B, 10]."""
        P, B = x.shape[:2]
        named = {name: piece.reshape(P, *shape)
                 for (name, shape), piece in zip(self.shapes, params.split(self.sizes, dim=1))}
        h = x.transpose(0, 1).reshape(B, P * 3, 32, 32)  # problems as channel groups
        for layer in range(3):
            weight = named[f"conv{layer}.weight"].reshape(P * CHANNELS, -1, KERNEL, KERNEL)
            h = F.conv2d(h, weight, named[f"conv{layer}.bias"].reshape(-1), padding=KERNEL // 2, groups=P)
            h = F.max_pool2d(F.relu(h), 2)
            h = F.batch_norm(h, None, None, named[f"bn{layer}.weight"].reshape(-1), named[f"bn{layer}.bias"].reshape(-1),
                             training=True)
        h = h.reshape(B, P, -1).transpose(0, 1)  # [P, B, 256]
        h = F.relu(torch.baddbmm(named["fc.bias"].unsqueeze(1), h, named["fc.weight"].transpose(1, 2)))
        return torch.baddbmm(named["out.bias"].unsqueeze(1), h, named["out.weight"].transpose(1, 2))


@register_task("cifar10", needs_data=True, help="a CNN classifying CIFAR-10 minibatches (separate conv and fc LSTMs)")
class CIFARCNNTask(Task):
    def __init__(self, batch_size: int = 128, data_dir=None):
        super().__init__("cifar10", {"batch_size": batch_size})
        self.batch_size, self.data_dir = batch_size, data_dir

    def sample(self, num_problems: int, seed: int, split: str = "train") -> CNNBatch:
        from ..data.cifar10 import load_cifar10

        check_split(split)
        if split == "test":
            images, labels = load_cifar10("test", data_dir=self.data_dir)
        else:
            images, labels = load_cifar10("train", data_dir=self.data_dir)
            cut = min(TRAIN_IMAGES, int(len(labels) * 0.9))
            part = slice(0, cut) if split == "train" else slice(cut, None)
            images, labels = images[part], labels[part]
        return CNNBatch(images, labels, self.batch_size, num_problems, seed, _SPLIT_SALT[split])
