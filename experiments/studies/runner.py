"""The study runner: resolve (or resume) the study folder, build the activation cache, train
each distinct arm once with the probes its studies need, then analyse every study from the files
and write `summary.json`, the report, W&B summary runs and the terminal tables.
"""
from __future__ import annotations

import contextlib
import errno
import io
import fcntl
import os
import shutil
import sys
import textwrap
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from config.schema import (LATER_DEFAULTS, ArmSpec, RunConfig, SAEArmConfig, TrainConfig, UsageError, flatten,
                           stable_hash)
from experiments import faults
from models.sae.catalog import ARCHITECTURE_DEFAULTS, OPTION_ARCHITECTURES
from experiments.eval.embedding import embedding_workers
from experiments.eval.baselines import baselines_file, concept_baselines, read_baselines, write_baselines
from experiments.eval.features import features_done, save_features
from experiments.eval.probes import PROBE_KINDS, ArmProbes, umap_steps
from experiments.studies import features, hook_points
from experiments.studies.results import StudyInputs, StudyResult, load_arm
from experiments.studies.sources import SOURCES, OpenedSource, bars, source_of
from experiments.data.activation_cache import BuildInterrupted
from experiments.provenance import code_commit, machine
from experiments.timing import CLOCK, phase
from experiments.train.trainer import (NonFiniteLoss, StopFlag, StopRequested, Trainer, check_device, eval_steps,
                                      lockstep_key, total_steps, train_arms, use_fast_matmuls)
from config.files import read_json, write_json_atomic
from config.records import ArmRecord, StudyRecord, hook_label
from models.sae import SAE
from models.sae.base import trained_on
from visualization.sinks import ArmSinks
from visualization.generated import block_kinds, fill_blocks
from visualization.report import docs_excerpt, figure_file, write_report
from visualization.terminal import boxed_table, format_timing, wrapped_finding

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


class OutOfSpace(Exception):
    """The disk filled up mid-run. What was written stays (checkpoints are atomic, the cache
    resumes by chunk), so the study continues with --resume once space is freed."""

    def __init__(self, study_id: str, err: OSError):
        where = f" writing {err.filename}" if err.filename else ""
        super().__init__(f"no space left on device{where}")
        self.study_id = study_id


class StudyLock:
    """One process per study: an exclusive flock on `.lock`, which the kernel drops when its holder
    dies, so a killed run's lock is simply free: no pid to trust (pids get reused) and no race
    between two processes taking over the same stale lock. The file holds the holder's pid, for
    the message."""

    def __init__(self, study_dir: Path):
        self.path = study_dir / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "StudyLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UsageError(f"study {self.path.parent.name} is being run by process {holder}; "
                                 f"wait for it or stop it first") from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # its holder removed this file as we locked it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # while still holding it, so no one locks a file on its way out
        os.close(self.fd)


def _first_difference(a: dict, b: dict) -> str:
    fa, fb = flatten(a, lists=True), flatten(b, lists=True)

    def shown(flat: dict, key: str) -> str:
        if key in flat:
            return repr(flat[key])
        name = key.rsplit(".", 1)[-1]  # a spec leaves out a later setting at its default (TrainConfig.identity)
        return f"{LATER_DEFAULTS[name]!r} (the default)" if name in LATER_DEFAULTS else "unset"

    for key in sorted(set(fa) | set(fb)):
        if shown(fa, key) != shown(fb, key):
            return f"{key} was {shown(fa, key)}, now {shown(fb, key)}"
    return "no difference"


def resolve_study_dir(cfg: RunConfig, root: Path) -> Path:
    spec = cfg.result_spec()
    if not cfg.study.resume:
        study_id = cfg.study.study_id or f"{cfg.study.label}-{time.strftime('%Y%m%d-%H%M%S')}"
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
        stored = StudyRecord.read(path / "study.json", "--resume").spec
        if stored != spec:
            raise UsageError(f"cannot resume {cfg.study.study_id!r} with different settings: "
                             f"{_first_difference(stored, spec)}")
        return path
    candidates = []
    for study_json in root.glob("*/study.json"):
        try:
            record = StudyRecord.from_dict(read_json(study_json))
        except (OSError, ValueError):
            continue
        if record.status != "complete" and record.spec == spec:
            candidates.append((record.created, study_json.parent))
    if not candidates:
        raise UsageError(f"nothing to resume: no unfinished study in {root} was run with these settings "
                         f"(name one with --study-id)")
    return max(candidates)[1]


