"""The task registry: every task's name, its options and whether it reads a dataset, declared once.

The CLI's --task choices and task flags, make_task, and meta-training's data_dir all read it. A task module
registers its task with the decorator, next to the constructor whose keyword arguments are the options:

    @register_task("quadratic", options=[TaskOption("dim", positive_int, help="...")])
    class QuadraticTask(Task): ...

and tasks/__init__.py imports the module (the order of the imports is the order of --task's choices).
Code outside the package registers with ``register(TaskSpec(name, factory, options, needs_data))``.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from .base import Task


class _FactoryDefault:
    def __repr__(self) -> str:
        return "<the factory's default>"


FACTORY_DEFAULT = _FactoryDefault()


@dataclass(frozen=True)
class TaskOption:
    """A keyword argument of a task's factory, offered on the command line as ``--name`` (underscores as dashes).

    type: converts one command-line word (of each, with nargs); default: the factory's own default when left
    out; choices, nargs: as argparse's; label: the value is part of the names of `l2l-fast evaluate`'s files.
    """

    name: str
    type: Callable[[str], Any] = str
    help: str = ""
    default: Any = FACTORY_DEFAULT
    choices: Sequence | None = None
    nargs: int | str | None = None
    label: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self, given: Any) -> Any:
        """`given` as the factory takes it: the default when None, a tuple for a list of values."""
        value = self.default if given is None else given
        return tuple(value) if self.nargs is not None and isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class TaskSpec:
    """A task: `factory(**options, data_dir=...)` returns its Task.

    needs_data: the factory takes data_dir, where its dataset lies (not part of a run's identity: a run's
    config holds the options only).
    """

    name: str
    factory: Callable[..., Task]
    options: tuple[TaskOption, ...] = ()
    needs_data: bool = False
    help: str = ""

    def __post_init__(self):
        parameters = inspect.signature(self.factory).parameters
        options = []
        for option in self.options:
            if option.name not in parameters:
                raise TypeError(f"task {self.name!r}: option {option.name!r} is no argument of {self.factory}")
            if option.default is FACTORY_DEFAULT:
                default = parameters[option.name].default
                if default is inspect.Parameter.empty:
                    raise TypeError(f"task {self.name!r}: option {option.name!r} needs a default")
                option = dataclasses.replace(option, default=default)
            options.append(option)
        if self.needs_data and "data_dir" not in parameters:
            raise TypeError(f"task {self.name!r}: needs_data, but {self.factory} takes no data_dir")
        object.__setattr__(self, "options", tuple(options))

    def complete(self, kwargs: Mapping) -> dict:
        """`kwargs` with every option it lacks (or gives as None) at its default, sequences as tuples; other
        entries are kept as they are. Two runs' task_kwargs name the same task when their completions are equal."""
        declared = {option.name: option.value(kwargs.get(option.name)) for option in self.options}
        return {**dict(kwargs), **declared}

    def make(self, options: Mapping, data_dir=None) -> Task:
        """The task with these options (completed), reading its dataset from data_dir where it has one."""
        location = {"data_dir": data_dir} if self.needs_data else {}
        return self.factory(**self.complete(options), **location)


_REGISTRY: dict[str, TaskSpec] = {}
TASKS: Mapping[str, TaskSpec] = MappingProxyType(_REGISTRY)  # name -> spec, in registration order


def register(spec: TaskSpec) -> TaskSpec:
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"spec: expected a TaskSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY:
        raise ValueError(f"task {spec.name!r} is registered already (by {_REGISTRY[spec.name].factory})")
    _REGISTRY[spec.name] = spec
    return spec


def register_task(name: str, *, options: Sequence[TaskOption] = (), needs_data: bool = False, help: str = ""):
    """Class or function decorator: registers it as the factory of task `name`; returns it unchanged."""
    def decorate(factory):
        register(TaskSpec(name, factory, tuple(options), needs_data, help))
        return factory

    return decorate


def get_task(name: str) -> TaskSpec:
    if name not in _REGISTRY:
        raise ValueError(f"task: expected one of {tuple(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def make_task(name: str, **kwargs) -> Task:
    """The task `name` built from keyword arguments as its factory takes them (options, data_dir, others)."""
    return get_task(name).factory(**kwargs)
