"""The harness as a user runs it: real tinylm activations, real training, W&B offline, stop signals."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from config.cli import QUICK_DEFAULTS
from models.tinylm.model import SPEC_ENV
from tests.forked import run_forked
from tests.wandb_readback import read_offline_runs

pytestmark = pytest.mark.slow  # real subprocess runs; about a minute together
ROOT = Path(__file__).resolve().parents[1]
# A small but real run: 48 sequences of 33 tokens, TopK with 256 latents.
TINY = ["--study", "activations", "--activation", "topk", "--n-samples", "64", "--seq-len", "33", "--batch-size", "128", "--expansion-factor", "2", "--k", "8",
        "--no-progress"]
BATCH = QUICK_DEFAULTS["batch_size"]  # tokens per --quick step


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
    # Tests that used wandb in this pytest process left its service's address here; a run attached
    # to that long-lived service outlives a SIGKILL, and its resumed segment then writes nothing.
    env.pop("WANDB_SERVICE", None)
    return env


def run(args, env=None, **kw):
    return subprocess.run([sys.executable, "run_experiments.py", *args], cwd=ROOT, env=env or os.environ.copy(),
                          capture_output=True, text=True, timeout=300, **kw)


def summary(study_dir: Path) -> dict:
    return json.loads((study_dir / "summary.json").read_text())


def raw_topk_eval(cache: Path, arm_dir: Path) -> tuple[float, float, float]:
    """(explained variance, L0, MSE) of a saved TopK SAE on the cache's raw eval split, in float64 numpy."""
    from safetensors.numpy import load_file
    manifest = json.loads((cache / "manifest.json").read_text())
    x = np.load(cache / "acts.npy", mmap_mode="r")[manifest["split"]["n_train_rows"]:].astype(np.float64)
    w, k = load_file(str(arm_dir / "sae.safetensors")), json.loads((arm_dir / "config.json").read_text())["k"]
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = np.argpartition(-pre, k - 1, axis=1)[:, :k]
    f = np.zeros_like(pre)
    np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0), axis=1)
    x_hat = f @ w["W_dec"] + w["b_dec"]
    total = (x ** 2).sum() - (x.sum(0) ** 2).sum() / len(x)
    return 1 - ((x - x_hat) ** 2).sum() / total, float((f > 0).sum(1).mean()), float(((x - x_hat) ** 2).mean())


def test_quick_topk_with_wandb_offline(ckpt, wandb_env):
    start = time.time()
    out = run_forked(["--study", "activations", "--activation", "topk", "--use-wandb", "--wandb-checkpoints", "--quick",
                      "--checkpoint-dir", str(ckpt), "--study-id", "q"], env=wandb_env)
    seconds = time.time() - start
    assert out.returncode == 0, out.stderr[-3000:]
    s = summary(ckpt / "q")
    assert s["study_id"] == "q" and s["status"] == "complete"
    (arm,) = s["arms"]
    assert set(arm) >= {"arm_id", "name", "architecture", "dead_handling", "status", "steps", "tokens", "final",
                        "weights", "wandb_run_id"}
    assert arm["architecture"] == "topk" and arm["steps"] == 120 and arm["tokens"] == 120 * BATCH
    final = arm["final"]
    for metric in ("mse", "fvu", "explained_variance", "l0", "l1", "cos", "l2_ratio", "dead_frac", "dense_frac",
                   "ce_loss_recovered", "kl"):
        assert metric in final
    # the saved SAE (normalisation folded in) applied to the raw eval activations by an independent
    # numpy TopK gives the reported explained variance and L0
    study = json.loads((ckpt / "q" / "study.json").read_text())
    (cache,) = [info["cache"] for info in study["setup"]["hooks"].values()]
    assert raw_topk_eval(Path(cache), Path(arm["weights"]).parent) == pytest.approx(
        (final["explained_variance"], final["l0"], final["mse"]), rel=1e-5)
    assert "╔" in out.stdout and "explained_variance" in out.stdout  # the boxed table
    timing = s["timing"]  # where this run's wall time went
    assert timing["training"] > 0 and timing["harvest"] > 0 and timing["model"] > 0 and timing["eval"] > 0
    assert timing["umap"] == 0  # the activations study has no UMAP probe
    assert sum(v for k, v in timing.items() if k != "total") == pytest.approx(timing["total"], abs=0.1)
    assert timing["total"] < seconds and "time: " in out.stdout

    wb = read_offline_runs(Path(wandb_env["WANDB_DIR"]), arm["wandb_run_id"])
    assert wb.group == "q" and wb.job_type == "activations" and wb.name == arm["name"]
    assert wb.config["sae.k"] == 32 and wb.config["arm_id"] == arm["arm_id"]
    assert wb.steps("train/loss") == list(range(5, 121, 5))
    assert wb.steps("eval/explained_variance") == [60, 120]
    assert [r["tokens"] for r in wb.history if "eval/fvu" in r] == [60 * BATCH, 120 * BATCH]
    hist = wb.values("density/hist")
    assert len(hist) == 2 and hist[0]["_type"] == "histogram" and sum(hist[-1]["values"]) == 32 * 8 * 4
    assert wb.summary["final/explained_variance"] == pytest.approx(final["explained_variance"])
    assert wb.summary["final/ce_loss_recovered"] == pytest.approx(final["ce_loss_recovered"])
    # the final SAE as a model artifact, with its config and final metrics; with --wandb-checkpoints
    # every checkpoint too (--quick: every 40 steps and at the end)
    arm_dir = Path(arm["weights"]).parent
    (sae,) = [a for a in wb.artifacts if a["name"] == f"sae-{arm['arm_id']}"]
    assert sae["type"] == "model" and "final" in sae["aliases"] and "step-120" in sae["aliases"]
    assert sae["metadata"]["config"] == json.loads((arm_dir / "config.json").read_text())
    assert sae["metadata"]["final"]["explained_variance"] == pytest.approx(final["explained_variance"])
    assert sae["metadata"]["tokens"] == arm["tokens"] and sae["metadata"]["study"] == "q"
    weights = sae["files"]["sae.safetensors"]
    assert weights["size"] == (arm_dir / "sae.safetensors").stat().st_size
    assert Path(weights["local_path"]).read_bytes() == (arm_dir / "sae.safetensors").read_bytes()  # staged offline
    checkpoints = [a for a in wb.artifacts if a["name"] == f"checkpoint-{arm['arm_id']}"]
    assert [[x for x in a["aliases"] if x.startswith("step-")] for a in checkpoints] == [
        ["step-40"], ["step-80"], ["step-120"]]
    saved = sorted(p.name for p in (arm_dir / "checkpoints" / "step-00000120").iterdir())
    assert sorted(checkpoints[-1]["files"]) == saved and checkpoints[-1]["type"] == "model"