def arm_name(sae: SAEArmConfig, train: TrainConfig, common: dict) -> str:
    """Readable, and distinct for the arms one run compares: the architecture and its sparsity,
    plus the width and learning rate where they differ from most arms', and the dead-latent
    handling where it is not the default or differs between arms of the architecture."""
    defaults = ARCHITECTURE_DEFAULTS[sae.architecture]
    if sae.architecture in OPTION_ARCHITECTURES["k"]:
        name = f"{sae.architecture}-k{sae.k}"
    elif sae.target_l0 is not None:
        name = f"{sae.architecture}-l0target{sae.target_l0:.3g}"
    else:
        name = f"{sae.architecture}-coef{sae.sparsity_coef:.3g}"
    if _width(sae) != common["width"]:
        name += f"-d{sae.hidden_dim}" if sae.hidden_dim is not None else f"-x{sae.expansion_factor}"
    if sae.dead_handling != defaults["dead_handling"] or sae.architecture in common["handling_varies"]:
        name += f"-{sae.dead_handling}"
    if train.lr != common["lr"]:
        name += f"-lr{train.lr:g}"
    return name


def _width(sae: SAEArmConfig) -> tuple:
    return sae.expansion_factor, sae.hidden_dim


@dataclass
class PlannedArm:
    """An arm of the run: its folder (a hash of everything that changes its results), its name, what it
    trains, the studies that read it, and the hook point whose activations it reads."""
    arm_id: str
    name: str
    spec: ArmSpec
    studies: list[str]
    hook: str

    def record(self, d_in: int) -> ArmRecord:
        sae, train = self.spec.sae, self.spec.train
        return ArmRecord(self.arm_id, self.name, sae.architecture, sae.dead_handling, self.studies, d_sae=sae.d_sae(d_in),
                         sparsity=sae.sparsity_setting(), lr=train.lr, batch_size=train.batch_size, hook=self.hook)


def plan_arms(cfg: RunConfig, sources: list[OpenedSource]) -> list[PlannedArm]:
    """The distinct arms of the run, for each hook point in turn: an arm listed by several studies is
    trained once. With several hook points an arm's name ends in its hook point's (`@L1.resid_post`)."""
    specs = cfg.arms
    common = {"width": Counter(_width(a.sae) for a in specs).most_common(1)[0][0],
              "lr": Counter(a.train.lr for a in specs).most_common(1)[0][0],
              "handling_varies": {arch for arch in {a.sae.architecture for a in specs}
                                  if len({a.sae.dead_handling for a in specs if a.sae.architecture == arch}) > 1}}
    planned: dict[str, PlannedArm] = {}
    for source in sources:
        for plan in cfg.plans:
            for spec in plan.arms:
                identity = {"data": source.data_spec, "normalize": cfg.data.normalize, "sae": asdict(spec.sae),
                            "train": spec.train.identity()}
                name = arm_name(spec.sae, spec.train, common) + (f"@{hook_label(source.hook)}" if len(sources) > 1
                                                                 else "")
                arm_id = f"{name}-{stable_hash(identity, 8)}"  # the folder: readable, and unique to the settings
                if arm_id not in planned:
                    planned[arm_id] = PlannedArm(arm_id, name, spec, [], source.hook)
                if plan.name not in planned[arm_id].studies:
                    planned[arm_id].studies.append(plan.name)
    return list(planned.values())


def run_study(cfg: RunConfig, stop: StopFlag) -> int:
    check_device(cfg.train.device)
    root = Path(cfg.log.checkpoint_dir)
    if cfg.study.resume and not root.is_dir():  # before it is made, which would leave an empty folder
        raise UsageError(f"nothing to resume: --checkpoint-dir {root} is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--checkpoint-dir {root} is not writable: {err.strerror}") from None
    if cfg.study.executor != "ray":
        return _run_in(cfg, root, stop)
    from experiments.studies import ray_executor

    # Tasks run elsewhere: every path they are given is absolute.
    cfg = replace(cfg, log=replace(cfg.log, checkpoint_dir=str(root.resolve())))
    ray_executor.connect(cfg)
    try:
        return _run_in(cfg, root.resolve(), stop)
    finally:
        ray_executor.shutdown()


