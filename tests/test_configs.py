"""Every experiment composes and instantiates; typos are rejected naming the key."""
import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ConfigKeyError

from cli import compose_config, run_tool
from deformable_detr.cli.checks import check_config

from deformable_detr.errors import ConfigError
from deformable_detr.cli.schema import EvalConfig, TrainConfig
from deformable_detr.engine.trainer import TrainerSettings
from deformable_detr.models import DeformableDETR, SetCriterion
from deformable_detr.models.weights import OFFICIAL_EXPERIMENTS, recipe_of_model

EXPERIMENTS = list(OFFICIAL_EXPERIMENTS) + ["small"]


@pytest.mark.parametrize("config_name", ["train", "eval"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(config_name, experiment):
    overrides = [f"experiment={experiment}", "model.backbone.pretrained=false"]
    if config_name == "eval":
        overrides.append("checkpoint=unused.pth")
    cfg = compose_config(config_name, overrides)
    check_config(cfg, TrainConfig if config_name == "train" else EvalConfig)
    assert cfg.name == experiment
    model = instantiate(cfg.model, num_classes=91)
    assert isinstance(model, DeformableDETR)
    if experiment in OFFICIAL_EXPERIMENTS:
        assert recipe_of_model(model).name() == experiment
    criterion = instantiate(cfg.criterion, num_classes=91)
    assert isinstance(criterion, SetCriterion)
    assert ("loss_ce_enc" in criterion.weight_dict) == model.two_stage
    optimizer = instantiate(cfg.optimizer)(model)
    assert {g["name"] for g in optimizer.param_groups} == {"default", "backbone", "linear_proj"}
    instantiate(cfg.schedule)(optimizer, iters_per_epoch=10)
    assert isinstance(instantiate(cfg.trainer), TrainerSettings)
    instantiate(cfg.postprocess)


def test_official_recipe_values():
    cfg = compose_config("train", ["experiment=r50_deformable_detr"])
    assert cfg.dataset.kind == "coco" and cfg.dataset.batch_size == 2
    assert cfg.optimizer.lr == 2e-4 and cfg.optimizer.lr_backbone == 2e-5 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.optimizer.lr_linear_proj_mult == 0.1 and list(cfg.schedule.milestones) == [40]
    assert cfg.trainer.epochs == 50 and cfg.trainer.clip_max_norm == 0.1
    t = cfg.model.transformer
    assert (t.d_model, t.nhead, t.num_encoder_layers, t.num_decoder_layers, t.dim_feedforward, t.dropout) == (256, 8, 6, 6, 1024, 0.1)
    assert (cfg.model.num_queries, t.num_feature_levels, t.enc_n_points, t.dec_n_points) == (300, 4, 4, 4)
    assert (cfg.criterion.matcher.cost_class, cfg.criterion.matcher.cost_bbox, cfg.criterion.matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert (cfg.criterion.weight_dict.cls, cfg.criterion.weight_dict.bbox, cfg.criterion.weight_dict.giou) == (2.0, 5.0, 2.0)
    assert cfg.criterion.focal_alpha == 0.25 and cfg.postprocess.num_select == 100


def test_the_default_is_the_small_synthetic_recipe():
    cfg = compose_config("train")
    assert cfg.name == "small" and cfg.dataset.kind == "synthetic" and cfg.model.backbone.pretrained is False
    # every recipe's training batches pad to their largest image, as the reference does
    assert cfg.dataset.train_pad_multiple == 0
    for experiment in OFFICIAL_EXPERIMENTS:
        assert compose_config("train", [f"experiment={experiment}", "dataset=coco"]).dataset.train_pad_multiple == 0


def test_the_command_line_dataset_wins_over_the_experiments():
    cfg = compose_config("train", ["dataset=coco", "dataset.root=/data/coco"])
    assert cfg.dataset.kind == "coco" and cfg.name == "small"


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.epoch=3", "epoch"),
        ("dataset.batchsize=3", "batchsize"),
        ("+dataset.batchsize=3", "batchsize"),
        ("+dataset.train_transforms.scale=[1]", "scale"),
        ("+seeds=1", "seeds"),
    ],
)
def test_typos_in_typed_nodes_are_rejected(override, key):
    try:
        cfg = compose_config("train", [override])
    except (ConfigCompositionException, ConfigKeyError) as error:
        assert key in str(error) or key in str(error.__cause__)
        return
    # Hydra lets ``+key=`` into typed nodes; the schema check names the key
    with pytest.raises(ConfigError, match=f"{key} is not a known key"):
        check_config(cfg, TrainConfig)


@pytest.mark.parametrize(
    "override,message",
    [
        ("+trainer.epoch=3", "trainer.epoch is not a parameter of deformable_detr.engine.trainer.TrainerSettings (did you mean trainer.epochs?)"),
        ("+model.transformer.num_layers=3", "model.transformer.num_layers is not a parameter"),
        ("+optimizer.momentum=0.9", "optimizer.momentum is not a parameter"),
    ],
)
def test_typos_in_instantiated_nodes_are_rejected(override, message):
    cfg = compose_config("train", [override])
    with pytest.raises(ConfigError) as error:
        check_config(cfg, TrainConfig)
    assert message in str(error.value)


@pytest.mark.slow
def test_typo_from_the_command_line_names_the_key(tmp_path):
    result = run_tool("train", "+trainer.epoch=3", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert "trainer.epoch is not a parameter" in result.stderr and "did you mean trainer.epochs" in result.stderr


@pytest.mark.slow
def test_coco_without_a_root_says_what_to_set(tmp_path):
    result = run_tool("train", "dataset=coco", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    assert "dataset.root is required" in result.stderr


@pytest.mark.slow
def test_a_missing_coco_directory_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_tool("train", "dataset=coco", f"dataset.root={missing}", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert f"dataset.root={missing} does not exist" in result.stderr


def test_a_missing_checkpoint_is_named(tmp_path):
    result = run_tool("eval", f"checkpoint={tmp_path / 'absent.pth'}", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert "absent.pth does not exist" in result.stderr


def test_only_user_errors_become_one_line_and_a_bug_keeps_its_traceback(capsys):
    from deformable_detr.cli.app import run_reporting_errors
    from deformable_detr.errors import DataError

    def mistake(cfg):
        raise DataError("dataset.root=/x has no annotations/instances_val2017.json; point dataset.root at a COCO layout")

    def bug(cfg):
        raise ValueError("an internal inconsistency")

    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(mistake, None)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: dataset.root=/x has no annotations/instances_val2017.json; point dataset.root at a COCO layout\n"
    with pytest.raises(ValueError, match="internal inconsistency"):
        run_reporting_errors(bug, None)


@pytest.mark.slow
def test_the_tools_raise_onednn_s_primitive_cache_for_varying_image_sizes():
    """oneDNN keeps 1024 compiled primitives by default, which batches of ever new sizes thrash.
    The tools raise that before any model runs: after convolutions of 1,100 other sizes, the
    first size's primitive is still cached (oneDNN's verbose log says cache_hit), where the
    default (or a user's choice in the environment) has evicted it."""
    script = """
import torch
from deformable_detr.cli import app
weight = torch.randn(4, 3, 3, 3, dtype=torch.bfloat16)  # bfloat16: oneDNN's convolution on every CPU
for width in range(8, 1108):
    torch.nn.functional.conv2d(torch.randn(1, 3, 3, width, dtype=torch.bfloat16), weight)
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
    torch.nn.functional.conv2d(torch.randn(1, 3, 3, 8, dtype=torch.bfloat16), weight)
"""
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    environment = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    environment["PYTHONPATH"] = tools

    def convolution_creation(extra):
        result = subprocess.run([sys.executable, "-c", script], env=dict(environment, **extra), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        lines = [line for line in result.stdout.splitlines() if "primitive,create" in line and ",convolution," in line]
        if not lines:
            pytest.skip("this torch build does not convolve through oneDNN")
        return lines[0]

    assert "create:cache_hit" in convolution_creation({})
    assert "create:cache_miss" in convolution_creation({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
