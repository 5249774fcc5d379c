"""The Python API: ``Detector.from_checkpoint(...).predict(image)`` on this framework's checkpoints and
official release files, every accepted kind of image, and its errors; and the Hydra-free recipe
reading and building it rests on, checked against Hydra's own composition."""
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import OmegaConf

from cli import compose_config
from deformable_detr import Detections, Detector
from deformable_detr import recipes
from deformable_detr.builder import instantiate
from deformable_detr.errors import CheckpointError, ConfigError, MissingFileError, UserError
from inference_fixtures import CATEGORIES, make_checkpoint, make_image
from official_files import PUBLIC_CASE, public_case_checkpoint, random_official_checkpoint
from test_public_case import matched_fraction

MINICOCO = os.path.join(PUBLIC_CASE, "minicoco")


@pytest.fixture(scope="module")
def public_case(tmp_path_factory):
    return public_case_checkpoint(str(tmp_path_factory.mktemp("official") / "single_scale.pth"))


@pytest.fixture(scope="module")
def own_checkpoint(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("own") / "checkpoint.pth"))


def public_case_images():
    with open(os.path.join(MINICOCO, "annotations", "instances_val2017.json")) as f:
        images = json.load(f)["images"]
    return [(image["id"], os.path.join(MINICOCO, "val2017", image["file_name"])) for image in images]


def test_official_release_file_reproduces_the_official_detections(public_case):
    detector = Detector.from_checkpoint(public_case, device="cpu")
    assert detector.name == "r50_deformable_detr_single_scale" and len(detector.categories) == 80
    assert (detector.eval_size, detector.eval_max_size) == (800, 1333)
    ids, paths = zip(*public_case_images())
    results = detector.predict([PIL.Image.open(path) for path in paths], score_threshold=0)
    candidate = [d for image_id, result in zip(ids, results) for d in result.to_coco(image_id)]
    with open(os.path.join(PUBLIC_CASE, "r50_deformable_detr_single_scale.detections.json")) as f:
        reference = json.load(f)
    assert len(candidate) == len(reference) == 200
    assert matched_fraction(reference, candidate) == 1.0
    first = results[0]
    assert isinstance(first, Detections) and first.boxes.shape == (100, 4) and first.boxes.dtype == torch.float32
    assert first.labels.dtype == torch.int64 and set(first.labels.tolist()) <= {c["id"] for c in detector.categories}
    assert first.names == [detector.names[label] for label in first.labels.tolist()]
    assert torch.all(first.scores[:-1] >= first.scores[1:])  # best first
    # the same image as a path (one image in, one Detections out) gives the same detections
    single = detector.predict(paths[0], score_threshold=0)
    assert isinstance(single, Detections)
    torch.testing.assert_close(single.boxes, first.boxes, rtol=0, atol=1e-3)


