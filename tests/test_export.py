"""Export of the detector: torch.export with dynamic batch and image size, ONNX through tools/export.py,
the check that catches a changed export, and the shape logic that makes tracing possible."""
import dataclasses
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

from cli import compose_config, run_tool
from deformable_detr.cli.checks import check_config
from deformable_detr.cli.export import accepts, other_shape_batch
from deformable_detr.cli.schema import ExportConfig
from deformable_detr.data.synthetic_shapes import SHAPE_CATEGORIES
from deformable_detr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from deformable_detr.export import (
    Detections,
    ExportableDetector,
    export_metadata,
    export_program,
    input_ranges,
    load_program,
    match_detections,
    read_metadata,
    save_program,
    top_detections,
)
from deformable_detr.export.metadata import logit_categories
from deformable_detr.export.verification import verify
from deformable_detr.models import DeformableTransformer
from deformable_detr.models.encoder import DeformableEncoder
from deformable_detr.models.valid_ratios import valid_ratio
from deformable_detr.models.weights import OFFICIAL_EXPERIMENTS, recipe_of_model
from deformable_detr.utils.category_layout import CategoryLayout
from deformable_detr_ops import library_loaded, ms_deform_attn_reference
from deformable_detr_ops.testing import make_inputs
from hydra.utils import instantiate
from omegaconf import OmegaConf
from model_builders import official_model, tiny_model

needs_op = pytest.mark.skipif(not library_loaded(), reason="export needs the compiled op")
SYNTHETIC_CATEGORIES = [{"id": i, "name": name} for i, name in SHAPE_CATEGORIES]


# ---------------------------------------------------------------- shape logic (eager, padded batches)
def previous_reference_points(spatial_shapes, valid_ratios):
    """The encoder reference points as computed before export support (sizes read from the tensor)."""
    points = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32), torch.linspace(0.5, w - 0.5, w, dtype=torch.float32), indexing="ij"
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


def previous_encoder_proposals(self, memory, padding_mask, spatial_shapes):
    """``DeformableTransformer.encoder_proposals`` as it was before export support."""
    if not isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = torch.as_tensor(spatial_shapes)
    n, proposals, start = memory.shape[0], [], 0
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        mask = padding_mask[:, start : start + h * w].view(n, h, w, 1)
        valid_h, valid_w = torch.sum(~mask[:, :, 0, 0], 1), torch.sum(~mask[:, 0, :, 0], 1)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32), torch.linspace(0, w - 1, w, dtype=torch.float32), indexing="ij"
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**level)
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf")).masked_fill(~valid, float("inf"))
    output_memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
    return self.enc_output_norm(self.enc_output(output_memory)), proposals


def padded_masks(level_shapes, valid_sizes):
    """Per level a (N, H, W) padding mask whose image n covers valid_sizes[n] of the level (fractions)."""
    masks = []
    for h, w in level_shapes:
        mask = torch.ones(len(valid_sizes), h, w, dtype=torch.bool)
        for n, (fh, fw) in enumerate(valid_sizes):
            mask[n, : max(1, math.ceil(h * fh)), : max(1, math.ceil(w * fw))] = False
        masks.append(mask)
    return masks


def test_reference_points_and_proposals_equal_the_previous_formulas_on_padded_batches():
    level_shapes = [(25, 38), (13, 19), (7, 10), (1, 5), (4, 1)]
    masks = padded_masks(level_shapes, [(1.0, 1.0), (0.6, 0.9), (0.3, 0.45)])
    spatial_shapes = DeformableTransformer.shapes_tensor(level_shapes, torch.device("cpu"))
    assert torch.equal(spatial_shapes, torch.as_tensor(level_shapes))
    valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
    expected = previous_reference_points(spatial_shapes, valid_ratios)
    assert torch.equal(DeformableEncoder.reference_points(level_shapes, valid_ratios), expected)
    assert torch.equal(DeformableEncoder.reference_points(spatial_shapes, valid_ratios), expected)

    transformer = DeformableTransformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, num_feature_levels=5, two_stage=True)
    padding_mask = torch.cat([m.flatten(1) for m in masks], 1)
    memory = torch.randn(3, padding_mask.shape[1], 32)
    with torch.no_grad():
        output_memory, proposals = transformer.encoder_proposals(memory, padding_mask, level_shapes)
        previous_memory, previous = previous_encoder_proposals(transformer, memory, padding_mask, spatial_shapes)
    assert torch.equal(proposals, previous) and torch.equal(output_memory, previous_memory)
    assert torch.isinf(proposals).any() and torch.isfinite(proposals).any()


