"""Process-group helpers that degrade to no-ops in a single process.

Every function works whether or not ``torch.distributed`` is initialized, so library
code can call them unconditionally. Collectives (``barrier``, ``all_gather_object``,
``reduce_dict``, ``all_reduce_mean``) must be called by every rank in the same order.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_gather_object",
    "reduce_dict",
    "all_reduce_mean",
]


def is_distributed() -> bool:
    """True when a default process group exists (with any world size)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on global rank 0 (and always in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; returns at once in a single process."""
    if is_distributed() and get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> List[Any]:
    """Picklable ``obj`` from every rank -> list indexed by rank (``[obj]`` in a single process).

    With the NCCL backend each process must have selected its GPU (``torch.cuda.set_device``).
    """
    if not is_distributed() or get_world_size() == 1:
        return [obj]
    gathered: List[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo and the others work on CPU tensors.
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_dict(values: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """Sum (or mean, with ``average``) of scalar tensors over ranks, key by key.

    ``values`` maps names to 0-d tensors and must hold the same keys on every rank.
    The result is detached; in a single process the input values are returned detached.
    """
    if not is_distributed() or get_world_size() == 1:
        return {name: value.detach() for name, value in values.items()}
    # Sorted keys so every rank stacks the values in the same order.
    names = sorted(values.keys())
    device = _collective_device()
    stacked = torch.stack([values[name].detach().float().to(device) for name in names])
    dist.all_reduce(stacked)
    if average:
        stacked /= get_world_size()
    return {name: value for name, value in zip(names, stacked)}


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Mean over ranks of a Python number or 0-d tensor, as a Python float."""
    if isinstance(value, torch.Tensor):
        value = float(value.detach().item())
    if not is_distributed() or get_world_size() == 1:
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return float(total.item()) / get_world_size()
