"""What LearnedOptimizer.state_dict holds beyond torch.optim's, and the checks of a state_dict being loaded.

Each param group saves the signature of its net instead of the module (sizes, constants and a hash of the
weights), so a state_dict is only loaded into an optimizer with the same nets; each parameter's state is
``{"lstm_state": [num_layers, 2, hidden_size, *param.shape]}`` and, for a net that reads moments,
``"moments": [4, *param.shape]`` (m, v, t, u in the math dtype; a state saved with 3 rows, before u, loads with u
started at v, but torch.distributed.checkpoint's load, which fills a template of today's shapes, refuses it unless
the template's moments are cut to 3 rows first), each a DTensor for a DTensor parameter.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from ..features import MOMENT_ROWS, upgrade_moments
from ..net import CoordinatewiseLSTM
from .sharding import is_dtensor

__all__ = ["net_signature", "check_loadable"]


def net_signature(net: CoordinatewiseLSTM) -> dict:
    """Sizes, constants and the SHA-256 of the weights (as float64, so the net's dtype does not matter)."""
    flat = torch.cat([w.detach().reshape(-1).to("cpu", torch.float64) for w in net.weights()])
    # the paper's features and linear output go unnamed, as in signatures saved before nets had them
    defaults = {"features": ("paper",), "output": "linear"}
    kwargs = {k: v for k, v in net.size_kwargs().items() if k not in defaults or v != defaults[k]}
    return dict(kwargs, weights_sha256=hashlib.sha256(flat.numpy().tobytes()).hexdigest())


def check_loadable(state_dict: dict, param_groups: list[dict]) -> dict[Tensor, dict[str, Tensor]]:
    """Validates `state_dict` against this optimizer's groups; returns {param: its saved state entries}
    ({"lstm_state": ...}, with "moments" for a net that reads them).

    Raises ValueError (naming state_dict and the group / parameter) for another net, another parameter layout,
    moments missing, mis-shaped or not floating point for a net that reads them (or present for one that does
    not), or a state_dict of another optimizer; nothing is modified.
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
                             f"this optimizer's {expected!r}); an LSTM state only makes sense with the net that made it "
                             "(a shipped name can stand for several nets: 'general' with total_steps <= 200 is "
                             "'general_short', so give the same pretrained and total_steps as the optimizer saved)")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"state_dict: param_groups[{i}] has {len(saved['params'])} parameters, this optimizer's "
                             f"{len(group['params'])} (another parameter layout?)")
        for j, (key, param) in enumerate(zip(saved["params"], group["params"])):
            owner[key] = (f"param_groups[{i}]['params'][{j}]", param, group["net"])
    states = {}
    for key, (name, param, net) in owner.items():
        saved = state_dict["state"].get(key, {})
        saved = saved if isinstance(saved, dict) else {}
        lstm_state = saved.get("lstm_state")
        if not isinstance(lstm_state, Tensor):
            raise ValueError(f"state_dict: no 'lstm_state' for {name} (the state_dict of another optimizer?)")
        expected = (net.num_layers, 2, net.hidden_size, *param.shape)
        _check_entry(name, "the LSTM state", lstm_state, param, expected,
                     "(num_layers, 2, hidden_size, *param.shape) (another parameter layout?)")
        states[param] = {"lstm_state": lstm_state}
        moments = saved.get("moments")
        if net.reads_moments:
            if not isinstance(moments, Tensor):
                raise ValueError(f"state_dict: no 'moments' for {name}, whose net reads the gradient's moments "
                                 f"(features {net.features}); a state_dict of this optimizer holds them next to "
                                 "'lstm_state'")
            if moments.dim() == param.dim() + 1 and moments.shape[0] == 3 and moments.shape[1:] == param.shape:
                moments = upgrade_moments(moments)  # [3, ...] from before the long moment u: u starts at v
            _check_entry(name, "the moments", moments, param, (MOMENT_ROWS, *param.shape),
                         f"({MOMENT_ROWS}, *param.shape): rows m, v, t, u (another parameter layout?)")
            states[param]["moments"] = moments
        elif moments is not None:
            raise ValueError(f"state_dict: {name} has 'moments' but its net (features {net.features}) reads none")
    return states


def _check_entry(name: str, what: str, saved: Tensor, param: Tensor, expected: tuple, layout: str) -> None:
    if tuple(saved.shape) != expected:
        raise ValueError(f"state_dict: {what} of {name} has shape {tuple(saved.shape)}, expected {expected} = {layout}")
    if is_dtensor(param) != is_dtensor(saved):
        raise ValueError(f"state_dict: {what} of {name} is {'not ' if is_dtensor(param) else ''}a DTensor "
                         "but the parameter is; load sharded states with torch.distributed.checkpoint")
    if not saved.is_floating_point():
        raise ValueError(f"state_dict: {what} of {name} has dtype {saved.dtype}")