def _run_in(cfg: RunConfig, root: Path, stop: StopFlag) -> int:
    """The study in its folder under `root`, locked, which is removed again if bad input turns up."""
    study_dir = resolve_study_dir(cfg, root)
    created = not study_dir.exists()
    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        with StudyLock(study_dir):
            return _run_locked(cfg, study_dir, stop)
    except UsageError:
        if created and not _training_began(study_dir):  # bad input found before any arm ran: leave nothing
            shutil.rmtree(study_dir, ignore_errors=True)
        raise
    except OSError as err:
        if err.errno not in OUT_OF_SPACE:
            raise
        raise OutOfSpace(study_dir.name, err) from None


def _training_began(study_dir: Path) -> bool:
    """Whether an arm of the study has started (its folder then holds results to keep, resumable)."""
    try:
        return any(a.status != "pending" for a in StudyRecord.read(study_dir / "study.json", "").arms)
    except (UsageError, OSError):
        return False


def ends_the_study(err: BaseException) -> bool:
    """A usage error or a full disk in an arm ends the study (resumable); any other error fails only
    the arm."""
    return isinstance(err, UsageError) or (isinstance(err, OSError) and err.errno in OUT_OF_SPACE)


def _run_locked(cfg: RunConfig, study_dir: Path, stop: StopFlag) -> int:
    """The study, top to bottom: record → data → plan → train → analyse and write."""
    CLOCK.reset()
    study_json = study_dir / "study.json"
    record = (StudyRecord.read(study_json, "--resume") if study_json.exists() else
              StudyRecord(study_dir.name, cfg.study.names, time.time(), "running", cfg.result_spec()))
    record.status = "running"
    record.write(study_json)  # before the harvest, so a run killed there can be resumed

    with _embedding_workers(cfg) as workers:
        sources = _open_sources(cfg, study_dir, stop)
        planned = plan_arms(cfg, sources)
        _record_plan(record, planned, sources, cfg.train.device)
        record.write(study_json)
        if "emergence" in record.spec["study"]["names"]:
            for source in (s for s in sources if s.concepts is not None):
                _measure_baselines(study_dir, source)

        wandb = _wandb_sink(cfg)
        try:
            if cfg.study.executor == "ray":
                from experiments.studies.ray_executor import train_on_ray

                at_hook = {s.hook: s.cache for s in sources}
                steps = {p.arm_id: total_steps(p.spec.train, at_hook[p.hook]) for p in planned}
                failed = train_on_ray(cfg, study_dir, record, planned, steps, wandb, stop)
            else:
                trainers = _build_trainers(cfg, study_dir, record, planned, sources, wandb, stop, workers)
                failed = _train(cfg, study_dir, record, planned, trainers, stop)
            _describe_latents(study_dir, record, sources, stop)
        except StopRequested as stopped:
            stopped.study_id = study_dir.name
            record.status = "interrupted"  # resumable, as "running" is, but no process is at work on it
            record.write(study_json)
            print_sync_command(wandb)
            raise
    return _write_outputs(study_dir, record, failed, wandb, _shared_config(cfg))


@contextlib.contextmanager
def _embedding_workers(cfg: RunConfig) -> Iterator[Executor | None]:
    """Processes for the arms' UMAP fits while they train, when the study fits any here. Started
    before the subject model loads, which leaves a core idle (experiments/eval/embedding.py)."""
    fits = cfg.probes.umap_evals > 0 and "umap" in _probe_kinds(cfg.study.names)
    # Two where the fits are all at the final eval, with no training beside them (the module's docstring).
    workers = (embedding_workers(2 if cfg.probes.umap_evals == 1 else 1)
               if fits and cfg.study.executor == "local" else None)
    try:
        yield workers
    finally:
        if workers is not None:
            workers.shutdown(wait=False, cancel_futures=True)


def _wandb_sink(cfg: RunConfig, root_dir: Path | None = None):
    if not cfg.log.use_wandb:
        return None
    from visualization.wandb_sink import WandbSink

    return WandbSink(project=cfg.log.wandb_project, mode=cfg.log.wandb_mode, root_dir=root_dir,
                     after_log=lambda: faults.reached("wandb-log"))


