"""Detect objects in images and draw them.

    python tools/infer.py checkpoint=outputs/small/RUN/checkpoint_best.pth input=photos/
    python tools/infer.py checkpoint=r50_deformable_detr-checkpoint.pth input='photos/*.jpg' score_threshold=0.5 device=cuda amp=bf16

``input`` is an image, a folder (its images, sorted by name) or a glob. Any checkpoint tools/eval.py
takes works, with the same preprocessing. Writes to hydra.run.dir one picture per image (``<stem>.jpg``
for JPEG inputs, else ``<stem>.png``, or as ``picture_format`` says: boxes, class names and scores above
``score_threshold``) and ``predictions.json``: per image ``file_name``, ``path``, ``width``, ``height``,
``picture`` and ``detections`` [{category_id, category_name, score, bbox [x, y, w, h] in original pixels}],
best first.
"""
import os
from typing import Dict, List

import torch
from omegaconf import DictConfig

from ..data import collate
from ..data.image_files import ImageFiles, UnreadableImageFileError, list_image_files, read_image
from ..utils.atomic_files import write_json_atomic
from ..inference import Detections
from ..errors import ConfigError
from ..utils.progress_bar import ProgressBar
from ..visualization import render_detections
from . import runtime
from .app import Tool, start_run
from .checkpoint_config import categories_named_on_the_command_line, check_dataset_categories, config_for_checkpoint, detector_for, load_recipe
from .checks import check_config
from .schema import InferConfig

logger = runtime.logger
PICTURE_FORMATS = ("auto", "png", "jpg")
JPEG_EXTENSIONS = (".jpg", ".jpeg")


def picture_names(paths: List[str], picture_format: str) -> List[str]:
    """``<stem>.<extension>`` per path (``auto``: jpg for JPEG inputs, else png), numbered ``<stem>_2`` ...
    where names repeat (a.jpg and a.png as png, or two folders)."""
    seen: Dict[str, int] = {}
    names = []
    for path in paths:
        stem, extension = os.path.splitext(os.path.basename(path))
        if picture_format == "auto":
            extension = "jpg" if extension.lower() in JPEG_EXTENSIONS else "png"
        else:
            extension = picture_format
        name = f"{stem}.{extension}"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{stem}_{seen[name]}.{extension}")
    return names


def detections_json(detections: Detections) -> List[Dict]:
    """JSON detections (category_id, category_name, score, bbox [x, y, w, h] in pixels), best first."""
    return [
        {"category_id": int(label), "category_name": name, "score": round(score, 5),
         "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]}
        for (x0, y0, x1, y1), score, label, name in zip(detections.boxes.tolist(), detections.scores.tolist(),
                                                        detections.labels.tolist(), detections.names)
    ]


def one_line(error: UnreadableImageFileError) -> str:
    """A worker's error comes back with the worker's traceback in its message: keep the original message."""
    last = str(error).strip().splitlines()[-1]
    prefix = f"{UnreadableImageFileError.__name__}: "
    return last.split(prefix, 1)[1] if prefix in last else last


def check_options(cfg: DictConfig) -> None:
    if cfg.picture_format not in PICTURE_FORMATS:
        raise ConfigError(f"picture_format={cfg.picture_format} is not one of {', '.join(PICTURE_FORMATS)}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be at least 1")


def run(cfg: DictConfig):
    check_options(cfg)
    session = start_run(cfg, "infer.log")
    # the images first: a wrong input= fails before the model is built
    paths = list_image_files(str(cfg.input))
    recipe = load_recipe(cfg)
    cfg = config_for_checkpoint(cfg, recipe)
    check_config(cfg, InferConfig)
    session.save_config(cfg)
    detector = detector_for(cfg, recipe, session.device)
    expected = categories_named_on_the_command_line(cfg)
    if expected is not None:
        check_dataset_categories(recipe, expected, "the dataset named on the command line")
    pictures = picture_names(paths, cfg.picture_format)
    dataset = ImageFiles(paths, detector.transforms, skip_unreadable=cfg.skip_unreadable)
    # worker processes only pay off when there is more than one image to decode
    workers = cfg.num_workers if len(paths) > 1 else 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate, num_workers=workers)
    logger.info("%d image(s) from input=%s on %s (%s); writing to %s", len(paths), cfg.input, session.device,
                runtime.precision_name(cfg.amp), session.run_dir)

    predictions, best = [], 0.0
    progress = ProgressBar(len(paths), prefix="[infer]", logger=logger)
    try:
        for images, masks, targets in loader:
            if not targets:  # every image of the batch was skipped as unreadable
                progress.update(cfg.batch_size)
                continue
            sizes = torch.stack([t["orig_size"] for t in targets])
            outputs = detector.forward(images, masks)
            every = detector.postprocess(outputs, sizes, score_threshold=-1.0)
            for target, result in zip(targets, every):
                index = int(target["index"])
                best = max([best] + result.scores[:1].tolist())
                kept = _above(result, cfg.score_threshold)
                # drawn on the decoded original (the loader hands over only the resized, normalized tensor)
                picture = render_detections(read_image(paths[index]), kept.boxes, kept.labels, kept.scores, detector.names)
                picture.save(os.path.join(session.run_dir, pictures[index]), quality=92)
                height, width = result.image_size
                predictions.append({"file_name": os.path.basename(paths[index]), "path": paths[index], "width": width, "height": height,
                                    "picture": pictures[index], "detections": detections_json(kept)})
            progress.update(cfg.batch_size)
    except UnreadableImageFileError as error:
        raise UnreadableImageFileError(one_line(error)) from None
    finally:
        progress.close()
    write_json_atomic(os.path.join(session.run_dir, "predictions.json"), predictions)
    skipped = dataset.skipped.value
    count = sum(len(p["detections"]) for p in predictions)
    logger.info("%d picture(s), %d detection(s) above %g%s; wrote %s", len(predictions), count, cfg.score_threshold,
                f", {skipped} unreadable image(s) skipped" if skipped else "", os.path.join(session.run_dir, "predictions.json"))
    if predictions and count == 0:
        logger.warning("no detection scored above score_threshold=%g (the best scored %.3f); lower it, e.g. score_threshold=%.2g",
                       cfg.score_threshold, best, max(best * 0.9, 0.001))
    return predictions


def _above(detections: Detections, threshold: float) -> Detections:
    keep = detections.scores > threshold
    return Detections(detections.boxes[keep], detections.scores[keep], detections.labels[keep],
                      [name for name, k in zip(detections.names, keep.tolist()) if k], detections.image_size)


TOOL = Tool(
    name="infer",
    summary="Detect objects in images with a checkpoint (this framework's or an official release file); draw them "
            "and write predictions.json.",
    arguments="checkpoint=PATH input=IMAGE|DIR|GLOB",
    schema=InferConfig,
    run=run,
    required=("checkpoint", "input"),
    keys=(("postprocess.num_select=N", "detections per image before the threshold (100)"),
          ("postprocess.restrict_to_dataset_categories=false", "the official top-k over every logit")),
)
main = TOOL.main


if __name__ == "__main__":
    main()
