#!/usr/bin/env python
"""Evaluate a checkpoint with COCO box AP.

    python tools/eval.py checkpoint=outputs/small/RUN/checkpoint_best.pth
    python tools/eval.py checkpoint=r50_deformable_detr-checkpoint.pth experiment=r50_deformable_detr \
        dataset=coco dataset.root=/data/coco
    torchrun --nproc_per_node 8 tools/eval.py checkpoint=... dataset.root=...

This framework's checkpoints carry their config: without model or dataset overrides, the model
(and data) they were trained with are used. Official release files carry their arguments: without
``experiment=``, the experiment is read from them. Writes ``predictions.json`` (COCO results) and
``metrics.json`` (the 12 COCO stats by name, and ``per_category``: id, name, boxes, AP, AP50, AP75,
APs, APm, APl, AR100 of each category) to hydra.run.dir and prints them.
"""
import os
import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from config_schema import EvalConfig  # importing registers the schemas
import runtime
from checkpoint_model import build_model, checkpoint_num_classes, config_for_checkpoint
from config_checks import check_config

from deformable_detr.errors import ConfigError

from deformable_detr.engine.distributed import init_distributed
from deformable_detr.engine.compilation import check_compiler, compile_detector, compiled_graphs
from deformable_detr.engine.evaluate_loop import evaluate
from deformable_detr.engine.rng import seed_everything
from deformable_detr.engine.precision import AMP_DTYPES
from deformable_detr.evaluation.coco_evaluator import write_json_atomic
from deformable_detr.models.weights import read_checkpoint
from deformable_detr.utils import distributed

logger = runtime.logger


def run(cfg: DictConfig):
    if cfg.amp not in AMP_DTYPES:
        raise ConfigError(f"amp={cfg.amp} is not one of null, bf16, fp16")
    runtime.check_files_exist(cfg, ["checkpoint"])
    device = init_distributed(runtime.resolve_device(cfg.device))
    if cfg.compile:
        check_compiler(device)
    run_dir = runtime.run_directory()
    runtime.setup_logging(run_dir, "eval.log")
    seed_everything(cfg.seed)
    checkpoint = read_checkpoint(cfg.checkpoint)
    cfg = config_for_checkpoint(cfg, checkpoint)
    check_config(cfg, EvalConfig)
    if distributed.is_main_process():
        OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)

    data = runtime.dataset_settings(cfg.dataset)
    root = runtime.dataset_root(data)
    val_set = runtime.build_dataset(data, "val", root, cfg.seed)
    loader = runtime.make_loader(val_set, data.eval_batch_size, data.num_workers, False, cfg.seed, device)
    num_classes = checkpoint_num_classes(cfg, checkpoint, val_set.num_classes)
    if val_set.num_classes > num_classes:
        logger.warning("the dataset has category ids up to %d but the model predicts %d classes", val_set.num_classes - 1, num_classes)
    model, _ = build_model(cfg, checkpoint, device, num_classes)
    if cfg.compile:
        model = compile_detector(model)
    # predictions carry only the val set's category ids (postprocess.restrict_to_dataset_categories)
    postprocess = instantiate(cfg.postprocess, category_ids=val_set.category_ids)
    evaluation = evaluate(model, postprocess, loader, val_set.coco, device, amp=cfg.amp)
    if cfg.compile:
        logger.info("torch.compile: %d graph(s) compiled", compiled_graphs())
    if evaluation is None:
        return None
    write_json_atomic(os.path.join(run_dir, "predictions.json"), evaluation.predictions)
    write_json_atomic(os.path.join(run_dir, "metrics.json"), evaluation.metrics())
    print(evaluation.table)
    logger.info("wrote %s and %s", os.path.join(run_dir, "predictions.json"), os.path.join(run_dir, "metrics.json"))
    return evaluation.stats


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig):
    return runtime.run_reporting_errors(run, cfg)


if __name__ == "__main__":
    runtime.check_command_line("eval", sys.argv[1:])
    main()