def _shared_config(cfg: RunConfig) -> dict:
    """The W&B config every run of the study shares (each arm's run adds its own settings)."""
    return flatten({k: v for k, v in cfg.result_spec().items() if k not in ("plans", "train")})


def train_arm_in_worker(cfg: RunConfig, study_dir: Path, arm_id: str) -> dict:
    """One arm of a study where a Ray worker runs it (experiments/studies/ray_executor.py): the
    sources reopened (the caches the driver built, verified by their checksums), the arm's trainer
    built as the local runner builds it and trained from its last checkpoint if it has one. Returns
    its outcome as study.json records it; the driver records it."""
    record = StudyRecord.read(study_dir / "study.json", "--executor ray")
    stop = StopFlag()
    with contextlib.redirect_stdout(io.StringIO()):  # what opening says about the data, the driver has said
        sources = _open_sources(cfg, study_dir, stop)
    use_fast_matmuls(cfg.train.device)  # after the caches (a harvest, if the worker rebuilt one)
    planned = [p for p in plan_arms(cfg, sources) if p.arm_id == arm_id]
    if not planned:
        raise RuntimeError(f"arm {arm_id} is not one this worker plans from the study's settings (another "
                           f"version of the harness, or another subject model, on this node?)")
    wandb = _wandb_sink(cfg, root_dir=study_dir)  # the runs' files on the shared storage, beside the study
    trainers = _build_trainers(cfg, study_dir, record, planned, sources, wandb, stop)
    (outcome,) = train_arms(trainers, True, stop, {arm_id: planned[0].name})
    offline = wandb.offline_dirs if wandb is not None else []
    return {"settled": _settled(outcome, study_dir, planned[0].name), "wandb_offline": [str(d) for d in offline]}


def _open_sources(cfg: RunConfig, study_dir: Path, stop: StopFlag) -> list[OpenedSource]:
    """The source opened at each hook point of the study."""
    try:
        return SOURCES[cfg.data.source].open(cfg, Path(cfg.log.checkpoint_dir), stop)
    except BuildInterrupted as built:
        stopped = StopRequested(0, where=f"while building the activation cache, with {built.done} of its "
                                         f"{built.total} chunks saved")
        stopped.study_id = study_dir.name
        raise stopped from None


def _measure_baselines(study_dir: Path, source: OpenedSource) -> None:
    """The concept baselines on the raw activations at the source's hook point that the emergence
    study reads the latents' scores against; measured once per study (a resumed study reads them back)."""
    path = baselines_file(study_dir, source.hook)
    if read_baselines(study_dir, source.hook) is not None:  # measured already (by an older version: baselines.npz)
        return
    data = source.concepts()
    if not len(data.concepts):
        return
    cache = source.cache
    with phase("baselines"):
        print(textwrap.fill(f"baselines at {source.hook}: a dense probe and the best raw neuron per concept "
                            f"({len(data.concepts)} concepts, {cache.n_eval_rows:,} eval tokens)", 100,
                            subsequent_indent="  "))
        measured = concept_baselines(np.asarray(cache.acts[cache.n_train_rows:]), data.labels.numpy(),
                                     data.fit_mask.numpy())
        write_baselines(path, data.concepts.names, measured)


def _record_plan(record: StudyRecord, planned: list[PlannedArm], sources: list[OpenedSource], device: str) -> None:
    """The arms in study.json (those of an earlier run of this study as they were), and what a reader
    of the report needs to know about the data, and the code and machine each run of the study used."""
    previous, d_in = {a.arm_id: a for a in record.arms}, {s.hook: s.cache.d_in for s in sources}
    record.arms = [previous.get(p.arm_id) or p.record(d_in[p.hook]) for p in planned]
    for arm, p in zip(record.arms, planned):
        arm.hook = p.hook  # also on arms recorded before study.json named it
    commits, machines = record.setup.get("commits", []), record.setup.get("machines", [])
    record.setup = {"hooks": {s.hook: {"cache": str(s.cache.path), "d_in": s.cache.d_in,
                                       "train_tokens": s.cache.n_train_rows, "eval_tokens": s.cache.n_eval_rows,
                                       "norm_scale": s.scale} for s in sources},
                    "commits": commits + [c for c in [code_commit()] if c not in commits],
                    "machines": machines + [m for m in [machine(device)] if m not in machines]}


