"""The LSTM's input features: what its first layer sees of each coordinate (the registry).

Mirrors ``csrc/input_features.h``: each feature is one bit of a mask and contributes ``width`` inputs; the first
layer's inputs are the features of the mask in bit order, so ``weight_ih_l0`` is [4H, input_size(mask)].
The ops take the mask as ``features`` (default 1), the net a mask or names (default ``("paper",)``, the
paper's preprocessing). Each entry holds the reference function the kernels are tested against.

Adding a feature computed from the gradient: its function and one ``_register`` line here, and its struct
in ``csrc/input_features.h``; the tests parametrized over :data:`ALL` cover it without edits. A feature may
also read the running moments (``reads_moments``): one tensor [MOMENT_ROWS = 4, n] in the math dtype, rows m
(moving average of g), v (of g^2), t (steps taken) and u (long moving average of g^2), zeros to start, which
the in-place ops advance with :func:`advance_moments` before computing the features and the functional ops
receive already advanced.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable, Iterable, Union

import torch
from torch import Tensor

__all__ = ["ALL", "ALL_MASK", "BETA1", "BETA2", "BETA_LONG", "DEFAULT", "DEFAULT_MASK", "EPS", "Feature", "MOMENT_ROWS",
           "REGISTRY", "advance_moments", "compute", "input_size", "long_moments", "mask_of", "names_of", "paper",
           "reads_moments", "rnnprop", "upgrade_moments"]

FeaturesLike = Union[int, str, Iterable[str]]


# The running moments (csrc/input_features.h: kMomentRows, kMomentBeta1, kMomentBeta2, kMomentBetaLong,
# kMomentEps): RNNprop's decays for m and v (Lv et al. 2017), Adam's for u; constants of every net that reads
# moments. u remembers ~1,000 steps of gradient scale, v ~20: u tells how far the gradient has fallen.
MOMENT_ROWS = 4    # m, v, t, u
BETA1 = 0.95       # m's decay
BETA2 = 0.95       # v's decay
BETA_LONG = 0.999  # u's decay
EPS = 1e-8         # g / (sqrt(v_hat) + EPS)


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    bit: int     # its bit of a mask; the bits are 1 << 0, 1 << 1, ... in registration order
    width: int   # inputs it contributes to the first layer
    # (grad [n], preprocess_p) -> [n, width], differentiable in grad; with reads_moments, (grad [n], moments
    # [4, n] advanced with grad) -> [n, width], differentiable in grad only (the moments are data)
    fn: Callable[..., Tensor]
    doc: str
    reads_moments: bool = False

    def __call__(self, grad: Tensor, preprocess_p: float, moments: Tensor | None = None) -> Tensor:
        """This feature's inputs [n, width] of one step."""
        if not self.reads_moments:
            return self.fn(grad, preprocess_p)
        if moments is None:
            raise ValueError(f"moments: feature {self.name!r} reads the running moments; pass a [{MOMENT_ROWS}, n] tensor")
        return self.fn(grad, moments)


REGISTRY: dict[str, Feature] = {}


def _register(name: str, width: int, fn: Callable[..., Tensor], reads_moments: bool = False) -> None:
    REGISTRY[name] = Feature(name, 1 << len(REGISTRY), width, fn, inspect.getdoc(fn) or "", reads_moments)


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


def _bias_corrected(average: Tensor, beta: float, steps: Tensor) -> Tensor:
    return average / (1 - torch.pow(beta, steps))


def _scale_free(grad: Tensor, moments: Tensor, second_row: int, beta: float) -> Tensor:
    """(g, m_hat) / (sqrt(second_hat) + EPS), the second moment from row `second_row` with decay `beta`."""
    m, t, second = moments.detach()[[0, 2, second_row]]
    steps = torch.clamp(t, min=1.0)
    inverse_scale = 1 / (torch.sqrt(_bias_corrected(second, beta, steps)) + EPS)
    return torch.stack([grad * inverse_scale, _bias_corrected(m, BETA1, steps) * inverse_scale], dim=1)


