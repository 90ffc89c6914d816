"""`--executor ray`: each arm of a study is a Ray task (docs/cluster.md).

The driver (the process the user started) builds the activation caches and measures the
baselines as the local runner does, then submits one task per unfinished arm; a task reopens the
study's sources from the shared checkpoint directory (the caches' checksums prove they are the
driver's), builds the arm's trainer exactly as the local runner does and trains it from its last
checkpoint if it has one, writing its checkpoints, metrics and weights into the arm's folder. The
driver records each outcome in study.json as it arrives and then analyses and reports as usual.
A task whose worker or node is lost is started again by Ray (`--max-retries`), and resumes from
the arm's last checkpoint, on whichever node; after that the arm is recorded failed with the
reason. An arm's results equal the local runner's: the same trainer, batches and seeds, with as
many torch threads as the local run had (`--cpus-per-arm`).

Ray is imported here only, so the local path never loads it.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
from dataclasses import replace
from pathlib import Path

from config.records import StudyRecord
from config.schema import RunConfig, UsageError
from experiments.timing import phase
from experiments.train.trainer import StopFlag, StopRequested

ROOT = Path(__file__).resolve().parents[2]
# Settings the harness reads from the environment, passed on to every worker (a worker on another
# node does not inherit the driver's environment).
PASSED_ENV = ("TINYLM_", "WANDB_", "SAE_", "HF_")


def connect(cfg: RunConfig) -> None:
    """Join the cluster at --ray-address, or start a Ray instance on this machine, and check it can
    run the study: reachable, GPUs where --gpus-per-arm asks for them, a node with --cpus-per-arm
    CPUs, and every node sees --checkpoint-dir. UsageError (nothing started) otherwise."""
    import ray

    s = cfg.study
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    where = f"--ray-address {s.ray_address}" if s.ray_address else "--executor ray"
    if s.ray_address is not None:
        _check_reachable(s.ray_address)  # Ray itself retries an unreachable address for minutes
    # Ray's own notices (log level WARNING, e.g. about token authentication) stay off the terminal.
    quiet = {"log_to_driver": True, "logging_level": logging.ERROR, "runtime_env": {"env_vars": env}}
    try:
        if s.ray_address is None:  # "local": a new instance, never a cluster RAY_ADDRESS or /tmp/ray names
            # Ray starts its workers at nice 15; an arm would then crawl behind anything at normal priority
            # on this machine, where the local runner trains at the driver's priority. Workers inherit it.
            ray.init(address="local", include_dashboard=False, _system_config={"worker_niceness": 0}, **quiet)
        else:
            ray.init(address=s.ray_address, **quiet)
    except Exception as err:  # noqa: BLE001  (Ray raises ConnectionError, RuntimeError, ValueError ...)
        ray.shutdown()
        raise UsageError(f"{where}: cannot connect to Ray ({_first_line(err)})") from None
    try:
        _check_cluster(cfg, [n for n in ray.nodes() if n.get("Alive")])
    except UsageError:
        ray.shutdown()
        raise


def _check_cluster(cfg: RunConfig, nodes: list[dict]) -> None:
    """UsageError where the cluster cannot run the study's arms or some node cannot see --checkpoint-dir."""
    s = cfg.study
    for flag, wanted, resource in (("--gpus-per-arm", s.gpus_per_arm, "GPU"),
                                   ("--cpus-per-arm", s.cpus_per_arm, "CPU")):
        most = max((n["Resources"].get(resource, 0) for n in nodes), default=0)
        if wanted > most:
            raise UsageError(f"{flag} {wanted:g}: no node of the Ray cluster has that many {resource}s "
                             f"(the most is {most:g})")
    blind = nodes_not_seeing(Path(cfg.log.checkpoint_dir).resolve(), nodes)
    if blind:
        raise UsageError(f"--checkpoint-dir {cfg.log.checkpoint_dir}: Ray node {blind[0]} cannot see it; put it on "
                         f"storage every node mounts at the same path")


