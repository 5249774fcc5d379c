"""Train Deformable DETR.

    python tools/train.py                                   # small recipe, synthetic data, CPU-friendly
    python tools/train.py experiment=r50_deformable_detr dataset.root=/data/coco
    torchrun --nproc_per_node 8 tools/train.py experiment=... dataset.root=... hydra.run.dir=outputs/run1
    python tools/train.py hydra.run.dir=outputs/run1        # resumes outputs/run1 where it stopped

The run directory (hydra.run.dir) receives the composed config, logs, TensorBoard events,
checkpoints (last, best, every N epochs), metrics.json and predictions.json. SIGTERM or Ctrl-C
stops a run after the current step with a checkpoint and exit status 128 + the signal's number
(143, 130); a run that finishes, or stops at trainer.max_steps, exits 0.
"""
import os
import signal
import sys

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..engine.checkpoint import find_resume, load_resumable, refuse_to_overwrite, remove_stale_temporaries
from ..engine.precision import check_fp32_precision, resolve_amp, set_fp32_precision
from ..engine.stop_request import stop_exit_status
from ..engine.trainer import Trainer, TrainingData, TrainingParts
from ..inference.checkpoint_recipe import class_rows_by_name
from ..models.weights import load_weights, read_checkpoint
from ..utils import distributed
from ..utils.category_layout import CategoryLayout
from . import runtime
from .app import Run, Tool, start_run
from .checks import check_config
from .schema import TrainConfig

logger = runtime.logger


def train(cfg: DictConfig):
    # every check that needs no data or model comes first
    check_config(cfg, TrainConfig)
    settings = runtime.build(cfg.trainer)
    runtime.check_files_exist(cfg, ["resume", "init_weights"])
    data = runtime.dataset_settings(cfg.dataset)
    check_fp32_precision(settings.fp32_precision, torch.device(runtime.resolve_device(cfg.device)))
    session = start_run(cfg, "train.log", processes=True, lock=True)
    device, run_dir = session.device, session.run_dir
    requested_amp, settings.amp = settings.amp, resolve_amp(settings.amp, device)
    set_fp32_precision(settings.fp32_precision, device)
    prepare_run_directory(cfg, session)
    if requested_amp == "auto":
        logger.info("trainer.amp=auto: %s on this %s", settings.amp or "float32 (no autocast)", device.type)
    if settings.fp32_precision is not None:
        logger.info("trainer.fp32_precision=%s: float32 matrix products and convolutions %s", settings.fp32_precision,
                    "exact" if settings.fp32_precision == "ieee" else f"with {settings.fp32_precision} inputs")
    logger.info("run directory %s; %s on %d process(es), device %s", run_dir, cfg.name, distributed.get_world_size(), device)

    root = runtime.dataset_root(data)
    train_set = runtime.build_dataset(data, "train", root, cfg.seed)
    val_set = runtime.build_dataset(data, "val", root, cfg.seed)
    layout = runtime.category_layout(data, train_set, val_set)
    num_classes = layout.num_logits
    train_loader = runtime.make_loader(train_set, data.batch_size, data.num_workers, True, cfg.seed, device,
                                       data.size_group_window, data.train_pad_multiple)
    val_loader = runtime.make_loader(val_set, data.eval_batch_size, data.num_workers, False, cfg.seed, device)
    logger.info("data: %d train / %d val images, %s, %d steps per epoch%s",
                len(train_set), len(val_set), runtime.describe_categories(train_set.coco, layout), len(train_loader),
                runtime.describe_grouping(train_loader) + runtime.describe_padding(data.train_pad_multiple))

    categories = [{"id": int(c["id"]), "name": c["name"]} for c in train_set.coco.loadCats(train_set.coco.getCatIds())]
    parts = build_parts(cfg, settings, layout, categories, val_set.category_ids, iters_per_epoch=len(train_loader) // settings.accumulate_steps,
                        device=device)
    writer = None
    if distributed.is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    trainer = Trainer(
        parts, TrainingData(train_loader, val_loader, val_set.coco), settings, run_dir, device, writer=writer, seed=cfg.seed,
        extra_state={"config": OmegaConf.to_container(cfg, resolve=True), "num_classes": num_classes, "categories": categories,
                     "category_layout": layout.to_dict()},
    )
    resume_or_start(cfg, trainer, run_dir)
    stats = trainer.fit()
    if writer is not None:
        writer.close()
    if session.lock is not None:
        session.lock.release()
    if trainer.stop_signal is not None:
        exit_stopped(trainer.stop_signal)
    if stats is not None:
        logger.info("final COCO box AP %.4f (AP50 %.4f); %s", stats["AP"], stats["AP50"], run_dir)
    return stats


