"""The tools' shared skeleton: --help, and every mistake on the command line as one error line with
exit status 2, before any data or model is built."""
import os
import subprocess
import sys

import pytest

from cli import ROOT, assert_ok, run_tool_in_process
from deformable_detr.cli import benchmark, eval as eval_tool, export, infer, train, visualize
from deformable_detr.cli.app import run_reporting_errors
from deformable_detr.engine.train_step import NonFiniteLossError
from official_files import random_official_checkpoint

TOOLS = {"train": train, "eval": eval_tool, "infer": infer, "visualize": visualize, "export": export, "benchmark": benchmark}


def error_line(tool, capsys, *arguments):
    """The one line ``tools/<tool>.py ARGUMENTS`` prints before exiting with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[tool].TOOL.main(list(arguments))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and not captured.out, captured
    return lines[0]


@pytest.mark.parametrize("tool, own_keys", [
    ("infer", ["checkpoint=(required)", "input=(required)", "score_threshold=0.3", "picture_format=auto"]),
    ("visualize", ["checkpoint=(required)", "input=(required)", "top_k=4", "colour_by=level"]),
    ("export", ["checkpoint=(required)", "format=onnx", "min_match=0.99"]),
    ("benchmark", ["measure=[params, flops, inference, training]", "precisions=[fp32, bf16]", "warmup=1"]),
    ("eval", ["checkpoint=(required)", "amp=null"]),
    ("train", ["resume=auto", "init_weights=null", "trainer.epochs=N"]),
])
def test_help_starts_with_the_usage_and_lists_the_tools_own_keys(tool, own_keys, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[tool].TOOL.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python tools/{tool}.py ")
    for key in own_keys:
        assert key in text, key
    assert len(text.splitlines()) < 45 and "_target_" not in text  # not the composed training config


@pytest.mark.parametrize("tool, arguments, missing", [
    ("eval", [], "checkpoint="),
    ("infer", ["input=x.png"], "checkpoint="),
    ("infer", ["checkpoint=x.pth"], "input="),
    ("visualize", [], "checkpoint= and input= are"),
    ("export", [], "checkpoint="),
])
def test_a_missing_required_value(tool, arguments, missing, capsys):
    line = error_line(tool, capsys, *arguments)
    assert missing in line and "required" in line and f"usage: python tools/{tool}.py" not in line
    assert f"python tools/{tool}.py" in line


def test_an_unknown_experiment_names_the_nearest_and_lists_them(capsys):
    line = error_line("eval", capsys, "checkpoint=x.pth", "experiment=r50_deformable_detr_singlescale")
    assert "experiment=r50_deformable_detr_singlescale is not an experiment; did you mean r50_deformable_detr_single_scale?" in line
    assert "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage" in line and line.count("Could not find") == 0


def test_an_unknown_group_option(capsys):
    line = error_line("train", capsys, "dataset=cocoo")
    assert line == "error: dataset=cocoo is not a dataset config; did you mean dataset=coco? (dataset options: coco, synthetic, yolo)"


@pytest.mark.parametrize("tool, override, expected", [
    ("infer", "score_threshold=high", "score_threshold=high is not a number: score_threshold takes a number, e.g. score_threshold=0.3"),
    ("train", "trainer.epochs=ten", "trainer.epochs=ten is not an integer"),
    ("eval", "compile=maybe", "compile=maybe is not true or false: compile takes true or false, e.g. compile=false"),
    ("benchmark", "measure=params", "measure takes a list: write measure=[params]"),
    ("benchmark", "precisions=fp32,bf16", "precisions takes a list: write precisions=[fp32,bf16]"),
])
def test_a_value_of_the_wrong_type_names_the_key_the_type_and_the_fix(tool, override, expected, capsys):
    arguments = {"infer": ["checkpoint=x.pth", "input=x.png"], "eval": ["checkpoint=x.pth"]}.get(tool, [])
    line = error_line(tool, capsys, *arguments, override)
    assert expected in line, line


def test_a_misspelled_key_and_an_unknown_addition(capsys):
    assert "trainer.epoch is not a known key (did you mean trainer.epochs?)" in error_line("train", capsys, "trainer.epoch=1")
    assert "postprocess.num_selekt is not a parameter" in error_line("eval", capsys, "checkpoint=x", "+postprocess.num_selekt=3")


def test_one_changed_model_key_on_a_checkpoint_is_named_alone(tmp_path):
    checkpoint = random_official_checkpoint("r50_deformable_detr_single_scale", str(tmp_path / "official.pth"))
    result = run_tool_in_process("eval", f"checkpoint={checkpoint}", "model.num_queries=100", "dataset=coco",
                                 f"dataset.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", "device=cpu")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "num_queries: checkpoint 300, model 100" in line
    for other in ("num_feature_levels", "hidden_dim", "enc_layers", "backbone:", "two_stage:"):
        assert other not in line, line


def test_a_diverged_recipe_is_one_line_and_a_non_zero_exit(capsys):
    def diverges(cfg):
        raise NonFiniteLossError("the loss was NaN or infinite for 5 steps in a row (last batch: images 3); lower the learning rate")

    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(diverges, None)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: the loss was NaN or infinite for 5 steps in a row (last batch: images 3); "
                                       "lower the learning rate\n")


@pytest.mark.slow
def test_the_entry_points_run_the_same_tool():
    for command in ([sys.executable, os.path.join(ROOT, "tools", "eval.py")],
                    [sys.executable, "-m", "deformable_detr.cli.eval"]):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.strip() == (
            "error: checkpoint= is required: python tools/eval.py checkpoint=PATH [KEY=VALUE ...]"), result.stderr[-2000:]


def test_a_clean_training_run_leaves_no_lock_file_and_reports_its_first_step(tmp_path):
    from cli import tiny

    run = tmp_path / "run"
    result = run_tool_in_process("train", *tiny(run, tmp_path / "data", "trainer.epochs=1", "trainer.log_every=50"))
    assert_ok(result)
    assert not (run / ".train.lock").exists()
    assert any("[epoch 0] 1/" in line for line in result.stdout.splitlines()), result.stdout[-3000:]
