"""torch.compile(fullgraph=True) and torch.export through the compiled custom op."""
import pytest
import torch

import deformable_detr_ops as ops
from deformable_detr_ops import ms_deform_attn
from deformable_detr_ops.testing import ProjectedAttention, make_inputs

requires_kernel = pytest.mark.skipif(
    not ops.library_loaded(), reason=f"the compiled kernels are not built. {ops.BUILD_HINT}"
)


def run(function, inputs):
    """Output and gradients (value, sampling_locations, attention_weights) of function(*inputs)."""
    value, shapes, starts, locations, weights = (t.clone().requires_grad_() if t.is_floating_point() else t
                                                 for t in inputs)
    output = function(value, shapes, starts, locations, weights)
    output.backward(torch.cos(output.detach()))
    return [output.detach(), value.grad, locations.grad, weights.grad]


def model_inputs(queries=5):
    return make_inputs([(3, 4), (2, 2)], batch=2, heads=2, channels=4, queries=queries, points=3,
                       dtype=torch.float64, margin=0.1, seed=4)


@requires_kernel
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()
    module = ProjectedAttention(8)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for queries in (5, 7):
        inputs = model_inputs(queries)
        for eager, traced in zip(run(module, inputs), run(compiled, inputs)):
            torch.testing.assert_close(traced, eager, rtol=0, atol=1e-12)


@requires_kernel
def test_export_matches_eager():
    module = ProjectedAttention(8)
    inputs = model_inputs()
    exported = torch.export.export(module, tuple(inputs))
    assert any("deformable_attention.ms_deform_attn_forward" in str(node.target)
               for node in exported.graph.nodes), exported.graph
    for eager, traced in zip(run(module, inputs), run(exported.module(), inputs)):
        torch.testing.assert_close(traced, eager, rtol=0, atol=1e-12)


@requires_kernel
def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = model_inputs(queries=9)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        output = ms_deform_attn(*fake, implementation="kernel")
        grads = torch.ops.deformable_attention.ms_deform_attn_backward(*fake, output)
    assert output.shape == (2, 9, 8)
    assert [g.shape for g in grads] == [fake[0].shape, fake[3].shape, fake[4].shape]
