"""--executor ray: the same study on a Ray instance started on this machine gives the local
runner's results bit for bit, also when a worker is killed mid-arm and its task is retried; the
local path never imports Ray."""
import json
import subprocess
import sys

import pytest

from run_experiments import main
from tests.outcomes import assert_same_outcome
from tests.test_end_to_end import ROOT, ckpt  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
# A --quick emergence study made smaller still, with two architectures: probes, UMAP and features.
SMALL = ["--quick", "--study", "emergence", "--activation", "topk,gated", "--n-samples", "64", "--seq-len", "33",
         "--batch-size", "128", "--expansion-factor", "2", "--k", "8", "--no-progress"]


def local_run(root, study_id: str, *extra: str) -> None:
    """The study run by the local runner in a fresh interpreter, which must not import Ray."""
    args = [*SMALL, *extra, "--checkpoint-dir", str(root), "--study-id", study_id]
    code = ("import sys; from run_experiments import main; code = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'the local runner imported ray'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_study_on_ray_equals_the_local_runner(ckpt, capsys):  # noqa: F811
    local_run(ckpt, "local")
    threads = str(__import__("torch").get_num_threads())  # as many torch threads per arm as the local run had
    assert main([*SMALL, "--checkpoint-dir", str(ckpt), "--study-id", "ray", "--executor", "ray",
                 "--cpus-per-arm", threads]) == 0
    out = capsys.readouterr().out
    assert "training 2 arms as Ray tasks" in out and "[2/2] gated-coef0.0084: complete" in out
    assert_same_outcome(ckpt / "local", ckpt / "ray")
    study = json.loads((ckpt / "ray" / "study.json").read_text())
    assert study["status"] == "complete" and all(a["status"] == "complete" for a in study["arms"])


def test_a_worker_killed_mid_arm_is_retried_from_its_checkpoint(ckpt, tmp_path, monkeypatch, capfd):  # noqa: F811
    """The worker training topk is SIGKILLed at step 50, after its checkpoint at step 40 (once: the
    retry passes the point); Ray starts the task again, it resumes at step 40, and the study ends
    with the results of an uninterrupted local run."""
    local_run(ckpt, "local", "--steps", "60")
    once = tmp_path / "fault-fired"
    monkeypatch.setenv("SAE_FAULT", "step:50")
    monkeypatch.setenv("SAE_FAULT_ONCE", str(once))
    threads = str(__import__("torch").get_num_threads())
    assert main([*SMALL, "--steps", "60", "--checkpoint-dir", str(ckpt), "--study-id", "ray", "--executor", "ray",
                 "--cpus-per-arm", threads, "--max-retries", "1"]) == 0
    assert once.exists()  # a worker was killed
    assert_same_outcome(ckpt / "local", ckpt / "ray")
    (topk,) = [a["arm_id"] for a in json.loads((ckpt / "ray" / "summary.json").read_text())["arms"]
               if a["architecture"] == "topk"]
    assert f"resuming {topk} at step 40 of 60" in capfd.readouterr().out  # the retry, from the checkpoint


def test_an_arm_whose_worker_keeps_dying_is_recorded_failed_and_the_study_goes_on(ckpt, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("SAE_FAULT", "step:5")  # every attempt of every arm dies at step 5
    assert main([*SMALL, "--activation", "topk", "--checkpoint-dir", str(ckpt), "--study-id", "ray",
                 "--executor", "ray", "--max-retries", "1"]) == 1
    (arm,) = json.loads((ckpt / "ray" / "study.json").read_text())["arms"]
    assert arm["status"] == "failed" and arm["reason"].startswith("its Ray worker was lost 2 times")
    assert (ckpt / "ray" / "report" / "report.md").exists()


def test_every_node_is_asked_whether_it_sees_the_checkpoint_dir(tmp_path):
    """The check behind '--checkpoint-dir X: Ray node N cannot see it': a task pinned to each node
    looks for a file the driver has just written there."""
    import ray

    from experiments.studies.ray_executor import nodes_not_seeing, nodes_without

    ray.init(num_cpus=1, include_dashboard=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert nodes_not_seeing(tmp_path, nodes) == []
        assert not list(tmp_path.iterdir())  # the marker is removed again
        # what a node that does not mount the folder answers
        assert nodes_without(tmp_path / "elsewhere", nodes) == [nodes[0]["NodeManagerAddress"]]
    finally:
        ray.shutdown()
