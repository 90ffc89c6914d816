"""Read offline W&B runs back from disk, so tests can assert on exactly what was logged.

Reader: `wandb leet inspect --json <run dir>`, wandb's own CLI reader of a run's `.wandb`
transaction log (present in wandb 0.31; the old Python reader `wandb.sdk.internal.datastore` is
gone). It prints one JSON object per record, e.g.

    {"num":2,"type":"run","run":{"run_id":"abc","display_name":"arm","run_group":"g","job_type":"train",
                                 "project":"p","start_time":"2026-...Z","config":{"update":{"_wandb":{},"lr":0.001}}}}
    {"num":22,"type":"history","history":{"item":{"_step":1,"tokens":100,"train/loss":1.0},"step":{"num":1}}}
    {"num":33,"type":"summary","summary":{"update":{"final/ev":0.9}}}      (or {"remove":[{"key":"k"}]})
    {"num":8,"type":"config","config":{"update":{"late":3}}}

`--summary --json` exists too but lacks group/job_type and history, so we fold the records ourselves.
Media values come flattened into "<key>.<field>" entries with a "<key>._type" marker
("density/hist._type": "histogram", "density/hist.bins": [...], "density/hist.values": [...]);
we re-nest those into one dict per key. Other dotted keys are left as W&B itself shows them.

Resumed runs: in offline mode every wandb.init(id=same, resume="allow") writes its own folder
`wandb/offline-run-<YYYYmmdd_HHMMSS>-<id>` (a same-second clash gets `-1`, `-2`, ...), each with
its own `run-<id>.wandb`. read_offline_runs(root, run_id) finds them all and merges them in
start-time order. wandb-core writes that file only every few seconds (the sink asks for 1 s; wandb's
default is 15 s), so a SIGKILLed segment lacks its last rows, or everything if it died before the
first write (then its file holds just a header and yields no records at all).

`wandb leet inspect` is a thin Python CLI over wandb's `wandb-core` binary, which does the reading:
we run that binary with the CLI's arguments, as the CLI would, and save the CLI's second of Python
imports per read (the kill/resume chain reads 45 segments). The test process never imports wandb.
"""

import importlib.util
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The reader behind `wandb leet inspect`, found without importing wandb.
_WANDB_CORE = str(Path(importlib.util.find_spec("wandb").submodule_search_locations[0]) / "bin" / "wandb-core")


@dataclass
class OfflineRun:
    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    project: str = ""
    start_time: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged row, each with its "_step"
    summary: dict[str, Any] = field(default_factory=dict)
    run_dirs: list[Path] = field(default_factory=list)  # one per segment, in order
    # logged artifacts: {"name", "type", "aliases", "metadata" (parsed), "files": {path: {"size", "digest",
    # "local_path"}}} (offline, local_path is the staged copy in WANDB_DATA_DIR)
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    def keys(self) -> list[str]:
        """Metric keys seen in history (wandb's "_step", "_runtime", ... left out)."""
        return sorted({k for row in self.history for k in row if not k.startswith("_")})

    def steps(self, key: str) -> list[int]:
        return [row["_step"] for row in self.history if key in row]

    def values(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]


def _nest_media(item: dict[str, Any]) -> dict[str, Any]:
    media = {k[: -len("._type")] for k in item if k.endswith("._type")}
    out: dict[str, Any] = {}
    for k, v in item.items():
        owner = next((m for m in media if k.startswith(m + ".")), None)
        if owner is None:
            out[k] = v
        else:
            out.setdefault(owner, {})[k[len(owner) + 1 :]] = v
    return out


def inspect_records(run_dir: Path) -> list[dict[str, Any]]:
    """Raw records of a run folder (or a .wandb file), as printed by `wandb leet inspect --json`."""
    path = Path(run_dir).resolve()
    run_file = path if path.is_file() else next(path.glob("run-*.wandb"))
    # the CLI's arguments for an offline run: the run's file and the folder holding its run folder
    proc = subprocess.run(
        [_WANDB_CORE, "leet", "inspect", "--json", "--no-observability", "--run-file", str(run_file),
         str(run_file.parent.parent)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def read_offline_run(run_dir: Path) -> OfflineRun:
    """One run folder (one segment of a possibly resumed run)."""
    run = OfflineRun(run_dirs=[Path(run_dir)])
    for rec in inspect_records(run_dir):
        kind = rec["type"]
        body = rec.get(kind, {})
        if kind == "run":
            run.run_id = body.get("run_id", "")
            run.name = body.get("display_name", "")
            run.group = body.get("run_group", "")
            run.job_type = body.get("job_type", "")
            run.project = body.get("project", "")
            run.start_time = body.get("start_time", "")
            run.config.update(body.get("config", {}).get("update", {}))
        elif kind == "config":
            run.config.update(body.get("update", {}))
        elif kind == "history":
            run.history.append(_nest_media(body["item"]))
        elif kind == "summary":
            run.summary.update(_nest_media(body.get("update", {})))
            for removed in body.get("remove", []):
                run.summary.pop(removed.get("key", ""), None)
        elif kind == "artifact":
            run.artifacts.append({
                "name": body.get("name", ""), "type": body.get("type", ""), "aliases": body.get("aliases", []),
                "metadata": json.loads(body.get("metadata") or "{}"),
                "files": {c["path"]: {"size": int(c["size"]), "digest": c["digest"], "local_path": c.get("local_path")}
                          for c in body.get("manifest", {}).get("contents", [])}})
    run.config.pop("_wandb", None)  # wandb's own bookkeeping
    return run


def merge_segments(segments: list[OfflineRun]) -> OfflineRun:
    """Join resumed segments (already in order) into one run.

    W&B steps only go up (wandb-core ignores a log "to step N that is less than the current step"),
    so a later segment's rows at steps the run already has are dropped, as an online resume would.
    """
    merged = OfflineRun()
    for seg in segments:
        last = merged.history[-1]["_step"] if merged.history else -1
        merged.history.extend(row for row in seg.history if row["_step"] > last)
        # A segment killed before its first flush has no run record: keep what earlier ones said.
        merged.run_id, merged.name = seg.run_id or merged.run_id, seg.name or merged.name
        merged.group, merged.job_type = seg.group or merged.group, seg.job_type or merged.job_type
        merged.project = seg.project or merged.project
        merged.start_time = merged.start_time or seg.start_time
        merged.config.update(seg.config)
        merged.summary.update(seg.summary)
        merged.run_dirs.extend(seg.run_dirs)
        merged.artifacts.extend(seg.artifacts)
    return merged


def find_run_dirs(root: Path, run_id: str) -> list[Path]:
    """Every folder under root holding a segment of run_id (unordered)."""
    return sorted({p.parent.resolve() for p in Path(root).rglob(f"run-{run_id}.wandb")})


def _time_key(timestamp: str) -> tuple[str, str]:
    # RFC 3339 with trailing zeros of the fraction trimmed, so plain string order is wrong.
    whole, _, frac = timestamp.rstrip("Z").partition(".")
    return whole, frac.ljust(9, "0")


def read_offline_runs(root: Path, run_id: str) -> OfflineRun:
    """All segments of run_id under root (e.g. the wandb `dir`), merged in start-time order."""
    segments = [read_offline_run(d) for d in find_run_dirs(root, run_id)]
    if not segments:
        raise FileNotFoundError(f"no offline run {run_id!r} under {root}")
    return merge_segments(sorted(segments, key=lambda s: _time_key(s.start_time)))
