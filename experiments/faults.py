"""Fault injection for reliability tests: `SAE_FAULT=<point>` kills the process with SIGKILL
when the run reaches that point, e.g. `SAE_FAULT=step:57` right after training step 57 (before
any checkpoint of that step). A no-op unless the variable is set.
"""
from __future__ import annotations

import os
import signal


def reached(point: str) -> None:
    if os.environ.get("SAE_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