def exit_stopped(signum: int) -> None:
    """End a run that signal ``signum`` stopped, its checkpoint written, with ``stop_exit_status(signum)``:
    all ranks together and deaf to SIGTERM by now, as torchrun's agent terminates the ranks still
    running once one has exited, which would turn their status into a kill."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    distributed.barrier()
    sys.exit(stop_exit_status(signum))


def prepare_run_directory(cfg: DictConfig, session: Run) -> None:
    """The composed config saved and what interrupted saves left removed, by the process holding
    the run directory's lock."""
    if session.lock is None:
        return
    session.save_config(cfg)
    removed = remove_stale_temporaries(session.run_dir)
    if removed:
        logger.info("removed %d temporary file(s) (%.1f MB) left by interrupted checkpoint saves: %s", len(removed),
                    sum(size for _, size in removed) / 1e6, ", ".join(os.path.basename(path) for path, _ in removed))


def build_parts(cfg: DictConfig, settings, layout: CategoryLayout, categories, category_ids, iters_per_epoch: int,
                device: torch.device) -> TrainingParts:
    """The model (with ``init_weights`` loaded: into other categories, each starting from the rows
    of the checkpoint's category of the same name), loss, post-processing and optimization state."""
    num_classes = layout.num_logits
    model = runtime.build(cfg.model, num_classes=num_classes).to(device)
    if cfg.init_weights:
        source = read_checkpoint(cfg.init_weights, "init_weights")
        rows = class_rows_by_name(source, categories, layout, cfg.init_weights)
        report = load_weights(model, cfg.init_weights, allow_new_classes=True, checkpoint=source, key="init_weights", class_rows=rows)
        logger.info("initialized from %s (%s)%s", cfg.init_weights, report.recipe.name(), "".join(f"; {m}" for m in report.messages))
        if rows is not None:
            logger.info("init_weights: %d of the dataset's %d categories start from the checkpoint's category of the same name",
                        len(rows), len(categories))
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model %s: %.1fM parameters (%.1fM trainable)", cfg.name, parameters / 1e6, trainable / 1e6)
    optimizer = instantiate(cfg.optimizer)(model)
    parts = TrainingParts(
        model=model,
        criterion=instantiate(cfg.criterion, num_classes=num_classes),
        postprocess=instantiate(cfg.postprocess, category_ids=category_ids, logit_ids=layout.logit_ids),
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


TOOL = Tool(
    name="train",
    summary="Train Deformable DETR, evaluating as it goes. With no arguments it trains the small recipe on the "
            "built-in synthetic set and evaluates it.",
    arguments="",
    schema=TrainConfig,
    run=train,
    keys=(
        ("dataset=coco dataset.root=DIR", "a COCO-format dataset (DIR/{train2017,val2017}, DIR/annotations/)"),
        ("dataset=yolo dataset.root=DIR", "a YOLO-format dataset (DIR/data.yaml, DIR/images/{train,val}, DIR/labels/{train,val})"),
        ("dataset.batch_size=N", "images per process and step (dataset.eval_batch_size for evaluation)"),
        ("trainer.epochs=N", "epochs in total (schedule.milestones=[..] where the rate drops)"),
        ("trainer.amp=null|bf16|fp16|auto", "mixed precision"),
        ("trainer.fp32_precision=bf16|tf32", "float32 products and convolutions in bfloat16 (CPU) or TF32 (CUDA)"),
        ("trainer.compile=true", "torch.compile the detector (faster after the first steps)"),
        ("trainer.max_steps=N", "stop with a checkpoint after N steps in total"),
        ("trainer.checkpoint_every_steps=N", "also checkpoint within epochs"),
        ("trainer.ema_decay=0.9998", "evaluate and keep an exponential moving average of the weights"),
        ("optimizer.lr=X", "learning rate (optimizer.lr_backbone for the backbone)"),
        ("model.*, criterion.*", "architecture and losses (see configs/model, configs/criterion)"),
    ),
)
main = TOOL.main


if __name__ == "__main__":
    main()
