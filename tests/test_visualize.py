"""The sampling recorder, the sampling-point pictures and statistics, and tools/visualize.py."""
import json

import PIL.Image
import pytest
import torch

import deformable_detr.models.deformable_attention as deformable_attention
from cli import run_tool, run_tool_in_process
from deformable_detr.data import pad_images
from deformable_detr.models import MSDeformAttn, record_sampling
from deformable_detr.visualization import draw_sampling, encoder_query_at, sampling_points, sampling_statistics
from inference_fixtures import make_checkpoint, make_image
from model_builders import tiny_model

LAYERS = ["encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1"]
STAT_KEYS = {"queries", "heads", "levels", "points", "offset_pixels", "attention_weights", "outside_share", "outside_valid_share"}
WEIGHT_KEYS = {"min", "max", "mean", "entropy", "near_zero_share"}


def batch():
    """Two images of different sizes: the second is padded at the bottom and right."""
    torch.manual_seed(0)
    return pad_images([torch.randn(3, 64, 96), torch.randn(3, 48, 56)])


def attention_modules(model):
    return [m for m in model.modules() if isinstance(m, MSDeformAttn)]


@pytest.mark.parametrize("options", [{}, {"refine": True, "two_stage": True}], ids=["points", "boxes"])
def test_recorder_captures_what_the_op_received(monkeypatch, options):
    model = tiny_model(**options).eval()
    calls = []
    original = deformable_attention.ms_deform_attn

    def spy(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        calls.append((spatial_shapes, level_start_index, sampling_locations, attention_weights))
        return original(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    monkeypatch.setattr(deformable_attention, "ms_deform_attn", spy)
    images, masks = batch()
    with torch.no_grad(), record_sampling(model) as records:
        model(images, masks)
    assert [r.layer for r in records] == LAYERS
    assert len(calls) == len(records)
    for record, (shapes, starts, locations, weights) in zip(records, calls):
        assert torch.equal(record.sampling_locations, locations)
        assert torch.equal(record.attention_weights, weights)
        assert torch.equal(record.spatial_shapes, shapes) and torch.equal(record.level_start_index, starts)
        assert record.reference_points.shape[:2] == locations.shape[:2]
        assert record.reference_points.shape[-1] == (4 if options and record.layer.startswith("decoder") else 2)
        assert record.padding_mask is not None and record.padding_mask[0].sum() == 0 and record.padding_mask[1].any()
    assert all(m.recording is None for m in attention_modules(model))


def test_recording_off_stores_nothing_and_changes_nothing():
    model = tiny_model().eval()
    images, masks = batch()
    before = [dict(vars(m)) for m in attention_modules(model)]
    with torch.no_grad():
        plain = model(images, masks)
        with record_sampling(model) as records:
            recorded = model(images, masks)
        after = model(images, masks)
    assert len(records) == len(LAYERS)
    for outputs in (recorded, after):
        assert torch.equal(outputs["pred_logits"], plain["pred_logits"]) and torch.equal(outputs["pred_boxes"], plain["pred_boxes"])
    for module, attributes in zip(attention_modules(model), before):
        assert module.recording is None
        assert vars(module).keys() == attributes.keys()


def test_points_are_placed_on_the_valid_image():
    """Padding does not shift the drawing: locations are divided by the valid ratios, as the model multiplied them."""
    model = tiny_model().eval()
    images, masks = batch()
    with torch.no_grad(), record_sampling(model) as records:
        model(images, masks)
    encoder, decoder = records[0], records[-1]
    width, height = 560, 480  # the second image (56 x 48) drawn 10 times larger
    h, w = encoder.spatial_shapes[0].tolist()
    valid_w, valid_h = (encoder.valid_ratios()[1, 0] * torch.tensor([w, h])).round().int().tolist()
    for row, column in [(0, 0), (valid_h - 1, valid_w - 1), (valid_h // 2, 1)]:
        query = row * w + column
        sample = sampling_points(encoder, query, width, height, batch_index=1)
        # the encoder's reference of a finest-level pixel is that pixel's centre
        expected = torch.tensor([(column + 0.5) / valid_w * width, (row + 0.5) / valid_h * height])
        assert torch.allclose(sample["reference"], expected, atol=1e-3)
        assert encoder_query_at(encoder, *expected.tolist(), width, height, batch_index=1) == query
    # the decoder's reference is the sigmoid of the reference head, in fractions of the valid image
    transformer = model.transformer
    with torch.no_grad():
        query_pos = model.query_embed.weight[:, : transformer.d_model]
        expected = transformer.reference_points(query_pos).sigmoid() * torch.tensor([width, height])
    for query in range(3):
        assert torch.allclose(sampling_points(decoder, query, width, height, batch_index=1)["reference"], expected[query], atol=1e-3)


def test_statistics_and_picture():
    model = tiny_model().eval()
    images, masks = batch()
    with torch.no_grad(), record_sampling(model) as records:
        model(images, masks)
    stats = sampling_statistics(records[-1])
    assert set(stats) == STAT_KEYS and set(stats["attention_weights"]) == WEIGHT_KEYS
    assert list(stats["offset_pixels"]) == ["level0", "level1", "level2", "level3"]
    assert stats["queries"] == 20 and stats["levels"] == 4
    assert stats["attention_weights"]["entropy"] <= torch.log(torch.tensor(4.0 * 2)).item() + 1e-6
    assert 0 <= stats["outside_share"] <= stats["outside_valid_share"] <= 1
    picture = draw_sampling(torch.rand(3, 64, 96), records[-1], query=0, box_xyxy=[10, 10, 50, 40], label=3, title="decoder.layers.1 query 0")
    assert picture.dtype == torch.uint8 and picture.shape[0] == 3 and picture.shape[1] > 64 and picture.shape[2] == 96


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("visualize")
    return make_checkpoint(folder / "tiny.pth"), make_image(folder / "photo.png", 120, 90)


def check_outputs(run, queries, points):
    pictures = [f"decoder_query{query}.png" for query in queries] + [f"encoder_point{index}.png" for index in range(points)]
    for name in pictures:
        width, height = PIL.Image.open(run / name).size
        assert width == 120 and height > 90  # the image below a band with the title and legend
    assert (run / "decoder_overview.png").is_file() and (run / "encoder_overview.png").is_file()
    stats = json.loads((run / "sampling_stats.json").read_text())
    assert {"image", "width", "height", "layers"} <= set(stats) and (stats["width"], stats["height"]) == (120, 90)
    assert list(stats["layers"]) == ["encoder.layers.0", "decoder.layers.0", "decoder.layers.1"]
    for layer in stats["layers"].values():
        assert set(layer) == STAT_KEYS and set(layer["attention_weights"]) == WEIGHT_KEYS


def test_visualize_writes_pictures_and_statistics(case, tmp_path):
    checkpoint, image = case
    result = run_tool("visualize", f"checkpoint={checkpoint}", f"input={image}", f"hydra.run.dir={tmp_path}", "device=cpu", "top_k=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "decoder.layers.1" in result.stdout and "entropy" in result.stdout
    queries = sorted(int(p.stem[len("decoder_query"):]) for p in tmp_path.glob("decoder_query*.png"))
    assert len(queries) == 2
    check_outputs(tmp_path, queries, points=2)


def test_visualize_chosen_queries_points_and_layer(case, tmp_path):
    checkpoint, image = case
    arguments = [f"checkpoint={checkpoint}", f"input={image}", f"hydra.run.dir={tmp_path}", "device=cpu"]
    result = run_tool_in_process("visualize", *arguments, "queries=[0,7]", "points=[[5,5],[119,89],[60,45]]", "layer=0", "colour_by=head")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_outputs(tmp_path, [0, 7], points=3)
    result = run_tool_in_process("visualize", *arguments, "layer=5")
    assert result.returncode == 2 and "layer=5 is out of range" in result.stderr


def test_sampling_snapshot_for_tensorboard():
    from deformable_detr.visualization import sampling_snapshot

    model = tiny_model().eval()
    images, masks = batch()
    picture = sampling_snapshot(model, images[1], masks[1], names={3: "square"})
    assert picture.dtype == torch.uint8 and picture.shape[0] == 3 and picture.shape[1] > 48 and picture.shape[2] == 56  # the unpadded image
    assert all(m.recording is None for m in attention_modules(model))