@pytest.mark.parametrize("refine,two_stage", [(False, False), (True, True)])
def test_padded_batch_results_are_unchanged(refine, two_stage, monkeypatch):
    torch.manual_seed(0)
    model = tiny_model(levels=4, refine=refine, two_stage=two_stage).eval()
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 70:] = True
    mask[1, :, 90:] = True
    with torch.no_grad():
        now = model(images, mask)
        # the previous implementation: sizes read back from the spatial_shapes tensor, linspace grids
        monkeypatch.setattr(DeformableEncoder, "reference_points", staticmethod(lambda shapes, ratios: previous_reference_points(
            torch.as_tensor(shapes) if not isinstance(shapes, torch.Tensor) else shapes, ratios)))
        monkeypatch.setattr(DeformableTransformer, "shapes_tensor", staticmethod(lambda shapes, device: torch.as_tensor(shapes, device=device)))
        monkeypatch.setattr(DeformableTransformer, "encoder_proposals", previous_encoder_proposals)
        before = model(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(now[key], before[key]), key


# ---------------------------------------------------------------- torch.export
@pytest.mark.slow
@needs_op
@pytest.mark.parametrize("levels,refine,two_stage", [(4, False, False), (4, True, False), (4, True, True)], ids=["multi_scale", "refine", "two_stage"])
def test_torch_export_with_dynamic_batch_and_size_matches_eager(levels, refine, two_stage, tmp_path):
    torch.manual_seed(0)
    detector = ExportableDetector(tiny_model(levels=levels, refine=refine, two_stage=two_stage)).eval()
    program = export_program(detector, torch.randn(2, 3, 96, 128))
    ranges = input_ranges(program)
    assert ranges["batch"] == (1, None) and ranges["height"][1] is None and ranges["width"][1] is None
    path = str(tmp_path / "model.pt2")
    save_program(program, path)
    loaded = load_program(path).module()
    with torch.no_grad():
        for shape in [(1, 3, 80, 112), (3, 3, 128, 96)]:
            images = torch.randn(shape)
            mask = torch.zeros(shape[0], *shape[2:], dtype=torch.bool)
            expected = detector.detector(images, mask)
            logits, boxes = loaded(images)
            assert logits.shape == expected["pred_logits"].shape and boxes.shape == expected["pred_boxes"].shape
            assert torch.allclose(logits, expected["pred_logits"], atol=1e-5, rtol=0)
            assert torch.allclose(boxes, expected["pred_boxes"], atol=1e-5, rtol=0)


@pytest.mark.slow
@needs_op
def test_a_batch_of_one_small_image_traces_a_program_of_any_batch_and_size():
    torch.manual_seed(0)
    detector = ExportableDetector(tiny_model(levels=4)).eval()
    # one image, 64 px high: a batch of one and a last feature map (stride 64) one pixel high, both of
    # which torch.export would specialize
    program = export_program(detector, torch.randn(1, 3, 64, 90))
    assert input_ranges(program) == {"batch": (1, None), "channels": (3, 3), "height": (65, None), "width": (65, None)}
    assert program.example_inputs[0][0].shape[0] == 2
    module = program.module()
    with torch.no_grad():
        for shape in [(1, 3, 72, 90), (3, 3, 130, 70)]:
            images = torch.randn(shape)
            for exported, expected in zip(module(images), detector(images)):
                torch.testing.assert_close(exported, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
@needs_op
@pytest.mark.parametrize("experiment", OFFICIAL_EXPERIMENTS)
def test_official_recipes_trace_from_a_batch_of_one(experiment):
    torch.manual_seed(0)
    detector = ExportableDetector(official_model(experiment)).eval()
    program = export_program(detector, torch.randn(1, 3, 160, 192))
    ranges = input_ranges(program)
    assert ranges["batch"] == (1, None) and ranges["height"][1] is None and ranges["width"][1] is None
    images = torch.randn(2, 3, 192, 160)
    with torch.no_grad():
        for exported, expected in zip(program.module()(images), detector(images)):
            torch.testing.assert_close(exported, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- ONNX
@needs_op
def test_op_translation_runs_in_onnxruntime_with_other_sizes(tmp_path):
    import onnxruntime
    from deformable_detr.export.onnx_model import foreign_operators
    from deformable_detr_ops import ms_deform_attn
    from deformable_detr_ops.onnx_translation import OPSET, translation_table
    from torch.export import Dim

    class Attention(torch.nn.Module):
        def forward(self, value, spatial_shapes, level_start_index, locations, weights):
            return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)

    names = ["value", "spatial_shapes", "level_start_index", "locations", "weights"]
    example = make_inputs([(6, 8), (3, 4)], batch=2, heads=4, channels=8, queries=10, points=3, margin=0.1)
    dynamic = {0: Dim.AUTO, 1: Dim.AUTO}
    program = torch.onnx.export(
        Attention().eval(), example, dynamo=True, opset_version=OPSET, custom_translation_table=translation_table(), input_names=names,
        dynamic_shapes=(dynamic, None, None, dynamic, dynamic), verbose=False,
    )
    path = str(tmp_path / "attention.onnx")
    program.save(path)
    assert foreign_operators(path) == []
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs = make_inputs([(5, 9), (2, 3)], batch=3, heads=4, channels=8, queries=7, points=3, margin=0.1, seed=1)
    output = session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs)})[0]
    np.testing.assert_allclose(output, ms_deform_attn_reference(*inputs).numpy(), atol=1e-5, rtol=0)


