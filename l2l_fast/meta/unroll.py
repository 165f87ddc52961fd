"""Running an optimizer on a batch of problems: the differentiable truncation of meta-training and
the no-grad evaluation runs share this module.

theta_{t+1} = theta_t + update_t; gradients of the optimizee are data (no second derivatives); the
coordinates of all problems go through one kernel call per step: params are [P, D] for problems of one
shape, [N] for a MixedBatch of problems of different shapes, and the LSTM sees them flattened alike.

What an optimizer carries from step to step per coordinate is its LSTM state [L, 2, H, n] and, for a net that
reads the running moments of the gradient (``net.reads_moments``: features "moments"), its moments [4, n]. The
carried state is the LSTM state alone for a net without moments and the pair (state, moments) for a net with
them (:func:`initial_state`); both are carried (detached) across truncations and reset at an episode's start.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..tasks.base import ProblemBatch


def reads_moments(net) -> bool:
    """Whether `net` reads the gradient's running moments (a learned optimizer without the attribute does not)."""
    return bool(getattr(net, "reads_moments", False))


def reads_progress(net) -> bool:
    """Whether `net` reads where training is (progress_input: t / T and the horizon's length)."""
    return bool(getattr(net, "reads_progress", False))


def progress_at(net, step: int, horizon: int | None):
    """What `net` takes as progress at step `step` (0-based, the update from theta_step) of an episode of `horizon`
    steps: (step, horizon) for a net that reads progress (ValueError without a horizon), else None."""
    if not reads_progress(net):
        return None
    if horizon is None or horizon < 1:
        raise ValueError(f"horizon: a net with progress_input needs the episode's length (a positive int), got "
                         f"{horizon!r}")
    return (step, horizon)


def _told(progress) -> dict:
    """The keyword a net that reads progress takes; none for the others (whose calls stay as they were)."""
    return {} if progress is None else {"progress": progress}


def initial_state(net, n: int, device=None, dtype=None):
    """The carried state of an episode's start for n coordinates: net.init_state(n), or for a net that reads
    moments the pair (net.init_state(n), net.init_moments(n)), all zeros (device, dtype: as the net's
    init_state / init_moments take them; default the net's)."""
    where = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    state = net.init_state(n, **where)
    if not reads_moments(net):
        return state
    return state, net.init_moments(n, **where)


def _unpack(net, state) -> tuple[Tensor, Tensor | None]:
    """(LSTM state, moments or None) of a carried state; a bare LSTM state for a net that reads moments starts
    them at zero (an episode's start)."""
    if isinstance(state, (tuple, list)):
        lstm_state, moments = state
        if moments is None and reads_moments(net):
            raise ValueError("state: the net reads moments but the carried state has none")
        return lstm_state, moments
    if reads_moments(net):
        return state, net.init_moments(state.shape[-1], device=state.device)
    return state, None


def _pack(state: Tensor, moments: Tensor | None):
    return state if moments is None else (state, moments)


def loss_and_grad(problems: ProblemBatch, params: Tensor, step: int, keep_graph: bool) -> tuple[Tensor, Tensor]:
    """Losses [P] at `params` (problems.param_shape) and their gradient, of params' shape (detached).

    keep_graph: the losses stay differentiable (meta-loss terms), so their graph is retained.
    """
    if not params.requires_grad:
        params = params.detach().requires_grad_(True)
    losses = problems.loss(params, step)
    (grad,) = torch.autograd.grad(losses.sum(), params, retain_graph=keep_graph)
    return losses, grad.detach()


def problem_weights(loss_scale: str, start_losses: Tensor, initial_losses: Tensor) -> Tensor | None:
    """Each problem's meta-loss weight [P] for a truncation (MetaTrainConfig.loss_scale): None for "sum",
    1 / its losses at the truncation's start for "relative", at the episode's start for "initial"."""
    if loss_scale == "sum":
        return None
    losses = start_losses if loss_scale == "relative" else initial_losses
    return 1.0 / losses.detach().clamp_min(1e-12)


