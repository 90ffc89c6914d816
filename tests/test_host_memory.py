"""experiments/host_memory.py: the allocator setting run_experiments.py applies at start-up."""
import platform

import pytest
import torch

from experiments.host_memory import retain_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_glibc_accepts_the_setting_and_large_tensors_still_work():
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # idempotent
    for _ in range(3):  # freed and allocated again, now from retained memory
        t = torch.ones(1024, 16384)
        assert t.sum().item() == 1024 * 16384
        del t