def write_images(directory):
    """Four images of three sizes: the first alone (the batch traced holds one image), then two of one
    size (a batch of 2), then one upright (a batch of 1)."""
    directory.mkdir()
    generator = np.random.default_rng(0)
    for name, (w, h) in (("a.png", (100, 100)), ("b.png", (120, 90)), ("c.png", (120, 90)), ("d.png", (90, 120))):
        pixels = generator.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[20:60, 30:80] = (220, 40, 40)  # an object-like block
        PIL.Image.fromarray(pixels).save(directory / name)
    return directory


def small_model():
    cfg = compose_config("train", ["experiment=small"])
    torch.manual_seed(0)
    return instantiate(cfg.model, num_classes=7).eval()


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    """tools/export.py on a checkpoint of the small recipe (random weights), and what it printed."""
    root = tmp_path_factory.mktemp("export_small")
    model = small_model()
    checkpoint = root / "small.pth"
    torch.save({"model": model.state_dict(), "recipe": dataclasses.asdict(recipe_of_model(model)), "num_classes": 7}, checkpoint)
    images = write_images(root / "images")
    run = root / "run"
    result = run_tool("export", "experiment=small", f"checkpoint={checkpoint}", f"input={images}", "latency_runs=1", f"hydra.run.dir={run}")
    return result, run / "model.onnx", model, images


@pytest.mark.slow
@needs_op
def test_small_recipe_round_trips_in_onnxruntime(small_onnx):
    import onnx
    from deformable_detr.export.onnx_model import foreign_operators, onnx_opset

    result, path, _, _ = small_onnx
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert path.is_file()
    assert "onnxruntime vs PyTorch on 4 images" in result.stdout
    assert "matched 400/400 (100.00%)" in result.stdout
    assert "onnxruntime vs PyTorch at a shape not traced, (3, 3," in result.stdout
    assert "latency on one" in result.stdout and "export verified" in result.stdout
    assert foreign_operators(str(path)) == [] and onnx_opset(str(path)) == 18
    model = onnx.load(str(path))
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(model.graph.input) + list(model.graph.output)}
    assert shapes == {"images": ["batch", 3, "height", "width"], "logits": ["batch", 100, 7], "boxes": ["batch", 100, 4]}


