"""``LearnedOptimizer``: a trained coordinatewise LSTM (Andrychowicz et al. 2016) as a ``torch.optim.Optimizer``."""
from __future__ import annotations

import contextlib
import math
import numbers
from collections import OrderedDict

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..checks import PARAM_DTYPES, check_total_steps
from ..net import CoordinatewiseLSTM
from ..pretrained import DEFAULT, for_horizon, short_run_member
from .checkpoint import check_loadable, net_signature
from .fused import FusedGroup, math_dtype_of, resolve_state_dtype
from .sharding import check_placements, local, state_like

__all__ = ["LearnedOptimizer"]

STATE_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16)
OWN_STATE = ("lstm_state", "moments")  # per-parameter state entries loaded by this optimizer, not torch.optim


class LearnedOptimizer(Optimizer):
    """Steps parameters with a trained ``CoordinatewiseLSTM``: param += lr * update(grad, LSTM state).

    Args:
        params: parameters or param groups, as for any torch optimizer. A group may carry its own ``net``
            (e.g. one for conv and one for fully connected parameters, as in the paper), ``lr`` and ``state_dtype``.
        net: the optimizer network; default: the shipped one named by ``pretrained``.
        pretrained: name of a shipped net: "general" (the default: meta-trained over many model families, it
            reads the gradient's running moments) or the paper's specialists "mnist" and "quadratic"; or a file
            from ``save_pretrained``. With ``total_steps`` <= 200, "general" loads its short-run member
            "general_short" (meta-trained on runs of 40-200 steps: ``pretrained.for_horizon``); the name loaded
            is ``self.pretrained``.
        lr: multiplies the net's update (its output_scale); 1.0 is the optimizer as trained. LR schedulers
            scale it as they scale any learning rate. A float: the kernels take it as one, so a Tensor lr (torch's
            way to change lr without recompiling a compiled step) is refused; under torch.compile each new lr
            value compiles the step again.
        state_dtype: storage of the per-coordinate LSTM state: None (float32; float64 for float64 parameters)
            or torch.bfloat16, which halves the optimizer's memory (the math stays in float32).
        total_steps: the number of optimizer steps the run will take, for a net that reads where training is
            (``net.reads_progress``: progress_input): at its t-th ``step()`` (t from 0)
            it reads (t, total_steps), the fraction of training done and the run's length, as a scheduler would;
            steps past total_steps read as the last one. Required for such a net. For a shipped name with a
            short-run member ("general") it picks the weights (above); for any other net without the input it
            would change nothing and is refused (ValueError). The count of steps taken is the group's
            ``step_count``, saved in the state_dict.

    State: per parameter ``state[p]["lstm_state"]`` [num_layers, 2, hidden_size, *p.shape] (in state_dtype) and,
    for a net that reads the gradient's running moments (``net.reads_moments``, features "moments" or
    "long_moments"), ``state[p]["moments"]`` [4, *p.shape]: rows m, v (running mean and second moment, beta 0.95),
    t (the coordinate's step count) and u (long second moment, beta 0.999), always in the math dtype (float32, float64 for float64 parameters), never bfloat16,
    whatever state_dtype is. Both are views of the fused tensors of one kernel call.

    Memory: the LSTM state holds 2 * num_layers * hidden_size values per parameter element, 80 for the shipped
    nets (H = 20, L = 2): 320 bytes per element in float32, 160 in bfloat16 (Adam: 8); a net that reads moments
    adds 4 values (16 bytes in float32, 32 in float64) per element. Under FSDP2 each rank keeps only its shard's.

    Parameters: float32, float64, bfloat16 or float16, dense, real; DTensors (FSDP2) are stepped shard by
    shard. Each param group's parameters on one device with one math dtype (float64, or float32 for the
    others) are stepped in one fused ``lstm_multi_step_`` call over all of them. Each parameter at most once:
    the same tensor twice in a group is refused with a ValueError (torch.optim only warns, but it would be
    stepped twice per step, with two LSTM states), as is a tensor in two groups (torch's ValueError).

    Gradients: dense, with the parameter's shape and dtype, checked at every step before any parameter moves
    (torch checks the shape of ``p.grad = g``, not of ``p.grad.data = g.view(...)``). A zero gradient is not
    "no gradient": the LSTM's update for an input of 0 is not 0, so a coordinate with gradient 0 moves (unlike
    SGD or Adam); ``zero_grad()`` (set_to_none=True, the default) leaves parameters that get no gradient alone.

    NaN/Inf gradients (the policy of the ops): a coordinate whose gradient is NaN or +-Inf is not updated
    and its LSTM state is left unchanged; a parameter without a gradient is skipped the same way. Under
    ``torch.amp.GradScaler`` a step with any Inf is skipped as a whole by the scaler.
    """

    def __init__(self, params, net: CoordinatewiseLSTM | None = None, *, pretrained: str | None = DEFAULT,
                 lr: float = 1.0, state_dtype: torch.dtype | None = None, total_steps: int | None = None):
        self.pretrained = None  # the shipped name or file the net came from, if any
        if net is None:
            if pretrained is None:
                raise ValueError("net: pass a CoordinatewiseLSTM, or name a shipped one in pretrained")
            self.pretrained = for_horizon(pretrained, total_steps)
            net = CoordinatewiseLSTM.from_pretrained(self.pretrained)
            if short_run_member(pretrained) is not None and not net.reads_progress:
                total_steps = None  # it chose the weights; a net without the progress input reads nothing more
        defaults = dict(net=net, lr=lr, state_dtype=state_dtype, total_steps=total_steps)
        _check_options(defaults)
        self._fused: list[list[FusedGroup]] | None = None
        super().__init__(params, defaults)
        # The state is made now, not at the first step: torch.distributed.checkpoint initialises an optimizer
        # without state by a step with zero gradients, which would advance every LSTM state.
        self._fused = [self._fuse(group, index) for index, group in enumerate(self.param_groups)]

    def __getstate__(self) -> dict:  # torch.optim keeps defaults, state and param_groups only
        return {**super().__getstate__(), "pretrained": self.pretrained}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("pretrained", None)  # pickled before the attribute existed
        if "_fused" not in self.__dict__:  # unpickled or deep-copied: the fused views are not part of the state
            self._fused = [self._fuse(group, index) for index, group in enumerate(self.param_groups)]

    # ------------------------------------------------------------------------------------------
    # param groups
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group: expected a dict, got {type(param_group).__name__}")
        _check_options({**self.defaults, **param_group})
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else params
        if not isinstance(params, set):  # torch's own error for sets
            params = list(params)
            _check_params([p[1] if isinstance(p, tuple) else p for p in params], len(self.param_groups))
        super().add_param_group({**param_group, "params": params})
        group = self.param_groups[-1]
        if group["total_steps"] is not None:
            group.setdefault("step_count", 0)
        if self._fused is not None:
            self._fused.append(self._fuse(self.param_groups[-1], len(self.param_groups) - 1))

    def _fuse(self, group: dict, index: int) -> list[FusedGroup]:
        """One FusedGroup per (device, math dtype) of the group, taking over the parameters' states so far."""
        if torch.is_inference_mode_enabled():  # the state outlives inference mode: it must be a normal tensor
            with torch.inference_mode(False):
                return self._fuse(group, index)
        by_key: dict[tuple, list[int]] = {}
        for j, p in enumerate(group["params"]):
            t = local(p)
            by_key.setdefault((t.device, math_dtype_of(t.dtype)), []).append(j)
        parts = []
        for positions in by_key.values():
            params = [group["params"][j] for j in positions]
            part = FusedGroup(params, group["net"], group["state_dtype"],
                              [self.state[p].get("lstm_state") for p in params], positions,
                              [f"param_groups[{index}]['params'][{j}]" for j in positions],
                              moments=[self.state[p].get("moments") for p in params])
            moment_views = part.moment_views()
            for k, (p, view) in enumerate(zip(params, part.state_views())):
                self.state[p]["lstm_state"] = state_like(p, view)
                if moment_views is None:
                    self.state[p].pop("moments", None)  # a net that reads none (the group's net was replaced)
                else:
                    self.state[p]["moments"] = state_like(p, moment_views[k])
            parts.append(part)
        return parts

    # ------------------------------------------------------------------------------------------
    # step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every gradient is checked before the first parameter moves
        work = []
        for index, group in enumerate(self.param_groups):
            try:  # options edited in place since (by a scheduler, by hand) are held to the constructor's rules
                _check_options(group)
            except (TypeError, ValueError) as error:
                raise type(error)(f"param_groups[{index}]: {error}") from None
            net, parts, params = group["net"], self._fused[index], group["params"]
            if sum(len(part.params) for part in parts) != len(params) or not all(
                    part.is_current(group["state_dtype"], net, params) for part in parts):
                _check_params(params, index)  # the list may have been edited in place
                parts = self._fused[index] = self._fuse(group, index)
            for part in parts:
                grads = part.gradients()
                if grads is not None:  # None: no gradient at all, nothing moves
                    work.append((part, net, float(group["lr"]), grads, _progress(group)))
        for part, net, lr, grads, progress in work:
            part.step(net, lr, grads, progress)
        for group in self.param_groups:
            if group.get("total_steps") is not None:
                group["step_count"] = group.get("step_count", 0) + 1
        return loss

    # ------------------------------------------------------------------------------------------
    # state_dict
    @torch._disable_dynamo
    def state_dict(self) -> dict:
        """torch.optim's, with each group's net replaced by its signature (sizes, constants, weight hash) and
        per parameter {"lstm_state": [L, 2, H, *param.shape]}, with "moments": [4, *param.shape] for a net that
        reads them (views of the live state, not copies). Post hooks (register_state_dict_post_hook) see this
        form."""
        with self._hooks_held("_optimizer_state_dict_post_hooks") as (post_hooks,):
            state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group["net"] = net_signature(group["net"])
        for post_hook in post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of a LearnedOptimizer with the same nets and parameter layout (else ValueError,
        nothing changed, also for moments missing or mis-shaped for a net that reads them); the states are
        copied, stepping continues bit-identically.

        As in torch.optim, pre hooks (register_load_state_dict_pre_hook) run first and may convert the
        state_dict; it is validated after them. Post hooks run once the nets and LSTM states are in place."""
        state_dict = dict(state_dict) if isinstance(state_dict, dict) else state_dict  # shallow, as torch.optim
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        states = check_loadable(state_dict, self.param_groups)
        for index, (group, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            try:
                missing = {"lr", "state_dtype"} - saved.keys()
                if missing:
                    raise ValueError(f"has no {sorted(missing)} (not the state_dict of a LearnedOptimizer?)")
                _check_options({"total_steps": None, **saved, "net": group["net"]})
                for p in group["params"]:
                    resolve_state_dtype(saved["state_dtype"], math_dtype_of(local(p).dtype))
            except (TypeError, ValueError) as error:
                raise type(error)(f"state_dict: param_groups[{index}]: {error}") from None
        nets = [group["net"] for group in self.param_groups]
        # torch.optim would cast every state to its parameter's dtype (a float32 state to bfloat16): the LSTM
        # states and moments go around it.
        stripped = {key: {k: v for k, v in value.items() if k not in OWN_STATE} if isinstance(value, dict) else value
                    for key, value in state_dict["state"].items()}
        with self._hooks_held("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks") as (
                _, post_hooks):
            super().load_state_dict({**state_dict, "state": stripped})
        for group, net in zip(self.param_groups, nets):
            group["net"] = net
            group.setdefault("total_steps", None)  # a state_dict of before total_steps existed
        for param, entries in states.items():
            self.state[param].update(entries)
        self._fused = [self._fuse(group, index) for index, group in enumerate(self.param_groups)]
        for post_hook in post_hooks.values():
            post_hook(self)

    @contextlib.contextmanager
    def _hooks_held(self, *names: str):
        """Holds back torch.optim's hooks `names` (yielded) while torch.optim's state_dict / load_state_dict run,
        so that they can run on the LearnedOptimizer form instead."""
        held = [getattr(self, name) for name in names]
        for name in names:
            setattr(self, name, OrderedDict())
        try:
            yield held
        finally:
            for name, hooks in zip(names, held):
                setattr(self, name, hooks)


def _check_options(group: dict) -> None:
    net, lr, state_dtype = group.get("net"), group.get("lr"), group.get("state_dtype")
    if not isinstance(net, CoordinatewiseLSTM):
        raise TypeError(f"net: expected an l2l_fast.CoordinatewiseLSTM, got {type(net).__name__}")
    total_steps = group.get("total_steps")
    check_total_steps(total_steps)
    if net.reads_progress and total_steps is None:
        raise ValueError("total_steps: this net reads where training is (progress_input); "
                         "pass the number of optimizer steps the run will take, LearnedOptimizer(params, "
                         "total_steps=...), as you would to a learning-rate schedule")
    if not net.reads_progress and total_steps is not None:
        raise ValueError(f"total_steps: this net has no progress input (built without progress_input), so "
                         f"total_steps={total_steps} would change nothing; pass None")
    count = group.get("step_count", 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"step_count: expected an int >= 0 (steps taken), got {count!r}")
    if isinstance(lr, Tensor):
        raise ValueError(f"lr: lr as a Tensor is not supported (got one of shape {tuple(lr.shape)}); the kernels take "
                         "the learning rate as a Python float: pass float(lr)")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr: expected a finite number >= 0 (a multiplier of the net's update), got {lr!r}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype: expected None, torch.float32, torch.float64 or torch.bfloat16, got {state_dtype!r}")
    if group.get("weight_decay", 0) != 0:  # an AdamW recipe's group: its decay would never be applied
        raise ValueError(f"weight_decay: LearnedOptimizer has no weight decay, but a param group asks for "
                         f"{group['weight_decay']!r}; decay those parameters yourself before step() "
                         "(with torch.no_grad(): p.mul_(1 - decay)) or leave the key out")


def _progress(group: dict):
    """What the group's net reads as progress at this step: (steps taken, total_steps), or None without
    total_steps."""
    if group.get("total_steps") is None:
        return None
    return (group.get("step_count", 0), group["total_steps"])


def _check_params(params: list, index: int) -> None:
    """The parameters of param_groups[index]: each one's dtype and layout, and none listed twice."""
    name, first = f"param_groups[{index}]['params']", {}
    for j, p in enumerate(params):
        _check_param(p, f"{name}[{j}]")
        if isinstance(p, Tensor) and id(p) in first:
            raise ValueError(f"params: {name}[{j}] is the same tensor as {name}[{first[id(p)]}]; a parameter listed "
                             "twice would be stepped twice per step, with two LSTM states (torch.optim only warns); "
                             "list it once")
        first[id(p)] = j


def _check_param(p, name: str) -> None:
    if not isinstance(p, Tensor):
        return  # torch.optim's own TypeError follows
    if p.is_complex():
        raise TypeError(f"params: {name} is complex ({p.dtype}); LearnedOptimizer is real-valued (view it with "
                        "torch.view_as_real)")
    if p.layout != torch.strided:
        raise TypeError(f"params: {name} is sparse ({p.layout}); LearnedOptimizer needs dense parameters")
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"params: {name} has dtype {p.dtype}; expected float32, float64, bfloat16 or float16")
    check_placements(p, f"params: {name}")
