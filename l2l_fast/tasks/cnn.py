"""Small CNNs on 8x8 digits (scikit-learn's) or downsampled MNIST: 3x3 convolutions (padding 1), each followed by
the activation and a 2x2 max-pool, then a linear layer to the 10 classes.

The P problems run as one grouped convolution (groups = P), as the cifar10 task's do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..argtypes import positive_int
from .base import Task, check_split
from .datasets import IMAGES, source
from .layout import Entry, LayoutBatch
from .mlp import (DATASET_OPTION, IMAGE_SIZE_OPTION, NONLINEARITIES, NONLINEARITY_OPTION, WEIGHT_INIT_OPTION,
                  check_family, check_options)
from .registry import TaskOption, register_task

_SPLIT_SALT = {"train": 50, "val": 51, "test": 52}
KERNEL = 3


class CNNFamilyBatch(LayoutBatch):
    def __init__(self, data, channels: tuple[int, ...], nonlinearity: str, weight_init: str, batch_size: int,
                 num_problems: int, seed: int, salt: int):
        self.channels = channels
        in_channels, side = data.x.shape[1], data.x.shape[2]
        entries = []
        for layer, out_channels in enumerate(channels):
            fan_in = in_channels * KERNEL * KERNEL
            entries += [Entry(f"conv{layer}.weight", (out_channels, in_channels, KERNEL, KERNEL), fan_in),
                        Entry(f"conv{layer}.bias", (out_channels,), fan_in)]
            in_channels, side = out_channels, side // 2
        if side < 1:
            raise ValueError(f"channels: {len(channels)} conv layers pool a {data.x.shape[2]}-pixel image to nothing")
        features = in_channels * side * side
        entries += [Entry("fc.weight", (features, data.outputs), features), Entry("fc.bias", (data.outputs,), features)]
        self._set_up(data, entries, NONLINEARITIES[nonlinearity], weight_init, batch_size, num_problems, seed, salt)

    def forward(self, params: Tensor, x: Tensor) -> Tensor:
        """params [P, D], x [P, B, C, S, S] -> logits [P, B, classes]."""
        named = self.layout.split(params)
        P, B = x.shape[:2]
        h = x.transpose(0, 1).reshape(B, P * x.shape[2], *x.shape[3:])  # problems as channel groups
        for layer in range(len(self.channels)):
            weight = named[f"conv{layer}.weight"]
            h = F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), named[f"conv{layer}.bias"].reshape(-1),
                         padding=KERNEL // 2, groups=P)
            h = F.max_pool2d(self.activation(h), 2)
        h = h.reshape(B, P, -1).transpose(0, 1)  # [P, B, features]
        return torch.baddbmm(named["fc.bias"].unsqueeze(1), h, named["fc.weight"])


@register_task("cnn", needs_data=True, help="a small CNN on 8x8 digits or downsampled MNIST", options=[
    DATASET_OPTION, TaskOption("channels", positive_int, "channels of each 3x3 conv layer", nargs="+", label=True),
    NONLINEARITY_OPTION, WEIGHT_INIT_OPTION, IMAGE_SIZE_OPTION])
class CNNTask(Task):
    def __init__(self, dataset: str = "digits", channels=(8, 8), nonlinearity: str = "relu",
                 weight_init: str = "default", image_size: int = 14, batch_size: int = 64, data_dir=None):
        check_options(dataset, image_size, IMAGES)
        check_family(nonlinearity, weight_init)
        channels = tuple(int(c) for c in channels)
        kwargs = {"dataset": dataset, "channels": channels, "nonlinearity": nonlinearity, "weight_init": weight_init,
                  "image_size": image_size, "batch_size": batch_size}
        super().__init__("cnn", kwargs)
        self.options, self.data_dir = kwargs, data_dir

    def sample(self, num_problems: int, seed: int, split: str = "train") -> CNNFamilyBatch:
        check_split(split)
        o = self.options
        salt = _SPLIT_SALT[split]
        data = source(o["dataset"], split, num_problems, seed, salt, self.data_dir, o["image_size"], flat=False)
        return CNNFamilyBatch(data, o["channels"], o["nonlinearity"], o["weight_init"], o["batch_size"], num_problems,
                              seed, salt)