def unfinished(record: StudyRecord, planned: list[PlannedArm]) -> list[PlannedArm]:
    """The planned arms not yet complete; those that are, a line each saying they are skipped."""
    for p in planned:
        if record.arm(p.arm_id).status == "complete":
            print(f"arm {p.name} ({p.arm_id}) already complete; skipped")
    return [p for p in planned if record.arm(p.arm_id).status != "complete"]


def _build_trainers(cfg: RunConfig, study_dir: Path, record: StudyRecord, planned: list[PlannedArm],
                    sources: list[OpenedSource], wandb, stop: StopFlag,
                    workers: Executor | None = None) -> dict[str, Trainer]:
    """A trainer per arm of `planned` not yet complete, in plan order, with its sinks and the probes its
    studies need (their UMAP fits in `workers`, when given)."""
    needs_concepts = any("concepts" in _probe_kinds(p.studies) for p in planned)
    at_hook, shared_config = {s.hook: s for s in sources}, _shared_config(cfg)
    trainers: dict[str, Trainer] = {}
    for p in unfinished(record, planned):
        spec, source = p.spec, at_hook[p.hook]
        cache, ctx, scale = source.cache, source.ctx, source.scale
        concept_data = source.concepts() if needs_concepts and source.concepts is not None else None
        arm_dir = study_dir / p.arm_id
        run_config = {**shared_config, **flatten({"sae": asdict(spec.sae), "train": asdict(spec.train)}),
                      "arm_id": p.arm_id, "studies": p.studies, "study_id": study_dir.name, "d_in": cache.d_in,
                      "d_sae": spec.sae.d_sae(cache.d_in), "hook_name": ctx.hook_name, "norm_scale": scale}
        sinks = ArmSinks(arm_dir, wandb.for_another_run() if wandb is not None else None, p.name,
                         group=study_dir.name, job_type="+".join(p.studies), config=run_config,
                         checkpoints=cfg.log.wandb_checkpoints)
        n_steps = total_steps(spec.train, cache)
        probes = ArmProbes(arm_dir, _probe_kinds(p.studies), cfg.probes, concept_data,
                           umap_steps(eval_steps(spec.train, n_steps), cfg.probes.umap_evals), spec.train.seed,
                           cache.n_eval_rows, truth=ctx.truth, workers=workers)
        trained_on = {"study_id": study_dir.name, "arm_id": p.arm_id, "arm_name": p.name, **source.about,
                      "normalize": cfg.data.normalize, "norm_scale": scale, "commit": code_commit()}
        trainers[p.arm_id] = Trainer(arm_dir, spec.sae, spec.train, cache, scale, ctx, sinks, stop, probes, trained_on)
    return trainers


def _train(cfg: RunConfig, study_dir: Path, record: StudyRecord, planned: list[PlannedArm],
           trainers: dict[str, Trainer], stop: StopFlag) -> bool:
    """Train the arms, those that read the same batches in lockstep, recording each arm's outcome in
    study.json as it comes. True when an arm failed."""
    study_json = study_dir / "study.json"
    use_fast_matmuls(cfg.train.device)  # from here on: the harvest (the cache's key) stays in full float32
    index_of = {p.arm_id: i for i, p in enumerate(planned)}
    groups: dict[tuple, dict[str, Trainer]] = {}
    for arm_id, trainer in trainers.items():  # in plan order
        groups.setdefault(lockstep_key(trainer) if cfg.study.lockstep else arm_id, {})[arm_id] = trainer
    failed = False
    for group in groups.values():
        labels = {arm_id: arm_label(planned, arm_id) for arm_id in group}
        if len(group) > 1:
            print(f"training {len(group)} arms in lockstep, one batch read per step for all "
                  f"(--sequential-arms: one by one)", flush=True)
        for arm_id, trainer in group.items():
            record.arm(arm_id).status, record.arm(arm_id).steps_total = "running", trainer.n_steps
        record.write(study_json)
        for outcome in train_arms(group, cfg.study.resume, stop, labels, bars(cfg), cfg.study.parallel_arms):
            name = planned[index_of[outcome.arm_id]].name
            failed |= record_outcome(study_dir, record, outcome.arm_id, _settled(outcome, study_dir, name), index_of)
    return failed


