"""The optimizer: AdamW's fused step on channels-last weights, without copies, bit for bit."""
import pytest
import torch

from deformable_detr.engine.optim import AdamW, build_optimizer, dense_views


def parameters(seed=0):
    """Channels-last convolution weights (one with 1 x 1 kernels), a contiguous matrix and a bias."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(8, 4, 3, 3), (6, 8, 1, 1), (5, 7), (5,)]
    params = []
    for shape in shapes:
        tensor = torch.randn(shape, generator=generator)
        if tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        params.append(torch.nn.Parameter(tensor))
    return params


def run(optimizer_class, params, steps=4, seed=1, **options):
    optimizer = optimizer_class(params, lr=1e-2, weight_decay=1e-2, **options)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            # gradients as autograd leaves them: in the parameter's own layout
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=generator))
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_step_equals_torch_bit_for_bit_and_keeps_the_layout(amsgrad):
    ours, theirs = parameters(), parameters()
    assert not ours[0].is_contiguous() and ours[0].grad is None
    ours_optimizer = run(AdamW, ours, fused=True, amsgrad=amsgrad)
    theirs_optimizer = run(torch.optim.AdamW, theirs, fused=True, amsgrad=amsgrad)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert a.stride() == b.stride()
    for a, b in zip(ours, theirs):
        for key, value in ours_optimizer.state[a].items():
            assert torch.equal(value, theirs_optimizer.state[b][key]), key
            assert value.stride() == theirs_optimizer.state[b][key].stride(), key
    # the same state_dict format as torch's: a checkpoint loads into either
    torch.optim.AdamW(parameters(), lr=1e-2, fused=True, amsgrad=amsgrad).load_state_dict(ours_optimizer.state_dict())


def test_unfused_step_is_torch_s():
    ours, theirs = parameters(), parameters()
    run(AdamW, ours, fused=False)
    run(torch.optim.AdamW, theirs, fused=False)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def copies_in_step(optimizer_class):
    params = parameters()
    optimizer = run(optimizer_class, params, steps=1, fused=True)
    with torch.profiler.profile() as profile:
        optimizer.step()
    return sum(event.count for event in profile.key_averages() if event.key in ("aten::clone", "aten::contiguous"))


def test_fused_step_makes_no_contiguous_copies():
    """torch's fused step copies each channels-last tensor (parameter, gradient, both moments)
    to a contiguous one and back; ours hands the kernel views of the same memory."""
    assert copies_in_step(torch.optim.AdamW) > 0  # what this guards against still exists
    assert copies_in_step(AdamW) == 0


def test_dense_views():
    weight = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    views = dense_views([weight, grad])
    assert all(v.is_contiguous() for v in views)
    assert views[0].shape == (8, 3, 3, 4) and views[0].data_ptr() == weight.data_ptr()
    views[1].add_(1.0)  # writes land in the original tensor
    assert torch.equal(views[1].permute(0, 3, 1, 2), grad)
    contiguous = torch.randn(8, 4, 3, 3)
    assert dense_views([contiguous])[0] is contiguous
    # a gradient in another layout than its parameter: left to the kernel
    mixed = dense_views([weight, torch.randn(8, 4, 3, 3)])
    assert mixed[0] is weight
    # not dense (a strided slice): left to the kernel
    sliced = torch.randn(8, 4, 3, 6)[..., ::2]
    assert dense_views([sliced])[0] is sliced


def test_build_optimizer_is_ours_and_a_torch_adamw():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model)
    assert isinstance(optimizer, AdamW) and isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["fused"]
