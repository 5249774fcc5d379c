#!/usr/bin/env python
"""Detect objects in images and draw them.

    python tools/infer.py checkpoint=outputs/small/RUN/checkpoint_best.pth input=photos/
    python tools/infer.py checkpoint=r50_deformable_detr-checkpoint.pth input='photos/*.jpg' score_threshold=0.5 device=cuda amp=bf16

``input`` is an image, a folder (its images, sorted by name) or a glob. Any checkpoint tools/eval.py
takes works, with the same preprocessing. Writes to hydra.run.dir one picture per image (``<stem>.png``
or ``.jpg``: boxes, class names and scores above ``score_threshold``) and ``predictions.json``: per
image ``file_name``, ``path``, ``width``, ``height``, ``picture`` and ``detections``
[{category_id, category_name, score, bbox [x, y, w, h] in original pixels}], best first.
"""
import dataclasses
import os
import sys
from typing import Dict, List

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from config_schema import InferConfig  # importing registers the schemas
import runtime
from checkpoint_model import load_predictor
from config_checks import ConfigError

from deformable_detr.data import collate
from deformable_detr.data.image_files import ImageFiles, UnreadableImageFileError, list_image_files, read_image
from deformable_detr.engine.compilation import check_compiler, compile_detector
from deformable_detr.engine.rng import seed_everything
from deformable_detr.evaluation.coco_evaluator import write_json_atomic
from deformable_detr.utils.progress_bar import ProgressBar
from deformable_detr.visualization import render_detections

logger = runtime.logger


def picture_names(paths: List[str], extension: str) -> List[str]:
    """``<stem>.<extension>`` per path, numbered ``<stem>_2`` ... where stems repeat (a.jpg and a.png, or two folders)."""
    seen: Dict[str, int] = {}
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.{extension}" if seen[stem] == 1 else f"{stem}_{seen[stem]}.{extension}")
    return names


def detections_of(result: Dict[str, torch.Tensor], names: Dict[int, str], threshold: float) -> List[Dict]:
    """Post-processed ``scores``, ``labels``, ``boxes`` (xyxy pixels) -> JSON detections above ``threshold``, best first."""
    keep = result["scores"] > threshold
    detections = []
    for score, label, (x0, y0, x1, y1) in zip(result["scores"][keep].tolist(), result["labels"][keep].tolist(), result["boxes"][keep].tolist()):
        detections.append({
            "category_id": int(label), "category_name": names.get(int(label), str(label)),
            "score": round(score, 5), "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
        })
    return detections


def one_line(error: UnreadableImageFileError) -> str:
    """A worker's error comes back with the worker's traceback in its message: keep the original message."""
    last = str(error).strip().splitlines()[-1]
    prefix = f"{UnreadableImageFileError.__name__}: "
    return last.split(prefix, 1)[1] if prefix in last else last


def run(cfg: DictConfig):
    run_dir = runtime.run_directory()
    runtime.setup_logging(run_dir, "infer.log")
    seed_everything(cfg.seed)
    # the images first: a wrong input= fails before the model is built
    paths = list_image_files(str(cfg.input))
    predictor = load_predictor(cfg, "infer", InferConfig)
    cfg = predictor.cfg
    if cfg.compile:
        check_compiler(predictor.device)
        predictor = dataclasses.replace(predictor, model=compile_detector(predictor.model))
    if cfg.picture_format not in ("png", "jpg"):
        raise ConfigError(f"picture_format={cfg.picture_format} is not one of png, jpg")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be at least 1")
    OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)
    pictures = picture_names(paths, cfg.picture_format)
    dataset = ImageFiles(paths, predictor.transforms, skip_unreadable=cfg.skip_unreadable)
    # worker processes only pay off when there is more than one image to decode
    workers = cfg.num_workers if len(paths) > 1 else 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate, num_workers=workers)
    logger.info("%d image(s) from input=%s on %s; writing to %s", len(paths), cfg.input, predictor.device, run_dir)

    names = predictor.names
    predictions = []
    progress = ProgressBar(len(paths), prefix="[infer]", logger=logger)
    try:
        for images, masks, targets in loader:
            if not targets:  # every image of the batch was skipped as unreadable
                progress.update(cfg.batch_size)
                continue
            outputs = predictor(images, masks)
            results = predictor.postprocess(outputs, torch.stack([t["orig_size"] for t in targets]).to(predictor.device))
            for target, result in zip(targets, results):
                index = int(target["index"])
                result = {k: v.cpu() for k, v in result.items()}
                height, width = target["orig_size"].tolist()
                keep = result["scores"] > cfg.score_threshold
                # drawn on the decoded original (the loader hands over only the resized, normalized tensor)
                picture = render_detections(read_image(paths[index]), result["boxes"][keep], result["labels"][keep], result["scores"][keep], names)
                picture.save(os.path.join(run_dir, pictures[index]), quality=92)
                predictions.append({"file_name": os.path.basename(paths[index]), "path": paths[index], "width": width, "height": height,
                                    "picture": pictures[index], "detections": detections_of(result, names, cfg.score_threshold)})
            progress.update(cfg.batch_size)
    except UnreadableImageFileError as error:
        raise UnreadableImageFileError(one_line(error)) from None
    finally:
        progress.close()
    write_json_atomic(os.path.join(run_dir, "predictions.json"), predictions)
    skipped = dataset.skipped.value
    count = sum(len(p["detections"]) for p in predictions)
    logger.info("%d picture(s), %d detection(s) above %g%s; wrote %s", len(predictions), count, cfg.score_threshold,
                f", {skipped} unreadable image(s) skipped" if skipped else "", os.path.join(run_dir, "predictions.json"))
    return predictions


@hydra.main(version_base="1.3", config_path="../configs", config_name="infer")
def main(cfg: DictConfig):
    return runtime.run_reporting_errors(run, cfg)


if __name__ == "__main__":
    runtime.check_command_line("infer", sys.argv[1:])
    main()
