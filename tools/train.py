#!/usr/bin/env python
"""Train Deformable DETR.

    python tools/train.py                                   # small recipe, synthetic data, CPU-friendly
    python tools/train.py experiment=r50_deformable_detr dataset.root=/data/coco
    torchrun --nproc_per_node 8 tools/train.py experiment=... dataset.root=... hydra.run.dir=outputs/run1
    python tools/train.py hydra.run.dir=outputs/run1        # resumes outputs/run1 where it stopped

The run directory (hydra.run.dir) receives the composed config, logs, TensorBoard events,
checkpoints (last, best, every N epochs), metrics.json and predictions.json.
"""
import os
import sys

import hydra
import runtime
import torch
from config_checks import check_config
from config_schema import TrainConfig  # importing registers the schemas
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from deformable_detr.engine.checkpoint import find_resume, load_resumable, refuse_to_overwrite, remove_stale_temporaries
from deformable_detr.engine.distributed import init_distributed
from deformable_detr.engine.precision import set_fp32_precision
from deformable_detr.engine.rng import seed_everything
from deformable_detr.engine.run_lock import RunLock
from deformable_detr.engine.trainer import Trainer, TrainingData, TrainingParts, resolve_amp
from deformable_detr.models.weights import load_weights
from deformable_detr.utils import distributed

logger = runtime.logger


def train(cfg: DictConfig):
    # every check that needs no data or model comes first
    check_config(cfg, TrainConfig)
    settings = runtime.build(cfg.trainer)
    runtime.check_files_exist(cfg, ["resume", "init_weights"])
    data = runtime.dataset_settings(cfg.dataset)
    device = init_distributed(runtime.resolve_device(cfg.device))
    requested_amp, settings.amp = settings.amp, resolve_amp(settings.amp, device)
    set_fp32_precision(settings.fp32_precision, device)
    run_dir, lock = open_run_directory(cfg)
    if requested_amp == "auto":
        logger.info("trainer.amp=auto: %s on this %s", settings.amp or "float32 (no autocast)", device.type)
    if settings.fp32_precision is not None:
        logger.info("trainer.fp32_precision=%s: float32 matrix products and convolutions %s", settings.fp32_precision,
                    "exact" if settings.fp32_precision == "ieee" else f"with {settings.fp32_precision} inputs")
    logger.info("run directory %s; %s on %d process(es), device %s", run_dir, cfg.name, distributed.get_world_size(), device)
    seed_everything(cfg.seed + distributed.get_rank())

    root = runtime.dataset_root(data)
    train_set = runtime.build_dataset(data, "train", root, cfg.seed)
    val_set = runtime.build_dataset(data, "val", root, cfg.seed)
    num_classes = runtime.num_classes_of(data, train_set, val_set)
    train_loader = runtime.make_loader(train_set, data.batch_size, data.num_workers, True, cfg.seed, device,
                                       data.size_group_window, data.train_pad_multiple)
    val_loader = runtime.make_loader(val_set, data.eval_batch_size, data.num_workers, False, cfg.seed, device)
    logger.info("data: %d train / %d val images, %s, %d steps per epoch%s",
                len(train_set), len(val_set), runtime.describe_categories(train_set.coco, num_classes), len(train_loader),
                runtime.describe_grouping(train_loader) + runtime.describe_padding(data.train_pad_multiple))

    parts = build_parts(cfg, settings, num_classes, val_set.category_ids, iters_per_epoch=len(train_loader) // settings.accumulate_steps, device=device)
    writer = None
    if distributed.is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    categories = [{"id": int(c["id"]), "name": c["name"]} for c in train_set.coco.loadCats(train_set.coco.getCatIds())]
    trainer = Trainer(
        parts, TrainingData(train_loader, val_loader, val_set.coco), settings, run_dir, device, writer=writer, seed=cfg.seed,
        extra_state={"config": OmegaConf.to_container(cfg, resolve=True), "num_classes": num_classes, "categories": categories},
    )
    resume_or_start(cfg, trainer, run_dir)
    stats = trainer.fit()
    if writer is not None:
        writer.close()
    if lock is not None:
        lock.release()
    if stats is not None:
        logger.info("final COCO box AP %.4f (AP50 %.4f); %s", stats["AP"], stats["AP50"], run_dir)
    return stats


def open_run_directory(cfg: DictConfig):
    """The run directory, locked by the process that writes checkpoints (until it exits), with
    the composed config saved and what interrupted saves left removed; returns (dir, lock or None)."""
    run_dir = runtime.run_directory()
    lock = RunLock(run_dir).acquire() if distributed.is_main_process() else None
    runtime.setup_logging(run_dir, "train.log")
    if lock is not None:
        OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)
        removed = remove_stale_temporaries(run_dir)
        if removed:
            logger.info("removed %d temporary file(s) (%.1f MB) left by interrupted checkpoint saves: %s", len(removed),
                        sum(size for _, size in removed) / 1e6, ", ".join(os.path.basename(path) for path, _ in removed))
    return run_dir, lock


def build_parts(cfg: DictConfig, settings, num_classes: int, category_ids, iters_per_epoch: int, device: torch.device) -> TrainingParts:
    """The model (with ``init_weights`` loaded), loss, post-processing and optimization state."""
    model = runtime.build(cfg.model, num_classes=num_classes).to(device)
    if cfg.init_weights:
        report = load_weights(model, cfg.init_weights, allow_new_classes=True, key="init_weights")
        logger.info("initialized from %s (%s)%s", cfg.init_weights, report.recipe.name(), "".join(f"; {m}" for m in report.messages))
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model %s: %.1fM parameters (%.1fM trainable)", cfg.name, parameters / 1e6, trainable / 1e6)
    optimizer = instantiate(cfg.optimizer)(model)
    parts = TrainingParts(
        model=model,
        criterion=instantiate(cfg.criterion, num_classes=num_classes),
        postprocess=instantiate(cfg.postprocess, category_ids=category_ids),
        optimizer=optimizer,
        scheduler=instantiate(cfg.schedule)(optimizer, iters_per_epoch=iters_per_epoch),
        scaler=torch.amp.GradScaler(device.type) if settings.amp == "fp16" else None,
    )
    if distributed.get_world_size() > 1:
        parts.train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=cfg.find_unused_parameters
        )
    return parts


def resume_or_start(cfg: DictConfig, trainer: Trainer, run_dir: str) -> None:
    """Continue from ``resume`` (auto: the run directory's newest usable checkpoint); a run that
    starts from scratch may not replace an earlier run's checkpoints unless ``overwrite=true``."""
    resume = None
    if cfg.resume == "auto":
        resume = find_resume(run_dir)
    elif cfg.resume:
        resume = load_resumable(cfg.resume)
        resume["path"] = cfg.resume
    if resume is not None:
        trainer.load_state_dict(resume)
    elif not cfg.overwrite:
        refuse_to_overwrite(run_dir)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig):
    return runtime.run_reporting_errors(train, cfg)


if __name__ == "__main__":
    runtime.check_command_line("train", sys.argv[1:])
    main()
