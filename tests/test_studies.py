"""All four studies end to end on tinylm: shared arms, outputs, W&B runs read back, kill + resume."""
import itertools
import json
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.forked import run_forked
from tests.test_end_to_end import ckpt, summary, wandb_env  # noqa: F401  (fixtures)
from run_experiments import main
from config.schema import UsageError
from experiments.arms import TrainedArm
from experiments.eval.features import load_features
from models.sae import SAE
from experiments.provenance import code_commit, machine
from safetensors.torch import load_file
from tests.outcomes import assert_same_outcome
from visualization.generated import check_blocks
from tests.wandb_readback import read_offline_run, read_offline_runs
from visualization.local_sink import MetricsCSV

pytestmark = pytest.mark.slow
# --quick, made smaller still: 64 sequences of 33 tokens, 256 latents (512 for resampling), 40 steps.
SMALL = ["--quick", "--n-samples", "64", "--seq-len", "33", "--batch-size", "128", "--expansion-factor", "2",
         "--k", "8", "--steps", "40", "--no-progress"]
STUDIES = ("activations", "emergence", "frequency", "resampling")


def test_quick_study_all_trains_each_arm_once_and_logs_everything(ckpt, wandb_env, capsys, monkeypatch):  # noqa: F811
    out = run_forked([*SMALL, "--checkpoint-dir", str(ckpt), "--study-id", "all", "--use-wandb"], env=wandb_env)
    assert out.returncode == 0, out.stderr[-3000:]
    study_dir = ckpt / "all"
    s = summary(study_dir)
    arms = s["arms"]
    # 6 architectures shared by activations, emergence and frequency + 3 dead-handling arms for resampling
    assert len(arms) == len({a["arm_id"] for a in arms}) == 9
    assert sorted(p.parent.name for p in study_dir.glob("*/sae.safetensors")) == sorted(a["arm_id"] for a in arms)
    shared = [a for a in arms if a["studies"] == ["activations", "emergence", "frequency"]]
    assert len(shared) == 6 and sorted(a["dead_handling"] for a in arms if a["studies"] == ["resampling"]) == [
        "auxk", "none", "resample"]
    assert all(a["status"] == "complete" for a in arms) and s["status"] == "complete"
    for name in STUDIES:
        assert s["studies"][name]["arms"], name
        assert list((study_dir / "report" / name).glob("*.png")), name
        assert f"## {name}" in (study_dir / "report" / "report.md").read_text()
    assert len(list((study_dir / "report" / "emergence").glob("umap_*.png"))) == 6 * 1  # one eval: umap once per arm
    emergence = s["studies"]["emergence"]
    scored = {c["concept"] for c in emergence["arms"][0]["concepts"]}
    assert "category:animals" in scored and "word:cat" in scored | set(emergence["absent_concepts"])
    for table in ("╔", "activations:", "emergence:", "frequency:", "resampling:"):
        assert table in out.stdout
    wide = [line for line in out.stdout.splitlines()
            if len(line) > 100 and not line.startswith(("report: ", "outputs: ")) and "offline-run-" not in line]
    assert not wide, wide  # every line but those naming a path fits a 100-column terminal

    assert out.stderr.count("W&B logging offline") == 1  # one notice for the 14 runs
    sync = out.stdout.split("W&B runs logged offline; upload them with:\n  ", 1)[1].strip()
    synced = sync.split(" \\\n    ")[1:]
    assert sync.startswith("wandb sync \\\n") and len(synced) == 14 and all(Path(d).is_dir() for d in synced)
    assert {d.rsplit("-", 1)[1] for d in synced} == {a["wandb_run_id"] for a in arms} | set(s["summary_runs"].values())
    wb_root = Path(wandb_env["WANDB_DIR"])
    topk = next(a for a in shared if a["architecture"] == "topk")
    wb = read_offline_runs(wb_root, topk["wandb_run_id"])
    assert wb.group == "all" and wb.job_type == "activations+emergence+frequency" and wb.name == topk["name"]
    assert wb.steps("train/loss") == list(range(5, 41, 5)) and wb.steps("eval/explained_variance") == [40]
    assert wb.steps("density/hist") == [40] and wb.steps("concepts/animals/single_f1") == [40]
    assert wb.steps("freq/ultra_low_frac") == [40]
    (table,) = wb.values("umap/table")
    assert table["_type"] == "table-file" and table["nrows"] == 256
    # each arm's run holds its final SAE as a model artifact, and no checkpoint without --wandb-checkpoints
    assert [a["name"] for a in wb.artifacts if a["type"] == "model"] == [f"sae-{topk['arm_id']}"]
    resampling = next(a for a in arms if a["studies"] == ["resampling"])
    assert read_offline_runs(wb_root, resampling["wandb_run_id"]).job_type == "resampling"
    for name in (*STUDIES, "features"):
        run_id = s["summary_runs"][name]
        summary_run = read_offline_runs(wb_root, run_id)
        assert summary_run.job_type == "summary" and summary_run.group == "all" and summary_run.name == f"{name}-summary"
        tables = [k for k in summary_run.keys() if k.startswith("tables/")]
        assert tables and all(summary_run.values(k)[0]["_type"] == "table-file" for k in tables)
        assert any(k.startswith("plots/") for k in summary_run.keys()) or name == "features"  # tables only

    # every arm's latents are described, in its folder, the report, W&B and --search
    topk_features = load_features(study_dir / topk["arm_id"])
    assert len(topk_features.labels) == 256 and topk_features.arrays["top_context_tokens"].shape == (256, 20, 17)
    assert s["studies"]["features"]["arms"][0] == {"arm": topk["name"], "latents": 256,
                                                   "alive": int((topk_features.arrays["n_fired"] > 0).sum()),
                                                   "matched": int((topk_features.arrays["concept_f1"] >= 0.5).sum())}
    section = (study_dir / "report" / "report.md").read_text().split("## features", 1)[1]
    frequent = markdown_table(section.split(f"**{topk['name']}: the 5 most frequent latents**", 1)[1])
    by_density = np.argsort(-topk_features.arrays["density"], kind="stable")[:5]
    assert [int(row["latent"]) for row in frequent] == by_density.tolist()
    assert all("**⟦" in row["top context"] for row in frequent)
    (latents,) = read_offline_runs(wb_root, s["summary_runs"]["features"]).values(f"tables/latents {topk['name']}")
    assert latents["nrows"] == 256
    label = next(label for label in topk_features.labels if label and label.isalpha())
    capsys.readouterr()
    assert main(["--search", label, "--study-id", "all", "--checkpoint-dir", str(ckpt), "--arm", topk["name"]]) == 0
    printed = capsys.readouterr().out
    assert f"latents matching {label!r}" in printed and "│ label '" in printed
    assert max(map(len, printed.splitlines())) <= 100 and "\\" not in printed  # no Markdown escapes on a terminal

    # an arm's folder is named for it and says what it was trained on; the Python API reads it back
    assert topk["arm_id"].startswith(topk["name"] + "-")
    about = json.loads((study_dir / topk["arm_id"] / "config.json").read_text())["trained_on"]
    assert (about["hook_name"], about["study_id"], about["arm_name"], about["commit"], about["context_size"]) == (
        "blocks.0.hook_resid_post", "all", topk["name"], code_commit(), 33)
    arm = TrainedArm.load("all", topk["name"], checkpoint_dir=ckpt)
    (cache,) = [Path(info["cache"]) for info in
                json.loads((study_dir / "study.json").read_text())["setup"]["hooks"].values()]
    tokens, acts = np.load(cache / "tokens.npy"), np.load(cache / "acts.npy", mmap_mode="r")
    harvested = arm.activations(torch.from_numpy(tokens[0]).long())  # sequence 0: the cache's first 32 rows
    assert torch.allclose(harvested, torch.from_numpy(np.array(acts[:32])), atol=1e-5)
    assert torch.equal(arm.encode(harvested), SAE.load(study_dir / topk["arm_id"]).encode(harvested))
    text = "Once there was a cat."
    assert arm.encode(text).shape == (arm.tokens(text).shape[1] - 1, 256)
    spliced = arm.spliced_logits(text)
    assert spliced.shape[0] == arm.tokens(text).shape[1] and torch.isfinite(spliced).all()
    with pytest.raises(UsageError, match="not a finished arm"):
        TrainedArm.load("all", "nope", checkpoint_dir=ckpt)
    # --export writes each finished arm for SAELens and Neuronpedia, named by what it was trained on
    assert main(["--export", "saelens", "--study-id", "all", "--checkpoint-dir", str(ckpt)]) == 0
    exported = study_dir / "exports" / "saelens"
    assert sorted(p.name for p in exported.iterdir()) == sorted(a["name"] for a in arms)
    cfg = json.loads((exported / topk["name"] / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["metadata"]["hook_name"], cfg["metadata"]["context_size"]) == (
        "topk", 8, "blocks.0.hook_resid_post", 33)
    # an export that fails at its second arm leaves none: a rerun would find the first and refuse
    import experiments.export.neuronpedia as np_export
    real, calls = np_export.export_neuronpedia, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("planted failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(np_export, "export_neuronpedia", second_fails)
    assert main(["--export", "neuronpedia", "--study-id", "all", "--checkpoint-dir", str(ckpt)]) == 2
    assert "planted failure" in capsys.readouterr().err and not list((study_dir / "exports" / "neuronpedia").iterdir())
    monkeypatch.setattr(np_export, "export_neuronpedia", real)
    # a folder that cannot be made, or a file where a folder should be: one line, exit 2
    (ckpt / "a-file").write_text("")
    for out, said in ((ckpt / "a-file" / "np", "a-file is a file, not a folder"),
                      (Path("/proc/harness-test/np"), "cannot write /proc/harness-test/np")):
        assert main(["--export", "neuronpedia", "--study-id", "all", "--checkpoint-dir", str(ckpt), "--arm",
                     topk["name"], "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    # every arm for Neuronpedia, whose names take no dots: a relu arm's id (relu-coef0.0065-<hash>) becomes
    # the source set relu-coef0-0065-<hash>
    assert main(["--export", "neuronpedia", "--study-id", "all", "--checkpoint-dir", str(ckpt)]) == 0
    for arm in arms:
        batches = sorted((study_dir / "exports" / "neuronpedia" / arm["name"]).glob("batch-*.json"))
        assert sum(len(json.loads(b.read_text())["features"]) for b in batches) == 256
        assert json.loads(batches[0].read_text())["source"] == "0-" + re.sub(r"[._]+", "-", arm["arm_id"])
    out = ckpt / "np-topk"
    assert main(["--export", "neuronpedia", "--study-id", "all", "--checkpoint-dir", str(ckpt), "--arm", topk["name"],
                 "--out", str(out)]) == 0
    batches = sorted(out.glob("batch-*.json"))
    assert sum(len(json.loads(b.read_text())["features"]) for b in batches) == 256 and (out / "README.md").exists()
    assert main(["--export", "neuronpedia", "--study-id", "all", "--checkpoint-dir", str(ckpt), "--arm", topk["name"],
                 "--out", str(out)]) == 2  # an existing folder is never written into

    # the report opens with the findings and the setup, and says what to look for in each figure
    report = (study_dir / "report" / "report.md").read_text()
    head = report.split("\n## activations", 1)[0]
    assert head.index("## Summary") < head.index("## Setup")
    assert all(f"- **{name}**: " in head.split("## Setup")[0] for name in STUDIES)
    setup = {row["setting"]: row["value"] for row in markdown_table(head.split("## Setup", 1)[1])}
    assert setup["subject model"] == "tinylm, `blocks.0.hook_resid_post` (d_in 128)"
    assert setup["code"] == f"commit {code_commit()}" and "64 sequences of 33 tokens" in setup["text"]
    recorded = json.loads((study_dir / "study.json").read_text())["setup"]
    assert setup["machine"] == machine() and recorded["machines"] == [machine()]
    arm_table = markdown_table(head.split("| machine |", 1)[1])
    assert [(row["arm"], row["d_sae"], row["sparsity"]) for row in arm_table][:2] == [
        ("topk-k8-auxk", "256", "k 8"), ("batchtopk-k8", "256", "k 8")]
    assert {row["sparsity"].split(" coef ")[0] for row in arm_table} == {"k 8", "L1", "L0"}
    figures = [i for i, line in enumerate(report.splitlines()) if line.startswith("![")]
    assert len(figures) == len(files_png := list((study_dir / "report").rglob("*.png"))) and files_png
    assert all(re.fullmatch(r"\*\S.{20,}\*", report.splitlines()[i + 2]) for i in figures)  # a caption each

    # the report's tables show summary.json's numbers
    shown = markdown_table(report.split("## activations", 1)[1].split("**Final metrics on the eval split**", 1)[1])
    assert [row["arm"] for row in shown] == [a["name"] for a in arms if "activations" in a["studies"]]
    for row, arm in zip(shown, (a for a in arms if "activations" in a["studies"])):
        for metric in ("l0", "explained_variance", "mse", "cos", "dead_frac", "dense_frac", "kl"):
            assert float(row[metric]) == pytest.approx(arm["final"][metric], rel=5e-4, abs=5.01e-5), metric

    # --report rebuilds the same report from the files alone, up to the time it was written
    (study_dir / "report").rename(study_dir / "report-old")
    assert main(["--report", "all", "--checkpoint-dir", str(ckpt)]) == 0  # in-process: saves a start-up
    files = {name: sorted(p.relative_to(study_dir / name) for p in (study_dir / name).rglob("*") if p.is_file())
             for name in ("report", "report-old")}
    assert files["report"] == files["report-old"] and len(files["report"]) > 20
    for rel in files["report"]:
        new, old = ((study_dir / name / rel).read_bytes() for name in ("report", "report-old"))
        if rel.name == "report.md":
            new, old = (re.sub(rb"Report written [0-9: -]+ from", b"", text) for text in (new, old))
        assert new == old, rel

    # --docs writes the summary, setup and main tables into a page, stamped and sealed
    page = ckpt / "results.md"
    page.write_text("# Results\n\n<!-- generated summary from study all -->\nSTALE TEXT\n<!-- end of generated -->\n\n"
                    "<!-- generated results from study all -->\n<!-- end of generated -->\n\nProse.\n")
    assert main(["--report", "all", "--checkpoint-dir", str(ckpt), "--docs", str(page)]) == 0
    text = page.read_text()
    assert check_blocks(text) == ["all", "all"] and text.endswith("<!-- end of generated -->\n\nProse.\n")
    summary_block = text.split("<!-- generated results", 1)[0]
    assert "STALE TEXT" not in summary_block and "- **resampling**: " in summary_block and "| arm |" not in summary_block
    assert f"from study `all`, which ran at commit {code_commit()} on {machine()}; do not edit by hand" in text
    excerpt_rows = markdown_table(text.split("**activations: Final metrics on the eval split**", 1)[1])
    assert excerpt_rows == shown  # the report's table, as the report shows it
    with pytest.raises(ValueError, match="edited by hand"):
        check_blocks(text.replace("| topk-k8-auxk |", "| topk-k8-auxk (best) |"))
    # a page without the study's block is refused before the report is rebuilt
    report_written = (study_dir / "report" / "report.md").stat().st_mtime_ns
    (ckpt / "other.md").write_text("# Another page\n")
    for page, said in (("other.md", "other.md has no block for study all"), ("missing.md", "missing.md is no such file"),
                       (".", "is a folder")):
        assert main(["--report", "all", "--checkpoint-dir", str(ckpt), "--docs", str(ckpt / page)]) == 2
        assert said in capsys.readouterr().err
    assert (study_dir / "report" / "report.md").stat().st_mtime_ns == report_written


def markdown_table(text: str) -> list[dict[str, str]]:
    """The first markdown table in text, one dict per row."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = itertools.takewhile(lambda line: line.startswith("|"), lines[start:])
    cells = (re.split(r"(?<!\\)\|", line.strip()[1:-1]) for line in table)  # a cell's own "|" is escaped
    header, _rule, *rows = [[cell.strip() for cell in row] for row in cells]
    return [dict(zip(header, row)) for row in rows]


# Where the chained run below is killed, in order, and what it leaves for the next --resume. The arms
# train in lockstep, so a resume can find them at different steps (the damaged checkpoint).
KILLS = [
    ("cache-chunk:1", "harvest: chunk 1 of 2 written, not yet recorded"),
    ("step:25", "mid-training, after every arm's checkpoints at steps 10 and 20 and two rounds of resampling"),
    ("checkpoint-write@2", "one arm resumed from step 10 (its step 20 was damaged) caught up alone and the group "
                           "writing step 30, the process's second checkpoint, the others resumed from step 20"),
    ("arm-done:1", "arm 1 recorded complete, the others past their last step but not yet recorded"),
    ("wandb-log@4", "arm 2, resumed at its last step, replaying its logged history to W&B (4th log call)"),
    ("features-arm@3", "three arms' latents described, the others' not yet"),
    ("report-figure", "the report half written: its first figure saved"),
    ("summary-run", "the first study's W&B summary run logged, summary.json not yet written"),
]


def test_killed_anywhere_then_resumed_equals_an_uninterrupted_run(tmp_path, tinylm_models_dir, wandb_env):
    """One study killed (SIGKILL) at every point of KILLS in turn, with its latest checkpoint and its
    activation cache damaged on the way, then resumed to the end: the same summary, weights and
    metrics as an uninterrupted run, and W&B steps that never go backwards."""
    config = tmp_path / "chain.yaml"
    config.write_text("train: {checkpoint_every: 10, eval_every: 20, log_every: 5, ce_eval_sequences: 8}\n")
    roots = {}
    for name in ("ref", "chain"):
        roots[name] = tmp_path / name
        shutil.copytree(tinylm_models_dir, roots[name] / "models")
    # All four studies, so concept probes, frequency statistics and UMAP run at every eval, every
    # architecture trains, and dead latents are handled by AuxK (the TopK family) and resampling
    # (the resampling study's TopK arm) under a dead window of 10 steps: the windows, the AuxK
    # masks, the resampling RNG and the revived latents' Adam state all cross the kills. (The
    # penalised architectures leave no latent dead for a window this early, so resampling them
    # would not act.)
    args = ["--study", "all", "--dead-window", "1280", "--n-samples", "300", "--seq-len", "33",
            "--batch-size", "128", "--expansion-factor", "2", "--k", "8", "--steps", "40", "--no-progress",
            "--config", str(config), "--study-id", "s"]
    # The reference runs in this process (W&B off, which does not change results): a process of its
    # own would only add a start-up, and equal results also show nothing depends on the process.
    assert main([*args, "--checkpoint-dir", str(roots["ref"])]) == 0

    chain = [*args, "--use-wandb", "--checkpoint-dir", str(roots["chain"])]
    study = roots["chain"] / "s"
    for i, (point, _) in enumerate(KILLS):
        killed = run_forked(chain + (["--resume"] if i else []), env={**wandb_env, "SAE_FAULT": point})
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
        assert json.loads((study / "study.json").read_text())["status"] == "running", point
        assert not (study / "summary.json").exists(), point
        if point == "cache-chunk:1":
            (manifest,) = roots["chain"].glob("activations/*/manifest.json")
            assert json.loads(manifest.read_text())["chunks_done"] == 0
        if point == "step:25":  # damage the newest checkpoint: the resume must fall back to step 10
            newest = sorted(study.glob("*/checkpoints/step-*"))[-1]
            assert newest.name == "step-00000020"
            (newest / "tensors.safetensors").write_bytes((newest / "tensors.safetensors").read_bytes()[:100])
        if point == "checkpoint-write@2":
            assert list(study.glob("*/checkpoints/.tmp-step-00000030"))
        if point == "wandb-log@4":  # damage the activation cache: it must be rebuilt, not reused
            (acts,) = roots["chain"].glob("activations/*/acts.npy")
            data = bytearray(acts.read_bytes())
            data[-5] ^= 0x01
            acts.write_bytes(bytes(data))
        if point == "features-arm@3":
            assert len(list(study.glob("*/features/features.json"))) == 3
        if point == "report-figure":
            assert (study / ".report.tmp").is_dir() and not (study / "report").exists()
        if i == 2:
            assert "unusable" in killed.stderr and "step-00000020" in killed.stderr
        if i == 5:
            assert "corrupt" in killed.stdout and "rebuilding" in killed.stdout
    done = run_forked([*chain, "--resume"], env=wandb_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already complete; skipped" in done.stdout

    assert_same_outcome(roots["ref"] / "s", study)
    a, b = summary(roots["ref"] / "s"), summary(study)
    assert all(list((study / x["arm_id"] / "probes").glob("eval-*.npz")) for x in b["arms"])
    assert not list(study.rglob(".tmp-*")) and not (study / ".report.tmp").exists()
    # the dead-latent handling acted before the kills: resampling revived latents, and AuxK had dead
    # latents to train (a non-zero auxiliary loss) in some arm of each kind
    rows = [(x["dead_handling"], r) for x in a["arms"]
            for r in MetricsCSV.read(roots["ref"] / "s" / x["arm_id"] / "metrics.csv") if r["step"] < 25]
    assert {x["architecture"] for x in a["arms"]} == {"topk", "batchtopk", "matryoshka", "relu", "jumprelu", "gated"}
    assert any(mode == "resample" and r["name"] == "train/resampled" and r["value"] > 0 for mode, r in rows)
    assert any(mode == "auxk" and r["name"] == "train/aux" and r["value"] > 0 for mode, r in rows)
    assert not list(study.rglob(".tmp-*")) and not (study / ".report.tmp").exists()

    # W&B: each arm is one run in several segments (a segment replays the history up to its
    # checkpoint, which W&B ignores for steps it has); merged, every step is there once and in order.
    wb_root = Path(wandb_env["WANDB_DIR"])
    for arm in b["arms"]:
        wb = read_offline_runs(wb_root, arm["wandb_run_id"])
        assert wb.steps("train/loss") == list(range(5, 41, 5)) and wb.steps("eval/fvu") == [20, 40]
        for segment in wb.run_dirs:
            steps = [row["_step"] for row in read_offline_run(segment).history]
            assert steps == sorted(steps)
        assert wb.summary["final/explained_variance"] == pytest.approx(arm["final"]["explained_variance"])
    # (a segment killed before wandb's first write, about a second in, has no records at all)
    # the summary run logged before the last kill is continued, not duplicated
    assert b["summary_runs"]["activations"] == json.loads((study / "study.json").read_text())["summary_runs"]["activations"]
    first = read_offline_runs(wb_root, b["summary_runs"]["activations"])
    assert len(first.run_dirs) == 2 and first.job_type == "summary"


def test_a_study_over_every_layer_trains_each_arm_at_each_hook_point_and_compares_them(ckpt, capsys):  # noqa: F811
    """--layer all on tinylm's two blocks: one cache per hook point (the same as a one-hook study's),
    an arm per architecture and hook point, each bit-identical to the arm of a study of its hook
    point alone; each study analysed per hook point, and a comparison whose table holds the arms'
    own final metrics."""
    args = [*SMALL, "--checkpoint-dir", str(ckpt), "--study", "activations,emergence", "--activation", "topk,relu"]
    assert main([*args, "--layer", "all", "--study-id", "layers"]) == 0
    study_dir = ckpt / "layers"
    s, study = summary(study_dir), json.loads((study_dir / "study.json").read_text())
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert list(study["setup"]["hooks"]) == hooks
    assert [(a["name"], a["hook"]) for a in s["arms"]] == [
        (f"{arch}@{label}", hook) for hook, label in zip(hooks, ["L0.resid_post", "L1.resid_post"])
        for arch in ("topk-k8", "relu-coef0.0065")]
    for arm in s["arms"]:
        about = json.loads((study_dir / arm["arm_id"] / "config.json").read_text())["trained_on"]
        assert about["hook_name"] == arm["hook"]
    assert list(s["studies"]) == ["hook-points", "activations@L0.resid_post", "activations@L1.resid_post",
                                  "emergence@L0.resid_post", "emergence@L1.resid_post", "features"]
    baselines = [np.load(study_dir / "baselines" / f"{hook}.npz") for hook in hooks]
    assert not np.array_equal(baselines[0]["dense_f1"], baselines[1]["dense_f1"])  # measured on each hook's own

    compared = {(row["arm"], row["hook"]): row for row in s["studies"]["hook-points"]["arms"]}
    assert len(compared) == 4
    for arm in s["arms"]:
        base, label = arm["name"].split("@")
        row = compared[(base, label)]
        for metric in ("l0", "explained_variance", "ce_loss_recovered", "kl"):
            # the table rounds to 4 decimals: within half a unit of the last, and float error
            assert row[metric] == pytest.approx(arm["final"][metric], abs=5.01e-5), (arm["name"], metric)
        evals = np.load(sorted((study_dir / arm["arm_id"] / "probes").glob("eval-*.npz"))[-1])
        kinds = json.loads((study_dir / arm["arm_id"] / "probes" / "concepts.json").read_text())["kinds"]
        categories = evals["single_f1"][np.array(kinds) == "category"]
        assert row["f1_category"] == pytest.approx(float(np.nanmedian(categories)), abs=5e-5)
    report = (study_dir / "report" / "report.md").read_text()
    assert "## hook-points" in report and "## emergence@L1.resid_post" in report
    assert (study_dir / "report" / "hook-points" / "per_hook.png").exists()
    assert "hook points `blocks.0.hook_resid_post`, `blocks.1.hook_resid_post`" in report

    # The arm of layer 1 is the arm a study of layer 1 alone trains: same folder hash, same weights.
    assert main([*args, "--layer", "1", "--study-id", "layer1"]) == 0
    alone = summary(ckpt / "layer1")
    assert json.loads((ckpt / "layer1" / "study.json").read_text())["setup"]["hooks"]["blocks.1.hook_resid_post"][
        "cache"] == study["setup"]["hooks"]["blocks.1.hook_resid_post"]["cache"]
    for arm in alone["arms"]:
        twin = next(a for a in s["arms"] if a["name"] == f"{arm['name']}@L1.resid_post")
        assert twin["arm_id"].rsplit("-", 1)[1] == arm["arm_id"].rsplit("-", 1)[1]
        assert twin["final"] == arm["final"]
        w1, w2 = (load_file(str(d / "sae.safetensors")) for d in (study_dir / twin["arm_id"],
                                                                   ckpt / "layer1" / arm["arm_id"]))
        assert all(torch.equal(w1[k], w2[k]) for k in w1)
