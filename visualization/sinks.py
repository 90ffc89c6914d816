"""Where one arm's numbers go: its `metrics.csv` always, and W&B when enabled."""
from __future__ import annotations

import json
import re
from itertools import groupby
from pathlib import Path

import numpy as np

from visualization.local_sink import MetricsCSV
from visualization.plots import log10_density


class ArmSinks:
    def __init__(self, arm_dir: Path, wandb, run_name: str, group: str, job_type: str, config: dict,
                 checkpoints: bool = False):
        self.csv = MetricsCSV(arm_dir / "metrics.csv")
        self.wandb = wandb  # a WandbSink, or None
        self.run_name, self.group, self.job_type, self.config = run_name, group, job_type, config
        self.checkpoints = checkpoints  # --wandb-checkpoints: log each checkpoint as an artifact too

    def start(self, run_id: str | None, resumed_at: int | None) -> str | None:
        """Open the arm's logs. On resume, rows past the checkpoint are dropped so the files
        match an uninterrupted run, and W&B continues the same run id. A killed process may not
        have flushed its last W&B rows (wandb writes in the background), so the CSV history up to
        the checkpoint is logged again: W&B ignores the steps it already has."""
        replay: list[dict] = []
        if resumed_at is None:
            self.csv.path.unlink(missing_ok=True)
        elif self.csv.path.exists():
            self.csv.truncate_after(resumed_at)
            replay = MetricsCSV.read(self.csv.path)
        if self.wandb is None:
            return None
        run_id = self.wandb.start(name=self.run_name, group=self.group, job_type=self.job_type,
                                  config=self.config, run_id=run_id)
        for step, rows in groupby(replay, key=lambda r: r["step"]):
            rows = list(rows)
            self.wandb.log(step, rows[0]["tokens"], {r["name"]: r["value"] for r in rows})
        return run_id

    def log(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        self.csv.append(step, tokens, metrics)
        if self.wandb is not None:
            self.wandb.log(step, tokens, metrics)

    def log_density(self, step: int, tokens: int, density: np.ndarray, n_tokens: int, dense_threshold: float) -> None:
        if self.wandb is not None:
            self.wandb.log_density(step, tokens, density, n_tokens, dense_threshold)

    def log_embedding(self, step: int, tokens: int, embedding: dict, n_tokens: int) -> None:
        if self.wandb is not None:
            log_freq = log10_density(embedding["density"], n_tokens)
            self.wandb.log_embedding(step, tokens, embedding["xy"], log_freq, embedding["concept"])

    def log_model(self, arm_dir: Path, step: int, tokens: int, final: dict[str, float]) -> None:
        """The arm's final SAE (weights and config.json, as written in arm_dir) as the W&B artifact
        sae-<arm folder>, with its config and final metrics as metadata."""
        if self.wandb is not None:
            config = json.loads((arm_dir / "config.json").read_text())
            finite = {k: v if np.isfinite(v) else None for k, v in final.items()}  # W&B refuses NaN in metadata
            self.wandb.log_model(artifact_name("sae", arm_dir.name),
                                 [arm_dir / "sae.safetensors", arm_dir / "config.json"],
                                 {"arm": self.run_name, "study": self.group, "step": step, "tokens": tokens,
                                  "config": config, "final": finite}, ["final", f"step-{step}"])

    def log_checkpoint(self, path: Path, step: int, tokens: int) -> None:
        """A checkpoint folder as the W&B artifact checkpoint-<arm folder> (with --wandb-checkpoints)."""
        if self.wandb is not None and self.checkpoints:
            files = sorted(p for p in path.iterdir() if p.is_file())
            self.wandb.log_model(artifact_name("checkpoint", path.parent.parent.name), files,
                                 {"arm": self.run_name, "study": self.group, "step": step, "tokens": tokens},
                                 [f"step-{step}"])

    def finish(self, summary: dict[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.finish(summary)


def artifact_name(kind: str, arm_folder: str) -> str:
    """`<kind>-<arm folder>` in the characters W&B takes for an artifact name (an arm of a study
    over several hook points is named `...@L1.resid_post`): sae-topk-k32@L1.resid_post-1a2b ->
    sae-topk-k32-L1.resid_post-1a2b."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{kind}-{arm_folder}")
