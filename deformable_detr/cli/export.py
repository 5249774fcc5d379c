"""Export a checkpoint to ONNX or a torch.export program and check it against PyTorch.

    python tools/export.py checkpoint=outputs/small/RUN/checkpoint_best.pth
    python tools/export.py checkpoint=r50_deformable_detr-checkpoint.pth format=torch input=photos/

Accepts every checkpoint tools/eval.py accepts (this framework's, with their config; official
release files, with the experiment read from them). Writes ``model.onnx`` (``format=onnx``) or
``model.pt2`` (``format=torch``) to hydra.run.dir, then runs what it wrote (onnxruntime, or
``torch.export.load``) on sample images -- ``input=IMAGE|DIR`` or the dataset's val images,
through the evaluation transforms, and on a batch of another size and shape than the traced one --
and compares with the PyTorch model: the largest absolute differences of logits and boxes, and
the share of top-100 detections that match. Below ``min_match`` it exits with status 1. The
exported file carries its categories, pre- and post-processing (``export.metadata``). The
contract of the exported model is in docs/export.md.
"""
import collections
import logging
import os
import random
import sys

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..data.image_files import list_image_files, read_image
from ..errors import ConfigError
from ..export import ExportableDetector, detector_metadata, export_program, input_ranges, load_program, save_program
from ..export.verification import latencies, verify
from . import runtime
from .app import Tool, start_run
from .checkpoint_config import config_for_checkpoint, detector_for, load_recipe
from .checks import check_config
from .schema import ExportConfig

logger = runtime.logger
FORMATS = {"onnx": "model.onnx", "torch": "model.pt2"}


def sample_images(cfg: DictConfig, transforms):
    """Up to ``num_images`` images (3, H, W), resized and normalized for evaluation by ``transforms``:
    those of ``input=``, else the dataset's val images."""
    if cfg.input:
        paths = list_image_files(str(cfg.input))[: cfg.num_images]
        # evaluation transforms draw nothing at random; the generator only satisfies the interface
        return [transforms(read_image(path), None, random.Random(0))[0] for path in paths]
    if OmegaConf.is_missing(cfg.dataset, "root") and not cfg.dataset.get("val_images"):
        raise ConfigError("sample images are needed to check the export: set input=IMAGE|DIR or dataset.root=DIR")
    root = runtime.dataset_root(cfg.dataset)
    val_set = runtime.build_dataset(cfg.dataset, "val", root, cfg.seed)
    return [val_set[index][0] for index in range(min(cfg.num_images, len(val_set)))]


def batches_by_size(images, batch_size: int):
    """Stacks images of the same size into batches (N, 3, H, W) of at most ``batch_size``: the
    exported model takes unpadded batches."""
    groups = collections.defaultdict(list)
    for image in images:
        groups[tuple(image.shape)].append(image)
    batches = []
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            batches.append(torch.stack(group[start : start + batch_size]))
    return batches


def other_shape_batch(images, traced, ranges) -> torch.Tensor:
    """Sample ``images`` (3, H, W) as a batch (N' + 1, 3, H', W') of a shape the trace did not see:
    one image more than the traced batch (N', 3, H, W), each resized to other sides (``other_side``,
    at least the program's smallest ``ranges``). Running it checks that batch, height and width stayed dynamic."""
    size = [other_side(side, ranges[name][0]) for side, name in zip(traced[2:], ("height", "width"))]
    picked = [images[index % len(images)] for index in range(traced[0] + 1)]
    return torch.cat([F.interpolate(image[None], size=size, mode="bilinear", align_corners=False) for image in picked])


def other_side(side: int, smallest: int) -> int:
    """About 3/4 of ``side`` (cheaper than larger), at least ``smallest``; ``side`` + 16 where that is ``side``."""
    other = max(smallest, side * 3 // 4)
    return other if other != side else side + 16


def accepts(ranges, shape) -> bool:
    """Whether a program of input ``ranges`` (``input_ranges``) takes a batch of ``shape`` (N, 3, H, W)."""
    return all(low <= size and (high is None or size <= high) for size, (low, high) in zip(shape, ranges.values()))


def check_options(cfg: DictConfig) -> None:
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format} is not one of {', '.join(FORMATS)}")
    if cfg.num_images < 1 or cfg.batch_size < 1:
        raise ConfigError(f"num_images={cfg.num_images} and batch_size={cfg.batch_size} must be at least 1")
    if not 0.0 <= cfg.min_match <= 1.0:
        raise ConfigError(f"min_match={cfg.min_match} must be a fraction in [0, 1]")