@pytest.mark.slow
@needs_op
def test_a_changed_export_fails_the_check(small_onnx):
    from deformable_detr.data import make_eval_transforms
    from deformable_detr.data.image_files import list_image_files, read_image
    from deformable_detr.export.onnx_model import OnnxRunner
    import random

    result, path, model, images = small_onnx
    assert result.returncode == 0, result.stderr[-3000:]
    transforms = make_eval_transforms(176, 288)
    batch = torch.stack([transforms(read_image(p), None, random.Random(0))[0] for p in list_image_files(str(images))[1:3]])
    exported = OnnxRunner(str(path))
    detector = ExportableDetector(model).eval()
    assert verify(detector, exported, [batch]).passed(0.99)

    # wrong normalization: the export fed pixels in [0, 1] instead of normalized ones
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    unnormalized = verify(detector, lambda x: exported(x * std + mean), [batch])
    assert not unnormalized.passed(0.99) and unnormalized.max_logit_difference > 1e-3

    # a perturbed weight: the PyTorch model no longer computes what was exported
    with torch.no_grad():
        model.class_embed[-1].weight.add_(torch.randn_like(model.class_embed[-1].weight) * 0.05)
    perturbed = verify(detector, exported, [batch])
    assert not perturbed.passed(0.99)


@pytest.fixture(scope="module")
def default_recipe_program(tmp_path_factory):
    """tools/export.py format=torch on a checkpoint of the default recipe saved as training saves it (random
    weights), checked on its own sample images: the first 4 val images of its synthetic set, each a batch of one."""
    root = tmp_path_factory.mktemp("export_default")
    cfg = compose_config("train", [f"dataset.root={root / 'synthetic'}"])
    layout = CategoryLayout.for_category_ids(c["id"] for c in SYNTHETIC_CATEGORIES)
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=layout.num_logits)
    checkpoint = root / "checkpoint_best.pth"
    torch.save({"model": model.state_dict(), "recipe": dataclasses.asdict(recipe_of_model(model)), "config": OmegaConf.to_container(cfg, resolve=True),
                "num_classes": layout.num_logits, "categories": SYNTHETIC_CATEGORIES, "category_layout": layout.to_dict()}, checkpoint)
    run = root / "run"
    result = run_tool("export", f"checkpoint={checkpoint}", "format=torch", "latency_runs=0", f"hydra.run.dir={run}")
    return result, run / "model.pt2"


@pytest.mark.slow
@needs_op
def test_the_default_recipe_exports_from_its_own_sample_images(default_recipe_program):
    result, path = default_recipe_program
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torch.export vs PyTorch on 4 images" in result.stdout and "matched 400/400 (100.00%)" in result.stdout
    assert "torch.export vs PyTorch at a shape not traced, (3, 3," in result.stdout and "not checked" not in result.stdout
    log = (path.parent / "export.log").read_text()
    assert "tracing with torch.export on the first sample batch, (1, 3," in log and "traced a (2, 3," in log
    metadata = read_metadata(str(path))
    assert metadata["recipe"] == "small" and metadata["format_version"] == "1"
    assert metadata["categories"] == [dict(c, logit=c["id"]) for c in SYNTHETIC_CATEGORIES]
    assert metadata["resize"] == {"shorter_side": 176, "max_size": 288, "interpolation": "bilinear"}
    assert metadata["mean"] == list(IMAGENET_MEAN) and metadata["std"] == list(IMAGENET_STD) and metadata["top_k"] == 100
    assert "before the sigmoid" in metadata["outputs"] and "(cx, cy, w, h)" in metadata["outputs"]


