"""study.json, typed: the record of a study and of each of its arms, read and written here only.

The runner updates it as the study goes (so an interrupted study can be resumed and reported), the
studies' analyses and the report read it back, and summary.json lists each arm's `summary()`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.files import read_json, write_json_atomic
from config.schema import UsageError


@dataclass
class ArmRecord:
    arm_id: str  # its folder
    name: str
    architecture: str
    dead_handling: str
    studies: list[str] = field(default_factory=list)
    status: str = "pending"  # pending | running | complete | interrupted | failed
    d_sae: int | None = None
    sparsity: str | None = None  # what sets it, as the report names it ("k 32", "L1 coef 0.0065")
    lr: float | None = None
    batch_size: int | None = None
    steps_total: int | None = None
    steps: int | None = None  # reached (complete, or the last checkpoint of an interrupted or failed arm)
    tokens: int | None = None
    final: dict[str, float] = field(default_factory=dict)  # metrics of the final eval
    weights: str | None = None  # sae.safetensors, once complete
    wandb_run_id: str | None = None
    seconds: float | None = None
    reason: str | None = None  # why it failed
    hook: str | None = None  # the hook point it read (None in studies recorded before studies had several)

    def summary(self) -> dict[str, Any]:
        """The arm as summary.json lists it."""
        return {name: getattr(self, name) for name in SUMMARY_FIELDS}


SUMMARY_FIELDS = ("arm_id", "name", "architecture", "dead_handling", "hook", "studies", "status", "steps", "tokens",
                  "final", "weights", "wandb_run_id", "seconds", "reason")


def hook_label(hook: str) -> str:
    """blocks.1.hook_mlp_out -> L1.mlp_out: how arm names and report sections name a hook point."""
    block = re.fullmatch(r"blocks\.(\d+)\.hook_(.+)", hook)
    return f"L{block[1]}.{block[2]}" if block else hook.removeprefix("hook_")


@dataclass
class StudyRecord:
    study_id: str
    studies: list[str]
    created: float
    status: str  # running | interrupted | complete | failed
    spec: dict  # RunConfig.result_spec(): what a resume must match
    arms: list[ArmRecord] = field(default_factory=list)
    setup: dict = field(default_factory=dict)  # per hook point its cache (d_in, token counts, scale); the commits
    summary_runs: dict[str, str] = field(default_factory=dict)  # study -> W&B summary run id

    def arm(self, arm_id: str) -> ArmRecord:
        return next(a for a in self.arms if a.arm_id == arm_id)

    def named(self, key: str) -> ArmRecord | None:
        """The arm whose name (as the report gives it) or folder is exactly `key`; None if none is."""
        return next((a for a in self.arms if key in (a.name, a.arm_id)), None)

    @property
    def hooks(self) -> dict[str, dict]:
        """Hook point -> its activation cache (folder, d_in, train_tokens, eval_tokens, norm_scale), in the
        study's order; the one hook of a study recorded before studies had several."""
        if "hooks" in self.setup:
            return self.setup["hooks"]
        if "hook" in self.setup:
            return {self.setup["hook"]: {k: v for k, v in self.setup.items() if k not in ("hook", "commits")}}
        return {}

    def hook_of(self, arm: ArmRecord) -> str | None:
        return arm.hook or next(iter(self.hooks), None)

    @property
    def finished(self) -> list[ArmRecord]:
        return [a for a in self.arms if a.status == "complete"]

    @classmethod
    def from_dict(cls, data: Any) -> StudyRecord:
        """ValueError when `data` is not a study record (missing keys, wrong shapes)."""
        if not isinstance(data, dict) or not {"study_id", "spec", "arms", "status"} <= data.keys():
            raise ValueError("not a study record")
        known = {f.name for f in dataclasses.fields(ArmRecord)}
        try:
            arms = [ArmRecord(**{k: v for k, v in arm.items() if k in known}) for arm in data["arms"]]
            if "cache" in data and "hooks" not in data.get("setup", {}):  # recorded before several hook points
                data = {**data, "setup": {**data.get("setup", {}), "cache": data["cache"]}}
            return cls(**{**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}},
                          "arms": arms, "summary_runs": data.get("summary_runs") or {},
                          "studies": data["studies"] if "studies" in data else data["spec"]["study"]["names"],
                          "created": data.get("created", 0)})
        except (TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"not a study record ({err})") from None

    @classmethod
    def read(cls, path: Path, flag: str) -> StudyRecord:
        """study.json, checked enough that a damaged or foreign file is one UsageError line naming `flag`."""
        try:
            data = read_json(path)
        except (ValueError, UnicodeDecodeError):
            raise UsageError(f"{flag}: {path} is not valid JSON") from None
        try:
            return cls.from_dict(data)
        except ValueError:
            raise UsageError(f"{flag}: {path} is not a study record of this harness") from None

    def write(self, path: Path) -> None:
        write_json_atomic(path, dataclasses.asdict(self))
