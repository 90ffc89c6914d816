"""All four studies end to end on tinylm: shared arms, outputs, W&B runs read back, kill + resume."""
import json
import signal
from pathlib import Path

import pytest

from tests.test_end_to_end import ckpt, run, summary, wandb_env  # noqa: F401  (fixtures)
from tests.wandb_readback import read_offline_runs

pytestmark = pytest.mark.slow
# --quick, made smaller still: 64 sequences of 33 tokens, 256 latents (512 for resampling), 40 steps.
SMALL = ["--quick", "--n-samples", "64", "--seq-len", "33", "--batch-size", "128", "--expansion-factor", "2",
         "--k", "8", "--steps", "40", "--no-progress"]
STUDIES = ("activations", "emergence", "frequency", "resampling")


def test_quick_study_all_trains_each_arm_once_and_logs_everything(ckpt, wandb_env):  # noqa: F811
    out = run([*SMALL, "--checkpoint-dir", str(ckpt), "--study-id", "all", "--use-wandb"], env=wandb_env)
    assert out.returncode == 0, out.stderr[-3000:]
    study_dir = ckpt / "all"
    s = summary(study_dir)
    arms = s["arms"]
    # 5 architectures shared by activations, emergence and frequency + 3 dead-handling arms for resampling
    assert len(arms) == len({a["arm_id"] for a in arms}) == 8
    assert sorted(p.parent.name for p in study_dir.glob("*/sae.safetensors")) == sorted(a["arm_id"] for a in arms)
    shared = [a for a in arms if a["studies"] == ["activations", "emergence", "frequency"]]
    assert len(shared) == 5 and sorted(a["dead_handling"] for a in arms if a["studies"] == ["resampling"]) == [
        "auxk", "none", "resample"]
    assert all(a["status"] == "complete" for a in arms) and s["status"] == "complete"
    for name in STUDIES:
        assert s["studies"][name]["arms"], name
        assert list((study_dir / "report" / name).glob("*.png")), name
        assert f"## {name}" in (study_dir / "report" / "report.md").read_text()
    assert len(list((study_dir / "report" / "emergence").glob("umap_*.png"))) == 5 * 1  # one eval: umap once per arm
    emergence = s["studies"]["emergence"]["arms"][0]["concepts"]
    assert {c["concept"] for c in emergence} >= {"category:animals", "word:cat"}
    for table in ("╔", "activations:", "emergence:", "frequency:", "resampling:"):
        assert table in out.stdout

    wb_root = Path(wandb_env["WANDB_DIR"])
    topk = next(a for a in shared if a["architecture"] == "topk")
    wb = read_offline_runs(wb_root, topk["wandb_run_id"])
    assert wb.group == "all" and wb.job_type == "activations+emergence+frequency" and wb.name == topk["name"]
    assert wb.steps("train/loss") == list(range(5, 41, 5)) and wb.steps("eval/explained_variance") == [40]
    assert wb.steps("density/hist") == [40] and wb.steps("concepts/animals/single_f1") == [40]
    assert wb.steps("freq/ultra_low_frac") == [40]
    (table,) = wb.values("umap/table")
    assert table["_type"] == "table-file" and table["nrows"] == 256
    resampling = next(a for a in arms if a["studies"] == ["resampling"])
    assert read_offline_runs(wb_root, resampling["wandb_run_id"]).job_type == "resampling"
    for name in STUDIES:
        run_id = s["summary_runs"][name]
        summary_run = read_offline_runs(wb_root, run_id)
        assert summary_run.job_type == "summary" and summary_run.group == "all" and summary_run.name == f"{name}-summary"
        tables = [k for k in summary_run.keys() if k.startswith("tables/")]
        assert tables and all(summary_run.values(k)[0]["_type"] == "table-file" for k in tables)
        assert any(k.startswith("plots/") for k in summary_run.keys())

    # --report rebuilds the report from the files alone
    (study_dir / "report").rename(study_dir / "report-old")
    rebuilt = run(["--report", "all", "--checkpoint-dir", str(ckpt)])
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert sorted(p.relative_to(study_dir / "report") for p in (study_dir / "report").rglob("*.png")) == sorted(
        p.relative_to(study_dir / "report-old") for p in (study_dir / "report-old").rglob("*.png"))


def test_kill_between_arms_and_mid_arm_then_resume_gives_the_same_summary(ckpt, tmp_path):  # noqa: F811
    # No UMAP here (it is not what this test is about, and each process would pay its JIT warm-up).
    config = tmp_path / "no-umap.yaml"
    config.write_text("probes: {umap_evals: 0}\ntrain: {checkpoint_every: 20, eval_every: 20}\n")
    args = [*SMALL, "--checkpoint-dir", str(ckpt), "--config", str(config)]
    ref = run([*args, "--study-id", "ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]

    between = run([*args, "--study-id", "k"], env={**_env(), "SAE_FAULT": "arm-done:2"})
    assert between.returncode == -signal.SIGKILL
    study = json.loads((ckpt / "k" / "study.json").read_text())
    assert [a["status"] for a in study["arms"]][:3] == ["complete", "complete", "pending"]
    # the resumed process trains arm 3, then dies in arm 4 at step 30, after its checkpoint at step 20
    mid = run([*args, "--study-id", "k", "--resume"], env={**_env(), "SAE_FAULT": "step:30@2"})
    assert mid.returncode == -signal.SIGKILL
    study = json.loads((ckpt / "k" / "study.json").read_text())
    statuses = [a["status"] for a in study["arms"]]
    assert statuses[:3] == ["complete"] * 3 and statuses[3] == "running"
    resumed = run([*args, "--study-id", "k", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already complete; skipped" in resumed.stdout

    a, b = summary(ckpt / "ref"), summary(ckpt / "k")
    assert [x["arm_id"] for x in a["arms"]] == [x["arm_id"] for x in b["arms"]]
    assert [x["final"] for x in a["arms"]] == [x["final"] for x in b["arms"]]
    assert a["studies"] == b["studies"]


def _env():
    import os

    return {**os.environ, "WANDB_MODE": "disabled"}
