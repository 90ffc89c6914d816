"""The harness as a user runs it: real tinylm activations, real training, W&B offline, kill + resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.wandb_readback import read_offline_run, read_offline_runs

pytestmark = pytest.mark.slow  # real subprocess runs; about a minute together
ROOT = Path(__file__).resolve().parents[1]
# A small but real run: 48 sequences of 33 tokens, TopK with 256 latents.
TINY = ["--study", "activations", "--activation", "topk", "--n-samples", "64", "--seq-len", "33", "--batch-size", "128", "--expansion-factor", "2", "--k", "8",
        "--no-progress"]


@pytest.fixture
def ckpt(tmp_path, tinylm_models_dir):
    """A checkpoint dir that already holds the session's trained tinylm."""
    root = tmp_path / "ckpt"
    shutil.copytree(tinylm_models_dir, root / "models")
    return root


@pytest.fixture
def wandb_env(tmp_path):
    wdir = tmp_path / "wandb"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        (wdir / var.lower()).mkdir(parents=True)
        env[var] = str(wdir / var.lower())
    env.pop("WANDB_API_KEY", None)
    return env


def run(args, env=None, **kw):
    return subprocess.run([sys.executable, "run_experiments.py", *args], cwd=ROOT, env=env or os.environ.copy(),
                          capture_output=True, text=True, timeout=300, **kw)


def summary(study_dir: Path) -> dict:
    return json.loads((study_dir / "summary.json").read_text())


def test_quick_topk_with_wandb_offline(ckpt, wandb_env):
    start = time.time()
    out = run(["--study", "activations", "--activation", "topk", "--use-wandb", "--quick", "--checkpoint-dir", str(ckpt), "--study-id", "q"],
              env=wandb_env)
    seconds = time.time() - start
    assert out.returncode == 0, out.stderr[-3000:]
    assert seconds < 90, seconds  # the issue asks < 60 s on a quiet machine; leave room for a loaded CI box
    s = summary(ckpt / "q")
    assert s["study_id"] == "q" and s["status"] == "complete"
    (arm,) = s["arms"]
    assert set(arm) >= {"arm_id", "name", "architecture", "dead_handling", "status", "steps", "tokens", "final",
                        "weights", "wandb_run_id"}
    assert arm["architecture"] == "topk" and arm["steps"] == 120 and arm["tokens"] == 120 * 512
    final = arm["final"]
    for metric in ("mse", "fvu", "explained_variance", "l0", "l1", "cos", "l2_ratio", "dead_frac", "dense_frac",
                   "ce_loss_recovered", "kl"):
        assert metric in final
    assert final["l0"] <= 32 + 1e-6
    assert Path(arm["weights"]).exists() and (Path(arm["weights"]).parent / "config.json").exists()
    assert "╔" in out.stdout and "explained_variance" in out.stdout  # the boxed table

    wb = read_offline_runs(Path(wandb_env["WANDB_DIR"]), arm["wandb_run_id"])
    assert wb.group == "q" and wb.job_type == "activations" and wb.name == arm["name"]
    assert wb.config["sae.k"] == 32 and wb.config["arm_id"] == arm["arm_id"]
    assert wb.steps("train/loss") == list(range(5, 121, 5))
    assert wb.steps("eval/explained_variance") == [60, 120]
    assert [r["tokens"] for r in wb.history if "eval/fvu" in r] == [60 * 512, 120 * 512]
    hist = wb.values("density/hist")
    assert len(hist) == 2 and hist[0]["_type"] == "histogram" and sum(hist[-1]["values"]) == 32 * 8 * 4
    assert wb.summary["final/explained_variance"] == pytest.approx(final["explained_variance"])
    assert wb.summary["final/ce_loss_recovered"] == pytest.approx(final["ce_loss_recovered"])


def test_sigkill_then_resume_equals_uninterrupted_run(ckpt, wandb_env):
    args = [*TINY, "--steps", "60", "--checkpoint-dir", str(ckpt), "--use-wandb"]
    # checkpoint_every is 100 by default: use --quick's 40 so the kill lands after a checkpoint
    args += ["--quick"]
    ref = run([*args, "--study-id", "ref"], env=wandb_env)
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = run([*args, "--study-id", "k"], env={**wandb_env, "SAE_FAULT": "step:52"})
    assert killed.returncode == -signal.SIGKILL
    study = json.loads((ckpt / "k" / "study.json").read_text())
    assert study["status"] == "running"
    resumed = run([*args, "--study-id", "k", "--resume"], env=wandb_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    (a,), (b,) = summary(ckpt / "ref")["arms"], summary(ckpt / "k")["arms"]
    assert a["arm_id"] == b["arm_id"] and a["final"] == b["final"]
    wa, wb = load_file(a["weights"]), load_file(b["weights"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    csv_a = (ckpt / "ref" / a["arm_id"] / "metrics.csv").read_text()
    csv_b = (ckpt / "k" / b["arm_id"] / "metrics.csv").read_text()
    assert csv_a == csv_b

    # one W&B run in two segments; the second replays the history up to the checkpoint (the
    # killed process may not have flushed it) and continues. Read back as W&B merges them
    # (steps it already has are ignored): increasing steps, nothing missing.
    run_b = read_offline_runs(Path(wandb_env["WANDB_DIR"]), b["wandb_run_id"])
    assert len(run_b.run_dirs) == 2
    second = read_offline_run(run_b.run_dirs[1])
    assert second.steps("train/loss") == list(range(5, 61, 5))
    assert second.steps("eval/fvu") == [60]  # eval at 60 only: quick's eval_every is 60
    steps = [row["_step"] for row in second.history]
    assert steps == sorted(steps)
    steps = [row["_step"] for row in run_b.history]
    assert steps == sorted(steps)
    assert run_b.steps("train/loss") == list(range(5, 61, 5))
    assert run_b.summary["final/explained_variance"] == pytest.approx(a["final"]["explained_variance"])


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(ckpt):
    args = [*TINY, "--steps", "100000", "--checkpoint-dir", str(ckpt), "--study-id", "t"]
    proc = subprocess.Popen([sys.executable, "run_experiments.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((ckpt / "t").glob("*/metrics.csv")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "--study-id t" in err
    study = json.loads((ckpt / "t" / "study.json").read_text())
    (arm,) = study["arms"]
    assert arm["status"] == "interrupted" and arm["steps"] > 0
    ckpts = sorted((ckpt / "t" / arm["arm_id"] / "checkpoints").glob("step-*"))
    assert ckpts[-1].name == f"step-{arm['steps']:08d}"
    assert not (ckpt / "t" / ".lock").exists()


def test_resume_without_a_matching_study_exits_2(ckpt):
    out = run([*TINY, "--checkpoint-dir", str(ckpt), "--resume"])
    assert out.returncode == 2 and out.stderr.startswith("error: nothing to resume")
    assert out.stderr.strip().count("\n") == 0


def test_hugging_face_model_offline_fails_in_one_line(ckpt):
    env = {**os.environ, "HF_HOME": str(ckpt / "hf")}
    start = time.time()
    out = run(["--model-name", "gpt2", "--checkpoint-dir", str(ckpt)], env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "gpt2" in out.stderr and "HF_HUB_OFFLINE" in out.stderr
    assert time.time() - start < 40  # no minute of retries
