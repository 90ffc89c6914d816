"""Crash-safe local records: a long-format metrics CSV and atomic JSON files."""

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np

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
        with _atomic_writer(self.path) as f:
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


@contextmanager
def _atomic_writer(path: Path) -> Iterator[TextIO]:
    """Text file in the target's directory; on clean exit it is fsynced and os.replace'd over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # only still there if something failed


def _json_default(obj: Any) -> Any:
    # Metrics often arrive as numpy scalars/arrays and configs hold Paths.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so readers see either the old file or the complete new one, never a torn write."""
    with _atomic_writer(path) as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)
