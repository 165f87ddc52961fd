"""The LSTM's input features: what its first layer sees of each coordinate (the registry).

Mirrors ``csrc/input_features.h``: each feature is one bit of a mask and contributes ``width`` inputs; the first
layer's inputs are the features of the mask in bit order, so ``weight_ih_l0`` is [4H, input_size(mask)].
The ops take the mask as ``features`` (default 1), the net a mask or names (default ``("paper",)``, the
paper's preprocessing). Each entry holds the reference function the kernels are tested against.

Adding a feature computed from the gradient: its function and one ``_register`` line here, and its struct
in ``csrc/input_features.h``; the tests parametrized over :data:`ALL` cover it without edits.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable, Iterable, Union

import torch
from torch import Tensor

__all__ = ["ALL", "ALL_MASK", "DEFAULT", "DEFAULT_MASK", "Feature", "REGISTRY", "compute", "input_size", "mask_of",
           "names_of", "paper"]

FeaturesLike = Union[int, str, Iterable[str]]


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    bit: int     # its bit of a mask; the bits are 1 << 0, 1 << 1, ... in registration order
    width: int   # inputs it contributes to the first layer
    fn: Callable[[Tensor, float], Tensor]  # (grad [n], preprocess_p) -> [n, width], differentiable in grad
    doc: str


REGISTRY: dict[str, Feature] = {}


def _register(name: str, width: int, fn: Callable[[Tensor, float], Tensor]) -> None:
    REGISTRY[name] = Feature(name, 1 << len(REGISTRY), width, fn, inspect.getdoc(fn) or "")


def paper(grad: Tensor, p: float) -> Tensor:
    """Appendix A of the paper: [n] -> [n, 2].

    |g| >= e^-p: (log|g| / p, sign g); otherwise (-1, e^p g). Both branches meet at |g| = e^-p.
    """
    magnitude = grad.abs()
    big = magnitude >= math.exp(-p)
    # clamp keeps log finite on the branch that torch.where discards (and its gradient NaN-free)
    log_part = torch.log(torch.clamp(magnitude, min=math.exp(-p))) / p
    x0 = torch.where(big, log_part, torch.full_like(grad, -1.0))
    x1 = torch.where(big, torch.sign(grad), grad * math.exp(p))
    return torch.stack([x0, x1], dim=1)


_register("paper", 2, paper)

ALL: tuple[str, ...] = tuple(REGISTRY)  # every feature's name, in bit order
ALL_MASK: int = sum(f.bit for f in REGISTRY.values())
DEFAULT: tuple[str, ...] = ("paper",)
DEFAULT_MASK: int = REGISTRY["paper"].bit


def _known() -> str:
    return ", ".join(f"{f.name} = {f.bit} ({f.width} input{'s' if f.width > 1 else ''})" for f in REGISTRY.values())


def mask_of(features: FeaturesLike) -> int:
    """A mask (int), a feature's name or an iterable of names -> the mask; ValueError naming `features` for
    an empty set, an unknown name or an unknown bit."""
    if isinstance(features, bool):
        raise ValueError(f"features: expected a mask or feature names, got {features!r}")
    if isinstance(features, int):
        if features <= 0 or features & ~ALL_MASK:
            raise ValueError(f"features: expected a nonzero mask of the known feature bits ({_known()}), "
                             f"got {features}")
        return features
    names = (features,) if isinstance(features, str) else tuple(features)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        raise ValueError(f"features: expected one or more of {list(REGISTRY)}, got {names!r}")
    return sum(REGISTRY[name].bit for name in set(names))


def names_of(features: FeaturesLike) -> tuple[str, ...]:
    """The names of a mask's (or a set of names') features, in bit order."""
    mask = mask_of(features)
    return tuple(f.name for f in REGISTRY.values() if mask & f.bit)


def input_size(features: FeaturesLike) -> int:
    """Inputs of the LSTM's first layer: the sum of the features' widths."""
    mask = mask_of(features)
    return sum(f.width for f in REGISTRY.values() if mask & f.bit)


def compute(grad: Tensor, features: FeaturesLike, preprocess_p: float) -> Tensor:
    """grad [n] -> the first layer's inputs [n, input_size(features)], the features in bit order."""
    mask = mask_of(features)
    parts = [f.fn(grad, preprocess_p) for f in REGISTRY.values() if mask & f.bit]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
