"""Run a study: resolve (or resume) its folder, build the activation cache, train its arms,
write `study.json` and `summary.json`, print the comparison table.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from config.schema import (ARCHITECTURE_DEFAULTS, OPTION_ARCHITECTURES, RunConfig, SAEArmConfig, UsageError,
                           flatten, stable_hash)
from experiments.activation_cache import build_or_open
from experiments.sources import (dataset_fingerprint, harvester, load_subject_model, resolve_hook,
                                 token_sequences)
from experiments.trainer import EvalContext, StopFlag, StopRequested, Trainer
from visualization.local_sink import read_json, write_json_atomic
from visualization.sinks import ArmSinks
from visualization.terminal import boxed_table

TABLE_METRICS = ("l0", "explained_variance", "mse", "cos", "dead_frac", "dense_frac", "ce_loss_recovered", "kl")


@dataclass
class Arm:
    arm_id: str
    name: str
    architecture: str
    dead_handling: str


class StudyLock:
    """One process per study: a lock file holding the owner's pid; a dead owner's lock is taken over."""

    def __init__(self, study_dir: Path):
        self.path = study_dir / ".lock"

    def __enter__(self) -> "StudyLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise UsageError(f"study {self.path.parent.name} is being run by process {pid}; "
                                     f"wait for it or stop it first") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise UsageError(f"could not take the lock {self.path}")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _first_difference(a: dict, b: dict) -> str:
    fa, fb = flatten(a), flatten(b)
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key) != fb.get(key):
            return f"{key} was {fa.get(key)!r}, now {fb.get(key)!r}"
    return "no difference"


def resolve_study_dir(cfg: RunConfig, root: Path) -> Path:
    spec = cfg.result_spec()
    if not cfg.study.resume:
        study_id = cfg.study.study_id or f"{cfg.study.study}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = root / study_id
        if (path / "study.json").exists():
            if cfg.study.study_id:
                raise UsageError(f"study {study_id!r} already exists in {root}; add --resume to continue it "
                                 f"or pick another --study-id")
            path = root / f"{study_id}-{os.getpid()}"
        return path
    if cfg.study.study_id:
        path = root / cfg.study.study_id
        if not (path / "study.json").exists():
            raise UsageError(f"nothing to resume: there is no study {cfg.study.study_id!r} in {root}")
        stored = read_json(path / "study.json")["spec"]
        if stored != spec:
            raise UsageError(f"cannot resume {cfg.study.study_id!r} with different settings: "
                             f"{_first_difference(stored, spec)}")
        return path
    candidates = []
    for study_json in root.glob("*/study.json"):
        try:
            meta = read_json(study_json)
        except (OSError, ValueError):
            continue
        if meta.get("status") != "complete" and meta.get("spec") == spec:
            candidates.append((meta.get("created", 0), study_json.parent))
    if not candidates:
        raise UsageError(f"nothing to resume: no unfinished study in {root} was run with these settings "
                         f"(name one with --study-id)")
    return max(candidates)[1]


def arm_name(sae: SAEArmConfig) -> str:
    """Readable, and distinct for the arms one study compares."""
    defaults = ARCHITECTURE_DEFAULTS[sae.architecture]
    if sae.architecture in OPTION_ARCHITECTURES["k"]:
        name = f"{sae.architecture}-k{sae.k}"
    elif sae.target_l0 is not None:
        name = f"{sae.architecture}-l0target{sae.target_l0:g}"
    else:
        name = f"{sae.architecture}-coef{sae.sparsity_coef:g}"
    if sae.dead_handling != defaults["dead_handling"]:
        name += f"-{sae.dead_handling}"
    return name


def arms_for(cfg: RunConfig, data_spec: dict) -> list[tuple[Arm, SAEArmConfig]]:
    arms = []
    for sae in cfg.saes:
        identity = {"data": data_spec, "normalize": cfg.data.normalize, "sae": asdict(sae),
                    "train": asdict(cfg.train)}
        arm = Arm(f"{sae.architecture}-{stable_hash(identity, 8)}", arm_name(sae), sae.architecture,
                  sae.dead_handling)
        arms.append((arm, sae))
    return arms


def run_study(cfg: RunConfig, stop: StopFlag) -> int:
    import torch

    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.train.device}: no CUDA device is available here; use --device cpu")
    root = Path(cfg.log.checkpoint_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--checkpoint-dir {root} is not writable: {err.strerror}") from None
    study_dir = resolve_study_dir(cfg, root)
    created = not study_dir.exists()
    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        with StudyLock(study_dir):
            return _run_locked(cfg, study_dir, stop)
    except UsageError:
        if created:  # bad input found after the folder was made: leave nothing behind
            shutil.rmtree(study_dir, ignore_errors=True)
        raise


def _run_locked(cfg: RunConfig, study_dir: Path, stop: StopFlag) -> int:
    root = Path(cfg.log.checkpoint_dir)
    study_json = study_dir / "study.json"
    meta = read_json(study_json) if study_json.exists() else {
        "study_id": study_dir.name, "study": cfg.study.study, "created": time.time(), "status": "running",
        "spec": cfg.result_spec(), "arms": []}
    write_json_atomic(study_json, meta)  # before the harvest, so a run killed there can be resumed

    device = cfg.train.device
    model = load_subject_model(cfg.data, root / "models", device=device, progress=cfg.log.progress)
    hook_name = resolve_hook(model, cfg.data)
    sequences = token_sequences(model, cfg.data, cfg.train.seed)
    harvest = harvester(model, hook_name, device)
    probe = harvest(sequences[:1])
    if probe.ndim != 3:
        raise UsageError(f"hook {hook_name!r} gives activations of shape {tuple(probe.shape)}, "
                         f"not [batch, position, features]; pick a residual, MLP or attention output hook")
    data_spec = {"source": cfg.data.source, "model": model.fingerprint, "hook_name": hook_name,
                 "n_samples": cfg.data.n_samples, "seq_len": cfg.data.seq_len,
                 "dataset": dataset_fingerprint(cfg.data), "seed": cfg.train.seed,
                 "eval_fraction": cfg.data.eval_fraction}
    cache = build_or_open(root, data_spec, sequences, probe.shape[-1], harvest, cfg.data.harvest_batch_size,
                          cfg.data.eval_fraction, progress=cfg.log.progress)
    scale = cache.norm_scale(cfg.data.normalize)
    ctx = EvalContext(model.bridge, hook_name, cfg.train.ce_eval_sequences)

    arms = arms_for(cfg, data_spec)
    previous = {a["arm_id"]: a for a in meta["arms"]}
    meta["arms"] = [previous.get(a.arm_id, {**asdict(a), "status": "pending"}) for a, _ in arms]
    meta["cache"] = str(cache.path)
    write_json_atomic(study_json, meta)

    wandb = None
    if cfg.log.use_wandb:
        from visualization.wandb_sink import WandbSink

        wandb = WandbSink(project=cfg.log.wandb_project, mode=cfg.log.wandb_mode)

    failed = False
    shared_config = flatten({k: v for k, v in cfg.result_spec().items() if k != "saes"})
    for (arm, sae_cfg), record in zip(arms, meta["arms"]):
        if record["status"] == "complete":
            print(f"arm {arm.name} ({arm.arm_id}) already complete; skipped")
            continue
        arm_dir = study_dir / arm.arm_id
        run_config = {**shared_config, **flatten({"sae": asdict(sae_cfg)}), "arm_id": arm.arm_id,
                      "study_id": study_dir.name, "d_in": cache.d_in, "d_sae": sae_cfg.d_sae(cache.d_in),
                      "hook_name": hook_name, "norm_scale": scale}
        sinks = ArmSinks(arm_dir, wandb, arm.name, group=study_dir.name, job_type=cfg.study.study, config=run_config)
        trainer = Trainer(arm_dir, sae_cfg, cfg.train, cache, scale, ctx, sinks, stop, progress=cfg.log.progress)
        record.update(status="running", steps_total=trainer.n_steps)
        write_json_atomic(study_json, meta)
        try:
            result = trainer.run(arm.name, resume=cfg.study.resume)
        except StopRequested as stopped:
            record.update(status="interrupted", steps=stopped.step)
            write_json_atomic(study_json, meta)
            stopped.study_id = study_dir.name
            raise
        except (FloatingPointError, RuntimeError) as err:
            print(f"arm {arm.name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            record.update(status="failed", reason=f"{type(err).__name__}: {err}")
            write_json_atomic(study_json, meta)
            failed = True
            continue
        record.update(status="complete", steps=result.steps, tokens=result.tokens, final=result.final,
                      weights=str(arm_dir / "sae.safetensors"), wandb_run_id=result.wandb_run_id,
                      seconds=round(result.seconds, 2))
        write_json_atomic(study_json, meta)

    meta["status"] = "failed" if failed else "complete"
    write_json_atomic(study_json, meta)
    summary = {"study_id": study_dir.name, "status": meta["status"], "arms": [
        {"arm_id": r["arm_id"], "name": r["name"], "architecture": r["architecture"],
         "dead_handling": r["dead_handling"], "status": r["status"], "steps": r.get("steps"),
         "tokens": r.get("tokens"), "final": r.get("final", {}), "weights": r.get("weights"),
         "wandb_run_id": r.get("wandb_run_id"), "seconds": r.get("seconds"), "reason": r.get("reason")}
        for r in meta["arms"]]}
    write_json_atomic(study_dir / "summary.json", summary)
    print(boxed_table(
        f"{cfg.study.study} study {study_dir.name}: eval split, {cache.n_eval_rows:,} tokens",
        ["arm", *TABLE_METRICS, "steps", "time (s)"],
        [[a["name"], *(a["final"].get(m) for m in TABLE_METRICS), a["steps"], a["seconds"]] for a in summary["arms"]]))
    print(f"outputs: {study_dir}")
    return 1 if failed else 0
