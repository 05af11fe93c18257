"""Device and dtype selection (sft_helpers.runtime), with the GPU capability faked; the report."""

from __future__ import annotations

import pytest
import torch

from sft_helpers import environment, runtime
from sft_helpers.runtime import bf16_native, pick_device, pick_dtype


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA GPU of a given compute capability is present."""

    def install(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        # Recent torch says "supported" on a T4 (emulated); the course must not believe it.
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    return install


def test_cpu_gets_float32():
    assert pick_dtype("cpu") == torch.float32
    assert not bf16_native("cpu")


@pytest.mark.parametrize(
    ("gpu", "capability", "dtype"),
    [
        ("T4", (7, 5), torch.float16),
        ("V100", (7, 0), torch.float16),
        ("A100", (8, 0), torch.bfloat16),
        ("L4", (8, 9), torch.bfloat16),
        ("H100", (9, 0), torch.bfloat16),
    ],
)
def test_gpu_dtype_follows_compute_capability(fake_gpu, gpu, capability, dtype):
    fake_gpu(capability)
    assert pick_device() == torch.device("cuda")
    assert pick_dtype("cuda") == dtype, gpu


def test_explicit_device_wins(fake_gpu):
    fake_gpu((8, 0))
    assert pick_device("cpu") == torch.device("cpu")


def test_seed_everything_repeats_random_numbers():
    runtime.seed_everything(3)
    first = torch.rand(4)
    runtime.seed_everything(3)
    assert torch.equal(first, torch.rand(4))


def test_setup_hides_only_the_optional_kernel_notice(caplog):
    import logging

    environment.setup("tiny", seed=1)
    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=ops.name):
        ops.warning(environment.OPTIONAL_KERNEL_NOTICE + " from kernels-community: no module")
        ops.warning("some other bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes problem"]


def test_setup_reports_versions_and_profile(capsys):
    report = environment.setup("tiny", seed=1)
    printed = capsys.readouterr().out
    for key in ("torch", "transformers", "trl", "peft", "device", "dtype", "profile", "cache"):
        assert key in report and key in printed
    assert report["profile"] == "tiny"
