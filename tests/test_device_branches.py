"""What the code paths that choose by device type decide, tested on the CPU: batches moved to a
device, the process group's backend and device, the device of collectives, CUDA random states in
checkpoints, and pinned loader memory. What only a GPU can run (pinning, NCCL, real CUDA generators)
is left to the GPU tests; here those calls are recorded instead."""
import logging
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from deformable_detr.engine.distributed import init_distributed, process_group_backend
from deformable_detr.engine.precision import to_device
from deformable_detr.engine.rng import rng_state, set_rng_state
from deformable_detr.utils import distributed as utils_distributed


def collated_batch():
    target = {"boxes": torch.rand(2, 4), "labels": torch.tensor([1, 2]), "image_id": torch.tensor(7)}
    return torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), [target]


class Recorder:
    """Stands in for a tensor: records how it was asked to move."""

    def __init__(self, calls):
        self.calls = calls

    def to(self, device, non_blocking=False):
        self.calls.append((device, non_blocking))
        return self


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_batches_move_without_blocking_on_every_device(device):
    calls = []
    to_device(Recorder(calls), Recorder(calls), [{"boxes": Recorder(calls), "labels": Recorder(calls)}], torch.device(device))
    assert calls == [(torch.device(device), True)] * 4


def test_a_batch_already_on_the_cpu_is_not_copied():
    images, masks, targets = collated_batch()
    moved = to_device(images, masks, targets, torch.device("cpu"))
    assert moved[0] is images and moved[1] is masks and all(moved[2][0][k] is v for k, v in targets[0].items())


def test_every_tensor_of_a_batch_reaches_the_device():
    # the meta device stands in for a GPU: a real move to another device, on any machine
    images, masks, targets = to_device(*collated_batch(), torch.device("meta"))
    assert {t.device.type for t in [images, masks, *targets[0].values()]} == {"meta"}


@pytest.mark.parametrize(
    "device, local_rank, expected",
    [("cuda", 3, ("nccl", torch.device("cuda", 3), {"device_id": torch.device("cuda", 3)})),
     ("cuda:0", 1, ("nccl", torch.device("cuda", 1), {"device_id": torch.device("cuda", 1)})),
     ("cpu", 2, ("gloo", torch.device("cpu"), {}))],
)
def test_the_process_group_backend_follows_the_device(device, local_rank, expected):
    assert process_group_backend(device, local_rank) == expected


@pytest.fixture
def torchrun_rank_1_of_2(monkeypatch):
    """A torchrun environment of two processes on this machine, this one local rank 1, in which
    joining the process group and selecting a GPU are recorded instead of done."""
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(("init_process_group", kwargs)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    return calls


def test_a_gpu_rank_selects_its_gpu_and_joins_over_nccl(torchrun_rank_1_of_2):
    assert init_distributed("cuda", timeout_minutes=1) == torch.device("cuda", 1)
    (select, selected), (join, arguments) = torchrun_rank_1_of_2
    assert (select, selected) == ("set_device", torch.device("cuda", 1))
    assert join == "init_process_group" and arguments["backend"] == "nccl" and arguments["device_id"] == torch.device("cuda", 1)


def test_a_cpu_rank_joins_over_gloo_and_selects_no_gpu(torchrun_rank_1_of_2):
    assert init_distributed("cpu", timeout_minutes=1) == torch.device("cpu")
    ((join, arguments),) = torchrun_rank_1_of_2
    assert join == "init_process_group" and arguments["backend"] == "gloo" and "device_id" not in arguments


@pytest.mark.parametrize("backend, expected", [("nccl", torch.device("cuda", 2)), ("gloo", torch.device("cpu"))])
def test_collectives_run_on_the_backends_device(monkeypatch, backend, expected):
    monkeypatch.setattr(dist, "get_backend", lambda *args: dist.Backend(backend))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert utils_distributed._collective_device() == expected


@pytest.fixture
def gpus(monkeypatch):
    """Fakes ``count`` visible GPUs whose generator states are ``[gpu index]`` byte tensors;
    records the states set (``fake.restored``)."""

    class FakeGPUs:
        count = 0
        restored = None

    fake = FakeGPUs()

    def set_rng_state_all(states):
        fake.restored = [int(s[0]) for s in states]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: fake.count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([i], dtype=torch.uint8) for i in range(fake.count)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    return fake


def test_cuda_states_are_captured_per_gpu(gpus):
    gpus.count = 2
    assert [int(s[0]) for s in rng_state()["cuda"]] == [0, 1]
    gpus.count = 0
    assert rng_state()["cuda"] == []


def test_cuda_states_are_restored_on_the_same_gpus(gpus, caplog):
    gpus.count = 2
    state = rng_state()
    with caplog.at_level(logging.WARNING, logger="deformable_detr.engine.rng"):
        set_rng_state(state)
    assert gpus.restored == [0, 1] and not caplog.records


def test_a_gpu_checkpoint_resumed_on_the_cpu_restores_the_cpu_generators(gpus, caplog):
    gpus.count = 2
    state = rng_state()
    expected = random.random(), np.random.rand(), torch.rand(3)
    gpus.count = 0
    with caplog.at_level(logging.INFO, logger="deformable_detr.engine.rng"):
        set_rng_state(state)
    drawn = random.random(), np.random.rand(), torch.rand(3)
    assert drawn[:2] == expected[:2] and torch.equal(drawn[2], expected[2])
    assert gpus.restored is None and "no GPU visible" in caplog.text


@pytest.mark.parametrize("saved, visible, restored", [(4, 2, [0, 1]), (1, 2, [0])])
def test_other_gpu_counts_restore_the_gpus_both_have(gpus, caplog, saved, visible, restored):
    gpus.count = saved
    state = rng_state()
    gpus.count = visible
    with caplog.at_level(logging.WARNING, logger="deformable_detr.engine.rng"):
        set_rng_state(state)
    assert gpus.restored == restored
    assert f"CUDA random states of {saved} GPU(s) but {visible} are visible" in caplog.text


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("device, pinned", [("cuda", True), ("cuda:1", True), ("cpu", False)])
def test_loaders_pin_memory_for_gpus_only(device, pinned, train):
    from deformable_detr.cli import runtime

    # built only, never iterated: pinning needs a GPU
    loader = runtime.make_loader(list(range(4)), 2, 0, train, 0, torch.device(device))
    assert loader.pin_memory is pinned
