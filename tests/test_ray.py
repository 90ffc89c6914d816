"""--executor ray: the same study on Ray gives the local runner's results bit for bit, on a Ray
instance the run starts itself and on a cluster it joins (`ray start --head` on 127.0.0.1, started
once for the module), also when a worker is killed mid-arm and its task is retried, or the driver
is killed and the study resumed; the local path never imports Ray."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from run_experiments import main
from tests.forked import run_forked
from tests.outcomes import assert_same_outcome
from tests.test_end_to_end import ROOT, wandb_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
# The tests of the study `local` run on one xdist worker (`--dist loadgroup`), which builds it once.
on_local_study = pytest.mark.xdist_group("ray-local-study")
# A --quick emergence study made smaller still, with two architectures: probes, UMAP and features.
# 60 steps, so that a checkpoint (every 40 under --quick) falls mid-arm.
SMALL = ["--quick", "--study", "emergence", "--activation", "topk,gated", "--n-samples", "64", "--seq-len", "33",
         "--batch-size", "128", "--expansion-factor", "2", "--k", "8", "--steps", "60", "--no-progress"]


@pytest.fixture(scope="module")
def local(tmp_path_factory, tinylm_models_dir):
    """A checkpoint dir with tinylm and study `local`: the study run by the local runner in a fresh
    interpreter, which must not import Ray. The Ray runs below each go beside it."""
    root = tmp_path_factory.mktemp("ray") / "ckpt"
    shutil.copytree(tinylm_models_dir, root / "models")
    code = ("import sys; from run_experiments import main; code = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'the local runner imported ray'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *SMALL, "--checkpoint-dir", str(root), "--study-id", "local"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster, `ray start --head --block` on 127.0.0.1 (stopped with it); its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            # a test cluster on loopback; tasks at normal priority, as docs/cluster.md advises
                            env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, head.stderr.read()[-2000:]
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head and the Ray processes it started, at once
        head.wait(timeout=60)


def on_ray(root, study_id: str, *extra: str, address: str | None = None) -> list[str]:
    """The study's arguments for a Ray run with as many torch threads per arm as the local run had,
    on the cluster at `address` (default: a Ray instance the run starts)."""
    return [*SMALL, "--checkpoint-dir", str(root), "--study-id", study_id, "--executor", "ray",
            "--cpus-per-arm", str(torch.get_num_threads()), *(["--ray-address", address] if address else []), *extra]


@on_local_study
def test_a_study_on_ray_equals_the_local_runner(local, wandb_env, monkeypatch, capsys):  # noqa: F811
    """On a Ray instance of its own, with W&B offline: the tasks' runs are written beside the study
    (on the shared storage) and join the driver's one `wandb sync` command."""
    for name, value in wandb_env.items():
        monkeypatch.setenv(name, value)
    assert main(on_ray(local, "ray", "--use-wandb")) == 0
    out = capsys.readouterr().out
    assert "training 2 arms as Ray tasks" in out and "[2/2] gated-coef0.0084: complete" in out
    sync = out.split("upload them with:\n  ", 1)[1]
    arm_runs = sorted((local / "ray" / "wandb").glob("offline-run-*"))
    assert len(arm_runs) == 2 and all(str(run) in sync for run in arm_runs)
    assert_same_outcome(local / "local", local / "ray")
    study = json.loads((local / "ray" / "study.json").read_text())
    assert study["status"] == "complete" and all(a["status"] == "complete" for a in study["arms"])


@on_local_study
def test_a_worker_killed_mid_arm_is_retried_from_its_checkpoint(local, cluster, tmp_path, monkeypatch, capfd):
    """The worker training topk is SIGKILLed at step 50, after its checkpoint at step 40 (once: the
    retry passes the point); Ray starts the task again, it resumes at step 40, and the study ends
    with the results of the uninterrupted local run."""
    once = tmp_path / "fault-fired"
    monkeypatch.setenv("SAE_FAULT", "step:50")
    monkeypatch.setenv("SAE_FAULT_ONCE", str(once))
    assert main(on_ray(local, "killed-worker", "--max-retries", "1", address=cluster)) == 0
    assert once.exists()  # a worker was killed
    assert_same_outcome(local / "local", local / "killed-worker")
    (topk,) = [a["arm_id"] for a in json.loads((local / "killed-worker" / "summary.json").read_text())["arms"]
               if a["architecture"] == "topk"]
    assert f"resuming {topk} at step 40 of 60" in capfd.readouterr().out  # the retry, from the checkpoint


@on_local_study
def test_a_study_whose_driver_was_killed_resumes_on_ray(local, cluster):
    """The driver SIGKILLed once its first arm is recorded complete (Ray stops the driver's other
    task with it); --resume on Ray skips the finished arm and ends with the local run's results."""
    killed = run_forked(on_ray(local, "killed-driver", address=cluster), env={**os.environ, "SAE_FAULT": "arm-done:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    arms = json.loads((local / "killed-driver" / "study.json").read_text())["arms"]
    assert sorted(a["status"] for a in arms) == ["complete", "running"]
    resumed = run_forked(on_ray(local, "killed-driver", "--resume", address=cluster))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already complete; skipped" in resumed.stdout
    assert_same_outcome(local / "local", local / "killed-driver")


@on_local_study
def test_an_arm_whose_worker_keeps_dying_is_recorded_failed_and_the_study_goes_on(local, cluster, monkeypatch):
    monkeypatch.setenv("SAE_FAULT", "step:5")  # every attempt of every arm dies at step 5
    assert main(on_ray(local, "dying", "--activation", "topk", "--max-retries", "1", address=cluster)) == 1
    (arm,) = json.loads((local / "dying" / "study.json").read_text())["arms"]
    assert arm["status"] == "failed" and arm["reason"].startswith("its Ray worker was lost 2 times")
    assert (local / "dying" / "report" / "report.md").exists()


def test_the_ray_instance_a_run_starts_runs_at_the_drivers_priority_and_asks_each_node_for_the_checkpoint_dir(
        tmp_path, monkeypatch):
    """Its tasks run at the driver's priority: Ray's default is nice 15, and beside other work at normal
    priority an arm would all but stop. The check behind '--checkpoint-dir X: Ray node N cannot see it':
    a task pinned to each node looks for a file the driver has just written there."""
    import ray

    from config.cli import parse_args
    from experiments.studies.ray_executor import connect, nodes_not_seeing, nodes_without

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    connect(parse_args(["--executor", "ray", "--checkpoint-dir", str(tmp_path)]))
    try:
        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert nodes_not_seeing(tmp_path, nodes) == []
        assert not list(tmp_path.iterdir())  # the marker is removed again
        # what a node that does not mount the folder answers
        assert nodes_without(tmp_path / "elsewhere", nodes) == [nodes[0]["NodeManagerAddress"]]
    finally:
        ray.shutdown()
