"""Official-layout checkpoint files for tests: from the key tables and from the public case's weights."""
import argparse
import json
import math
import os
import zlib

import numpy as np
import torch

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PUBLIC_CASE = os.path.join(DATA, "public_case")

# The official command-line arguments of each experiment that differ from the defaults.
OFFICIAL_FLAGS = {
    "r50_deformable_detr": {},
    "r50_deformable_detr_single_scale": {"num_feature_levels": 1},
    "r50_deformable_detr_single_scale_dc5": {"num_feature_levels": 1, "dilation": True},
    "r50_deformable_detr_plus_iterative_bbox_refinement": {"with_box_refine": True},
    "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage": {"with_box_refine": True, "two_stage": True},
}


def official_keys(experiment):
    """[(key, shape tuple, tied-to key or None)] of an official release checkpoint."""
    rows = []
    with open(os.path.join(DATA, "official_keys", f"{experiment}.tsv")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, *rest = line.rstrip("\n").split("\t")
            dims = tuple(int(d) for d in shape.split("x")) if shape else ()
            rows.append((key, dims, rest[0] if rest and rest[0] else None))
    return rows


def official_args(experiment, **overrides):
    """The argparse.Namespace an official release file carries."""
    args = dict(
        lr=2e-4, lr_backbone=2e-5, batch_size=2, weight_decay=1e-4, epochs=50, lr_drop=40, clip_max_norm=0.1,
        with_box_refine=False, two_stage=False, backbone="resnet50", dilation=False, position_embedding="sine",
        num_feature_levels=4, enc_layers=6, dec_layers=6, dim_feedforward=1024, hidden_dim=256, dropout=0.1,
        nheads=8, num_queries=300, dec_n_points=4, enc_n_points=4, masks=False, aux_loss=True, dataset_file="coco",
    )
    args.update(OFFICIAL_FLAGS[experiment])
    args.update(overrides)
    return argparse.Namespace(**args)


def random_official_checkpoint(experiment, path, seed=0, num_classes=None):
    """Write a release-layout checkpoint of ``experiment`` with random values (tied keys equal)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    rows = official_keys(experiment)
    for key, shape, tied in rows:
        if tied is None:
            if num_classes is not None and key.startswith("class_embed."):
                shape = (num_classes,) + shape[1:]
            state[key] = torch.rand(shape, generator=generator) * 0.02 - 0.01
    for key, _, tied in rows:
        if tied is not None:
            state[key] = state[tied].clone()
    torch.save({"model": state, "args": official_args(experiment), "epoch": 49}, path)
    return path


def public_case_checkpoint(path):
    """The public case's single-scale checkpoint, regenerated from its weights description."""
    with open(os.path.join(PUBLIC_CASE, "r50_deformable_detr_single_scale.weights.json")) as f:
        description = json.load(f)
    specs = description["specs"]
    state = {}
    for key in sorted(specs):
        spec = specs[key]
        if "alias" in spec:
            continue
        n = int(np.prod(spec["shape"])) if spec["shape"] else 1
        if "const" in spec:
            values = np.full(n, spec["const"], dtype=np.float64)
        else:
            uniform = np.random.Generator(np.random.PCG64(zlib.crc32(key.encode()))).random(n)
            values = spec["mean"] + spec["std"] * math.sqrt(3.0) * (2.0 * uniform - 1.0)
        state[key] = torch.from_numpy(values.astype(np.float32)).reshape(spec["shape"])
    for key in sorted(specs):
        if "alias" in specs[key]:
            state[key] = state[specs[key]["alias"]].clone()
    torch.save({"model": state, "args": argparse.Namespace(**description["args"]), "epoch": 49}, path)
    return path
