"""DTensor parameters (FSDP2 ``fully_shard``, tensor parallel): the optimizer steps each rank's local shard.

The optimizer is coordinatewise, so a shard is stepped exactly as the same coordinates of the full tensor.
A parameter's LSTM state has the parameter's shape behind [L, 2, H]; for a DTensor parameter it is a DTensor
with the parameter's mesh and placements moved three dims right (Shard(d) -> Shard(d + 3)), so distributed
checkpointing saves and reshards it like the parameter itself. The moments of a net that reads them, [4, *shape],
are placed alike, one dim right (Shard(d) -> Shard(d + 1)).
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed
    DTensor = Replicate = Shard = None

__all__ = ["check_placements", "is_dtensor", "local", "state_like"]


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's local tensor of a DTensor (a view of its storage: in-place updates reach the DTensor), else t."""
    return t.to_local() if is_dtensor(t) else t


def _shifted(placement, lead: int, name: str = "params"):
    if type(placement) is Shard:
        return Shard(placement.dim + lead)
    if type(placement) is Replicate:
        return placement
    raise ValueError(f"{name}: DTensor placement {placement} is not supported by LearnedOptimizer "
                     "(Shard and Replicate are)")


def check_placements(param: Tensor, name: str) -> None:
    if is_dtensor(param):
        for placement in param.placements:
            _shifted(placement, 0, name)


def state_like(param: Tensor, local_state: Tensor) -> Tensor:
    """local_state [*lead, *local shape] (an LSTM state [L, 2, H, ...], moments [4, ...]) as the state of `param`:
    a DTensor like param's, its shard dims moved behind the lead dims, if param is one."""
    if not is_dtensor(param):
        return local_state
    lead = local_state.dim() - param.dim()
    shape = tuple(local_state.shape[:lead]) + tuple(param.shape)
    stride, size = [], 1
    for extent in reversed(shape):
        stride.append(size)
        size *= extent
    return DTensor.from_local(local_state, param.device_mesh, [_shifted(p, lead) for p in param.placements],
                              run_check=False, shape=torch.Size(shape), stride=tuple(reversed(stride)))
