"""Running an optimizer on a batch of problems: the differentiable truncation of meta-training and
the no-grad evaluation runs share this module.

theta_{t+1} = theta_t + update_t; gradients of the optimizee are data (no second derivatives); the
coordinates of all problems go through one kernel call per step: params are [P, D] for problems of one
shape, [N] for a MixedBatch of problems of different shapes, and the LSTM sees them flattened alike.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..tasks.base import ProblemBatch


def loss_and_grad(problems: ProblemBatch, params: Tensor, step: int, keep_graph: bool) -> tuple[Tensor, Tensor]:
    """Losses [P] at `params` (problems.param_shape) and their gradient, of params' shape (detached).

    keep_graph: the losses stay differentiable (meta-loss terms), so their graph is retained.
    """
    if not params.requires_grad:
        params = params.detach().requires_grad_(True)
    losses = problems.loss(params, step)
    (grad,) = torch.autograd.grad(losses.sum(), params, retain_graph=keep_graph)
    return losses, grad.detach()


class CoordinateSample:
    """A random subset of k of the n coordinates that carries the meta-gradient in one truncation.

    With detached optimizee gradients, the meta-gradient is a sum of per-coordinate terms: coordinate
    i's LSTM chain depends only on the weights and on i's own gradients, and the loss gradient that
    reaches its updates is computed for every coordinate anyway. So backpropagating through a uniform
    subset and scaling by n / k is an unbiased estimate, at k / n of the LSTM backward's cost (the
    largest cost of meta-training); the other coordinates still take their learned steps, without
    a graph.
    """

    def __init__(self, n: int, fraction: float, generator: torch.Generator, device=None):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
        if n < 1:
            raise ValueError(f"n: expected at least one coordinate, got {n}")
        k = min(n, max(1, round(fraction * n)))
        order = torch.randperm(n, generator=generator).to(device)  # drawn on the CPU: the same on any device
        self.tracked, self.untracked = order[:k], order[k:]
        self.inverse = torch.argsort(order)  # positions in cat(tracked, untracked) of coordinates 0..n-1
        self.scale = n / k

    def split(self, state: Tensor) -> tuple[Tensor, Tensor]:
        return state[..., self.tracked].contiguous(), state[..., self.untracked].contiguous()

    def join(self, tracked: Tensor, untracked: Tensor) -> Tensor:
        """Tensors over the tracked and untracked coordinates (last dim) -> one in coordinate order."""
        return torch.cat([tracked, untracked], dim=-1).index_select(-1, self.inverse)


def _sampled_step(net, grad: Tensor, state: tuple[Tensor, Tensor], sample: CoordinateSample):
    """One learned step whose graph covers only the sampled coordinates (their weight gradients x n/k)."""
    tracked_state, untracked_state = state
    update, tracked_state = net(grad[sample.tracked], tracked_state)
    # value unchanged; gradient scaled by n / k, so the estimate is unbiased and clipping sees its size
    update = update * sample.scale - update.detach() * (sample.scale - 1)
    with torch.no_grad():
        rest = torch.zeros(sample.untracked.numel(), dtype=grad.dtype, device=grad.device)
        net.step_(rest, grad[sample.untracked].contiguous(), untracked_state)
    return sample.join(update, rest), (tracked_state, untracked_state)


def truncation(net, problems: ProblemBatch, params: Tensor, grad: Tensor, state: Tensor, start: int, steps: int,
               weights: Tensor | None = None, step_weights=None, sample: CoordinateSample | None = None):
    """`steps` differentiable steps from `params` ([P, D], or [N] for a MixedBatch) whose gradient `grad`
    (params' shape) is already known; state [L, 2, H, params.numel()].

    Returns (meta_loss = sum of the P losses after each update, each problem's losses times
    `weights` [P] and the losses after update j times `step_weights[j]` when given, losses [steps, P]
    detached, params, grad, state) with the last three ready to carry (detached) into the next truncation.
    `sample`: backpropagate through those coordinates only (an unbiased estimate; see CoordinateSample).
    """
    meta_loss = params.new_zeros(())
    history = []
    carried = sample.split(state) if sample is not None else state
    for j in range(steps):
        flat_grad = grad.reshape(-1)
        if sample is None:
            update, carried = net(flat_grad, carried)
        else:
            update, carried = _sampled_step(net, flat_grad, carried, sample)
        params = params + update.view(params.shape)
        losses, grad = loss_and_grad(problems, params, start + j + 1, keep_graph=True)
        term = losses.sum() if weights is None else (losses * weights).sum()
        meta_loss = meta_loss + (term if step_weights is None else step_weights[j] * term)
        history.append(losses.detach())
    state = carried.detach() if sample is None else sample.join(carried[0].detach(), carried[1])
    return meta_loss, torch.stack(history), params.detach(), grad, state


def run_learned(net, problems: ProblemBatch, steps: int) -> Tensor:
    """Optimizes the problems for `steps` steps with the learned optimizer (in-place, no graph).

    Returns the losses [steps + 1, P] at theta_0 .. theta_steps.
    """
    params = problems.init_params()
    flat = params.reshape(-1).clone()
    state = net.init_state(flat.numel())
    history = []
    for t in range(steps + 1):
        losses, grad = loss_and_grad(problems, flat.view(params.shape), t, keep_graph=False)
        history.append(losses.detach())
        if t < steps:
            with torch.no_grad():
                net.step_(flat, grad.reshape(-1), state)
    return torch.stack(history)


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
