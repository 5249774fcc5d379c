"""Model analysis of an experiment: parameters, FLOPs per image, inference and training speed,
peak memory, and where a training step's time goes. Random weights, random inputs.

    python tools/benchmark.py experiment=r50_deformable_detr device=cpu measure=[params]
    python tools/benchmark.py experiment=r50_deformable_detr measure=[params,flops]
    python tools/benchmark.py experiment=r50_deformable_detr measure=[inference] precisions=[fp32] inference_batch_sizes=[1]
    python tools/benchmark.py experiment=r50_deformable_detr measure=[profile]

Measures (``measure=``):
    params     parameters, total and trainable (the model is built on the meta device: instant)
    flops      FLOPs of one image at ``image_size`` (torch.utils.flop_counter; a multiply-add is
               2 FLOPs; GMACs = GFLOPs / 2, the unit of the paper's "GFLOPs"), by part
    inference  images/s of the model's forward at each of ``inference_batch_sizes``
    training   images/s of optimizer steps (forward, losses, backward, clipping, AdamW) at
               ``training_batch_size``, and peak memory
    profile    milliseconds per training step by part (backbone, encoder, decoder, the op's
               forward and backward, matcher, loss, backward, optimizer), see ``profile.*``
Each speed measurement runs in a fresh process (deformable_detr/cli/benchmark_worker.py) for each of
``precisions`` (fp32; bf16 or fp16 autocast, as ``trainer.amp``; bf32 on CPUs or tf32 on CUDA:
float32 with products in bfloat16 or TF32, as ``trainer.fp32_precision``) and ``compile``;
the median of ``iterations`` timed iterations after ``warmup`` is reported with their minimum
and maximum, logged as each is measured. Writes ``benchmark.json`` to hydra.run.dir after each
measurement. Speed is measured eager; ``compile=[false,true]`` adds torch.compile of the
detector (as ``trainer.compile=true`` trains, but for this one input size: static shapes, which
compile much faster than the dynamic ones training uses; the first iteration's time,
compilation included, is reported as ``first_iteration_seconds``).
"""
import json
import os
import platform
import subprocess
import sys
from typing import Dict, List

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..engine.compilation import check_compiler
from ..engine.flops import count_detector_flops
from ..errors import ConfigError
from ..utils.atomic_files import write_json_atomic
from . import runtime
from .app import Tool, start_run
from .checks import check_config
from .schema import BenchmarkConfig

logger = runtime.logger

MEASURES = ("params", "flops", "inference", "training", "profile")
PRECISIONS = ("fp32", "bf32", "tf32", "bf16", "fp16")
FP32_PRECISION_DEVICES = {"bf32": "cpu", "tf32": "cuda"}  # float32 with bfloat16 / TF32 products
WORKER = "deformable_detr.cli.benchmark_worker"


# ---------------------------------------------------------------- settings

def check_settings(cfg: DictConfig) -> None:
    unknown = [m for m in cfg.measure if m not in MEASURES]
    if unknown:
        raise ConfigError(f"measure={list(cfg.measure)}: {unknown} not among {', '.join(MEASURES)}")
    for key, precisions in (("precisions", list(cfg.precisions)), ("profile.precision", [cfg.profile.precision])):
        bad = [p for p in precisions if p not in PRECISIONS]
        if bad:
            raise ConfigError(f"{key}: {bad} not among {', '.join(PRECISIONS)}")
    for key, size in (("image_size", cfg.image_size), ("profile.image_size", cfg.profile.image_size)):
        if size is not None and (len(size) != 2 or min(size) < 32):
            raise ConfigError(f"{key}={list(size)} must be [H, W], each at least 32 pixels")
    if cfg.iterations < 1 or cfg.warmup < 0 or cfg.profile.steps < 1 or cfg.profile.warmup < 0:
        raise ConfigError("iterations and profile.steps must be at least 1; warmup and profile.warmup at least 0")
    batches = {"inference_batch_sizes": list(cfg.inference_batch_sizes), "training_batch_size": [cfg.training_batch_size],
               "profile.batch_size": [cfg.profile.batch_size]}
    for key, sizes in batches.items():
        if min(sizes, default=1) < 1:
            raise ConfigError(f"{key} must be at least 1, got {sizes}")


