"""The Triton kernels compile for a GPU without one: Triton's compiler lowers them to PTX for sm_90
(H100) and sm_80 (A100) here, which the interpreter (tests/test_ops_triton.py) never does, and the
PTX keeps the memory accesses the kernels are designed around: 16-byte loads of value rows and,
on sm_90, 16-byte atomic adds of value gradients."""
import re

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def kernels():
    """The kernel module, decorated for compilation: skipped when this process interprets them."""
    from deformable_detr_ops import triton_kernels

    if type(triton_kernels.ms_deform_attn_forward_kernel).__name__ == "InterpretedFunction":
        pytest.skip("Triton's interpreter is on (TRITON_INTERPRET=1): nothing is compiled")
    if "nvidia" not in getattr(triton.backends, "backends", {"nvidia": None}):
        pytest.skip("this Triton has no CUDA backend")
    return triton_kernels


COMMON = {"spatial_shapes": "*i64", "level_start_index": "*i64", "tokens": "i32", "queries": "i32", "heads": "i32",
          "channels": "i32"}


def compile_kernel(function, signature, constexprs, capability, num_warps=4):
    """PTX of ``function`` for ``signature`` (argument name -> Triton type, in order), with the
    16-divisibility Triton specializes at run time for aligned pointers and channels = 32."""
    names = list(signature)
    divisible = [name for name in names if signature[name].startswith("*")] + ["channels"]
    source = ASTSource(
        fn=function,
        signature=dict(signature, **{name: "constexpr" for name in constexprs}),
        constexprs={(names.index(name) if name in names else len(names) + list(constexprs).index(name),): value
                    for name, value in constexprs.items()},
        attrs={(names.index(name),): [["tt.divisibility", 16]] for name in divisible},
    )
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps}).asm["ptx"]


def forward_signature(value_type, location_type, output_type):
    return {"value": f"*{value_type}", "spatial_shapes": "*i64", "level_start_index": "*i64",
            "sampling_locations": f"*{location_type}", "attention_weights": f"*{location_type}",
            "output": f"*{output_type}", **{k: v for k, v in COMMON.items() if not k.startswith(("spatial", "level"))}}


def backward_signature(value_type, location_type, sum_type):
    return {"value": f"*{value_type}", "spatial_shapes": "*i64", "level_start_index": "*i64",
            "sampling_locations": f"*{location_type}", "attention_weights": f"*{location_type}",
            "grad_output": f"*{location_type}", "grad_value": f"*{sum_type}",
            "grad_sampling_locations": f"*{location_type}", "grad_attention_weights": f"*{location_type}",
            **{k: v for k, v in COMMON.items() if not k.startswith(("spatial", "level"))}}


def count(pattern, ptx):
    return len(re.findall(pattern, ptx))


@pytest.mark.parametrize("value_type", ["fp32", "bf16"])
def test_forward_compiles_with_16_byte_value_loads(value_type):
    module = kernels()
    from deformable_detr_ops.triton_op import launch_config

    config = launch_config(32, backward=False)
    ptx = compile_kernel(module.ms_deform_attn_forward_kernel, forward_signature(value_type, "fp32", "fp32"),
                         {"LEVELS": 4, "POINTS": 4, "BLOCK_Q": config["BLOCK_Q"], "BLOCK_D": config["BLOCK_D"],
                          "FLOAT64": False}, 90)
    assert count(r"ld\.global[^\n;]*\.v4", ptx) > 0, "value rows are not read 16 bytes at a time"
    assert count(r"(ld|st)\.local", ptx) == 0, "registers spill to local memory"
    assert count(r"atom\.", ptx) == 0


@pytest.mark.parametrize("capability, vector_atomics", [(90, True), (80, False)])
def test_backward_compiles_with_coalesced_atomics(capability, vector_atomics):
    module = kernels()
    from deformable_detr_ops.triton_op import launch_config

    config = launch_config(32, backward=True)
    ptx = compile_kernel(module.ms_deform_attn_backward_kernel, backward_signature("bf16", "fp32", "fp32"),
                         {"LEVELS": 4, "POINTS": 4, "BLOCK_Q": config["BLOCK_Q"], "BLOCK_D": config["BLOCK_D"],
                          "FLOAT64": False, "GRAD_VALUE": True}, capability)
    atomics = count(r"(atom|red)\.global[^\n;]*add", ptx)
    assert atomics > 0
    # relaxed: no fences around each of them
    assert count(r"(atom|red)\.global[^\n;]*\.relaxed", ptx) == atomics
    if vector_atomics:
        assert count(r"(atom|red)\.global[^\n;]*add\.v4\.f32", ptx) == atomics, "value gradients are not added 16 bytes at a time"
    assert count(r"(ld|st)\.local", ptx) == 0, "registers spill to local memory"


def test_float64_and_the_backward_without_value_gradients_compile():
    module = kernels()
    ptx = compile_kernel(module.ms_deform_attn_forward_kernel, forward_signature("fp64", "fp64", "fp64"),
                         {"LEVELS": 2, "POINTS": 2, "BLOCK_Q": 32, "BLOCK_D": 32, "FLOAT64": True}, 90)
    assert count(r"fma\.rn\.f64|mul\.rn\.f64|add\.rn\.f64|\.f64", ptx) > 0
    ptx = compile_kernel(module.ms_deform_attn_backward_kernel, backward_signature("fp32", "fp32", "fp32"),
                         {"LEVELS": 2, "POINTS": 2, "BLOCK_Q": 32, "BLOCK_D": 32, "FLOAT64": False, "GRAD_VALUE": False}, 90)
    assert count(r"atom\.global|red\.global", ptx) == 0
