"""Peak memory of this process, as the progress line reports it."""
import resource
import sys

import torch


def peak_memory_mib(device: torch.device) -> float:
    """On a GPU the peak of memory allocated by torch's allocator on ``device`` since the process
    started (or the last ``torch.cuda.reset_peak_memory_stats``); on the CPU the process's peak
    resident set, which holds the model, the data and the step's activations."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # kilobytes on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
