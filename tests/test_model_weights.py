"""Official checkpoints load into every recipe exactly; wrong files fail loudly."""
import argparse
import os
import pickle
import urllib.error

import pytest
import torch

from deformable_detr.models import Backbone
from deformable_detr.models.weights import OFFICIAL_EXPERIMENTS, convert_official_state_dict, load_weights, read_checkpoint
from model_builders import official_model
from official_files import official_args, official_keys, random_official_checkpoint

TWO_STAGE = "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage"


@pytest.mark.parametrize("experiment", OFFICIAL_EXPERIMENTS)
def test_every_recipe_has_the_official_keys_and_loads_its_checkpoint(experiment, tmp_path):
    model = official_model(experiment)
    rows = official_keys(experiment)
    official = {key: torch.zeros(shape) for key, shape, tied in rows if tied is None}
    official.update({key: official[tied] for key, _, tied in rows if tied is not None})
    expected = {k: tuple(v.shape) for k, v in convert_official_state_dict(official).items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected

    path = random_official_checkpoint(experiment, str(tmp_path / "official.pth"))
    report = load_weights(model, path, allow_new_classes=False)
    assert report.official and report.epoch == 49 and report.reinitialized == []
    assert report.recipe.name() == experiment
    saved = torch.load(path, weights_only=False)["model"]
    own = model.state_dict()
    for key, value in saved.items():
        ours = key.replace("backbone.0.", "backbone.", 1)
        ours = ours.replace("transformer.decoder.bbox_embed.", "bbox_embed.").replace("transformer.decoder.class_embed.", "class_embed.")
        assert torch.equal(own[ours], value), key


def test_another_recipe_is_named_not_partially_loaded(tmp_path):
    path = random_official_checkpoint(TWO_STAGE, str(tmp_path / "two_stage.pth"))
    model = official_model("r50_deformable_detr_single_scale")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_weights(model, path)
    message = str(error.value)
    assert f"experiment={TWO_STAGE}" in message and "two_stage" in message and "num_feature_levels" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refinement_and_dc5_are_told_apart(tmp_path):
    refine = random_official_checkpoint("r50_deformable_detr_plus_iterative_bbox_refinement", str(tmp_path / "refine.pth"))
    with pytest.raises(ValueError, match="experiment=r50_deformable_detr_plus_iterative_bbox_refinement[^_]"):
        load_weights(official_model("r50_deformable_detr"), refine)
    dc5 = random_official_checkpoint("r50_deformable_detr_single_scale_dc5", str(tmp_path / "dc5.pth"))
    with pytest.raises(ValueError, match="experiment=r50_deformable_detr_single_scale_dc5"):
        load_weights(official_model("r50_deformable_detr_single_scale"), dc5)


def test_other_class_count_loads_all_but_the_class_heads_for_fine_tuning(tmp_path):
    path = random_official_checkpoint("r50_deformable_detr", str(tmp_path / "coco.pth"))
    model = official_model("r50_deformable_detr", num_classes=8)
    fresh_bias = model.class_embed[0].bias.detach().clone()
    report = load_weights(model, path, allow_new_classes=True)
    assert sorted(report.reinitialized) == sorted(f"class_embed.{i}.{p}" for i in range(6) for p in ("weight", "bias"))
    assert "91 classes" in report.messages[0] and "8" in report.messages[0]
    assert torch.equal(model.class_embed[0].bias, fresh_bias)
    saved = torch.load(path, weights_only=False)["model"]
    assert torch.equal(model.transformer.level_embed, saved["transformer.level_embed"])
    with pytest.raises(ValueError, match="num_classes"):
        load_weights(official_model("r50_deformable_detr", num_classes=8), path, allow_new_classes=False)


def test_files_that_are_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(str(tmp_path / "missing.pth"))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(str(text))
    other = tmp_path / "other.pth"
    torch.save({"weights": [1, 2, 3]}, other)
    with pytest.raises(ValueError, match="not a model checkpoint"):
        read_checkpoint(str(other))


class Payload:
    def __reduce__(self):
        return (os.system, ("echo unsafe",))


def test_unsafe_pickles_are_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(ValueError):
        read_checkpoint(str(path))


def test_official_args_namespace_is_allowed(tmp_path):
    path = tmp_path / "ns.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": official_args("r50_deformable_detr")}, path)
    assert isinstance(read_checkpoint(str(path))["args"], argparse.Namespace)


def test_backbone_freezing_and_dc5_stride():
    backbone = Backbone("resnet50", train_backbone=True, return_interm_layers=True, dilation=True)
    trainable = {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert backbone.strides == [8, 16, 16] and backbone.num_channels == [512, 1024, 2048]
    features = backbone(torch.zeros(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert [tuple(f.shape[-2:]) for f, _ in features] == [(8, 12), (4, 6), (4, 6)]
    frozen = Backbone("resnet18", train_backbone=False, return_interm_layers=False)
    assert not any(p.requires_grad for p in frozen.parameters()) and frozen.strides == [32]
    assert Backbone("resnet34").num_channels == [128, 256, 512]
    with pytest.raises(ValueError, match="bottleneck"):
        Backbone("resnet18", dilation=True)


def test_backbone_from_scratch_trains_everything_with_learned_normalization():
    backbone = Backbone("resnet18", norm="bn", trainable_layers=5)
    assert all(p.requires_grad for p in backbone.parameters())
    assert isinstance(backbone.body.layer1[0].bn1, torch.nn.BatchNorm2d)
    grouped = Backbone("resnet18", norm="gn", trainable_layers=4)
    assert isinstance(grouped.body.layer1[0].bn1, torch.nn.GroupNorm)
    assert not grouped.body.conv1.weight.requires_grad and grouped.body.layer1[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="norm="):
        Backbone("resnet18", norm="ln")


def test_pretrained_offline_error_says_how_to_provide_weights(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as error:
        Backbone("resnet18", pretrained=True)
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message and "pretrained=" in message and "checkpoints" in message


def test_pretrained_from_a_local_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = Backbone("resnet18", pretrained=str(path))
    assert torch.equal(backbone.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    with pytest.raises(FileNotFoundError, match="pretrained="):
        Backbone("resnet18", pretrained=str(tmp_path / "absent.pth"))
