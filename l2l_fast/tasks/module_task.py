"""Meta-training problems made from your own model: any ``nn.Module`` factory, a loss and data.

    import torch, torch.nn as nn, torch.nn.functional as F
    from l2l_fast.tasks import ModuleTask

    x, y = torch.randn(512, 16), torch.randint(0, 3, (512,))
    task = ModuleTask(lambda: nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3)),
                      F.cross_entropy, data=(x, y), batch_size=64)
    problems = task.sample(8, seed=0)       # 8 models, each initialised by the factory under its own seed
    losses = problems.loss(problems.init_params(), step=0)   # [8]

Each problem is one model made by ``model_factory()``, called under a torch RNG seeded from (seed, split,
problem), so its initialisation, and any random choice the factory makes (a width, a depth), is
deterministic. Models whose parameters all have the same shapes are batched: their parameters stacked
(``torch.func.stack_module_state``) into params [P, D] and the P losses computed in one
``torch.func.vmap`` of ``torch.func.functional_call``. Where vmap cannot run the model (data-dependent
control flow, ``.item()``) the same params are evaluated model by model; models of different shapes make a
MixedBatch of one part per model. Buffers are never updated: every call sees the factory's initial buffers
(batch norm's running statistics included; in training mode it normalises with the minibatch's).

data: tensors (x [N, ...], y [N, ...]): problem p's minibatch of step t is ``batch_size`` examples drawn
from (seed, split, t, p), the same for every optimizer (``batch_size=None``: all N every step); a dict
{"train": (x, y), "val": ..., "test": ...} gives each split its own examples (a missing split uses
"train"'s); or a callable ``data(generator, batch_size) -> (x, y)`` making one problem's minibatch from the
given torch.Generator. loss_fn(output, y) -> a scalar (a mean over the minibatch), e.g. F.cross_entropy.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from .base import MixedBatch, ParamGroup, ProblemBatch, Task, check_split, derive_seed, seeded
from .layout import Entry, Layout

_SPLIT_SALT = {"train": 30, "val": 31, "test": 32}
VECTORIZE = ("auto", True, False)


class ModuleBatch(ProblemBatch):
    """P models of one parameter layout: params [P, D], each model's parameters in named_parameters order.

    first: the index of this batch's first problem among its task's sample (it keys the data draws, so a
    model draws the same minibatches alone as in a batch).
    """

    def __init__(self, modules: list[nn.Module], loss_fn: Callable, data, batch_size: int | None, seed: int,
                 salt: int, first: int = 0, vectorize="auto"):
        if vectorize not in VECTORIZE:
            raise ValueError(f"vectorize: expected one of {VECTORIZE}, got {vectorize!r}")
        named = [dict(m.named_parameters()) for m in modules]
        self.names = list(named[0])
        shapes = [tuple(p.shape) for p in named[0].values()]
        if any([tuple(p.shape) for p in n.values()] != shapes or list(n) != self.names for n in named):
            raise ValueError("modules: a ModuleBatch needs models of one parameter layout")
        if not self.names:
            raise ValueError("modules: the model has no parameters")
        self.layout = Layout([Entry(name, shape, 1) for name, shape in zip(self.names, shapes)])
        self.num_problems, self.dim = len(modules), self.layout.dim
        self.groups = [ParamGroup("all", 0, self.dim)]
        params, self.buffers = stack_module_state(modules)
        self._init = torch.cat([params[name].detach().reshape(len(modules), -1) for name in self.names], dim=1)
        self.base = copy.deepcopy(modules[0])
        self.loss_fn, self.data, self.batch_size = loss_fn, data, batch_size
        self.seed, self.salt, self.first = seed, salt, first
        self.vectorized = vectorize is True or (vectorize == "auto" and len(modules) > 1 and self._vmap_runs())

    def init_params(self) -> Tensor:
        return self._init.clone()

    def _select(self, start: int, stop: int) -> "ModuleBatch":
        part = copy.copy(self)  # the data draws are keyed by first + p: they follow the problems
        part._init = self._init[start:stop]
        part.buffers = {name: b[start:stop] for name, b in self.buffers.items()}
        part.num_problems, part.first = stop - start, self.first + start
        return part

    def _one(self, params: dict, buffers: dict, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(functional_call(self.base, (params, buffers), (x,)), y)

    def _vmap_runs(self) -> bool:
        try:
            with torch.no_grad():
                self.vectorized = True
                self.loss(self._init, 0)
            return True
        except Exception:  # any failure of vmap on this model: evaluate model by model instead
            return False

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The minibatches of `step`: x [P, B, ...], y [P, B, ...] (problem p's from (seed, salt, step, first + p))."""
        pairs = []
        for p in range(self.first, self.first + self.num_problems):
            generator = seeded(self.seed, self.salt, 2, step, p)
            if callable(self.data):
                pairs.append(self.data(generator, self.batch_size))
                continue
            x, y = self.data
            if self.batch_size is None:
                pairs.append((x, y))
                continue
            index = torch.randint(len(x), (self.batch_size,), generator=generator)
            pairs.append((x[index], y[index]))
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    def loss(self, params: Tensor, step: int) -> Tensor:
        """params [P, D] -> each model's loss_fn on its minibatch of `step`: [P]."""
        named = self.layout.split(params)
        x, y = self.batch(step)
        if self.vectorized:  # buffers cloned: a model that updates them in place must not change the problem
            return vmap(self._one)(named, {name: b.clone() for name, b in self.buffers.items()}, x, y)
        losses = []
        for p in range(self.num_problems):
            buffers = {name: b[p].clone() for name, b in self.buffers.items()}
            losses.append(self._one({name: t[p] for name, t in named.items()}, buffers, x[p], y[p]))
        return torch.stack(losses)