def test_every_kind_of_image_gives_the_same_detections(own_checkpoint, tmp_path):
    detector = Detector.from_checkpoint(own_checkpoint, device="cpu")
    path = make_image(str(tmp_path / "a.png"), 90, 70)
    pil = PIL.Image.open(path)
    array = np.array(pil.convert("RGB"))
    expected = detector.predict(path, score_threshold=0)
    assert expected.image_size == (70, 90) and len(expected) == 10 * len(CATEGORIES)
    variants = {"pil": pil, "array": array, "tensor": torch.from_numpy(array), "rgba": np.dstack([array, np.full(array.shape[:2], 255, np.uint8)]),
                "pathlib": tmp_path / "a.png", "grey-as-rgb": PIL.Image.fromarray(array).convert("L").convert("RGB")}
    for name, image in variants.items():
        result = detector.predict(image, score_threshold=0)
        if name == "grey-as-rgb":
            grey = detector.predict(np.asarray(PIL.Image.fromarray(array).convert("L")), score_threshold=0)
            torch.testing.assert_close(grey.scores, result.scores, msg=name)
            continue
        torch.testing.assert_close(result.boxes, expected.boxes, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(result.scores, expected.scores, rtol=0, atol=0, msg=name)
    batch = detector.predict(np.stack([array, array]), score_threshold=0)
    assert isinstance(batch, list) and len(batch) == 2
    torch.testing.assert_close(batch[1].scores, expected.scores)


def test_lists_batch_images_of_different_sizes_and_threshold_and_top_k(own_checkpoint, tmp_path):
    detector = Detector.from_checkpoint(own_checkpoint, device="cpu")
    paths = [make_image(str(tmp_path / f"{i}.png"), 60 + 17 * i, 80 - 9 * i, seed=i) for i in range(3)]
    alone = [detector.predict(path, score_threshold=0) for path in paths]
    together = detector.predict(paths, score_threshold=0, batch_size=1)
    for a, b in zip(alone, together):
        torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=0)
    padded = detector.predict(paths, score_threshold=0, batch_size=3)
    assert [r.image_size for r in padded] == [(80, 60), (71, 77), (62, 94)]
    threshold = float(alone[0].scores[4])
    kept = detector.predict(paths[0], score_threshold=threshold)
    assert len(kept) == 4 and torch.all(kept.scores > threshold)
    assert len(detector.predict(paths[0], score_threshold=0, top_k=7)) == 7
    assert detector.predict([], score_threshold=0) == []