class CoordinateSample:
    """A random subset of k of the n coordinates that carries the meta-gradient in one truncation.

    With detached optimizee gradients, the meta-gradient is a sum of per-coordinate terms: coordinate
    i's LSTM chain depends only on the weights and on i's own gradients, and the loss gradient that
    reaches its updates is computed for every coordinate anyway. So backpropagating through a uniform
    subset and scaling by n / k is an unbiased estimate, at k / n of the LSTM backward's cost (the
    largest cost of meta-training); the other coordinates still take their learned steps, without
    a graph.

    window: (first, end), the coordinates [first, end) of the n that this process steps (a rank's problems in a
    distributed run): the sample of all n restricted to them, renumbered from 0, with the scale n / k of all n.
    """

    def __init__(self, n: int, fraction: float, generator: torch.Generator, device=None,
                 window: tuple[int, int] | None = None):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
        if n < 1:
            raise ValueError(f"n: expected at least one coordinate, got {n}")
        k = min(n, max(1, round(fraction * n)))
        order = torch.randperm(n, generator=generator)  # drawn on the CPU: the same on any device
        tracked, untracked = order[:k], order[k:]
        if window is not None:
            first, end = window
            if not 0 <= first < end <= n:
                raise ValueError(f"window: expected 0 <= first < end <= n ({n}), got {window}")
            tracked = tracked[(tracked >= first) & (tracked < end)] - first
            untracked = untracked[(untracked >= first) & (untracked < end)] - first
        self.tracked, self.untracked = tracked.to(device), untracked.to(device)
        # positions in cat(tracked, untracked) of coordinates 0..n-1 (of the window)
        self.inverse = torch.argsort(torch.cat([self.tracked, self.untracked]))
        self.scale = n / k

    def split(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """A tensor over the n coordinates (last dim: an LSTM state, moments) -> (tracked, untracked) parts."""
        return state[..., self.tracked].contiguous(), state[..., self.untracked].contiguous()

    def join(self, tracked: Tensor, untracked: Tensor) -> Tensor:
        """Tensors over the tracked and untracked coordinates (last dim) -> one in coordinate order."""
        return torch.cat([tracked, untracked], dim=-1).index_select(-1, self.inverse)


def _sampled_step(net, grad: Tensor, state: tuple[Tensor, Tensor], moments, sample: CoordinateSample, progress=None):
    """One learned step whose graph covers only the sampled coordinates (their weight gradients x n/k).
    moments: None, or the (tracked, untracked) moments, advanced here with this gradient."""
    tracked_state, untracked_state = state
    tracked_grad, untracked_grad = grad[sample.tracked], grad[sample.untracked].contiguous()
    if moments is None:
        update, tracked_state = net(tracked_grad, tracked_state, **_told(progress))
    else:
        tracked_moments, untracked_moments = moments
        tracked_moments = net.advance_moments(tracked_grad.detach(), tracked_moments)
        moments = (tracked_moments, untracked_moments)
        update, tracked_state = net(tracked_grad, tracked_state, tracked_moments, **_told(progress))
    # value unchanged; gradient scaled by n / k, so the estimate is unbiased and clipping sees its size
    update = update * sample.scale - update.detach() * (sample.scale - 1)
    with torch.no_grad():
        rest = torch.zeros(sample.untracked.numel(), dtype=grad.dtype, device=grad.device)
        if moments is None:
            net.step_(rest, untracked_grad, untracked_state, **_told(progress))
        else:  # advances the untracked moments in place
            net.step_(rest, untracked_grad, untracked_state, moments[1], **_told(progress))
    return sample.join(update, rest), (tracked_state, untracked_state), moments


def truncation(net, problems: ProblemBatch, params: Tensor, grad: Tensor, state, start: int, steps: int,
               weights: Tensor | None = None, step_weights=None, sample: CoordinateSample | None = None,
               horizon: int | None = None):
    """`steps` differentiable steps from `params` ([P, D], or [N] for a MixedBatch) whose gradient `grad`
    (params' shape) is already known; state: the carried state (initial_state: the LSTM state [L, 2, H,
    params.numel()], with the moments [4, params.numel()] for a net that reads them; a bare LSTM state starts
    the moments at zero).

    Each step advances the moments with the (detached) gradient first, then runs the net on the gradient, its
    state and the advanced moments: update, state = net(grad, state, moments).

    Returns (meta_loss = sum of the P losses after each update, each problem's losses times
    `weights` [P] and the losses after update j times `step_weights[j]` when given, losses [steps, P]
    detached, params, grad, state) with the last three ready to carry (detached) into the next truncation.
    `sample`: backpropagate through those coordinates only (an unbiased estimate; see CoordinateSample).
    `horizon`: the episode's steps, which a net that reads progress needs (step start + j takes (start + j, horizon)).
    """
    meta_loss = params.new_zeros(())
    history = []
    state, moments = _unpack(net, state)
    carried = sample.split(state) if sample is not None else state
    if sample is not None and moments is not None:
        moments = sample.split(moments)
    for j in range(steps):
        flat_grad = grad.reshape(-1)
        progress = progress_at(net, start + j, horizon)
        if sample is not None:
            update, carried, moments = _sampled_step(net, flat_grad, carried, moments, sample, progress)
        elif moments is None:
            update, carried = net(flat_grad, carried, **_told(progress))
        else:
            moments = net.advance_moments(flat_grad.detach(), moments)
            update, carried = net(flat_grad, carried, moments, **_told(progress))
        params = params + update.view(params.shape)
        losses, grad = loss_and_grad(problems, params, start + j + 1, keep_graph=True)
        term = losses.sum() if weights is None else (losses * weights).sum()
        meta_loss = meta_loss + (term if step_weights is None else step_weights[j] * term)
        history.append(losses.detach())
    state = carried.detach() if sample is None else sample.join(carried[0].detach(), carried[1])
    if moments is not None:
        moments = (sample.join(*moments) if sample is not None else moments).detach()
    return meta_loss, torch.stack(history), params.detach(), grad, _pack(state, moments)


def run_learned(net, problems: ProblemBatch, steps: int) -> Tensor:
    """Optimizes the problems for `steps` steps with the learned optimizer (in-place, no graph), the moments of
    a net that reads them carried with its state (and a net that reads progress told (t, steps)): the trajectory of
    truncation's, without a graph.

    Returns the losses [steps + 1, P] at theta_0 .. theta_steps.
    """
    params = problems.init_params()
    flat = params.reshape(-1).clone()
    state = initial_state(net, flat.numel())
    history = []
    for t in range(steps + 1):
        losses, grad = loss_and_grad(problems, flat.view(params.shape), t, keep_graph=False)
        history.append(losses.detach())
        if t < steps:
            learned_step_(net, flat, grad, state, progress_at(net, t, steps))
    return torch.stack(history)


def learned_step_(net, flat: Tensor, grad: Tensor, state, progress: tuple[int, int] | None = None) -> None:
    """One in-place, no-graph learned step: flat [n] += update of grad (any shape of n elements); the carried
    `state` (initial_state's: the LSTM state, or the pair with the moments) advanced in place. progress: for a net
    that reads it (progress_at)."""
    lstm_state, moments = _unpack(net, state)
    if moments is not None and not isinstance(state, (tuple, list)):  # fresh zero moments each step: wrong
        raise ValueError("state: the net reads moments; carry initial_state's (state, moments) pair to keep them")
    with torch.no_grad():
        if moments is None:
            net.step_(flat, grad.reshape(-1), lstm_state, **_told(progress))
        else:  # advances the moments in place
            net.step_(flat, grad.reshape(-1), lstm_state, moments, **_told(progress))


def run_torch_optimizer(make_optimizer, problems: ProblemBatch, steps: int) -> Tensor:
    """The same with a torch.optim optimizer over the stacked parameters ([P, D], or [N] for a MixedBatch):
    all four baselines are elementwise, so this equals optimizing each problem on its own. Returns losses
    [steps + 1, P]."""
    params = problems.init_params().clone().requires_grad_(True)
    optimizer = make_optimizer([params])
    history = []
    for t in range(steps + 1):
        losses = problems.loss(params, t)
        history.append(losses.detach())
        if t < steps:
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
    return torch.stack(history)
