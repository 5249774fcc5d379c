"""The fine-tuning recipe and early stopping."""
import torch

from cli import assert_ok, compose_config, run_tool_in_process, tiny


def test_the_finetune_recipe_is_r50_with_a_short_schedule_ema_and_early_stopping():
    cfg = compose_config("train", ["experiment=finetune"])
    official = compose_config("train", ["experiment=r50_deformable_detr"])
    assert cfg.model == official.model and cfg.dataset.kind == "coco"
    assert (cfg.trainer.epochs, cfg.trainer.ema_decay, cfg.trainer.early_stopping_patience) == (30, 0.998, 5)
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.lr_backbone == 1e-5


def test_early_stopping_keeps_the_best_and_says_why(tmp_path):
    run = tmp_path / "run"
    # an improvement of more than 1 AP is impossible: the second evaluation stops the run
    arguments = tiny(run, tmp_path / "data", "trainer.epochs=4", "trainer.eval_every=1", "trainer.ema_decay=0.9",
                     "trainer.early_stopping_patience=1", "trainer.early_stopping_min_delta=1.0")
    result = run_tool_in_process("train", *arguments)
    assert_ok(result)
    line = next(line for line in result.stdout.splitlines() if "early stopping after epoch 1" in line)
    assert "AP has not improved on its best" in line and "by more than 1 in 1 evaluation(s)" in line and "EMA weights" in line
    last = torch.load(run / "checkpoint_last.pth", weights_only=True)
    assert last["epoch"] == 2 and last["stopped_early"] is True and (run / "checkpoint_best.pth").is_file()
    best = torch.load(run / "checkpoint_best.pth", weights_only=True)
    assert "stopped_early" not in best and best["best"] == last["best"]
    # run again: the run has finished, nothing more is trained
    again = run_tool_in_process("train", *arguments)
    assert_ok(again)
    assert "the run already finished (stopped early after epoch 1)" in again.stdout
    assert torch.load(run / "checkpoint_last.pth", weights_only=True)["step"] == last["step"]
