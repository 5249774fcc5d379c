"""Starting and stopping the process group of a torchrun launch."""
import datetime
import logging
import os
from typing import Any, Dict, Tuple

import torch
import torch.distributed as dist

from ..errors import DeviceError

logger = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def process_group_backend(device: str, local_rank: int) -> Tuple[str, torch.device, Dict[str, Any]]:
    """The process group's backend, this rank's device and the extra ``init_process_group``
    arguments for ``device`` ("cuda", "cuda:N" or "cpu"): NCCL on the GPU of the local rank (any
    index in ``device`` is ignored, as torchrun gives each process its own GPU), bound to it
    with ``device_id``; gloo on the CPU otherwise."""
    if device.startswith("cuda"):
        rank_device = torch.device("cuda", local_rank)
        return "nccl", rank_device, {"device_id": rank_device}
    return "gloo", torch.device("cpu"), {}


def init_distributed(device: str, timeout_minutes: float = 30.0) -> torch.device:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs) and pick this
    rank's device. Without torchrun, a single process on ``device``."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device={device} but no CUDA GPU is visible; use device=cpu")
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return torch.device(device)
    backend, rank_device, kwargs = process_group_backend(device, int(os.environ.get("LOCAL_RANK", "0")))
    if rank_device.type == "cuda":
        torch.cuda.set_device(rank_device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    logger.debug("rank %d/%d on %s (%s)", dist.get_rank(), dist.get_world_size(), rank_device, backend)
    return rank_device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
