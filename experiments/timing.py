"""Where a run's wall time goes: each second is charged to the innermost phase open at the time
(so UMAP inside an eval counts as UMAP, not eval). One clock per process, reset per study run."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

PHASES = ("model", "harvest", "baselines", "training", "eval", "umap", "features", "logging", "checkpoints", "report")


class PhaseClock:
    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []
        self._since = self._start = self.now()

    def _charge(self) -> None:
        now = self.now()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._since = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:  # its seconds would be in the total but in no part of the split
            raise ValueError(f"unknown phase {name!r}; the phases are {', '.join(PHASES)}")
        self._charge()
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def split(self) -> dict[str, float]:
        """Seconds per phase since the reset, plus `other` (outside every phase) and `total`."""
        total = self.now() - self._start
        out = {name: round(self.seconds.get(name, 0.0), 2) for name in PHASES}
        out["other"] = round(max(0.0, total - sum(self.seconds.values())), 2)
        out["total"] = round(total, 2)
        return out


CLOCK = PhaseClock()
phase = CLOCK.phase
