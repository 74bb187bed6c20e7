"""The CUDA-side choices, which cannot run here, as the small pure functions they are."""

from __future__ import annotations

import pytest

from tests.helpers import load_runner_module

runner = load_runner_module()


@pytest.mark.parametrize("requested, device, bf16, expected", [
    ("auto", "cuda", True, "bfloat16"),    # Ampere and newer: A10G, A100, L4, RTX 4090, H100
    ("auto", "cuda", False, "float16"),    # T4, V100, P100
    ("fp16", "cuda", True, "float16"),
    ("fp32", "cuda", True, "float32"),
    ("auto", "cpu", False, "float32"),
])
def test_choose_precision(requested, device, bf16, expected):
    assert runner.choose_precision(requested, device, bf16) == expected


class Cuda:
    """torch.cuda as plan_device asks it: the compute capability of each GPU, and the emulation
    check torch.cuda.is_bf16_supported() does by default, which passes on a T4."""

    def __init__(self, *capabilities: tuple[int, int]) -> None:
        self.capabilities = capabilities

    def get_device_capability(self, index: int) -> tuple[int, int]:
        return self.capabilities[index]

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return including_emulation or self.capabilities[0][0] >= 8


@pytest.mark.parametrize("gpu, capability, native", [("T4", (7, 5), False), ("V100", (7, 0), False),
                                                     ("A10G", (8, 6), True), ("A100", (8, 0), True),
                                                     ("H100", (9, 0), True)])
def test_a_t4_trains_in_fp16_under_auto_though_torch_says_it_can_emulate_bf16(gpu, capability, native):
    cuda = Cuda(capability)
    assert cuda.is_bf16_supported()  # what the runner must not go by
    assert runner.has_native_bf16(cuda, 0) is native
    expected = "bfloat16" if native else "float16"
    assert runner.choose_precision("auto", "cuda", runner.has_native_bf16(cuda, 0)) == expected


def test_bf16_on_a_gpu_without_it_is_a_config_error():
    with pytest.raises(runner.ConfigError, match="train.precision"):
        runner.choose_precision("bf16", "cuda", False)


@pytest.mark.parametrize("device, gpus, rank, expected", [
    ("cpu", 0, None, {"": "cpu"}),
    ("cuda", 1, None, {"": 0}),
    ("cuda", 4, None, "auto"),      # one process: spread the model over the GPUs
    ("cuda", 4, 2, {"": 2}),        # torchrun / accelerate: one GPU per process
])
def test_choose_device_map(device, gpus, rank, expected):
    assert runner.choose_device_map(device, gpus, rank) == expected


def test_out_of_memory_is_told_apart_from_other_errors():
    import torch

    assert runner.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert runner.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert runner.is_oom(MemoryError())
    assert not runner.is_oom(RuntimeError("shape '[128, 5]' is invalid for input of size 704"))
    assert not runner.is_oom(ValueError("out of memory"))


def test_oom_message_names_the_knobs_and_their_values(tmp_path):
    run = runner.RunDir(tmp_path)
    run.set_status("training", step=12)
    run.config = runner.from_dict(runner.JobConfig, {"model": {"base": "m"}, "data": {"path": "d.jsonl"},
                                                     "train": {"micro_batch_size": 8}})
    import torch

    message = runner.oom_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."), run)
    assert message.startswith("out of memory at step 12: CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "micro_batch_size 8" in message and "max_length 1024" in message and "\n" not in message