@pytest.mark.slow
@needs_op
def test_the_onnx_file_describes_itself(small_onnx):
    import onnx

    result, path, _, _ = small_onnx
    assert result.returncode == 0, result.stderr[-3000:]
    props = {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
    # the checkpoint names no categories: every logit is ranked, named by its index
    categories = [{"id": k, "name": str(k), "logit": k} for k in range(7)]
    assert props == export_metadata("small", categories, 176, 288, 100)
    metadata = read_metadata(str(path))
    assert metadata["categories"] == categories and metadata["resize"]["shorter_side"] == 176
    assert set(metadata) == {"format_version", "recipe", "input", "resize", "mean", "std", "categories", "top_k", "outputs"}


def test_metadata_categories_follow_the_logits():
    categories = [{"id": 1042, "name": "c"}, {"id": 3, "name": "a"}, {"id": 17, "name": "b"}]
    sparse = CategoryLayout(3, (3, 17, 1042))
    assert logit_categories(categories, sparse) == [
        {"id": 3, "name": "a", "logit": 0}, {"id": 17, "name": "b", "logit": 1}, {"id": 1042, "name": "c", "logit": 2}]
    by_id = CategoryLayout(4)
    assert logit_categories([{"id": 3, "name": "a"}, {"id": 1, "name": "b"}], by_id) == [
        {"id": 1, "name": "b", "logit": 1}, {"id": 3, "name": "a", "logit": 3}]
    # unknown categories, or no restriction to them: every logit, named where a category names it
    assert logit_categories(None, by_id) == [{"id": k, "name": str(k), "logit": k} for k in range(4)]
    assert [c["name"] for c in logit_categories([{"id": 3, "name": "a"}], by_id, restrict=False)] == ["0", "1", "2", "a"]
    texts = export_metadata("run", logit_categories(categories, sparse), 800, 1333)
    assert all(isinstance(text, str) for text in texts.values())
    assert json.loads(texts["categories"])[2] == {"id": 1042, "name": "c", "logit": 2}
    assert json.loads(texts["resize"]) == {"shorter_side": 800, "max_size": 1333, "interpolation": "bilinear"}


def test_the_untraced_batch_differs_from_the_traced_one_in_every_dynamic_size():
    images = [torch.randn(3, 176, 234), torch.randn(3, 176, 176)]
    ranges = {"batch": (1, None), "channels": (3, 3), "height": (65, None), "width": (65, None)}
    batch = other_shape_batch(images, (2, 3, 176, 234), ranges)
    assert batch.shape == (3, 3, 132, 175) and torch.equal(batch[2], batch[0])
    # never below the smallest size the program accepts, and never the traced size
    assert other_shape_batch(images, (1, 3, 65, 80), ranges).shape == (2, 3, 81, 65)
    assert accepts(ranges, (1, 3, 65, 300)) and not accepts(ranges, (1, 3, 64, 300))


@pytest.mark.parametrize("experiment", ["small", *OFFICIAL_EXPERIMENTS])
def test_the_export_config_composes_with_every_recipe(experiment):
    cfg = compose_config("export", [f"experiment={experiment}", "checkpoint=model.pth"])
    check_config(cfg, ExportConfig)
    assert cfg.format == "onnx" and cfg.min_match == 0.99 and cfg.device == "cpu"


@pytest.mark.slow
def test_user_mistakes_are_one_line_with_status_2(tmp_path):
    result = run_tool("export", "checkpoint=missing.pth", "format=tflite", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "format=tflite" in result.stderr
    result = run_tool("export", f"checkpoint={tmp_path / 'missing.pth'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "missing.pth" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- matching
def detections(scores, labels, boxes):
    return Detections(torch.tensor(scores), torch.tensor(labels), torch.tensor(boxes, dtype=torch.float32))


def test_matching_needs_class_box_and_score():
    reference = [detections([0.9, 0.5], [1, 2], [[0, 0, 10, 10], [5, 5, 20, 20]])]
    assert match_detections(reference, reference).fraction == 1.0
    assert match_detections(reference, [detections([0.9, 0.5], [1, 3], [[0, 0, 10, 10], [5, 5, 20, 20]])]).matched == 1
    assert match_detections(reference, [detections([0.9, 0.502], [1, 2], [[0, 0, 10, 10], [5, 5, 20, 20]])]).matched == 1
    assert match_detections(reference, [detections([0.9, 0.5], [1, 2], [[0, 0, 10, 10], [6, 5, 20, 20]])]).matched == 1
    # one candidate cannot stand for two reference detections
    twice = [detections([0.9, 0.9], [1, 1], [[0, 0, 10, 10]] * 2)]
    assert match_detections(twice, [detections([0.9], [1], [[0, 0, 10, 10]])]).matched == 1


def test_top_detections_follow_postprocess():
    logits = torch.randn(2, 5, 4)
    boxes = torch.rand(2, 5, 4) * 0.5 + 0.25
    top = top_detections(logits, boxes, k=3)
    assert len(top) == 2 and top[0].scores.shape == (3,)
    flat = logits.sigmoid().view(2, -1)
    assert torch.equal(top[1].scores, flat[1].topk(3).values)
    assert torch.equal(top[1].labels, flat[1].topk(3).indices % 4)
