"""``device=``: the one rule for every tool and the Python API."""
from typing import Union

import torch

from ..errors import ConfigError, DeviceError


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """``"auto"`` (or None): a GPU when one is visible, else the CPU. ``cpu``, ``cuda``, ``cuda:N`` or a
    torch.device as given; a GPU asked for must be visible (DeviceError), a name must be a device
    (ConfigError naming ``device=``)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device} is not one of auto, cpu, cuda, cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device} is not one of auto, cpu, cuda, cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device={device} but no CUDA GPU is visible (torch {torch.__version__}); use device=cpu")
    return resolved