def image_size_of(cfg: DictConfig) -> List[int]:
    """``image_size``, else a 3:4 (H:W) image resized as at evaluation: 800x1066 at the official
    shorter side of 800."""
    if cfg.image_size is not None:
        return [int(v) for v in cfg.image_size]
    size, max_size = cfg.dataset.eval_transforms.size, cfg.dataset.eval_transforms.max_size
    return [size, min(int(size * 4 / 3), max_size)]


def num_classes_of(cfg: DictConfig) -> int:
    """``num_classes``, else the dataset's class count as training would build it without reading
    the data: ``dataset.num_classes``, the synthetic set's, or COCO's 91."""
    if cfg.num_classes is not None:
        return int(cfg.num_classes)
    return runtime.dataset_settings(cfg.dataset).default_num_classes()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} logical cores"


# ---------------------------------------------------------------- measurements

def count_parameters(model_cfg: DictConfig, num_classes: int) -> Dict[str, int]:
    # shapes only: the meta device allocates nothing, so even the R50 models build at once
    with torch.device("meta"):
        model = instantiate(model_cfg, num_classes=num_classes)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def measure_flops(model_cfg: DictConfig, num_classes: int, image_size: List[int], device: torch.device) -> Dict:
    torch.manual_seed(0)
    model = instantiate(model_cfg, num_classes=num_classes).to(device).eval()
    height, width = image_size
    images = torch.randn(1, 3, height, width, device=device)
    masks = torch.zeros(1, height, width, dtype=torch.bool, device=device)
    count = count_detector_flops(model, images, masks)
    return {
        "flops": count.total,
        "gflops": count.total / 1e9,
        "gmacs": count.macs / 1e9,
        "flops_by_part": count.by_part,
        "flops_deformable_attention": count.deformable_attention,
    }


