"""Starting and stopping the process group of a torchrun launch."""
import datetime
import logging
import os

import torch
import torch.distributed as dist

from ..errors import DeviceError

logger = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str, timeout_minutes: float = 30.0) -> torch.device:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs) and pick this
    rank's device. Without torchrun, a single process on ``device``."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device={device} but no CUDA GPU is visible; use device=cpu")
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        backend, rank_device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, rank_device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": rank_device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    logger.debug("rank %d/%d on %s (%s)", dist.get_rank(), dist.get_world_size(), rank_device, backend)
    return rank_device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
