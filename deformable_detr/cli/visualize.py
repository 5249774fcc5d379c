"""Where deformable attention samples: sampling points of one image, drawn and summarized.

    python tools/visualize.py checkpoint=outputs/small/RUN/checkpoint_best.pth input=photo.jpg
    python tools/visualize.py checkpoint=... input=photo.jpg layer=0 queries=[3,17] points=[[120,80]] colour_by=head

Decoder view: for the ``top_k`` best detections (or ``queries=[...]``), the reference point (cross) and the
sampling points of decoder layer ``layer`` on every level, with the predicted box: ``decoder_query<k>.png``
per query and ``decoder_overview.png``. Encoder view: the same for the finest-level encoder query nearest
each of ``points=[[x, y], ...]`` (original pixels; default: the centres of those detections):
``encoder_point<i>.png`` and ``encoder_overview.png``. Statistics of every layer: printed and written to
``sampling_stats.json``. All in hydra.run.dir.
"""
import os
from typing import Dict, List, Tuple

import torch
from omegaconf import DictConfig

from ..data.image_files import list_image_files, read_image
from ..errors import ConfigError
from ..utils.atomic_files import write_json_atomic
from ..models import record_sampling
from ..utils.box_ops import box_cxcywh_to_xyxy
from ..visualization import encoder_query_at, render_sampling, sampling_statistics, tile
from . import runtime
from .app import Tool, start_run
from .checkpoint_config import config_for_checkpoint, detector_for, load_recipe
from .checks import check_config
from .schema import VisualizeConfig

logger = runtime.logger


def pick_layer(records, stack: str, index: int, key: str):
    """The record of ``<stack>.layers.<index>`` (negative counts from the last)."""
    layers = [r for r in records if r.layer.startswith(f"{stack}.layers.")]
    if not -len(layers) <= index < len(layers):
        raise ConfigError(f"{key}={index} is out of range: the {stack} has {len(layers)} layers (0..{len(layers) - 1}, or -1 for the last)")
    return layers[index]


def chosen_queries(cfg: DictConfig, scores: torch.Tensor) -> List[int]:
    """``queries=[...]`` as given, else the ``top_k`` queries by their best class score."""
    if cfg.queries is not None:
        bad = [q for q in cfg.queries if not 0 <= q < len(scores)]
        if bad:
            raise ConfigError(f"queries={list(cfg.queries)}: {bad} out of range; the model has {len(scores)} queries (0..{len(scores) - 1})")
        return [int(q) for q in cfg.queries]
    if cfg.top_k < 1:
        raise ConfigError(f"top_k={cfg.top_k} must be at least 1 (or give queries=[...])")
    return torch.argsort(scores, descending=True)[: cfg.top_k].tolist()


def stats_table(stats: Dict[str, Dict]) -> str:
    header = f"{'layer':<18} {'queries':>7}  {'offset px mean (max) per level':<40} {'w max':>6} {'entropy':>7} {'w<1e-3':>7} {'outside':>7}"
    lines = [header, "-" * len(header)]
    for layer, s in stats.items():
        offsets = " ".join(f"{v['mean']:.1f}({v['max']:.0f})" for v in s["offset_pixels"].values())
        weights = s["attention_weights"]
        lines.append(f"{layer:<18} {s['queries']:>7}  {offsets:<40} {weights['max']:>6.3f} {weights['entropy']:>7.3f} "
                     f"{weights['near_zero_share']:>7.1%} {s['outside_share']:>7.1%}")
    return "\n".join(lines)


def run(cfg: DictConfig):
    if cfg.colour_by not in ("level", "head"):
        raise ConfigError(f"colour_by={cfg.colour_by} is not one of level, head")
    session = start_run(cfg, "visualize.log")
    run_dir = session.run_dir
    paths = list_image_files(str(cfg.input))
    if len(paths) != 1:
        raise ConfigError(f"input={cfg.input} names {len(paths)} images; tools/visualize.py draws one image (tools/infer.py takes many)")
    recipe = load_recipe(cfg)
    cfg = config_for_checkpoint(cfg, recipe)
    check_config(cfg, VisualizeConfig)
    session.save_config(cfg)
    detector = detector_for(cfg, recipe, session.device)
    path = paths[0]
    image = read_image(path)
    width, height = image.size
    images, masks, _ = detector.preprocess([image])
    with record_sampling(detector.model) as records:
        outputs = detector.forward(images, masks)

    probabilities = outputs["pred_logits"][0].sigmoid().cpu()  # (Q, K)
    scores, labels = probabilities.max(-1)
    labels = detector.layout.ids_of(labels)  # logit indices -> category ids
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"][0].cpu()) * torch.tensor([width, height, width, height], dtype=torch.float32)
    queries = chosen_queries(cfg, scores)
    names = detector.names

    decoder = pick_layer(records, "decoder", cfg.layer, "layer")
    panels = []
    for query in queries:
        label, score = int(labels[query]), float(scores[query])
        title = f"{decoder.layer} query {query}: {names.get(label, label)} {score:.2f}"
        panel = render_sampling(image, decoder, query, colour_by=cfg.colour_by, box_xyxy=boxes[query].tolist(), label=label, title=title)
        panel.save(os.path.join(run_dir, f"decoder_query{query}.png"))
        panels.append(panel)
    tile(panels, columns=2).save(os.path.join(run_dir, "decoder_overview.png"))

    encoder = pick_layer(records, "encoder", cfg.encoder_layer, "encoder_layer")
    points: List[Tuple[float, float]] = [tuple(p) if hasattr(p, "__len__") else (p,) for p in cfg.points] if cfg.points is not None else [
        (float(boxes[q, 0] + boxes[q, 2]) / 2, float(boxes[q, 1] + boxes[q, 3]) / 2) for q in queries]
    if any(len(p) != 2 or not all(isinstance(v, (int, float)) for v in p) for p in points):
        raise ConfigError(f"points={cfg.points} must be a list of [x, y] pixel pairs, e.g. points=[[120,80],[40,60]]")
    panels = []
    for index, (x, y) in enumerate(points):
        x, y = min(max(float(x), 0.0), width - 1.0), min(max(float(y), 0.0), height - 1.0)
        query = encoder_query_at(encoder, x, y, width, height)
        title = f"{encoder.layer} pixel ({x:.0f}, {y:.0f}): query {query}"
        panel = render_sampling(image, encoder, query, colour_by=cfg.colour_by, title=title)
        panel.save(os.path.join(run_dir, f"encoder_point{index}.png"))
        panels.append(panel)
    if panels:
        tile(panels, columns=2).save(os.path.join(run_dir, "encoder_overview.png"))

    stats = {record.layer: sampling_statistics(record) for record in records}
    print(stats_table(stats))
    write_json_atomic(os.path.join(run_dir, "sampling_stats.json"), {"image": path, "width": width, "height": height, "layers": stats})
    logger.info("decoder queries %s, encoder points %s: pictures and sampling_stats.json in %s", queries, [tuple(round(v) for v in p) for p in points], run_dir)
    return stats


TOOL = Tool(
    name="visualize",
    summary="Where deformable attention samples: the sampling points of the best detections (decoder) and of "
            "chosen pixels (encoder) of one image, drawn, and per-layer statistics in sampling_stats.json.",
    arguments="checkpoint=PATH input=IMAGE",
    schema=VisualizeConfig,
    run=run,
    required=("checkpoint", "input"),
)
main = TOOL.main


if __name__ == "__main__":
    main()
