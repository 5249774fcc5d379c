"""Precision: the ``amp`` setting of train/eval/infer (resolved, autocast, float32 outputs), and how
float32 matrix products and convolutions compute (``trainer.fp32_precision``)."""
import contextlib
import logging
from typing import Optional, Union

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}

# float32 products' internal precision per device type: exact (IEEE float32) or the reduced one
# the hardware multiplies fast while accumulating in float32 (TF32 on CUDA, bfloat16 on CPUs)
FP32_PRECISIONS = {"cpu": ("ieee", "bf16"), "cuda": ("ieee", "tf32")}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, slower than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name)() for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[str]:
    """``amp="auto"``: bf16 on a GPU that supports it or a CPU with native bfloat16 instructions
    (elsewhere bf16 is emulated, slower than float32), otherwise None. Other values unchanged."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else None
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else None


def warn_if_amp_is_emulated(amp: Optional[str], device: torch.device, key: str = "trainer.amp") -> None:
    """A warning when ``amp`` is bf16 on a CPU that only emulates bfloat16, slower than float32."""
    if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("%s=bf16 on a CPU without native bfloat16 instructions is emulated and slow; "
                       "%s=null is faster here", key, key)


def check_fp32_precision(precision: Optional[str], device: torch.device, key: str = "trainer.fp32_precision") -> None:
    """A ConfigError naming ``key`` unless ``precision`` applies to ``device`` (see ``set_fp32_precision``)."""
    allowed = FP32_PRECISIONS.get(device.type, ("ieee",))
    if precision is not None and precision not in allowed:
        other = {"tf32": "CUDA GPUs", "bf16": "CPUs"}.get(precision)
        where = f" ({precision} is for {other})" if other else ""
        raise ConfigError(f"{key}={precision} is not one of {', '.join(allowed)} on {device.type}{where}; "
                          f"null keeps torch's defaults")


def set_fp32_precision(precision: Optional[str], device: torch.device, key: str = "trainer.fp32_precision") -> None:
    """How float32 matrix products and convolutions (``nn.Linear``, ``nn.Conv2d``, ``matmul``)
    compute on ``device``'s type, process-wide, through torch's ``torch.backends.*.fp32_precision``.
    Tensors, weights, gradients and optimizer state stay float32 and products accumulate in
    float32; only the products' inputs are rounded:

    - None: torch's defaults (exact matrix products; on CUDA, cuDNN convolutions in TF32);
    - "ieee": exact float32 products and convolutions;
    - "tf32": CUDA products and convolutions on TF32 tensor cores (10 mantissa bits);
    - "bf16": CPU (oneDNN) products and convolutions with bfloat16 inputs (7 mantissa bits) on
      the CPU's bfloat16 units (AMX; AVX512-BF16 where oneDNN has kernels for it), the CPU's
      counterpart of TF32.

    Unlike ``amp`` (autocast), nothing else changes: element-wise operations, normalization,
    softmax and the deformable attention op stay float32. ``key`` names the setting in errors.
    """
    check_fp32_precision(precision, device, key)
    if precision is None:
        return
    if device.type == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
        logger.warning("%s=bf16 on a CPU without native bfloat16 instructions: oneDNN has no faster "
                       "kernels for it here", key)
    backends = {"cpu": (torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv),
                "cuda": (torch.backends.cuda.matmul, torch.backends.cudnn.conv)}
    if device.type not in backends:
        return
    # through torch's older global setting first: torch.compile's autotuning reads it back with
    # torch.get_float32_matmul_precision(), which raises once only the per-backend flags were set;
    # it also sets the other device type's products, which keep their own flag
    other = torch.backends.cuda.matmul if device.type == "cpu" else torch.backends.mkldnn.matmul
    kept = other.fp32_precision
    torch.set_float32_matmul_precision({"ieee": "highest", "tf32": "high", "bf16": "medium"}[precision])
    other.fp32_precision = kept
    for flag in backends[device.type]:
        flag.fp32_precision = precision


def autocast(device: torch.device, amp: Union[None, str, torch.dtype]):
    """Autocast to ``amp`` ("bf16", "fp16" or the torch dtype) on ``device``'s type; a no-op for None."""
    dtype = amp if isinstance(amp, torch.dtype) else AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def outputs_to_float(outputs):
    """Autocast leaves half-precision outputs; the matcher and losses run in float32 (or the
    model's own precision when that is higher, e.g. float64)."""
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    if isinstance(outputs, dict):
        return {k: outputs_to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(outputs_to_float(v) for v in outputs)
    return outputs


def to_device(images, masks, targets, device: torch.device):
    """A collated batch -- images (B, 3, H, W), masks (B, H, W), targets (list of dicts) -- on ``device``."""
    # non_blocking whatever the device: a no-op from CPU to CPU, safe from pinned or pageable host memory to a GPU
    images = images.to(device, non_blocking=True)
    masks = masks.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, masks, targets
