"""Fault injection for reliability tests: `SAE_FAULT=<point>` kills the process with SIGKILL
when the run reaches that point. The points:
  cache-chunk:<n>   a harvest (or toy generation) chunk written, before the manifest records it
  step:<n>          right after training step n, before any checkpoint or eval of that step
  checkpoint-write  inside a checkpoint write: weights and optimizer written, checksums not yet
  wandb-log         right after a W&B log call
  arm-done:<n>      once the n-th arm is recorded complete in study.json
  report-figure     a report figure saved, the report not yet complete
  summary-run       a study's W&B summary run logged, summary.json not yet written
`<point>@<n>` waits for the n-th time the point is reached (`step:57@3`: in the third arm trained),
and an `error:` prefix raises an exception there instead of killing (`error:step:5`: an arm that
crashes). With `SAE_FAULT_ONCE=<file>` as well, only the first process to get there fires (it
creates the file): a Ray worker killed mid-arm is retried, and the retry carries on. A no-op
unless the variable is set.
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
        once = os.environ.get("SAE_FAULT_ONCE")
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
        if raise_error:
            raise InjectedFault(f"fault injected at {point}")
        os.kill(os.getpid(), signal.SIGKILL)
