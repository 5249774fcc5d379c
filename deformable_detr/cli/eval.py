"""Evaluate a checkpoint with COCO box AP.

    python tools/eval.py checkpoint=outputs/small/RUN/checkpoint_best.pth
    python tools/eval.py checkpoint=r50_deformable_detr-checkpoint.pth dataset=coco dataset.root=/data/coco
    torchrun --nproc_per_node 8 tools/eval.py checkpoint=... dataset.root=...

This framework's checkpoints carry their config: without model or dataset overrides, the model
(and data) they were trained with are used. Official release files carry their arguments: without
``experiment=``, the experiment is read from them. Writes ``predictions.json`` (COCO results) and
``metrics.json`` (the 12 COCO stats by name; ``per_category``: id, name, boxes, AP, AP50, AP75, APs,
APm, APl, AR100 of each category; and what was measured: the checkpoint, the precision, the
dataset) to hydra.run.dir and prints them.
"""
import os

from omegaconf import DictConfig

from ..engine.compilation import compiled_graphs
from ..engine.evaluate_loop import evaluate
from ..utils.atomic_files import write_json_atomic
from ..models import PostProcess
from . import runtime
from .app import Tool, start_run
from .checkpoint_config import check_dataset_categories, config_for_checkpoint, detector_for, load_recipe
from .checks import check_config
from .schema import EvalConfig

logger = runtime.logger


def run(cfg: DictConfig):
    runtime.check_files_exist(cfg, ["checkpoint"])
    session = start_run(cfg, "eval.log", processes=True)
    recipe = load_recipe(cfg)
    cfg = config_for_checkpoint(cfg, recipe)
    check_config(cfg, EvalConfig)
    session.save_config(cfg)

    # the model first: weights of another recipe fail before any data is read
    detector = detector_for(cfg, recipe, session.device)
    data = runtime.dataset_settings(cfg.dataset)
    root = runtime.dataset_root(data)
    val_set = runtime.build_dataset(data, "val", root, cfg.seed)
    loader = runtime.make_loader(val_set, data.eval_batch_size, data.num_workers, False, cfg.seed, session.device)
    check_dataset_categories(recipe, val_set.coco.loadCats(val_set.category_ids), f"the val set ({val_set.annotation_file})")
    logger.info("evaluating %s (%s%s) on %s in %s", recipe.path, "official " if recipe.official else "", recipe.name, session.device,
                runtime.precision_name(cfg.amp))
    # predictions carry only the val set's category ids (postprocess.restrict_to_dataset_categories)
    postprocess = PostProcess(cfg.postprocess.num_select, cfg.postprocess.restrict_to_dataset_categories, val_set.category_ids,
                              logit_ids=recipe.layout.logit_ids)
    evaluation = evaluate(detector.forward_model, postprocess, loader, val_set.coco, session.device, amp=cfg.amp)
    if cfg.compile:
        logger.info("torch.compile: %d graph(s) compiled", compiled_graphs())
    if evaluation is None:
        return None
    metrics = dict(evaluation.metrics(), **runtime.provenance(recipe, cfg.amp, val_set))
    write_json_atomic(os.path.join(session.run_dir, "predictions.json"), evaluation.predictions)
    write_json_atomic(os.path.join(session.run_dir, "metrics.json"), metrics)
    print(evaluation.table)
    logger.info("wrote %s and %s", os.path.join(session.run_dir, "predictions.json"), os.path.join(session.run_dir, "metrics.json"))
    return evaluation.stats


TOOL = Tool(
    name="eval",
    summary="Evaluate a checkpoint (this framework's or an official release file) with COCO box AP on a COCO-format val set.",
    arguments="checkpoint=PATH",
    schema=EvalConfig,
    run=run,
    required=("checkpoint",),
    keys=(
        ("dataset=coco dataset.root=DIR", "a COCO-format dataset (DIR/val2017, DIR/annotations/instances_val2017.json)"),
        ("dataset=yolo dataset.root=DIR", "a YOLO-format dataset (DIR/data.yaml, DIR/images/val, DIR/labels/val)"),
        ("dataset.eval_batch_size=N", "images per process and step"),
        ("postprocess.num_select=N", "detections kept per image (100)"),
        ("postprocess.restrict_to_dataset_categories=false", "the official top-k over every logit"),
    ),
)
main = TOOL.main


if __name__ == "__main__":
    main()
