"""Optimizees: the paper's, families of problems for meta-training that generalizes (mlp, cnn, logistic, convex,
charlm, and the `mixed` sampler over them), your own model (ModuleTask), as batches of problems with functional
losses, and the registry that names them.

A new task is a module that registers its Task class with @register_task (see registry.py) and one line below
that imports it.
"""
from __future__ import annotations

from .base import MixedBatch, ParamGroup, ProblemBatch, Task
from .registry import TASKS, TaskOption, TaskSpec, get_task, make_task, register, register_task

# The tasks, registered as they are imported, in the order of the CLI's --task choices.
from . import quadratic, mnist_mlp, cifar_cnn, mlp, cnn, convex, charlm, chartransformer, mixed  # noqa: I001
from .charlm import CharLMTask
from .chartransformer import CharTransformerTask
from .cifar_cnn import CIFARCNNTask
from .cnn import CNNTask
from .convex import ConvexTask
from .mixed import HELD_OUT, MixedTask, held_out_tasks
from .mlp import LogisticTask, MLPTask
from .mnist_mlp import MNISTMLPTask
from .module_task import ModuleBatch, ModuleTask
from .quadratic import QuadraticTask

__all__ = ["MixedBatch", "ParamGroup", "ProblemBatch", "Task", "TASKS", "TaskOption", "TaskSpec", "get_task",
           "make_task", "register", "register_task", "CharLMTask", "CharTransformerTask", "CIFARCNNTask", "CNNTask",
           "ConvexTask", "HELD_OUT", "LogisticTask", "MixedTask", "MLPTask", "MNISTMLPTask", "ModuleBatch",
           "ModuleTask", "QuadraticTask", "held_out_tasks"]
