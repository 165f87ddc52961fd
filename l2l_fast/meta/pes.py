"""Persistent evolution strategies (PES; Vicol, Metz & Sohl-Dickstein 2021): an unbiased meta-gradient across
the truncations of an episode, without backprop.

Truncated backprop sees how the weights act within the truncation it runs through; how the earlier
truncations' steps shaped the parameters and LSTM state this one starts from is cut off, which biases
meta-training toward greedy steps (Metz et al. 2019). PES runs particles instead: copies of the episode's
problems, each optimized with its own perturbed weights theta + eps (eps ~ N(0, sigma^2 I), drawn afresh every
truncation), each carrying its own parameters and LSTM state across the truncations and xi, the sum of the
perturbations it has run with so far in the episode. After truncation t,

    g_t = 1 / (N sigma^2) * sum_i xi_i L_i        (L_i: particle i's meta-loss of truncation t)

and for fixed theta, E[sum_t g_t] is the gradient of the episode's meta-loss smoothed by the perturbations,
E_eps[sum_t L_t(theta + eps_1, ..., theta + eps_t)]: every truncation's loss is credited to all the
perturbations that led to it. Particles come in antithetic pairs (eps, -eps) every truncation, so their xi are
opposite and g_t = 1 / (2 P sigma^2) * sum_p xi_p (L+_p - L-_p), which cancels the loss's mean from the
estimate (its variance then does not grow with the loss's size).

The particles run under no_grad with the in-place kernels (net.step_): no graph is kept, so a truncation costs
2P inference unrolls of the meta-batch. The estimate is linear in the problems' losses, so ranks that each run a
slice of the problems with the same perturbations (drawn from (seed, epoch, start)) sum their estimates to the
one-process estimate, as the backprop meta-gradient is summed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from ..tasks.base import ProblemBatch
from .unroll import initial_state, learned_step_, loss_and_grad, problem_weights, progress_at


@dataclass
class Particle:
    """One copy of the episode's problems: flat parameters [n], their gradient [n], the carried state, and the
    losses [P] at its last step."""
    flat: Tensor
    grad: Tensor
    state: object
    losses: Tensor


@dataclass
class PESTruncation:
    """What one truncation of PES measured. meta_losses [pairs, 2]: each pair's (+eps, -eps) particles' meta-losses;
    pair_gradients [pairs, d]: each pair's estimate (float64), whose mean over pairs is the meta-gradient."""
    meta_losses: Tensor
    pair_gradients: Tensor

    @property
    def meta_loss(self) -> Tensor:
        """The mean meta-loss over the particles: an estimate of the smoothed meta-loss."""
        return self.meta_losses.mean()

    @property
    def gradient(self) -> Tensor:
        """The meta-gradient estimate [d] (float64): the net's parameters flattened in their order."""
        return self.pair_gradients.mean(0)


def flat_weights(net) -> Tensor:
    """The net's parameters as one detached vector [d], in net.parameters() order."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def write_gradient(net, gradient: Tensor) -> None:
    """Sets every parameter's .grad to its piece of the flat `gradient` [d] (in the parameter's dtype)."""
    offset = 0
    for p in net.parameters():
        p.grad = gradient[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


class PESEpisode:
    """The 2 * pairs particles of one episode of `problems`, all starting at theta_0 with zero state and xi = 0.

    net: the meta-trained net, read (never written) at each truncation: theta may change between truncations
    (an Adam step each), as in online PES. sigma: the perturbations' standard deviation. horizon: the episode's
    steps, which a net that reads progress needs.
    """

    def __init__(self, net, problems: ProblemBatch, pairs: int, sigma: float, horizon: int | None = None):
        if pairs < 1:
            raise ValueError(f"pairs: expected a positive int, got {pairs!r}")
        if not sigma > 0:
            raise ValueError(f"sigma: expected a number > 0, got {sigma!r}")
        self.net, self.problems, self.pairs, self.sigma = net, problems, pairs, float(sigma)
        self.horizon = horizon
        self.perturbed = copy.deepcopy(net).requires_grad_(False)  # runs theta + eps
        params = problems.init_params()
        self.shape = params.shape
        losses, grad = loss_and_grad(problems, params, 0, keep_graph=False)
        self.initial_losses = losses.detach()
        flat = params.detach().reshape(-1)
        self.particles = [Particle(flat.clone(), grad.clone(), initial_state(net, flat.numel()), losses.detach())
                          for _ in range(2 * pairs)]
        self.xi = torch.zeros(pairs, flat_weights(net).numel(), dtype=torch.float64)

    def truncation(self, start: int, steps: int, generator: torch.Generator, *, loss_scale: str = "sum",
                   step_weights=None, scale: float = 1.0) -> PESTruncation:
        """Runs every particle `steps` steps from step `start` with fresh antithetic perturbations (from
        `generator`) and returns the estimate. Meta-losses as truncation()'s: each problem's losses weighted
        by loss_scale (problem_weights), the losses after step j by step_weights[j], the sum times `scale`."""
        theta = flat_weights(self.net)
        eps = torch.randn(self.pairs, theta.numel(), generator=generator, dtype=torch.float64) * self.sigma
        self.xi += eps
        meta_losses = torch.empty(self.pairs, 2, dtype=torch.float64)
        for pair in range(self.pairs):
            for side, sign in enumerate((1.0, -1.0)):
                self._load(theta + (sign * eps[pair]).to(theta.dtype))
                particle = self.particles[2 * pair + side]
                meta_losses[pair, side] = self._unroll(particle, start, steps, loss_scale, step_weights) * scale
        differences = meta_losses[:, 0] - meta_losses[:, 1]
        return PESTruncation(meta_losses, self.xi * (differences / (2 * self.sigma**2))[:, None])

    @torch.no_grad()
    def _load(self, weights: Tensor) -> None:
        offset = 0
        for p in self.perturbed.parameters():  # in place: the kernels' packed-weight cache sees a new version
            p.copy_(weights[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _unroll(self, particle: Particle, start: int, steps: int, loss_scale: str, step_weights) -> float:
        weights = problem_weights(loss_scale, particle.losses, self.initial_losses)
        total = 0.0
        for j in range(steps):
            learned_step_(self.perturbed, particle.flat, particle.grad, particle.state,
                          progress_at(self.net, start + j, self.horizon))
            losses, particle.grad = loss_and_grad(self.problems, particle.flat.view(self.shape), start + j + 1,
                                                  keep_graph=False)
            losses = losses.detach()
            term = (losses.sum() if weights is None else (losses * weights).sum()).item()
            total += term if step_weights is None else step_weights[j] * term
        particle.losses = losses
        return total
