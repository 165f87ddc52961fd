"""Optimizees of the paper, as batches of problems with functional losses."""
from __future__ import annotations

from .base import ParamGroup, ProblemBatch, Task
from .mnist_mlp import MNISTMLPTask
from .quadratic import QuadraticTask

__all__ = ["ParamGroup", "ProblemBatch", "Task", "MNISTMLPTask", "QuadraticTask", "make_task", "TASKS"]

TASKS = ("quadratic", "mnist", "cifar10")


def make_task(name: str, **kwargs) -> Task:
    """'quadratic' (dim), 'mnist' (hidden, activation, batch_size, data_dir), 'cifar10' (data_dir)."""
    if name == "quadratic":
        return QuadraticTask(**kwargs)
    if name == "mnist":
        return MNISTMLPTask(**kwargs)
    if name == "cifar10":
        from .cifar_cnn import CIFARCNNTask

        return CIFARCNNTask(**kwargs)
    raise ValueError(f"task: expected one of {TASKS}, got {name!r}")
