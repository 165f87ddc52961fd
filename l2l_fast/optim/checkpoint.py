"""What LearnedOptimizer.state_dict holds beyond torch.optim's, and the checks of a state_dict being loaded.

Each param group saves the signature of its net instead of the module (sizes, constants and a hash of the
weights), so a state_dict is only loaded into an optimizer with the same nets; each parameter's state is
``{"lstm_state": [num_layers, 2, hidden_size, *param.shape]}``, a DTensor for a DTensor parameter.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from ..net import CoordinatewiseLSTM
from .sharding import is_dtensor

__all__ = ["net_signature", "check_loadable"]


def net_signature(net: CoordinatewiseLSTM) -> dict:
    """Sizes, constants and the SHA-256 of the weights (as float64, so the net's dtype does not matter)."""
    flat = torch.cat([w.detach().reshape(-1).to("cpu", torch.float64) for w in net.weights()])
    # the paper's features go unnamed, as in signatures saved before nets had features
    kwargs = {k: v for k, v in net.size_kwargs().items() if k != "features" or v != ("paper",)}
    return dict(kwargs, weights_sha256=hashlib.sha256(flat.numpy().tobytes()).hexdigest())


def check_loadable(state_dict: dict, param_groups: list[dict]) -> dict[Tensor, Tensor]:
    """Validates `state_dict` against this optimizer's groups; returns {param: its saved LSTM state}.

    Raises ValueError (naming state_dict and the group / parameter) for another net, another parameter layout
    or a state_dict of another optimizer; nothing is modified.
    """
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError("state_dict: expected a dict with 'state' and 'param_groups' (from LearnedOptimizer.state_dict)")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"state_dict: has {len(saved_groups)} parameter groups, this optimizer {len(param_groups)}")
    owner = {}
    for i, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        expected = net_signature(group["net"])
        if saved.get("net") != expected:
            raise ValueError(f"state_dict: param_groups[{i}] was saved with another net (saved {saved.get('net')!r}, "
                             f"this optimizer's {expected!r}); an LSTM state only makes sense with the net that made it")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"state_dict: param_groups[{i}] has {len(saved['params'])} parameters, this optimizer's "
                             f"{len(group['params'])} (another parameter layout?)")
        for j, (key, param) in enumerate(zip(saved["params"], group["params"])):
            owner[key] = (f"param_groups[{i}]['params'][{j}]", param, group["net"])
    states = {}
    for key, (name, param, net) in owner.items():
        saved = state_dict["state"].get(key, {})
        lstm_state = saved.get("lstm_state") if isinstance(saved, dict) else None
        if not isinstance(lstm_state, Tensor):
            raise ValueError(f"state_dict: no 'lstm_state' for {name} (the state_dict of another optimizer?)")
        expected = (net.num_layers, 2, net.hidden_size, *param.shape)
        if tuple(lstm_state.shape) != expected:
            raise ValueError(f"state_dict: the LSTM state of {name} has shape {tuple(lstm_state.shape)}, expected "
                             f"{expected} = (num_layers, 2, hidden_size, *param.shape) (another parameter layout?)")
        if is_dtensor(param) != is_dtensor(lstm_state):
            raise ValueError(f"state_dict: the LSTM state of {name} is {'not ' if is_dtensor(param) else ''}a DTensor "
                             "but the parameter is; load sharded states with torch.distributed.checkpoint")
        if not lstm_state.is_floating_point():
            raise ValueError(f"state_dict: the LSTM state of {name} has dtype {lstm_state.dtype}")
        states[param] = lstm_state
    return states
