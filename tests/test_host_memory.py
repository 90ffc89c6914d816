"""experiments/host_memory.py: the allocator setting run_experiments.py applies at start-up."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.host_memory import retain_freed_memory

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_glibc_accepts_the_setting_and_large_tensors_still_work():
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # idempotent
    for _ in range(3):  # freed and allocated again, now from retained memory
        t = torch.ones(1024, 16384)
        assert t.sum().item() == 1024 * 16384
        del t


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_a_thread_reuses_freed_memory_as_the_main_thread_does():
    """Arms step in threads (train_arms): 100 MB allocated again in a thread must come from retained
    memory, not from a fresh mmap whose every page faults in again (25,600 minor faults), which a
    thread's own arena would give it."""
    code = """
import ctypes, resource, threading
from experiments.host_memory import retain_freed_memory
assert retain_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
def allocate():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(100 << 20)
        libc.memset(p, 1, 100 << 20)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=allocate)
thread.start()
thread.join()
print(max(faults[1:]))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 1000