def test_categories_names_and_coco_format(own_checkpoint, tmp_path):
    detector = Detector.from_checkpoint(own_checkpoint, device="cpu")
    assert detector.category_ids == [c["id"] for c in CATEGORIES] and detector.names == {c["id"]: c["name"] for c in CATEGORIES}
    result = detector.predict(make_image(str(tmp_path / "a.png"), 64, 64), score_threshold=0, top_k=3)
    coco = result.to_coco(image_id=7)
    assert [d["category_id"] for d in coco] == result.labels.tolist()
    x0, y0, x1, y1 = result.boxes[0].tolist()
    assert coco[0]["image_id"] == 7 and coco[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    unrestricted = Detector.from_checkpoint(own_checkpoint, device="cpu", restrict_to_categories=False)
    labels = unrestricted.predict(make_image(str(tmp_path / "a.png"), 64, 64), score_threshold=0).labels
    assert not set(labels.tolist()) <= {c["id"] for c in CATEGORIES}  # the official top-k over every logit


def test_precision_and_compile_options(own_checkpoint, tmp_path):
    image = make_image(str(tmp_path / "a.png"), 64, 64)
    reference = Detector.from_checkpoint(own_checkpoint, device="cpu").predict(image, score_threshold=0)
    bf16 = Detector.from_checkpoint(own_checkpoint, device="cpu", precision="bf16")
    assert bf16.precision == torch.bfloat16 and "bf16" in repr(bf16)
    result = bf16.predict(image, score_threshold=0)
    assert result.scores.dtype == torch.float32 and torch.isfinite(result.scores).all()
    assert (result.scores[:5] - reference.scores[:5]).abs().max() < 0.05
    with pytest.raises(ConfigError, match="precision=half is not one of"):
        Detector.from_checkpoint(own_checkpoint, device="cpu", precision="half")


@pytest.mark.slow
def test_compiled_detector_gives_the_eager_detections(own_checkpoint, tmp_path):
    image = make_image(str(tmp_path / "a.png"), 64, 64)
    eager = Detector.from_checkpoint(own_checkpoint, device="cpu").predict(image, score_threshold=0)
    compiled = Detector.from_checkpoint(own_checkpoint, device="cpu", compile=True).predict(image, score_threshold=0)
    torch.testing.assert_close(compiled.scores, eager.scores, rtol=1e-4, atol=1e-4)


def test_experiment_and_model_overrides(tmp_path):
    bare = tmp_path / "bare.pth"
    official = random_official_checkpoint("r50_deformable_detr_single_scale", str(tmp_path / "official.pth"))
    torch.save(torch.load(official, weights_only=False)["model"], bare)  # official keys, no args
    detector = Detector.from_checkpoint(str(bare), device="cpu", experiment="r50_deformable_detr_single_scale")
    assert detector.name == "r50_deformable_detr_single_scale"
    with pytest.raises(CheckpointError, match=r"does not record its recipe.*experiment=NAME"):
        Detector.from_checkpoint(_own_weights_only(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match=r"experiment=r50_deformable_detr_singlescale is not an experiment; did you mean "
                                          r"r50_deformable_detr_single_scale\?"):
        Detector.from_checkpoint(official, device="cpu", experiment="r50_deformable_detr_singlescale")
    # one changed model key: the error names it, not every field of another recipe
    with pytest.raises(CheckpointError, match=r"num_queries: checkpoint 300, model 100") as error:
        Detector.from_checkpoint(official, device="cpu", model_overrides={"num_queries": 100})
    assert str(error.value).count("checkpoint") <= 3 and "hidden_dim" not in str(error.value)
    with pytest.raises(ConfigError, match=r"model.transformer.dropuot is not a key of the model"):
        Detector.from_checkpoint(official, device="cpu", model_overrides={"transformer.dropuot": 0.0})


def _own_weights_only(tmp_path):
    path = str(tmp_path / "weights_only.pth")
    torch.save(torch.load(make_checkpoint(str(tmp_path / "own.pth")), weights_only=True)["model"], path)
    return path


def test_errors_are_user_errors_naming_the_input(own_checkpoint, tmp_path):
    with pytest.raises(MissingFileError, match="checkpoint=.*missing.pth does not exist"):
        Detector.from_checkpoint(str(tmp_path / "missing.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError):
        Detector.from_checkpoint(str(tmp_path / "text.pth"))
    detector = Detector.from_checkpoint(own_checkpoint, device="cpu")
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\) RGB, got dtype float32.*\* 255"):
        detector.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"channels-first: pass image.permute\(1, 2, 0\)"):
        detector.predict(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="got int"):
        detector.predict(5)
    with pytest.raises(UserError, match="cannot be decoded"):
        detector.predict(str(tmp_path / "text.pth"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is visible"):
            Detector.from_checkpoint(own_checkpoint, device="cuda")


@pytest.mark.parametrize("experiment", recipes.experiment_names())
def test_recipes_read_without_hydra_equal_hydras_composition(experiment):
    cfg = compose_config("eval", [f"experiment={experiment}", "checkpoint=x"])
    assert recipes.experiment_model(experiment) == OmegaConf.to_container(cfg.model, resolve=True)
    transforms = cfg.dataset.eval_transforms
    assert recipes.experiment_eval_sizes(experiment) == (transforms.size, transforms.max_size)


@pytest.mark.parametrize("experiment", ["small", "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage"])
def test_builder_builds_what_hydra_instantiates(experiment):
    node = dict(recipes.experiment_model(experiment), backbone=dict(recipes.experiment_model(experiment)["backbone"], pretrained=False))
    with torch.device("meta"):
        ours = instantiate(node, num_classes=91)
        hydras = hydra_instantiate(OmegaConf.create(node), num_classes=91)
    assert type(ours) is type(hydras)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hydras.state_dict().items()}


def test_builder_refuses_targets_outside_the_package():
    with pytest.raises(ConfigError, match="_target_='os.system' is not a callable of deformable_detr"):
        instantiate({"_target_": "os.system", "command": "true"})
    with pytest.raises(ConfigError, match="has no Nonexistent"):
        instantiate({"_target_": "deformable_detr.models.Nonexistent"})
    assert instantiate({"_target_": "deformable_detr.models.PostProcess", "_partial_": True, "num_select": 5})().num_select == 5
