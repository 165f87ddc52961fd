"""Running an optimizer on a batch of problems: the differentiable truncation of meta-training and
the no-grad evaluation runs share this module.

theta_{t+1} = theta_t + update_t; gradients of the optimizee are data (no second derivatives); the
P * D coordinates of all problems go through one kernel call per step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..tasks.base import ProblemBatch


def loss_and_grad(problems: ProblemBatch, params: Tensor, step: int, keep_graph: bool) -> tuple[Tensor, Tensor]:
    """Losses [P] at `params` [P, D] and their gradient [P, D] (detached).

    keep_graph: the losses stay differentiable (meta-loss terms), so their graph is retained.
    """
    if not params.requires_grad:
        params = params.detach().requires_grad_(True)
    losses = problems.loss(params, step)
    (grad,) = torch.autograd.grad(losses.sum(), params, retain_graph=keep_graph)
    return losses, grad.detach()


def truncation(net, problems: ProblemBatch, params: Tensor, grad: Tensor, state: Tensor, start: int, steps: int,
               weights: Tensor | None = None, step_weights=None):
    """`steps` differentiable steps from `params` [P, D] whose gradient `grad` is already known.

    Returns (meta_loss = sum of the P losses after each update, each problem's losses times
    `weights` [P] and the losses after update j times `step_weights[j]` when given, losses [steps, P]
    detached, params, grad, state) with the last three ready to carry (detached) into the next truncation.
    """
    P, D = params.shape
    meta_loss = params.new_zeros(())
    history = []
    for j in range(steps):
        update, state = net(grad.reshape(-1), state)
        params = params + update.view(P, D)
        losses, grad = loss_and_grad(problems, params, start + j + 1, keep_graph=True)
        term = losses.sum() if weights is None else (losses * weights).sum()
        meta_loss = meta_loss + (term if step_weights is None else step_weights[j] * term)
        history.append(losses.detach())
    return meta_loss, torch.stack(history), params.detach(), grad, state.detach()


def run_learned(net, problems: ProblemBatch, steps: int) -> Tensor:
    """Optimizes the problems for `steps` steps with the learned optimizer (in-place, no graph).

    Returns the losses [steps + 1, P] at theta_0 .. theta_steps.
    """
    params = problems.init_params()
    P, D = params.shape
    flat = params.reshape(-1).clone()
    state = net.init_state(flat.numel())
    history = []
    for t in range(steps + 1):
        losses, grad = loss_and_grad(problems, flat.view(P, D), t, keep_graph=False)
        history.append(losses.detach())
        if t < steps:
            with torch.no_grad():
                net.step_(flat, grad.reshape(-1), state)
    return torch.stack(history)


def run_torch_optimizer(make_optimizer, problems: ProblemBatch, steps: int) -> Tensor:
    """The same with a torch.optim optimizer over the stacked [P, D] parameters: all four baselines
    are elementwise, so this equals optimizing each problem on its own. Returns losses [steps + 1, P]."""
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
