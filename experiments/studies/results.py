"""What every study's analysis shares: the arm's files as read back (ArmData), the result a study
returns (StudyResult with its tables, figures and findings), and how values are rounded for them.

Each study (§6, §7; one module each beside this one) reads the files its arms left behind
(study.json, metrics.csv, probes/eval-*.npz) and turns them into tables, figures and findings.
Nothing here trains or recomputes a probe, so `--report` can rebuild every result from the study
folder alone."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.figure import Figure

from config.records import ArmRecord
from experiments.eval.probes import read_concepts, read_evals
from visualization import study_plots
from visualization.local_sink import MetricsCSV
from visualization.terminal import round_beside

FINAL_METRICS = ("l0", "explained_variance", "mse", "cos", "dead_frac", "dense_frac", "ce_loss_recovered", "kl",
                 "mcc", "frac_recovered")
# Synthetic sources: frac_recovered by frequency quarter and by role (experiments/eval/recovery.py).
RECOVERY_BREAKDOWN = (*(f"frac_recovered_q{i}" for i in range(1, 5)),
                      *(f"frac_recovered_{role}" for role in ("parent", "child", "group", "independent")))


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list]


@dataclass
class StudyResult:
    name: str
    question: str
    tables: dict[str, Table] = field(default_factory=dict)
    figures: dict[str, Callable[[], Figure]] = field(default_factory=dict)  # drawn when the report is written
    data: dict[str, Table] = field(default_factory=dict)  # long per-item tables: CSV files and W&B tables
    findings: list[str] = field(default_factory=list)  # one Markdown sentence each, the first the headline
    summary: dict = field(default_factory=dict)  # goes to summary.json["studies"][name]
    captions: dict[str, str] = field(default_factory=dict)  # per figure: what to look for in it
    in_docs: bool = True  # whether a docs page's excerpt of the study shows its short tables

    def figure(self, key: str, draw: Callable[[], Figure], caption: str) -> None:
        self.figures[key] = draw
        self.captions[key] = caption


@dataclass
class ArmData:
    record: ArmRecord  # the arm's entry in study.json
    series: dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> (tokens, values), from metrics.csv
    evals: list[dict[str, np.ndarray]]  # probe arrays per eval, in step order
    concepts: dict | None  # names, kinds, skipped

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def architecture(self) -> str:
        return self.record.architecture

    @property
    def final(self) -> dict:
        return self.record.final or {}

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        return self.series.get(metric, (np.zeros(0), np.zeros(0)))


@dataclass
class StudyInputs:
    """What an analysis reads besides its arms: the run's probe settings and, where the study
    measured them, the concept baselines on the raw activations (experiments/eval/baselines.py)."""
    probes: dict
    baselines: dict[str, np.ndarray] | None = None  # names, dense_f1, neuron_f1, neuron, neuron_sign


def load_arm(study_dir: Path, record: ArmRecord) -> ArmData:
    arm_dir = study_dir / record.arm_id
    series: dict[str, tuple[list, list]] = {}
    csv = arm_dir / "metrics.csv"
    for row in MetricsCSV.read(csv) if csv.exists() else []:
        tokens, values = series.setdefault(row["name"], ([], []))
        tokens.append(row["tokens"])
        values.append(row["value"])
    arrays = {k: (np.array(t, dtype=np.float64), np.array(v, dtype=np.float64)) for k, (t, v) in series.items()}
    return ArmData(record, arrays, read_evals(arm_dir), read_concepts(arm_dir))


def rounded(value, digits: int = 4):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), digits)


def beside(value, threshold: float):
    """A score for a table beside its threshold: 3 decimals, more where rounding would cross it."""
    return None if value is None or np.isnan(value) else round_beside(float(value), threshold, 3)


def tokens_text(tokens: float) -> str:
    return "never" if tokens is None or math.isnan(tokens) else study_plots.format_tokens(tokens)


def percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"
