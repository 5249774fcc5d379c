"""Capturing and restoring every random number generator a training step touches."""
import logging
import random
from typing import Any, Dict

import numpy as np
import torch

logger = logging.getLogger(__name__)


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as plain types and tensors ("cuda":
    one state per visible GPU, empty without one)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position), "has_gauss": int(has_gauss), "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore ``rng_state()``'s generators. CUDA states are restored GPU by GPU for the GPUs
    both the checkpoint and this process have (a warning when the counts differ); on a machine
    without a GPU they are ignored."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = list(state["cuda"])
    if not cuda:
        return
    if not torch.cuda.is_available():
        logger.info("no GPU visible: the checkpoint's CUDA random states (%d GPU(s)) are not restored", len(cuda))
        return
    visible = torch.cuda.device_count()
    if len(cuda) != visible:
        # torch.cuda.set_rng_state_all would fail on a GPU index this process does not have
        logger.warning("the checkpoint holds the CUDA random states of %d GPU(s) but %d are visible: restoring those of the first %d",
                       len(cuda), visible, min(len(cuda), visible))
    torch.cuda.set_rng_state_all(cuda[:visible])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