def arm_label(planned: list[PlannedArm], arm_id: str) -> str:
    """`[i/n] name`: how progress lines name an arm."""
    index = next(i for i, p in enumerate(planned) if p.arm_id == arm_id)
    return f"[{index + 1}/{len(planned)}] {planned[index].name}"


def _settled(outcome, study_dir: Path, name: str) -> dict:
    """An arm's outcome from train_arms as study.json records it: finished, failed (with its reason)
    or interrupted (at its last checkpoint's step)."""
    if outcome.result is not None:
        r = outcome.result
        return {"status": "complete", "steps": r.steps, "tokens": r.tokens, "final": r.final,
                "weights": str(study_dir / outcome.arm_id / "sae.safetensors"), "wandb_run_id": r.wandb_run_id,
                "seconds": round(r.seconds, 2)}
    if outcome.error is not None:
        good = outcome.error.good_steps if isinstance(outcome.error, NonFiniteLoss) else outcome.trainer.step
        return {"status": "failed", "reason": _failure(outcome, study_dir, name), "steps": good}
    return {"status": "interrupted", "steps": outcome.trainer.step}


def record_outcome(study_dir: Path, record: StudyRecord, arm_id: str, settled: dict, index_of: dict[str, int]) -> bool:
    """Record an arm's outcome (_settled) in study.json at once; True when the arm failed."""
    for key, value in settled.items():
        setattr(record.arm(arm_id), key, value)
    record.write(study_dir / "study.json")
    if settled["status"] == "complete":
        faults.reached(f"arm-done:{index_of[arm_id] + 1}")
    return settled["status"] == "failed"


def _describe_latents(study_dir: Path, record: StudyRecord, sources: list[OpenedSource], stop: StopFlag) -> None:
    """What each latent of every finished arm means (experiments/eval/features.py), saved in the
    arm's folder; an arm already described is skipped, so a resumed study redoes at most one."""
    todo = [a for a in record.finished if not features_done(study_dir / a.arm_id)]
    for n, arm in enumerate(todo, 1):
        if stop.requested:
            raise StopRequested(0, where=f"between the feature analyses of the arms, {n - 1} of {len(todo)} done")
        print(f"features [{n}/{len(todo)}] {arm.name}: top contexts, logit effects, labels", flush=True)
        with phase("features"):
            source = next(s for s in sources if s.hook == record.hook_of(arm))
            save_features(source.features(SAE.load(study_dir / arm.arm_id)), study_dir / arm.arm_id)
        faults.reached("features-arm")


def _failure(outcome, study_dir: Path, name: str) -> str:
    """Why an arm failed, in one line. A usage error or a full disk ends the study (resumable); any other
    error fails this arm only, with its traceback in error.txt, and the others carry on."""
    err = outcome.error
    if ends_the_study(err):
        raise err
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    error_file = study_dir / outcome.arm_id / "error.txt"
    error_file.write_text("".join(traceback.format_exception(err)))
    print(f"arm {name} failed: {reason} (traceback in {error_file})", file=sys.stderr)
    try:
        outcome.trainer.sinks.finish({})
    except Exception:  # noqa: BLE001  (closing the failed arm's logs is best effort)
        pass
    return reason


def _write_outputs(study_dir: Path, record: StudyRecord, failed: bool, wandb, shared_config: dict) -> int:
    """The studies' analyses, summary.json, the report, the W&B summary runs and the terminal tables."""
    study_json = study_dir / "study.json"
    status = "failed" if failed else "complete"
    finished = replace(record, status=status)  # what the outputs describe; study.json says so once they exist
    with phase("report"):
        results = analyse(study_dir, finished)
    summary = {"study_id": study_dir.name, "status": status, "arms": [a.summary() for a in record.arms],
               "studies": {res.name: res.summary for res in results}}
    with phase("report"):
        report = write_report(study_dir, finished, results, source_of(record).describe(record),
                              lambda: faults.reached("report-figure"))
    if wandb is not None:
        runs = record.summary_runs
        for res in results:
            with phase("logging"):
                runs[res.name] = log_summary_run(wandb, study_dir, res, shared_config, runs.get(res.name))
            record.write(study_json)  # a resumed study logs to these runs again, adding none
            faults.reached("summary-run")
        summary["summary_runs"] = runs
    summary["timing"] = timing = CLOCK.split()  # this process only: a resumed study counts what it ran
    write_json_atomic(study_dir / "summary.json", summary)
    record.status = status
    record.write(study_json)
    print_tables(results)
    print(textwrap.fill(f"time: {format_timing(timing)}", 100, subsequent_indent="      "))
    print(f"report: {report}\noutputs: {study_dir}")
    print_sync_command(wandb)
    return 1 if failed else 0