def _check_reachable(address: str) -> None:
    if address == "auto":  # the cluster Ray would pick: RAY_ADDRESS, else the latest started on this machine
        latest = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        address = os.environ.get("RAY_ADDRESS") or (latest.read_text().strip() if latest.exists() else "")
        if not address:
            raise UsageError("--ray-address auto: no Ray cluster runs on this machine (RAY_ADDRESS is not set); "
                             "start one with ray start --head, or name it with --ray-address HOST:PORT")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address {address}: expected auto or HOST:PORT (the head node's GCS port, 6379 "
                         f"unless it was started with another)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise UsageError(f"--ray-address {address}: no Ray cluster answers there ({err.strerror or err})") from None


def nodes_not_seeing(root: Path, nodes: list[dict]) -> list[str]:
    """The addresses of the nodes on which a task does not find the folder `root` (with a file the
    driver writes there just before)."""
    marker = root / f".ray-visible-{socket.gethostname()}-{os.getpid()}"
    marker.write_text("")
    try:
        return nodes_without(marker, nodes)
    finally:
        marker.unlink(missing_ok=True)


def nodes_without(path: Path, nodes: list[dict]) -> list[str]:
    """The addresses of the nodes on which `path` does not exist, asked by a task pinned to each."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    look = ray.remote(num_cpus=0)(_exists)
    found = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                     .remote(str(path)) for n in nodes])
    return [n["NodeManagerAddress"] for n, seen in zip(nodes, found) if not seen]


def _exists(path: str) -> bool:
    return Path(path).exists()


def shutdown() -> None:
    import ray

    ray.shutdown()


def train_on_ray(cfg: RunConfig, study_dir: Path, record: StudyRecord, planned: list, steps: dict[str, int], wandb,
                 stop: StopFlag) -> bool:
    """Train the study's unfinished arms (`steps`: each arm's steps in all) as Ray tasks, recording
    each outcome in study.json as it arrives. True when an arm failed."""
    import ray

    from experiments.studies.runner import arm_label, record_outcome, unfinished
    from experiments.studies.sources import bars

    s = cfg.study
    index_of = {p.arm_id: i for i, p in enumerate(planned)}
    todo = unfinished(record, planned)
    if not todo:
        return False
    task = ray.remote(num_cpus=s.cpus_per_arm, num_gpus=s.gpus_per_arm, max_retries=s.max_retries,
                      retry_exceptions=False)(_train_arm)
    task_cfg = with_absolute_paths(cfg)
    pending = {}
    for p in todo:
        record.arm(p.arm_id).status, record.arm(p.arm_id).steps_total = "running", steps[p.arm_id]
        pending[task.remote(task_cfg, str(study_dir), p.arm_id)] = p
    record.write(study_dir / "study.json")
    print(f"training {len(todo)} arms as Ray tasks ({s.cpus_per_arm:g} CPUs"
          + (f", {s.gpus_per_arm:g} GPUs" if s.gpus_per_arm else "") + f" each; cluster: "
          f"{ray.cluster_resources().get('CPU', 0):g} CPUs)", flush=True)
    bar = bars(cfg)(total=len(todo), initial=0, desc="arms on Ray", unit="arm")
    failed = False
    try:
        with phase("training"):  # the driver's time goes to the arms it waits for
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                if stop.requested:
                    raise StopRequested(0, where="with each unfinished arm's last checkpoint kept")
                for ref in done:
                    p = pending.pop(ref)
                    settled = _outcome(ref, study_dir, p, s.max_retries, wandb)
                    failed |= record_outcome(study_dir, record, p.arm_id, settled, index_of)
                    bar.update()
                    print(f"{arm_label(planned, p.arm_id)}: {settled['status']}"
                          + (f" ({settled['reason']})" if settled.get("reason") else ""), flush=True)
    except (StopRequested, KeyboardInterrupt, UsageError, OSError):  # the others stop too, resumable
        for ref, p in pending.items():
            ray.cancel(ref, force=True)
            record.arm(p.arm_id).status = "interrupted"
        record.write(study_dir / "study.json")
        raise
    finally:
        bar.close()
    return failed


def _outcome(ref, study_dir: Path, planned_arm, max_retries: int, wandb) -> dict:
    """A finished task's outcome as study.json records it (the runs it logged to W&B offline join the
    driver's `wandb sync` command). A usage error or a full disk in the task ends the study, as in a
    local run."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError, RayTaskError

    from experiments.studies.runner import ends_the_study

    try:
        done = ray.get(ref, timeout=60)
        if wandb is not None:
            wandb.offline_dirs.extend(Path(d) for d in done["wandb_offline"])
        return done["settled"]
    except RayTaskError as err:  # the task raised
        if ends_the_study(err.cause):
            raise err.cause from None
        return _lost(study_dir, planned_arm, err, f"{type(err.cause).__name__}: {_first_line(err.cause)}")
    except (RayError, GetTimeoutError) as err:
        return _lost(study_dir, planned_arm, err, f"its Ray worker was lost {max_retries + 1} times "
                                                  f"({type(err).__name__})")


def _train_arm(cfg: RunConfig, study_dir: str, arm_id: str) -> dict:
    """The task: one arm, in a Ray worker, with as many torch threads as CPUs it reserved."""
    import torch

    from experiments.studies.runner import train_arm_in_worker

    if not (Path(study_dir) / "study.json").exists():
        raise UsageError(f"study folder {study_dir} is not visible on Ray node {socket.gethostname()}")
    torch.set_num_threads(max(1, int(cfg.study.cpus_per_arm)))
    return train_arm_in_worker(cfg, Path(study_dir), arm_id)


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """The settings a task gets: the files they name (--dataset, --concepts) absolute, since a task
    runs in whatever folder its node's Ray started in. The driver keeps the paths as given (they are
    among the settings --resume matches); the activations' identity holds the text's hash, not its
    path. (A local --model-name folder is part of the model's identity: give it as an absolute path.)"""
    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path is not None else None

    return replace(cfg, data=replace(cfg.data, dataset=absolute(cfg.data.dataset)),
                   probes=replace(cfg.probes, concepts=absolute(cfg.probes.concepts)))


def _lost(study_dir: Path, planned_arm, err: Exception, reason: str) -> dict:
    """A failed arm's record, its error kept in error.txt."""
    (study_dir / planned_arm.arm_id).mkdir(exist_ok=True)
    (study_dir / planned_arm.arm_id / "error.txt").write_text(str(err))
    return {"status": "failed", "reason": reason}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
