"""Optimizees of the paper, as batches of problems with functional losses, and the registry that names them.

A new task is a module that registers its Task class with @register_task (see registry.py) and one line below
that imports it.
"""
from __future__ import annotations

from .base import ParamGroup, ProblemBatch, Task
from .registry import TASKS, TaskOption, TaskSpec, get_task, make_task, register, register_task

# The tasks, registered as they are imported, in the order of the CLI's --task choices.
from . import quadratic, mnist_mlp, cifar_cnn  # noqa: I001  (not sorted: this order is the CLI's)
from .cifar_cnn import CIFARCNNTask
from .mnist_mlp import MNISTMLPTask
from .quadratic import QuadraticTask

__all__ = ["ParamGroup", "ProblemBatch", "Task", "TASKS", "TaskOption", "TaskSpec", "get_task", "make_task",
           "register", "register_task", "CIFARCNNTask", "MNISTMLPTask", "QuadraticTask"]
