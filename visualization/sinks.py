"""Where one arm's numbers go: its `metrics.csv` always, and W&B when enabled."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from visualization.local_sink import MetricsCSV


class ArmSinks:
    def __init__(self, arm_dir: Path, wandb, run_name: str, group: str, job_type: str, config: dict):
        self.csv = MetricsCSV(arm_dir / "metrics.csv")
        self.wandb = wandb  # a WandbSink, or None
        self.run_name, self.group, self.job_type, self.config = run_name, group, job_type, config
        self.wandb_floor = 0  # W&B already holds the steps up to here (from before a crash)

    def start(self, run_id: str | None, resumed_at: int | None) -> str | None:
        """Open the arm's logs. On resume, rows past the checkpoint are dropped so the files
        match an uninterrupted run; W&B continues the same run id with increasing steps."""
        if resumed_at is None:
            self.csv.path.unlink(missing_ok=True)
        else:
            # Steps past the checkpoint are retrained and give the same values; W&B already has
            # them, and logging them again would make its step go backwards.
            if self.csv.path.exists():
                self.wandb_floor = max((r["step"] for r in MetricsCSV.read(self.csv.path)), default=0)
            self.csv.truncate_after(resumed_at)
        if self.wandb is None:
            return None
        return self.wandb.start(name=self.run_name, group=self.group, job_type=self.job_type,
                                config=self.config, run_id=run_id)

    def log(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        self.csv.append(step, tokens, metrics)
        if self.wandb is not None and step > self.wandb_floor:
            self.wandb.log(step, tokens, metrics)

    def log_density(self, step: int, tokens: int, density: np.ndarray, n_tokens: int) -> None:
        if self.wandb is not None and step > self.wandb_floor:
            self.wandb.log_density(step, tokens, density, n_tokens)

    def finish(self, summary: dict[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.finish(summary)
