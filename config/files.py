"""Crash-safe files, for every layer: JSON records, CSVs and new folders written whole or not at all."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np


@contextmanager
def atomic_writer(path: Path) -> Iterator[TextIO]:
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
    with atomic_writer(path) as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez, so readers see either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)
    tmp.replace(path)


def write_new_folder(out: Path, files: dict[str, bytes]) -> Path:
    """Create the folder `out` holding `files` (name -> contents), whole or not at all: they are
    written and fsynced in a hidden sibling that is renamed to `out` at the end, and removed if
    anything fails. An existing `out` is never written into (FileExistsError, also when it appears
    meanwhile: os.rename would replace an empty folder). Returns `out`."""
    out = Path(out)

    def refused() -> FileExistsError:
        return FileExistsError(f"{out} already exists; a new folder is written, never into an existing one")

    if out.exists() or out.is_symlink():
        raise refused()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if out.exists() or out.is_symlink():
            raise refused()
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there if something failed
    return out


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)
