"""``trainer.fp32_precision``: float32 matrix products and convolutions with bfloat16 inputs on
CPUs (TF32 on CUDA), set through torch's backend flags; wrong values name the key."""
import json

import pytest
import torch
import torch.nn.functional as F

from cli import assert_ok, run_tool, tiny
from deformable_detr.engine.precision import check_fp32_precision, set_fp32_precision
from deformable_detr.engine.trainer import TrainerSettings
from deformable_detr.errors import ConfigError

FLAGS = (torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv, torch.backends.cuda.matmul, torch.backends.cudnn.conv)
CPU = torch.device("cpu")


@pytest.fixture
def restore_flags():
    """The flags are process-wide: every test leaves them as it found them (torch's older global
    setting, which ``set_fp32_precision`` goes through, first)."""
    legacy = torch.get_float32_matmul_precision()
    saved = [flag.fp32_precision for flag in FLAGS]
    yield
    torch.set_float32_matmul_precision(legacy)
    for flag, value in zip(FLAGS, saved):
        flag.fp32_precision = value


def products(generator: torch.Generator):
    """A matrix product, a linear layer and a channels-last convolution of random float32
    inputs, each with float64 results from the exact inputs and from bfloat16-rounded ones."""
    a, b = torch.randn(64, 256, generator=generator), torch.randn(256, 32, generator=generator)
    bias = torch.randn(32, generator=generator)
    x = torch.randn(2, 16, 12, 12, generator=generator).to(memory_format=torch.channels_last)
    w = torch.randn(8, 16, 3, 3, generator=generator)

    def rounded(t):
        return t.bfloat16().double()

    return [
        (lambda: a @ b, a.double() @ b.double(), rounded(a) @ rounded(b)),
        (lambda: F.linear(a, b.t(), bias), a.double() @ b.double() + bias.double(), rounded(a) @ rounded(b) + bias.double()),
        (lambda: F.conv2d(x, w, padding=1), F.conv2d(x.double(), w.double(), padding=1),
         F.conv2d(rounded(x), rounded(w), padding=1)),
    ]


def has_amx() -> bool:
    try:
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    except RuntimeError:
        return False


# oneDNN rounds float32 products' inputs where its kernels for them exist: measured on AMX CPUs
@pytest.mark.skipif(not has_amx(), reason="needs a CPU with AMX")
def test_bf16_rounds_the_inputs_of_float32_products_on_the_cpu(restore_flags):
    cases = products(torch.Generator().manual_seed(0))
    cuda_products = torch.backends.cuda.matmul.fp32_precision
    set_fp32_precision("bf16", CPU)
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16" and torch.backends.mkldnn.conv.fp32_precision == "bf16"
    assert torch.backends.cuda.matmul.fp32_precision == cuda_products
    # what torch.compile's autotuning reads back (it raises when only the per-backend flags were set)
    assert torch.get_float32_matmul_precision() == "medium"
    for compute, exact, from_rounded in cases:
        result = compute()
        assert result.dtype == torch.float32
        # the products of the rounded inputs, accumulated in float32; far from the exact ones
        torch.testing.assert_close(result.double(), from_rounded, rtol=1e-5, atol=1e-4)
        assert (result.double() - exact).abs().max() > 1e-2
    set_fp32_precision("ieee", CPU)
    assert torch.get_float32_matmul_precision() == "highest"
    for compute, exact, _ in cases:
        torch.testing.assert_close(compute().double(), exact, rtol=1e-5, atol=1e-4)


def test_tf32_sets_the_cuda_flags_only(restore_flags):
    cpu_products = torch.backends.mkldnn.matmul.fp32_precision
    set_fp32_precision("tf32", torch.device("cuda"))  # flags only: no GPU needed
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == cpu_products
    assert torch.get_float32_matmul_precision() == "high"


def test_the_fixture_leaves_exact_products_behind(restore_flags):
    # runs after the tests above: what they set is undone, products are exact again
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")


def test_none_leaves_torchs_flags_alone(restore_flags):
    for flag in FLAGS[:2]:
        flag.fp32_precision = "ieee"
    set_fp32_precision(None, CPU)
    assert [flag.fp32_precision for flag in FLAGS[:2]] == ["ieee", "ieee"]


@pytest.mark.parametrize(
    "precision, device, message",
    [("tf32", "cpu", r"trainer.fp32_precision=tf32 is not one of ieee, bf16 on cpu \(tf32 is for CUDA GPUs\)"),
     ("bf16", "cuda", r"trainer.fp32_precision=bf16 is not one of ieee, tf32 on cuda \(bf16 is for CPUs\)")],
)
def test_a_precision_of_the_other_device_type_is_refused(precision, device, message, restore_flags):
    before = [flag.fp32_precision for flag in FLAGS]
    with pytest.raises(ConfigError, match=message):
        set_fp32_precision(precision, torch.device(device))
    assert [flag.fp32_precision for flag in FLAGS] == before
    check_fp32_precision(None, torch.device(device))
    check_fp32_precision("ieee", torch.device(device))


def test_unknown_values_are_refused_by_the_settings():
    with pytest.raises(ConfigError, match="trainer.fp32_precision=fp8 is not one of null, ieee, tf32 .CUDA., bf16 .CPU."):
        TrainerSettings(fp32_precision="fp8")
    assert TrainerSettings().fp32_precision is None


@pytest.mark.slow
def test_train_refuses_tf32_on_the_cpu_before_building_anything(tmp_path):
    result = run_tool("train", "experiment=tiny_test", "device=cpu", "trainer.fp32_precision=tf32", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "trainer.fp32_precision=tf32 is not one of ieee, bf16 on cpu" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "train.log").exists()


@pytest.mark.slow
def test_benchmark_refuses_tf32_on_the_cpu(tmp_path):
    result = run_tool("benchmark", "experiment=tiny_test", "device=cpu", "measure=[training]", "precisions=[fp32,tf32]",
                      f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "precisions: ['tf32'] not on cpu (bf32 is for CPUs, tf32 for CUDA GPUs)" in result.stderr and not (tmp_path / "benchmark.json").exists()


@pytest.mark.slow
def test_a_run_trains_with_bfloat16_products_and_says_so(tmp_path):
    run = tmp_path / "run"
    result = run_tool("train", *tiny(run, str(tmp_path / "data"), "trainer.epochs=1", "trainer.fp32_precision=bf16"))
    assert_ok(result)
    log = (run / "train.log").read_text()
    assert "trainer.fp32_precision=bf16: float32 matrix products and convolutions with bf16 inputs" in log
    assert (run / "checkpoint_last.pth").is_file()


@pytest.mark.slow
def test_benchmark_measures_bfloat16_products(tmp_path):
    result = run_tool("benchmark", "experiment=tiny_test", "device=cpu", "image_size=[64,64]", "warmup=0", "iterations=1",
                      "precisions=[fp32,bf32]", "compile=[false]", "training_batch_size=1", "measure=[training]",
                      f"hydra.run.dir={tmp_path}")
    assert_ok(result)
    rows = json.loads((tmp_path / "benchmark.json").read_text())["training"]
    assert [row["precision"] for row in rows] == ["fp32", "bf32"] and all("error" not in row for row in rows)
    assert "| training bf32, batch 1, eager |" in result.stdout
