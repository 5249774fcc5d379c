"""torch.compile of the whole detector: one graph (no breaks), the same function and gradients as
eager, dynamic image sizes without recompiling, and training/evaluation through it."""
import functools

import pytest
import torch

import deformable_detr_ops as ops
from cli import assert_ok, run_tool_in_process, tiny
from model_builders import off_pixel_centres, tiny_model
from deformable_detr.engine import trainer as trainer_module
from deformable_detr.engine.compilation import compile_detector, compiled_graphs

requires_kernel = pytest.mark.skipif(not ops.library_loaded(), reason=f"the compiled kernels are not built. {ops.BUILD_HINT}")

VARIANTS = {
    "multi-scale": dict(levels=4),
    "box-refinement": dict(levels=4, refine=True),
    "two-stage": dict(levels=4, refine=True, two_stage=True),
}


def padded_batch(height, width, dtype=torch.float32, seed=0):
    """Two images, the second padded at the bottom and right: (2, 3, H, W), (2, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, height, width, generator=generator, dtype=dtype)
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[1, height * 3 // 4:, :] = True
    masks[1, :, width * 2 // 3:] = True
    images[masks[:, None].expand_as(images)] = 0
    return images, masks


def outputs_and_gradients(forward, model, images, masks):
    """Every output tensor and every parameter's gradient of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = forward(images, masks)
    tensors = [out["pred_logits"], out["pred_boxes"]]
    tensors += [t for aux in out.get("aux_outputs", []) for t in (aux["pred_logits"], aux["pred_boxes"])]
    if "enc_outputs" in out:
        tensors += [out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"]]
    # a loss that reaches every output, weighted so that no gradient is a plain sum
    loss = sum((t.float().sin() * (i + 1)).sum() for i, t in enumerate(tensors) if torch.isfinite(t).all())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return [t.detach() for t in tensors], grads


@pytest.mark.slow
@requires_kernel
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_model_is_one_graph_with_eager_outputs_and_gradients_in_float64(variant):
    """fullgraph=True: a graph break anywhere (the op, the encoder/decoder, valid ratios, level
    shapes, two-stage top-k) is an error. aot_eager traces forward and backward as inductor
    receives them, without generating code; float64 leaves only summation-order differences."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_model(**VARIANTS[variant]).double().train()
    images, masks = padded_batch(96, 128, torch.float64)
    compiled = compile_detector(model, dynamic=False, backend="aot_eager", fullgraph=True)
    eager_outputs, eager_grads = outputs_and_gradients(model, model, images, masks)
    compiled_outputs, compiled_grads = outputs_and_gradients(compiled, model, images, masks)
    for eager, traced in zip(eager_outputs, compiled_outputs):
        torch.testing.assert_close(traced, eager, rtol=1e-10, atol=1e-10)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 100
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-8, atol=1e-10, msg=name)
    assert compiled_graphs() >= 1


@pytest.mark.slow
@requires_kernel
def test_inductor_code_computes_the_eager_function():
    """The generated C++ of the default recipe's architecture (refinement + two-stage), float32,
    forward and backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    # off the kinks at pixel centres, where float32 rounding (which differs in generated code) picks a side
    model = off_pixel_centres(tiny_model(**VARIANTS["two-stage"])).train()
    images, masks = padded_batch(96, 128)
    compiled = compile_detector(model, dynamic=False, fullgraph=True)
    eager_outputs, eager_grads = outputs_and_gradients(model, model, images, masks)
    compiled_outputs, compiled_grads = outputs_and_gradients(compiled, model, images, masks)
    for eager, traced in zip(eager_outputs, compiled_outputs):
        # two-stage proposals whose scores differ in the last float32 bits may come in either order:
        # compare the queries as a set (each column sorted over them); the loss is order-free anyway
        torch.testing.assert_close(traced.sort(dim=1).values, eager.sort(dim=1).values, rtol=1e-4, atol=1e-4)
    # float32 through 20 trained BatchNorm layers: compare each gradient as a whole
    errors = {name: float((compiled_grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)) for name, grad in eager_grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, (worst, errors[worst])


@pytest.mark.slow
@requires_kernel
def test_new_image_sizes_reuse_the_dynamic_graph():
    """Multi-scale training pads every batch to a different size: one graph serves them all."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_model(levels=1).train()
    compiled = compile_detector(model, backend="aot_eager", fullgraph=True)
    before = compiled_graphs()
    for height, width in [(96, 128), (112, 144), (128, 100), (90, 170)]:
        images, masks = padded_batch(height, width)
        traced, _ = outputs_and_gradients(compiled, model, images, masks)
        eager, _ = outputs_and_gradients(model, model, images, masks)
        torch.testing.assert_close(traced[0], eager[0], rtol=1e-4, atol=1e-4)
    assert compiled_graphs() - before == 1


@requires_kernel
@pytest.mark.slow
def test_training_and_evaluation_run_compiled(tmp_path, monkeypatch):
    """trainer.compile=true end to end (aot_eager keeps it fast): it trains, evaluates, logs the
    compilation and does not recompile in the second epoch's new image sizes."""
    torch._dynamo.reset()
    monkeypatch.setattr(trainer_module, "compile_detector", functools.partial(compile_detector, backend="aot_eager"))
    result = run_tool_in_process("train", *tiny(tmp_path / "run", tmp_path / "data", "trainer.compile=true", "trainer.epochs=2"))
    assert_ok(result)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "first training step:" in log and "(compilation included)" in log
    counts = [int(line.split("torch.compile: ")[1].split()[0]) for line in log.splitlines() if "torch.compile: " in line]
    # epoch 2's new sizes add no training graph: at most the evaluation's, plus its specialization for
    # a last batch of one image (these 64-96 px images also make some maps 1 pixel wide: a guard of its own)
    assert len(counts) == 2 and counts[1] <= counts[0] + 2, log
    assert "final COCO box AP" in log


def test_training_resumes_train_mode_after_an_evaluation(monkeypatch):
    """An evaluation puts the model in eval mode; the next epoch must train in train mode again
    (BatchNorm statistics, dropout)."""
    from deformable_detr.engine import evaluate_loop

    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    model.train()

    class Loader(list):
        dataset = None

    monkeypatch.setattr(evaluate_loop, "CocoEvaluator", lambda coco: type("E", (), {"summarize": lambda self, **k: None})())
    evaluate_loop.evaluate(model, None, Loader(), None, torch.device("cpu"))
    assert model.training
    model.eval()
    evaluate_loop.evaluate(model, None, Loader(), None, torch.device("cpu"))
    assert not model.training


@requires_kernel
@pytest.mark.slow
def test_infer_compiled_writes_the_eager_predictions(tmp_path, monkeypatch):
    """tools/infer.py compile=true (through the Detector): images of three sizes through the compiled
    model, the same detections as eager."""
    import json

    from deformable_detr.inference import detector
    from inference_fixtures import make_checkpoint, make_image

    torch._dynamo.reset()
    monkeypatch.setattr(detector, "compile_detector", functools.partial(compile_detector, backend="aot_eager"))
    checkpoint = make_checkpoint(tmp_path / "tiny.pth")
    images = tmp_path / "images"
    images.mkdir()
    for index, (width, height) in enumerate([(90, 70), (64, 100), (120, 80)]):
        make_image(images / f"{index}.png", width, height, seed=index)
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled_{compiled}"
        assert_ok(run_tool_in_process("infer", f"checkpoint={checkpoint}", f"input={images}", "device=cpu", "num_workers=0",
                                      "batch_size=1", "score_threshold=0.0", f"compile={str(compiled).lower()}", f"hydra.run.dir={out}"))
        runs[compiled] = json.loads((out / "predictions.json").read_text())
    assert compiled_graphs() >= 1
    for eager, traced in zip(runs[False], runs[True]):
        assert eager["file_name"] == traced["file_name"] and len(eager["detections"]) == len(traced["detections"]) > 0
        # random weights give near-tied scores whose order may swap: compare the sorted scores
        eager_scores = sorted(d["score"] for d in eager["detections"])
        traced_scores = sorted(d["score"] for d in traced["detections"])
        assert max(abs(a - b) for a, b in zip(eager_scores, traced_scores)) < 1e-4
