"""``torch.compile`` of the detector: one graph from the images to the heads' outputs.

The whole forward traces without graph breaks (``fullgraph=True`` holds): the deformable
attention op is a ``torch.library`` custom op with a fake implementation, and the shape logic
(level sizes, valid ratios, reference points, two-stage top-k) uses Python sizes rather than
values read from tensors. The Hungarian matcher (scipy, on the host) and the losses stay out of
the graph: the caller runs them eagerly on the compiled model's outputs.

Image sizes are marked dynamic, so one graph serves every padded batch size (multi-scale
training pads each batch to its largest image); a new graph is compiled only for what the
guards specialize on, such as a batch of one image, or train vs eval mode.
"""
import logging
import os
import shutil
from typing import Optional

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)


def check_compiler(device: torch.device, key: str = "compile") -> None:
    """On the CPU, inductor compiles C++: fail before any work when no compiler is found."""
    if device.type != "cpu":
        return
    candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if not any(shutil.which(name) for name in candidates if name):
        raise ConfigError(
            f"{key}=true on the CPU needs a C++ compiler (g++ or clang++, or $CXX) for torch.compile's "
            f"generated code; install one or set {key}=false"
        )


def compile_detector(model: torch.nn.Module, *, dynamic: Optional[bool] = True, backend: str = "inductor",
                     fullgraph: bool = False) -> torch.nn.Module:
    """The detector (or its DistributedDataParallel wrapper) compiled with ``torch.compile``.

    Returns a wrapper that shares ``model``'s parameters and buffers: train, save and load
    through ``model`` as before (its state_dict keys are unchanged) and call the wrapper.
    ``dynamic=True`` traces the input sizes symbolically from the first call (one compilation for
    all image sizes); None lets PyTorch decide (static first, dynamic after a size changes).
    ``backend``: torch.compile's ("aot_eager" traces without generating code, for tests).
    ``fullgraph=True`` makes a graph break an error instead of a split.
    """
    return torch.compile(model, dynamic=dynamic, backend=backend, fullgraph=fullgraph)


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
