"""Optimizer parameter groups and the learning-rate schedule of the official recipe."""
from typing import Dict, Iterable, List, Sequence

import torch
from torch import nn

# device types with a fused AdamW kernel (torch.optim.AdamW(fused=True))
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose fused step reads channels-last weights in place.

    The fused kernel copies every non-contiguous tensor it is given into a contiguous one and
    back. A channels-last convolution weight is dense, only permuted, as are its gradient and
    moments when they share its strides; its permuted view is contiguous, and AdamW is the same
    element by element in any order. So for the fused step each such tensor is handed over as
    that view: the same memory, updated in one pass, bit for bit the same result. The state,
    its ``state_dict`` and every other path are torch's own.
    """

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *rest):
        first = len(params)
        result = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *rest)
        if group["fused"]:
            lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if group["amsgrad"] else [])
            for index in range(first, len(params)):
                views = dense_views([tensors[index] for tensors in lists])
                for tensors, view in zip(lists, views):
                    tensors[index] = view
        return result


def dense_views(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``tensors`` of one shape and strides as contiguous permuted views of themselves when they
    are dense but not contiguous (channels-last, say); otherwise ``tensors`` unchanged."""
    first = tensors[0]
    if first.is_contiguous() or any(t.shape != first.shape or t.stride() != first.stride() for t in tensors):
        return list(tensors)
    # outermost dimension first; ties (size-1 dimensions) keep their order
    order = sorted(range(first.dim()), key=lambda d: (-first.stride(d), d))
    view = first.permute(order)
    if not view.is_contiguous():  # overlapping or with gaps: leave it to the kernel
        return list(tensors)
    return [t.permute(order) for t in tensors]


def param_groups(
    model: nn.Module,
    lr: float,
    lr_backbone: float,
    lr_linear_proj_mult: float = 0.1,
    backbone_names: Sequence[str] = ("backbone.",),
    linear_proj_names: Sequence[str] = ("reference_points", "sampling_offsets"),
) -> List[Dict]:
    """Three groups: the rest at ``lr``; the backbone at ``lr_backbone``; the layers predicting
    sampling locations (sampling offsets, reference points) at ``lr * lr_linear_proj_mult``, since
    large steps there move the samples far and destabilize early training.

    Frozen parameters are left out; empty groups are dropped. Each group carries a ``name``.
    """
    groups = {"default": [], "backbone": [], "linear_proj": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(key in name for key in backbone_names):
            groups["backbone"].append(param)
        elif any(key in name for key in linear_proj_names):
            groups["linear_proj"].append(param)
        else:
            groups["default"].append(param)
    rates = {"default": lr, "backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult}
    return [{"name": key, "params": params, "lr": rates[key]} for key, params in groups.items() if params]


def build_optimizer(
    model: nn.Module,
    lr: float = 2e-4,
    lr_backbone: float = 2e-5,
    lr_linear_proj_mult: float = 0.1,
    weight_decay: float = 1e-4,
    betas: Sequence[float] = (0.9, 0.999),
    fused: bool = True,
) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; with ``fused``, the fused kernel (one pass over all parameters
    instead of a dozen element-wise operations per parameter) when every parameter is on a
    device that has it: the CPU or a GPU. An ``AdamW`` of this module, so channels-last
    weights are updated in place."""
    groups = param_groups(model, lr, lr_backbone, lr_linear_proj_mult)
    devices = {p.device.type for g in groups for p in g["params"]}
    supported = bool(devices) and devices <= set(FUSED_ADAMW_DEVICES)
    return AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=bool(fused and supported) or None)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    iters_per_epoch: int,
    milestones: Iterable[int] = (40,),
    gamma: float = 0.1,
    warmup_iters: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule: linear warmup over ``warmup_iters``, then the rate is multiplied by
    ``gamma`` at the start of each epoch in ``milestones`` (the official recipe: x0.1 after
    epoch 40 of 50). Step it once per optimizer step."""
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    milestones = sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        epoch = step // iters_per_epoch
        decay = gamma ** sum(epoch >= m for m in milestones)
        warmup = min(1.0, (step + 1) / warmup_iters) if warmup_iters > 0 else 1.0
        return warmup * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

