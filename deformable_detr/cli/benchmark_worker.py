"""One measurement of tools/benchmark.py, run in a fresh process so that its peak memory is its own.

    python -m deformable_detr.cli.benchmark_worker SPEC_JSON

SPEC_JSON (written by tools/benchmark.py) holds ``mode`` (inference | training | profile), the
resolved ``model``, ``criterion``, ``optimizer`` and ``schedule`` config nodes, ``num_classes``, ``device``,
``precision`` (fp32 | bf32 | tf32 | bf16 | fp16), ``compile`` (torch.compile the detector), ``batch``,
``image_size`` [H, W], ``warmup``, ``iterations`` and ``seed``. Prints one JSON line: the result.

Inputs are random: images (B, 3, H, W) from a normal distribution without padding, and for
training 1 to 10 random boxes per image with random labels. A training iteration is the training
loop's own step (``engine.train_step.TrainStep``). Times are taken with the allocators
as training runs them (glibc's malloc keeping freed memory, deformable_detr/utils/allocator.py).
Peak memory: on CUDA torch.cuda.max_memory_allocated over the timed iterations; on the CPU the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over one more iteration
after the timed ones, with glibc's malloc told to return freed blocks to the system at once
(which slows it down, hence not while timing), so that the resident set follows the memory in
use; weights and inputs included.
"""
import json
import statistics
import sys
import time
from typing import Dict

import torch

from deformable_detr.builder import instantiate
from deformable_detr.engine.compilation import compile_detector
from deformable_detr.engine.profiling import label_modules, step_breakdown
from deformable_detr.engine.precision import autocast, set_fp32_precision
from deformable_detr.engine.train_step import TrainStep
from deformable_detr.utils import allocator

# the autocast (``amp``) of each precision, and the float32 products' precision (``fp32_precision``)
PRECISIONS = {"fp32": None, "bf32": None, "tf32": None, "bf16": "bf16", "fp16": "fp16"}
FP32_PRECISIONS = {"bf32": "bf16", "tf32": "tf32"}


# ---------------------------------------------------------------- memory

def _status_kilobytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak(device: torch.device) -> bool:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_kilobytes("VmHWM") / 2**10


# ---------------------------------------------------------------- inputs

def random_batch(batch: int, height: int, width: int, num_classes: int, generator: torch.Generator):
    """images (B, 3, H, W), masks (B, H, W) all False, targets with ``labels`` (T,) in
    [1, num_classes) and ``boxes`` (T, 4) cxcywh in [0, 1]."""
    images = torch.randn(batch, 3, height, width, generator=generator)
    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    targets = []
    for _ in range(batch):
        count = int(torch.randint(1, 11, (), generator=generator))
        centres = 0.2 + 0.6 * torch.rand(count, 2, generator=generator)
        sizes = 0.05 + 0.35 * torch.rand(count, 2, generator=generator)
        labels = torch.randint(1, max(num_classes, 2), (count,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], 1)})
    return images, masks, targets


# ---------------------------------------------------------------- measurements

class Session:
    """The model (and for training its criterion and optimizer) of one spec, with a step function."""

    def __init__(self, spec: Dict):
        self.spec = spec
        self.device = torch.device(spec["device"])
        set_fp32_precision(FP32_PRECISIONS.get(spec["precision"]), self.device, key="precisions")
        torch.manual_seed(spec["seed"])
        self.model = instantiate(spec["model"], num_classes=spec["num_classes"]).to(self.device)
        # what is called; the matcher, losses and optimizer stay eager, as in training. Every
        # iteration has the same input size: static shapes (dynamic ones compile far longer)
        self.forward = compile_detector(self.model, dynamic=False) if spec.get("compile") else self.model
        self.amp = PRECISIONS[spec["precision"]]
        generator = torch.Generator().manual_seed(spec["seed"])
        height, width = spec["image_size"]
        images, masks, targets = random_batch(spec["batch"], height, width, spec["num_classes"], generator)
        self.images, self.masks = images.to(self.device), masks.to(self.device)
        self.targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
        self.training = spec["mode"] != "inference"
        if self.training:
            self.criterion = instantiate(spec["criterion"], num_classes=spec["num_classes"]).to(self.device)
            optimizer = instantiate(spec["optimizer"])(self.model)
            schedule = instantiate(spec["schedule"])(optimizer, iters_per_epoch=1000)
            scaler = torch.amp.GradScaler(self.device.type) if spec["precision"] == "fp16" else None
            # clipping at the recipe's 0.1, as the trainer steps
            self.train_step = TrainStep(self.forward, self.criterion, optimizer, schedule, self.device, amp=self.amp,
                                        scaler=scaler, max_norm=0.1)
            self.model.train()
        else:
            self.model.eval()

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def inference_step(self):
        with torch.inference_mode(), autocast(self.device, self.amp):
            self.forward(self.images, self.masks)

    def training_step(self):
        """One optimizer step of the training loop: autocast forward, float32 losses, backward,
        clipping, step, schedule."""
        result = self.train_step(self.images, self.masks, self.targets)
        if result.skipped:
            raise RuntimeError("the benchmark's training step was skipped (a non-finite loss)")

    def step(self):
        (self.training_step if self.training else self.inference_step)()


def timed(session: Session) -> float:
    start = time.perf_counter()
    session.step()
    session.synchronize()
    return time.perf_counter() - start


def measure_speed(spec: Dict) -> Dict:
    """``warmup`` untimed iterations (at least one when compiled: the first compiles), then the
    timed ones, then (CPU) one more for the peak memory."""
    session = Session(spec)
    warmup = [timed(session) for _ in range(max(spec["warmup"], 1 if spec.get("compile") else 0))]
    if not _reset_peak(session.device):
        return {"error": "cannot reset the peak RSS (/proc/self/clear_refs)"}
    seconds = [timed(session) for _ in range(spec["iterations"])]
    if session.device.type == "cpu":
        allocator.return_freed_memory()
        _reset_peak(session.device)
        timed(session)
    median = statistics.median(seconds)
    return {
        "images_per_second": spec["batch"] / median,
        "seconds_per_iteration": median,
        "seconds_min": min(seconds),
        "seconds_max": max(seconds),
        "iteration_seconds": seconds,
        "first_iteration_seconds": warmup[0] if warmup else None,
        "peak_memory_mb": _peak_mib(session.device),
    }


def profile_training(spec: Dict) -> Dict:
    """``steps`` training steps under torch.profiler after ``warmup`` unprofiled ones."""
    session = Session(spec)
    model, criterion = session.model, session.criterion
    labels = {
        "forward": model,
        "backbone": model.backbone,
        "encoder": model.transformer.encoder,
        "decoder": model.transformer.decoder,
        "loss": criterion,
        "matcher": criterion.matcher,
    }
    for _ in range(spec["warmup"]):
        session.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if session.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize = session.synchronize if session.device.type == "cuda" else None
    with label_modules(labels, synchronize), torch.profiler.profile(activities=activities) as profiler:
        for _ in range(spec["iterations"]):
            with torch.autograd.profiler.record_function("step"):
                session.step()
                session.synchronize()
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return {"milliseconds_per_step": step_breakdown(profiler.events()), "top_operators": table}


def main():
    spec = json.loads(sys.argv[1])
    allocator.keep_freed_memory()  # as the tools run (deformable_detr/cli/app.py)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = profile_training(spec) if spec["mode"] == "profile" else measure_speed(spec)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
