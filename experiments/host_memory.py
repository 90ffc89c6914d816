"""Keep freed host memory for reuse instead of handing it back to the OS after every step.

glibc serves allocations above its mmap threshold (32 MiB at most by default) with fresh mmaps and
unmaps them on free, so every [B, d_sae] temporary of a training step (100 MB at B 4096, d_sae
6144) is page-faulted in again each time it is allocated: measured on 2 cores, a relu over such a
tensor took 60-80 ms that way and 7-16 ms with the memory reused. Raising the mmap and trim
thresholds makes glibc keep and reuse it; the process's resident memory then stays at its peak,
as with PyTorch's caching allocator on GPUs. Threads share glibc's main arena (M_ARENA_MAX 1): the
others' arenas are heaps of at most 64 MiB, beyond which glibc mmaps whatever the thresholds say,
so arms stepping in threads (experiments/train/trainer.py, train_arms) would fault their
temporaries in afresh at every step.
"""
from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_LIMIT = 2**31 - 1  # the largest value mallopt accepts (an int)


def retain_freed_memory() -> bool:
    """Apply the setting to this process; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the symbols already loaded in this process, libc's included
    except (OSError, AttributeError, TypeError):
        return False
    return (bool(mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _LIMIT))
            and bool(mallopt(_M_ARENA_MAX, 1)))