def rnnprop(grad: Tensor, moments: Tensor) -> Tensor:
    """RNNprop's scale-free inputs (Lv et al. 2017): [n], moments [4, n] -> [n, 2].

    (g, m_hat) / (sqrt(v_hat) + eps), with m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t) from the moments
    advanced with this g (t below 1 counts as 1); beta1 = beta2 = 0.95, eps = 1e-8. Only g / (sqrt(v_hat) + eps)
    has a derivative, in g: the moments are data.
    """
    return _scale_free(grad, moments, 1, BETA2)


_register("moments", 2, rnnprop, reads_moments=True)


def long_moments(grad: Tensor, moments: Tensor) -> Tensor:
    """The same over Adam's long second moment: [n], moments [4, n] -> [n, 2].

    (g, m_hat) / (sqrt(u_hat) + eps), u_hat = u / (1 - 0.999^t). Near an optimum the gradient falls below its
    ~1,000-step average, so these inputs shrink where RNNprop's stay O(1). Only g / (sqrt(u_hat) + eps) has a
    derivative, in g.
    """
    return _scale_free(grad, moments, 3, BETA_LONG)


_register("long_moments", 2, long_moments, reads_moments=True)

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


def reads_moments(features: FeaturesLike) -> bool:
    """Whether any feature of the set reads the running moments (the ops then require them)."""
    mask = mask_of(features)
    return any(f.reads_moments for f in REGISTRY.values() if mask & f.bit)


def compute(grad: Tensor, features: FeaturesLike, preprocess_p: float, moments: Tensor | None = None) -> Tensor:
    """grad [n] (and the moments [4, n], advanced with it, for features that read them) -> the first layer's
    inputs [n, input_size(features)], the features in bit order."""
    mask = mask_of(features)
    parts = [f(grad, preprocess_p, moments) for f in REGISTRY.values() if mask & f.bit]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def advance_moments(grad: Tensor, moments: Tensor) -> Tensor:
    """The moments [4, n] after a step with gradient grad [n]: m = beta1 m + (1 - beta1) g, v = beta2 v +
    (1 - beta2) g^2, t + 1, u = beta_long u + (1 - beta_long) g^2, in the moments' dtype (grad is converted to
    it); a new tensor, no autograd. A coordinate whose gradient is NaN or +-Inf keeps its moments bit for bit (as
    it keeps its state)."""
    with torch.no_grad():
        dtype = moments.dtype
        g = grad.to(dtype)
        finite = torch.isfinite(g)
        g = torch.where(finite, g, torch.zeros_like(g))
        # the decays and their complements rounded to the moments' dtype first, as the kernels hold them
        beta1, beta2, beta_long = (torch.tensor(b, dtype=dtype, device=moments.device)
                                   for b in (BETA1, BETA2, BETA_LONG))
        m, v, t, u = moments
        squared = g * g
        advanced = torch.stack([beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * squared, t + 1,
                                beta_long * u + (1 - beta_long) * squared])
        return torch.where(finite, advanced, moments)


def upgrade_moments(moments: Tensor) -> Tensor:
    """Moments saved before the long second moment u existed ([3, ...]: m, v, t) -> [4, ...], u started at v.

    v's average over ~20 steps is the best estimate of u that such a file holds; u then follows its own decay.
    Moments of MOMENT_ROWS rows come back as they are; any other row count is a ValueError.
    """
    rows = moments.shape[0] if moments.dim() else 0
    if rows == MOMENT_ROWS:
        return moments
    if rows != 3:
        raise ValueError(f"moments: expected {MOMENT_ROWS} rows (m, v, t, u), or 3 (m, v, t) from a file written "
                         f"before u existed, got shape {tuple(moments.shape)}")
    return torch.cat([moments, moments[1:2]], dim=0)