def test_sigint_and_sigterm_save_a_checkpoint_and_say_how_to_resume(ckpt):
    """Ctrl-C, then a scheduler's SIGTERM: each stops at a step boundary with a checkpoint of that
    step and prints the command that continues; that command, copied into a fresh shell (no venv
    on its PATH) at the repository root, goes on from there."""
    args = [*TINY, "--steps", "100000", "--checkpoint-dir", str(ckpt), "--study-id", "t"]
    fresh_shell = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), SPEC_ENV: os.environ[SPEC_ENV]}
    stopped_at, printed = [], None
    for signum in (signal.SIGINT, signal.SIGTERM):
        command = [sys.executable, "run_experiments.py", *args] if printed is None else ["bash", "-c", f"exec {printed}"]
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=None if printed is None else fresh_shell)
        csv = next((ckpt / "t").glob("*/metrics.csv"), None) if stopped_at else None
        rows = len(csv.read_text().splitlines()) if csv else 0
        deadline = time.time() + 120
        while time.time() < deadline:  # until this process has logged a few steps of its own
            csv = next((ckpt / "t").glob("*/metrics.csv"), None)
            if csv is not None and len(csv.read_text().splitlines()) > rows + 20:
                break
            time.sleep(0.2)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err[-2000:]
        if stopped_at:  # the resumed run says where it picks up
            (arm,) = json.loads((ckpt / "t" / "study.json").read_text())["arms"]
            assert f"resuming {arm['arm_id']} at step {stopped_at[-1]:,} of " in out
        assert f"{signum.name} received" in err
        printed = err.split("Continue with:\n", 1)[1].splitlines()[0].strip()
        assert printed.split()[1:3] == ["run_experiments.py", *args[:1]] and printed.endswith("--study-id t --resume")
        study = json.loads((ckpt / "t" / "study.json").read_text())
        (arm,) = study["arms"]
        assert study["status"] == "interrupted"
        assert arm["status"] == "interrupted" and arm["steps"] > (stopped_at[-1] if stopped_at else 0)
        ckpts = sorted((ckpt / "t" / arm["arm_id"] / "checkpoints").glob("step-*"))
        assert ckpts[-1].name == f"step-{arm['steps']:08d}"
        assert not (ckpt / "t" / ".lock").exists()
        stopped_at.append(arm["steps"])
        if len(stopped_at) == 1:  # a report of the interrupted study says what state it is in
            report = run_forked(["--report", "t", "--checkpoint-dir", str(ckpt)])
            assert report.returncode == 0, report.stderr[-2000:]
            text = (ckpt / "t" / "report" / "report.md").read_text()
            assert "Status: **interrupted**" in text
            row = next(line for line in text.splitlines() if line.startswith(f"| {arm['name']} | {arm['arm_id']} |"))
            assert f"| topk | 256 | k 8 | auxk | activations | interrupted | {arm['steps']} |" in row


def test_hugging_face_model_offline_fails_in_one_line(ckpt):
    env = {**os.environ, "HF_HOME": str(ckpt / "hf")}
    out = run(["--model-name", "gpt2", "--checkpoint-dir", str(ckpt)], env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "gpt2" in out.stderr and "HF_HUB_OFFLINE" in out.stderr