def analyse(study_dir: Path, record: StudyRecord) -> list[StudyResult]:
    """Every study of the run, from its files: each study at each hook point (named `study@hook` where
    there are several, after their comparison across hook points), then what the latents mean."""
    hooks = list(record.hooks) or [None]
    inputs = {hook: StudyInputs(record.spec["probes"], read_baselines(study_dir, hook)) for hook in hooks}
    loaded = {r.arm_id: load_arm(study_dir, r) for r in record.arms}
    at_hook = {hook: [loaded[r.arm_id] for r in record.arms if record.hook_of(r) == hook] for hook in hooks}
    results = []
    for name in record.spec["study"]["names"]:
        for hook in hooks:
            res = source_of(record).analyses[name]([a for a in at_hook[hook] if name in a.record.studies],
                                                   inputs[hook])
            if len(hooks) > 1:  # a docs page shows the comparison's table instead of each hook point's
                res.name, res.in_docs = f"{name}@{hook_label(hook)}", False
            results.append(res)
    if len(hooks) > 1:
        results.insert(0, hook_points.analyse([(hook, at_hook[hook], inputs[hook]) for hook in hooks]))
    described = features.analyse(study_dir, record.finished)
    results += [described] if described is not None else []
    return results


def print_sync_command(wandb) -> None:
    command = wandb.sync_command() if wandb is not None else None
    if command:
        print(f"W&B runs logged offline; upload them with:\n  {command}")


def _probe_kinds(studies: list[str]) -> set[str]:
    return set().union(*(PROBE_KINDS[s] for s in studies))


def log_summary_run(wandb, study_dir: Path, res, config: dict, run_id: str | None) -> str | None:
    """A study's W&B run (job type `summary`): its tables and the report's figures."""
    tables = {key: (t.headers, t.rows) for key, t in {**res.tables, **res.data}.items()}
    images = {key: study_dir / "report" / figure_file(res.name, key) for key in res.figures}
    return wandb.log_summary_run(name=f"{res.name}-summary", group=study_dir.name, config={**config, "study": res.name},
                                 tables=tables, figures=images, run_id=run_id)


def print_tables(results: list) -> None:
    for res in results:
        table = next(iter(res.tables.values()), None)
        if table is None:
            continue
        print(boxed_table(f"{res.name}: {table.title}", table.headers, table.rows))
        for finding in res.findings[:6]:
            print(wrapped_finding(finding.replace("**", "")))


def _recorded_study(cfg: RunConfig, study_id: str, flag: str) -> tuple[Path, StudyRecord]:
    """The folder and record of study `study_id` under --checkpoint-dir; UsageError naming the
    studies there when it is not one."""
    root = Path(cfg.log.checkpoint_dir)
    study_dir = root / study_id
    if not (study_dir / "study.json").exists():
        known = sorted(p.parent.name for p in root.glob("*/study.json")) if root.is_dir() else []
        there = f"; the studies there: {', '.join(known)}" if known else "; it holds no study"
        raise UsageError(f"{flag}: there is no study {study_id!r} in {cfg.log.checkpoint_dir}{there}")
    return study_dir, StudyRecord.read(study_dir / "study.json", flag)


def _finished_arms(cfg: RunConfig, record: StudyRecord) -> list[ArmRecord]:
    """The study's finished arms, or the one --arm names; UsageError when --arm names no finished arm."""
    if cfg.study.arm is None:
        return record.finished
    chosen = record.named(cfg.study.arm)
    if chosen is None:
        names = ", ".join(a.name for a in record.finished) or "none"
        raise UsageError(f"--arm {cfg.study.arm!r} is not an arm of study {record.study_id} (finished: {names})")
    if chosen.status != "complete":
        raise UsageError(f"--arm {cfg.study.arm!r} of study {record.study_id} is {chosen.status}, not finished "
                         f"(--resume the study to finish it)")
    return [chosen]


