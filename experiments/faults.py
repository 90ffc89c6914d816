"""Fault injection for reliability tests: `SAE_FAULT=<point>` kills the process with SIGKILL
when the run reaches that point, e.g. `SAE_FAULT=step:57` right after training step 57 (before
any checkpoint of that step) and `SAE_FAULT=arm-done:2` once the second arm is recorded complete.
`<point>@<n>` waits for the n-th time the point is reached (`step:57@3`: in the third arm trained),
and an `error:` prefix raises an exception there instead of killing (`error:step:5`: an arm that
crashes). A no-op unless the variable is set.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter = Counter()


class InjectedFault(RuntimeError):
    pass


def reached(point: str) -> None:
    fault = os.environ.get("SAE_FAULT")
    if not fault:
        return
    raise_error = fault.startswith("error:")
    target, _, nth = fault.removeprefix("error:").partition("@")
    if point != target:
        return
    _seen[point] += 1
    if _seen[point] == int(nth or 1):
        if raise_error:
            raise InjectedFault(f"fault injected at {point}")
        os.kill(os.getpid(), signal.SIGKILL)