def run_worker(spec: Dict) -> Dict:
    """One measurement in a fresh interpreter; its result dictionary (or ``error``)."""
    result = subprocess.run([sys.executable, "-m", WORKER, json.dumps(spec)], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- report

def describe_speed(row: Dict) -> str:
    """``12.3 images/s (0.163 s per batch: median of 3, min 0.158, max 0.171; first iteration 2.1 s), peak memory 1,234 MiB``."""
    if "error" in row:
        return f"error: {row['error']}"
    spread = ""
    if "seconds_min" in row:
        count = len(row.get("iteration_seconds", [])) or "?"
        spread = f": median of {count}, min {row['seconds_min']:.3g}, max {row['seconds_max']:.3g}"
    first = f"; first iteration {row['first_iteration_seconds']:.3g} s" if row.get("first_iteration_seconds") else ""
    return (f"{row['images_per_second']:.3g} images/s ({row['seconds_per_iteration']:.3g} s per batch{spread}{first}), "
            f"peak memory {row['peak_memory_mb']:,.0f} MiB")


def format_report(report: Dict) -> str:
    lines = [
        f"{report['experiment']} on {report['device']} ({report['device_name']}), torch {report['torch']}",
        f"input {report['image_size'][0]}x{report['image_size'][1]}, {report['num_classes']} classes",
    ]
    if any(key in report for key in ("parameters", "flops", "inference", "training")):
        lines += ["", "| quantity | value |", "|---|---|"]
    if "parameters" in report:
        lines.append(f"| parameters | {report['parameters']:,} |")
        lines.append(f"| trainable parameters | {report['trainable_parameters']:,} |")
    if "flops" in report:
        lines.append(f"| GMACs per image | {report['gmacs']:.1f} |")
        lines.append(f"| GFLOPs per image (2 per MAC) | {report['gflops']:.1f} |")
        for part, flops in report["flops_by_part"].items():
            lines.append(f"| GMACs: {part} | {flops / 2e9:.1f} |")
        lines.append(f"| GMACs: deformable attention op (in encoder and decoder) | {report['flops_deformable_attention'] / 2e9:.2f} |")
    for mode in ("inference", "training"):
        for row in report.get(mode, []):
            what = f"{mode} {row['precision']}, batch {row['batch']}, {'compiled' if row.get('compile') else 'eager'}"
            lines.append(f"| {what} | {describe_speed(row)} |")
    profile = report.get("profile")
    if profile:
        settings = profile["settings"]
        lines += ["", f"training step, batch {settings['batch']} of {settings['image_size'][0]}x{settings['image_size'][1]}, "
                  f"{settings['precision']}, mean of {settings['iterations']} profiled steps", ""]
        if "error" in profile:
            lines.append(f"error: {profile['error']}")
        else:
            step = profile["milliseconds_per_step"]["step"]
            lines += ["| part | ms per step | share |", "|---|---|---|"]
            for part, ms in profile["milliseconds_per_step"].items():
                lines.append(f"| {part} | {ms:,.0f} | {100 * ms / step:.1f}% |")
    return "\n".join(lines)


def run(cfg: DictConfig):
    check_config(cfg, BenchmarkConfig)
    check_settings(cfg)
    device = torch.device(runtime.resolve_device(cfg.device))
    for key, precisions in (("precisions", list(cfg.precisions)), ("profile.precision", [cfg.profile.precision])):
        elsewhere = [p for p in precisions if FP32_PRECISION_DEVICES.get(p, device.type) != device.type]
        if elsewhere:
            raise ConfigError(f"{key}: {elsewhere} not on {device.type} (bf32 is for CPUs, tf32 for CUDA GPUs)")
    session = start_run(cfg, "benchmark.log")
    run_dir = session.run_dir
    with open_dict(cfg):
        # random weights: a benchmark never downloads ImageNet weights
        cfg.model.backbone.pretrained = False
    session.save_config(cfg)
    image_size, num_classes = image_size_of(cfg), num_classes_of(cfg)
    report: Dict = {
        "experiment": cfg.name,
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": cfg.threads or torch.get_num_threads(),
        "image_size": image_size,
        "num_classes": num_classes,
    }
    path = os.path.join(run_dir, "benchmark.json")

    def save():
        write_json_atomic(path, report)

    if "params" in cfg.measure:
        report.update(count_parameters(cfg.model, num_classes))
        logger.info("parameters: %s (%s trainable)", f"{report['parameters']:,}", f"{report['trainable_parameters']:,}")
        save()
    if "flops" in cfg.measure:
        report.update(measure_flops(cfg.model, num_classes, image_size, device))
        logger.info("%.1f GMACs (%.1f GFLOPs) per %dx%d image", report["gmacs"], report["gflops"], *image_size)
        save()

    if any(cfg.compile) and {"inference", "training"} & set(cfg.measure):
        check_compiler(device)
    nodes = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "criterion", "optimizer", "schedule")}
    base = dict(nodes, num_classes=num_classes, device=str(device), seed=cfg.seed, threads=cfg.threads)
    runs = [("inference", batch) for batch in cfg.inference_batch_sizes if "inference" in cfg.measure]
    runs += [("training", cfg.training_batch_size)] if "training" in cfg.measure else []
    for mode, batch in runs:
        for precision in cfg.precisions:
            for compiled in cfg.compile:
                spec = dict(base, mode=mode, batch=batch, precision=precision, compile=bool(compiled), image_size=image_size,
                            warmup=cfg.warmup, iterations=cfg.iterations)
                result = run_worker(spec)
                report.setdefault(mode, []).append(dict(precision=precision, batch=batch, compile=bool(compiled), warmup=cfg.warmup,
                                                        iterations=cfg.iterations, **result))
                logger.info("%s, %s, batch %d, %s: %s", mode, precision, batch, "compiled" if compiled else "eager", describe_speed(result))
                save()
    if "profile" in cfg.measure:
        settings = cfg.profile
        spec = dict(base, mode="profile", batch=settings.batch_size, precision=settings.precision, compile=False,
                    image_size=list(settings.image_size), warmup=settings.warmup, iterations=settings.steps)
        logger.info("profiling %d training steps ...", settings.steps)
        result = run_worker(spec)
        report["profile"] = dict(result, settings={k: spec[k] for k in ("batch", "image_size", "precision", "warmup", "iterations")})
        if "top_operators" in result:
            logger.info("operators by self time:\n%s", result["top_operators"])
        save()

    print(format_report(report))
    logger.info("wrote %s", path)
    return report


TOOL = Tool(
    name="benchmark",
    summary="Model analysis of an experiment with random weights: parameters, FLOPs per image, inference and training "
            "speed, peak memory, and where a training step's time goes; prints a table and writes benchmark.json.",
    arguments="[experiment=NAME] [measure=[params,flops,inference,training,profile]]",
    schema=BenchmarkConfig,
    run=run,
)
main = TOOL.main


if __name__ == "__main__":
    main()