class ModuleTask(Task):
    """Problems of your own model family: see the module's docstring.

    model_factory: () -> nn.Module; loss_fn: (output, y) -> scalar; data: (x, y), {split: (x, y)} or a callable
    (generator, batch_size) -> (x, y); batch_size: examples per problem and step (None: all, for tensors);
    vectorize: "auto" (vmap where the models share a layout and vmap runs them), True or False.
    """

    def __init__(self, model_factory: Callable[[], nn.Module], loss_fn: Callable, data, batch_size: int | None = 128,
                 name: str = "module", vectorize="auto"):
        if isinstance(model_factory, nn.Module):
            raise TypeError("model_factory: expected a callable that makes a model (e.g. lambda: MyNet()), got a "
                            "model: each problem needs its own")
        if not callable(model_factory) or not callable(loss_fn):
            raise TypeError("model_factory and loss_fn must be callables")
        if vectorize not in VECTORIZE:
            raise ValueError(f"vectorize: expected one of {VECTORIZE}, got {vectorize!r}")
        if isinstance(data, dict):
            if "train" not in data:
                raise ValueError(f"data: a dict of splits needs 'train', got {sorted(data)}")
            unknown = set(data) - set(_SPLIT_SALT)
            if unknown:
                raise ValueError(f"data: unknown splits {sorted(unknown)}; expected train, val, test")
        elif not callable(data) and not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError("data: expected (x, y), a dict {split: (x, y)} or a callable (generator, batch_size)")
        if batch_size is None and callable(data):
            raise ValueError("batch_size: None (all examples) needs tensors, not a callable")
        super().__init__(name, {"batch_size": batch_size})
        self.model_factory, self.loss_fn, self.data = model_factory, loss_fn, data
        self.batch_size, self.vectorize = batch_size, vectorize

    def _data(self, split: str):
        if isinstance(self.data, dict):
            return tuple(self.data.get(split, self.data["train"]))
        return self.data if callable(self.data) else tuple(self.data)

    def model(self, seed: int, split: str, problem: int) -> nn.Module:
        """Problem `problem`'s model of the sample (seed, split): the factory's, under its own RNG seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, _SPLIT_SALT[split], 1, problem))
            return self.model_factory()

    def sample(self, num_problems: int, seed: int, split: str = "train") -> ProblemBatch:
        check_split(split)
        modules = [self.model(seed, split, p) for p in range(num_problems)]
        data, salt = self._data(split), _SPLIT_SALT[split]
        layouts = {tuple((n, tuple(t.shape)) for n, t in m.named_parameters()) for m in modules}
        if len(layouts) == 1:
            return ModuleBatch(modules, self.loss_fn, data, self.batch_size, seed, salt, vectorize=self.vectorize)
        return MixedBatch([ModuleBatch([m], self.loss_fn, data, self.batch_size, seed, salt, first=p, vectorize=False)
                           for p, m in enumerate(modules)])
