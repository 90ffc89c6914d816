"""The local record of an arm's metrics: a long-format CSV, appended as training goes."""

import csv
from pathlib import Path
from typing import Any

from config.files import atomic_writer

FIELDS = ["step", "tokens", "name", "value"]


class MetricsCSV:
    """Tidy `step,tokens,name,value` CSV, one row per metric, appended as training goes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        # Reopen per call: truncate_after replaces the file, so a long-lived handle would write to the old one.
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(FIELDS)
            for name, value in metrics.items():
                writer.writerow([int(step), int(tokens), name, repr(float(value))])  # repr round-trips floats exactly
            f.flush()

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step`, so a resumed run's file matches an uninterrupted one."""
        if not self.path.exists():
            return
        rows = [r for r in self.read(self.path) if r["step"] <= step]
        with atomic_writer(self.path) as f:
            writer = csv.writer(f)
            writer.writerow(FIELDS)
            for r in rows:
                writer.writerow([r["step"], r["tokens"], r["name"], repr(r["value"])])

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """Rows as dicts with typed values: step/tokens int, name str, value float."""
        with open(path, newline="") as f:
            return [
                {"step": int(r["step"]), "tokens": int(r["tokens"]), "name": r["name"], "value": float(r["value"])}
                for r in csv.DictReader(f)
            ]
