"""tools/benchmark.py: parameter counts of the official recipes, the FLOP formula of the op, the
profile's bookkeeping, and one end-to-end run on a tiny model."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import deformable_detr_ops as ops
from deformable_detr.cli.benchmark import check_settings, count_parameters, image_size_of
from deformable_detr.cli.checks import ConfigError
from cli import compose_config, run_tool
from deformable_detr.engine.flops import count_detector_flops
from deformable_detr.engine.profiling import OP_BACKWARD, OP_FORWARD, step_breakdown
from deformable_detr_ops.flops import BACKWARD_NAME, FORWARD_NAME
from deformable_detr_ops.testing import make_inputs
from model_builders import tiny_model

# the official code's parameter counts (its main.py prints them)
OFFICIAL_PARAMETERS = {
    "r50_deformable_detr": 40_069_665,
    "r50_deformable_detr_plus_iterative_bbox_refinement": 40_849_660,
    "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage": 41_181_529,
}
IMPLEMENTATIONS = ["reference"] + (["kernel"] if ops.kernel_available("cpu") else [])


@pytest.mark.parametrize("experiment", list(OFFICIAL_PARAMETERS))
def test_parameter_counts_match_the_official_ones(experiment):
    cfg = compose_config("benchmark", [f"experiment={experiment}", "model.backbone.pretrained=false"])
    counts = count_parameters(cfg.model, 91)
    assert counts["parameters"] == OFFICIAL_PARAMETERS[experiment]
    # stem, layer1 and the frozen BatchNorm affine parameters stay fixed
    assert counts["trainable_parameters"] == OFFICIAL_PARAMETERS[experiment] - 222_400
    assert image_size_of(cfg) == [800, 1066]


def test_the_tool_writes_integer_parameter_counts(tmp_path):
    result = run_tool("benchmark", "experiment=r50_deformable_detr", "device=cpu", "measure=[params]", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["parameters"] == 40_069_665 and isinstance(report["trainable_parameters"], int)
    assert "40,069,665" in result.stdout


def _op_call(implementation):
    # N=1, levels 3x4 and 2x2, M=2 heads of D=3 channels, Lq=5 queries, P=2 points
    value, shapes, starts, locations, weights = make_inputs([(3, 4), (2, 2)], batch=1, heads=2, channels=3, queries=5, points=2)
    inputs = [value.requires_grad_(), shapes, starts, locations.requires_grad_(), weights.requires_grad_()]
    with FlopCounterMode(display=False) as counter:
        output = ops.ms_deform_attn(*inputs, implementation=implementation)
        forward = counter.get_total_flops()
        output.sum().backward()
    return forward, {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_op_flops_match_a_hand_count(implementation):
    # 1 image x 5 queries x 2 heads x 2 levels x 2 points = 40 samples, each of 3 channels:
    # 120 sampled channels x (4 bilinear corners + 1 attention weight) = 600 multiply-adds
    forward, by_operator = _op_call(implementation)
    assert forward == 2 * 600
    # the backward is counted as twice the forward, as for matrix products; nothing else counts
    assert by_operator == {FORWARD_NAME: 1200, BACKWARD_NAME: 2400}


def test_model_flops_do_not_depend_on_the_implementation():
    counts = {implementation: _op_call(implementation) for implementation in IMPLEMENTATIONS}
    assert len({json.dumps(c, sort_keys=True) for c in counts.values()}) == 1


def test_detector_flops_are_split_into_parts():
    model = tiny_model(hidden=32, queries=10).eval()
    count = count_detector_flops(model, torch.zeros(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert sum(count.by_part.values()) == count.total and min(count.by_part.values()) >= 0
    assert count.macs == count.total / 2
    # the op: 2 encoder layers (S queries) and 2 decoder layers (10 queries), 4 heads x 8 channels,
    # 4 levels x 2 points, 5 multiply-adds per sampled channel. Levels 8x12, 4x6, 2x3, 1x2: S = 128.
    per_query = 4 * 4 * 2 * 8 * 5
    assert count.deformable_attention == 2 * per_query * (2 * 128 + 2 * 10)
    assert all(p.requires_grad for p in model.parameters())


def _event(name, start, end):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))


def test_step_breakdown_counts_nested_ranges_once():
    # microseconds: one 100 ms step; the op's forward runs inside the encoder (10 ms of 30)
    events = [
        _event("step", 0, 100_000),
        _event("forward", 0, 50_000),
        _event("backbone", 0, 10_000),
        _event("encoder", 10_000, 40_000),
        _event(OP_FORWARD, 15_000, 25_000),
        _event(OP_FORWARD, 16_000, 24_000),  # the dispatcher's nested call of the same op
        _event("loss", 50_000, 60_000),
        _event("matcher", 52_000, 55_000),
        _event("backward", 60_000, 90_000),
        _event(OP_BACKWARD, 70_000, 75_000),
        _event("optimizer", 90_000, 99_000),
    ]
    rows = step_breakdown(events)
    assert rows["backbone"] == 10 and rows["encoder (without the op)"] == 20
    assert rows["deformable attention op, forward"] == 10 and rows["decoder (without the op)"] == 0
    assert rows["rest of the forward (projections, position encodings, heads)"] == 10
    assert rows["matcher"] == 3 and rows["loss (without the matcher)"] == 7
    assert rows["backward (without the op)"] == 25 and rows["deformable attention op, backward"] == 5
    assert rows["optimizer (clipping and step)"] == 9 and rows["step"] == 100
    assert rows["other (data to device, zero_grad, between the parts)"] == pytest.approx(1)


@pytest.mark.slow
def test_end_to_end_on_a_tiny_model(tmp_path):
    result = run_tool(
        "benchmark", "experiment=tiny_test", "device=cpu", "image_size=[64,64]", "warmup=0", "iterations=1",
        "precisions=[fp32]", "compile=[false]", "inference_batch_sizes=[1]", "training_batch_size=1",
        "measure=[params,flops,inference,training,profile]", "profile.image_size=[64,64]", "profile.batch_size=1",
        "profile.warmup=0", "profile.steps=1", f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["gmacs"] == pytest.approx(report["flops"] / 2e9)
    for mode in ("inference", "training"):
        (row,) = report[mode]
        assert "error" not in row, row
        assert row["images_per_second"] > 0 and row["peak_memory_mb"] > 0
    profile = report["profile"]["milliseconds_per_step"]
    assert profile["step"] > 0 and profile["backbone"] > 0 and profile["matcher"] > 0
    assert "| training fp32, batch 1, eager |" in result.stdout


@pytest.mark.slow
def test_compiled_speed_is_reported_with_its_first_iteration(tmp_path):
    result = run_tool(
        "benchmark", "experiment=tiny_test", "device=cpu", "image_size=[64,64]", "warmup=0", "iterations=2",
        "precisions=[fp32]", "compile=[false,true]", "inference_batch_sizes=[1]", "measure=[inference]", f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    eager, compiled = json.loads((tmp_path / "benchmark.json").read_text())["inference"]
    assert (eager["compile"], compiled["compile"]) == (False, True)
    assert "error" not in compiled and compiled["images_per_second"] > 0
    # the first iteration (compilation) is left out of the timed ones even without warmup
    assert eager["first_iteration_seconds"] is None and compiled["first_iteration_seconds"] > max(compiled["iteration_seconds"])
    assert "| inference fp32, batch 1, compiled |" in result.stdout and "first iteration" in result.stdout


@pytest.mark.parametrize(
    "override, message",
    [("measure=[speed]", "measure="), ("precisions=[fp8]", "precisions"), ("image_size=[800]", "image_size"), ("training_batch_size=0", "training_batch_size")],
)
def test_bad_settings_name_the_key(override, message):
    cfg = compose_config("benchmark", ["experiment=tiny_test", override])
    with pytest.raises(ConfigError, match=message):
        check_settings(cfg)