def run(cfg: DictConfig):
    check_options(cfg)
    session = start_run(cfg, "export.log")
    device, run_dir = session.device, session.run_dir
    # the ONNX optimizer's passes log every initializer they merge at INFO
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    recipe = load_recipe(cfg)
    cfg = config_for_checkpoint(cfg, recipe)
    check_config(cfg, ExportConfig)
    session.save_config(cfg)
    loaded = detector_for(cfg, recipe, device)
    images = sample_images(cfg, loaded.transforms)
    detector = ExportableDetector(loaded.model).eval()
    batches = [batch.to(device) for batch in batches_by_size(images, cfg.batch_size)]

    logger.info("tracing with torch.export on the first sample batch, %s", tuple(batches[0].shape))
    program = export_program(detector, batches[0])
    traced, ranges = tuple(program.example_inputs[0][0].shape), input_ranges(program)
    logger.info("traced a %s batch; accepted input sizes: %s", traced, ", ".join(f"{k} {lo}..{hi or 'any'}" for k, (lo, hi) in ranges.items()))
    path = os.path.join(run_dir, FORMATS[cfg.format])
    metadata = detector_metadata(loaded)
    if cfg.format == "onnx":
        from deformable_detr.export.onnx_model import OnnxRunner, export_onnx, foreign_operators

        export_onnx(program, path, metadata)
        foreign = foreign_operators(path)
        if foreign:
            raise RuntimeError(f"{path} uses operators outside standard ONNX: {', '.join(foreign)}")
        exported = OnnxRunner(path)
        engine = "onnxruntime"
    else:
        save_program(program, path, extra_files=metadata)
        exported = load_program(path).module()
        engine = "torch.export"
    logger.info("wrote %s (%.1f MB)", path, os.path.getsize(path) / 2**20)

    # a torch.export program refuses sizes below its ranges (a feature map under two pixels); onnxruntime runs them
    checked, refused = [], []
    for batch in batches:
        (refused if cfg.format == "torch" and not accepts(ranges, batch.shape) else checked).append(batch)
    if refused:
        print(f"not checked: {sum(len(b) for b in refused)} sample image(s) of a size below what {engine} accepts "
              f"(height {ranges['height'][0]}.., width {ranges['width'][0]}..): {sorted({tuple(b.shape[2:]) for b in refused})}")
    verification = verify(detector, exported, checked)
    print(f"{engine} vs PyTorch on {verification.summary()}")
    other = other_shape_batch(images, traced, ranges).to(device)
    dynamic = verify(detector, exported, [other])
    print(f"{engine} vs PyTorch at a shape not traced, {tuple(other.shape)}: {dynamic.summary()}")
    if cfg.latency_runs > 0:
        sample = batches[0][:1]
        seconds = latencies({engine: exported, "PyTorch": detector}, sample, cfg.latency_runs)
        print(
            f"latency on one {tuple(sample.shape[-2:])} image, median of {cfg.latency_runs} alternating runs "
            f"(torch threads: {torch.get_num_threads()}): {engine} {1000 * seconds[engine]:.0f} ms, "
            f"PyTorch ({device.type}) {1000 * seconds['PyTorch']:.0f} ms"
        )
    failed = [(what, check) for what, check in (("sample images", verification), ("the untraced shape", dynamic)) if not check.passed(cfg.min_match)]
    if failed:
        matched = ", ".join(f"{100 * check.match.fraction:.2f}% on {what}" for what, check in failed)
        message = f"the export does not match PyTorch: top-100 detections matched {matched}, below min_match={cfg.min_match}"
        logger.error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    print(f"export verified: {path}")
    return path


TOOL = Tool(
    name="export",
    summary="Export a checkpoint to ONNX (model.onnx) or a torch.export program (model.pt2) and check it against PyTorch "
            "on sample images.",
    arguments="checkpoint=PATH [format=onnx|torch] [input=IMAGE|DIR]",
    schema=ExportConfig,
    run=run,
    required=("checkpoint",),
)
main = TOOL.main


if __name__ == "__main__":
    main()