def search_study(cfg: RunConfig) -> int:
    """--search WORD --study-id ID [--arm NAME]: the matching latents of the study's arms, printed."""
    study_dir, record = _recorded_study(cfg, cfg.study.study_id, "--search")
    arms = _finished_arms(cfg, record)
    table = features.search(study_dir, arms, cfg.study.search)
    if table is None:
        raise UsageError(f"--search: no arm of study {record.study_id} has a feature analysis yet (it is made when "
                         f"an arm finishes; --resume the study to make it)")
    if not table.rows:
        print(f"no latent of {len(arms)} arm(s) matches {cfg.study.search!r}")
        return 0
    print(boxed_table(table.title, table.headers, table.rows))
    return 0


def export_study(cfg: RunConfig) -> int:
    """--export FORMAT --study-id ID [--arm NAME] [--out DIR]: each finished arm in another tool's format,
    written whole or not at all."""
    from experiments.export.neuronpedia import export_neuronpedia
    from experiments.export.saelens import export_saelens, saelens_metadata

    study_dir, record = _recorded_study(cfg, cfg.study.study_id, "--export")
    arms = _finished_arms(cfg, record)
    if not arms:
        raise UsageError(f"--export: study {record.study_id} has no finished arm yet")
    if cfg.study.out is not None and len(arms) > 1:
        raise UsageError(f"--out names one folder, and study {record.study_id} has {len(arms)} finished arms: "
                         f"pick one with --arm NAME")
    targets = {a.arm_id: Path(cfg.study.out) if cfg.study.out is not None else
               study_dir / "exports" / cfg.study.export / a.name for a in arms}
    taken = next((t for t in targets.values() if t.exists()), None)
    if taken is not None:
        raise UsageError(f"--export: {taken} exists; remove it, or write elsewhere with --out DIR")
    blocking = next((p for t in targets.values() for p in t.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"--export: {blocking} is a file, not a folder; write elsewhere with --out DIR")
    abouts = {a.arm_id: trained_on(study_dir / a.arm_id) for a in arms}
    unrecorded = next((a for a in arms if not abouts[a.arm_id]), None)
    if unrecorded is not None:
        raise UsageError(f"--export: arm {unrecorded.name} was saved without a record of what it was trained on "
                         f"(config.json's trained_on, written since this harness exports); run the study again")
    export = {"saelens": lambda arm_dir, out, about: export_saelens(arm_dir, out, saelens_metadata(about)),
              "neuronpedia": export_neuronpedia}[cfg.study.export]
    written: list[Path] = []
    for arm in arms:
        target = targets[arm.arm_id]
        try:
            written.append(export(study_dir / arm.arm_id, target, abouts[arm.arm_id]))
        except (ValueError, OSError) as err:
            for done in written:  # all the arms or none: a rerun would otherwise find these and refuse
                shutil.rmtree(done, ignore_errors=True)
            plain_os = isinstance(err, OSError) and not isinstance(err, FileExistsError)  # whose str() is errno's
            reason = f"cannot write {target}: {err.strerror}" if plain_os else str(err)
            raise UsageError(f"--export {cfg.study.export}, arm {arm.name}: {reason}") from None
    for arm, out in zip(arms, written):
        print(f"{cfg.study.export}: {arm.name} -> {out}")
    return 0


def rebuild_report(cfg: RunConfig) -> int:
    """--report STUDY_ID: tables, figures and report.md again, from the study folder alone."""
    study_dir, record = _recorded_study(cfg, cfg.study.report, "--report")
    if cfg.study.docs is not None:  # before the rebuild, which takes a while
        block_kinds(Path(cfg.study.docs), "study", record.study_id, "--docs")
    results = analyse(study_dir, record)
    described = source_of(record).describe(record)
    report = write_report(study_dir, record, results, described, lambda: faults.reached("report-figure"))
    print_tables(results)
    print(f"report: {report}")
    if cfg.study.docs is not None:
        run_summary = study_dir / "summary.json"
        timing = read_json(run_summary).get("timing") if run_summary.exists() else None
        fill_blocks(Path(cfg.study.docs), "study", record.study_id,
                    lambda kind: docs_excerpt(record, results, kind, described, timing), "--docs")
        print(f"docs: {cfg.study.docs}")
    return 0
