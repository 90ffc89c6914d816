"""Each flag of the original project changes what a real (tiny) run does."""
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from run_experiments import main
from experiments.eval.features import load_features
from tests.test_end_to_end import raw_topk_eval
from visualization.local_sink import MetricsCSV

COMMON = ["--study", "activations", "--activation", "topk", "--n-samples", "40", "--seq-len", "17", "--batch-size", "64", "--expansion-factor", "2", "--no-progress"]
UNTIMED = [*COMMON, "--k", "8"]
BASE = [*UNTIMED, "--steps", "12"]


@pytest.fixture
def ckpt(tmp_path, tinylm_models_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = tmp_path / "ckpt"
    shutil.copytree(tinylm_models_dir, root / "models")
    return root


class Run:
    def __init__(self, root, study_id):
        self.dir = root / study_id
        self.study = json.loads((self.dir / "study.json").read_text())
        self.summary = json.loads((self.dir / "summary.json").read_text())
        (self.arm,) = self.summary["arms"]
        self.arm_dir = self.dir / self.arm["arm_id"]
        self.weights = load_file(str(self.arm_dir / "sae.safetensors"))
        self.sae_config = json.loads((self.arm_dir / "config.json").read_text())
        (cache,) = [info["cache"] for info in self.study["setup"]["hooks"].values()]
        self.cache_dir = Path(cache)
        self.cache = json.loads((self.cache_dir / "manifest.json").read_text())
        self.metrics = MetricsCSV.read(self.arm_dir / "metrics.csv")

    def series(self, name):
        return [r["value"] for r in self.metrics if r["name"] == name]


def go(root, study_id, *extra, base=BASE):
    assert main([*base, "--checkpoint-dir", str(root), "--study-id", study_id, *extra]) == 0
    return Run(root, study_id)


def same_weights(a, b):
    return all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


@pytest.fixture
def base(ckpt):
    return go(ckpt, "base")


def test_seed_reproduces_and_changes(ckpt, base):
    assert same_weights(base, go(ckpt, "again"))
    assert not same_weights(base, go(ckpt, "seed1", "--seed", "1"))


def test_hidden_dim_and_expansion_factor(ckpt, base):
    assert base.weights["W_enc"].shape == (128, 256)
    assert go(ckpt, "hd", "--hidden-dim", "100").weights["W_enc"].shape == (128, 100)
    assert go(ckpt, "ef", "--expansion-factor", "3").weights["W_enc"].shape == (128, 384)


def test_k_sets_active_latents(ckpt, base):
    assert base.arm["final"]["l0"] <= 8
    assert max(go(ckpt, "k3", "--k", "3").series("train/l0")) <= 3


def test_lr_steps_epochs_batch_size(ckpt, base):
    # the schedule (warm-up, decay) scales with the base learning rate, 3e-3 by default
    lr = go(ckpt, "lr", "--lr", "0.0123").series("train/lr")
    assert lr == pytest.approx([0.0123 / 3e-3 * v for v in base.series("train/lr")]) and lr != base.series("train/lr")
    assert go(ckpt, "steps", "--steps", "7").arm["steps"] == 7
    # 36 train sequences x 16 tokens = 576 rows; batch 64 -> 9 steps per epoch
    assert main([*UNTIMED, "--epochs", "2", "--checkpoint-dir", str(ckpt), "--study-id", "ep"]) == 0
    assert Run(ckpt, "ep").arm["steps"] == 18
    assert go(ckpt, "bs", "--batch-size", "32").arm["tokens"] == 12 * 32


def test_layer_hook_and_hook_point_pick_the_activations(ckpt, base):
    assert base.cache["spec"]["hook_name"] == "blocks.0.hook_resid_post"
    l1 = go(ckpt, "l1", "--layer", "1")
    assert l1.cache["spec"]["hook_name"] == "blocks.1.hook_resid_post" and l1.cache_dir != base.cache_dir
    assert go(ckpt, "mlp", "--hook", "mlp_out").cache["spec"]["hook_name"] == "blocks.0.hook_mlp_out"
    hp = go(ckpt, "hp", "--hook-point", "blocks.1.hook_resid_mid")
    assert hp.cache["spec"]["hook_name"] == "blocks.1.hook_resid_mid"


def test_n_samples_and_seq_len_size_the_harvest(ckpt, base):
    assert base.cache["shape"] == [40 * 16, 128]
    assert go(ckpt, "ns", "--n-samples", "50").cache["shape"] == [50 * 16, 128]
    assert go(ckpt, "sl", "--seq-len", "9").cache["shape"] == [40 * 8, 128]


def test_normalisation_on_and_off(ckpt, base):
    scale = base.cache["normalization"]["scale"]
    assert scale != pytest.approx(1.0) and base.sae_config["folded_scale"] == pytest.approx(scale)
    raw = go(ckpt, "raw", "--no-normalize")
    assert raw.sae_config["folded_scale"] == 1.0 and raw.cache_dir == base.cache_dir
    assert base.arm["final"]["explained_variance"] != raw.arm["final"]["explained_variance"]
    # trained on normalised inputs, reported in the activations' own scale: the saved (folded) SAE
    # on the raw eval rows gives the reported MSE, not the normalised one (scale^2 times it)
    _, _, mse = raw_topk_eval(base.cache_dir, base.arm_dir)
    assert base.arm["final"]["mse"] == pytest.approx(mse, rel=1e-5)
    assert abs(scale ** 2 - 1) > 0.01


def test_dead_window_aux_k_and_dead_resample(ckpt):
    # 256 latents, k 8, 64 tokens a step: some latents go a whole 2,048-token window (32 steps)
    # without firing. Dead means exactly that, counted every step: nothing is dead before step 32.
    window = ["--dead-window", "2048", "--steps", "60"]
    auxk = go(ckpt, "dw", *window)
    dead = auxk.series("train/dead_frac")
    steps = [r["step"] for r in auxk.metrics if r["name"] == "train/dead_frac"]
    assert max(d for d, s in zip(dead, steps) if s < 32) == 0 and max(dead) > 0
    assert max(auxk.series("train/aux")) > 0
    narrow = go(ckpt, "ak", *window, "--aux-k", "2")
    assert narrow.sae_config["aux_k"] == 2 and not same_weights(narrow, auxk)
    # the default window (262,144 tokens) is not reached in 60 steps of 64 tokens
    assert max(go(ckpt, "dd", "--steps", "60").series("train/dead_frac")) == 0
    off = go(ckpt, "nores", *window, "--no-dead-resample")
    assert max(off.series("train/dead_frac")) > 0 and max(off.series("train/aux")) == 0
    assert not same_weights(auxk, off)


def test_dead_handling_resample_revives_dead_latents(ckpt):
    r = go(ckpt, "rs", "--dead-handling", "resample", "--dead-window", "2048", "--steps", "150")
    events = [row for row in r.metrics if row["name"] == "train/resampled"]
    # a window ends every 32 steps of 64 tokens: resampling is due at steps 32, 64, 96 and 128 (the
    # learning rate decays from step 120 on, so not at 128)
    assert [e["step"] for e in events] == [32, 64, 96] and sum(e["value"] for e in events) > 0
    assert r.arm["dead_handling"] == "resample" and r.arm["name"] == "topk-k8-resample"
    # right after each resampling no latent is dead (each revived one gets a fresh window), and from
    # the first one until a window after the last the run stays below the same run without handling
    # (identical until then); later the revived latents that never fired count as dead again
    none = go(ckpt, "rs-none", "--dead-handling", "none", "--dead-window", "2048", "--steps", "150")

    def dead_by_step(run):
        steps = [row["step"] for row in run.metrics if row["name"] == "train/dead_frac"]
        return dict(zip(steps, run.series("train/dead_frac")))

    dead, dead_none = dead_by_step(r), dead_by_step(none)
    assert all(dead[e["step"]] == 0 for e in events)
    first = next(e["step"] for e in events if e["value"] > 0)
    later = sorted(step for step in dead.keys() & dead_none.keys() if first < step < events[-1]["step"] + 32)
    assert later and all(dead[step] < dead_none[step] for step in later)


def test_activation_all_trains_every_architecture(ckpt):
    assert main([*UNTIMED, "--steps", "12", "--activation", "all", "--checkpoint-dir", str(ckpt),
                 "--study-id", "all"]) == 0
    summary = json.loads((ckpt / "all" / "summary.json").read_text())
    archs = {a["architecture"]: a for a in summary["arms"]}
    assert set(archs) == {"topk", "batchtopk", "matryoshka", "relu", "jumprelu", "gated"}
    assert len({a["arm_id"] for a in summary["arms"]}) == 6
    for arch, arm in archs.items():
        assert arm["status"] == "complete" and arm["steps"] == 12
        config = json.loads((Path(arm["weights"]).parent / "config.json").read_text())
        assert config["architecture"] == arch
        # AuxK for the TopK family; the penalised ones, as SAELens and dictionary_learning train them
        assert arm["dead_handling"] == ("auxk" if arch in ("topk", "batchtopk", "matryoshka") else "none")
    assert archs["gated"]["name"].startswith("gated-coef") and archs["batchtopk"]["name"] == "batchtopk-k8"


def test_sparsity_coefficients_and_target_l0(ckpt):
    def run(study_id, *extra):
        # these architectures take no --k; 60 steps: after the 5% warm-up (3 steps) the penalty
        # weight is the flag's value
        return go(ckpt, study_id, *extra, "--steps", "60", base=COMMON)

    weak = run("r1", "--activation", "relu", "--l1-coefficient", "0.001")
    strong = run("r2", "--activation", "relu", "--l1-coefficient", "0.5")
    assert strong.arm["final"]["l0"] < weak.arm["final"]["l0"]
    assert max(weak.series("train/sparsity")) > 0
    gated = run("g", "--activation", "gated", "--l1-coefficient", "0.5")
    assert gated.arm["name"] == "gated-coef0.5" and gated.sae_config["sparsity_coef"] == 0.5
    loose = run("j1", "--activation", "jumprelu", "--l0-coefficient", "0")
    tight = run("j2", "--activation", "jumprelu", "--l0-coefficient", "0.05")
    assert tight.arm["final"]["l0"] < loose.arm["final"]["l0"]
    target = run("j3", "--activation", "jumprelu", "--target-l0", "5", "--l0-coefficient", "1")
    assert target.sae_config["target_l0"] == 5 and target.arm["name"] == "jumprelu-l0target5"
    assert not same_weights(target, tight)


def test_dataset_file_is_harvested(ckpt, base, tmp_path):
    text = tmp_path / "docs.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Bob saw {i} red cats in the park."}) for i in range(200)))
    r = go(ckpt, "ds", "--dataset", str(text))
    assert r.cache["spec"]["dataset"].startswith("sha256:") and r.cache_dir != base.cache_dir
    # the cached tokens are the file's text: every piece between BOS tokens decodes to part of a document
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(str(next((ckpt / "models").glob("tinylm*/tokenizer"))))
    docs = [f"Bob saw {i} red cats in the park." for i in range(200)]
    tokens = np.load(r.cache_dir / "tokens.npy")
    pieces = [tok.decode(list(group)).strip() for row in tokens.tolist()
              for is_bos, group in itertools.groupby(row, key=lambda t: t == tok.bos_token_id) if not is_bos]
    assert pieces and all(any(piece in doc for doc in docs) for piece in pieces)
    assert any(piece in docs for piece in pieces)  # and whole documents where a row holds one


def test_concepts_the_text_lacks_are_left_out_with_a_warning(ckpt, tmp_path, capsys):
    text = tmp_path / "docs.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Bob saw {i} red cats in the park."}) for i in range(200)))
    r = go(ckpt, "dsc", "--dataset", str(text), "--study", "emergence", "--n-samples", "80")
    out = capsys.readouterr().out
    emergence = r.summary["studies"]["emergence"]
    scored = {c["concept"] for c in emergence["arms"][0]["concepts"]}
    absent = emergence["absent_concepts"]
    assert scored and "category:colours" in scored and "word:red" in scored  # what the text holds is scored
    assert "category:animals" in absent and not scored & set(absent)  # the rest is left out, and listed
    assert f"{len(absent)} concepts do not occur in both halves of the eval text" in " ".join(out.split())
    assert "pass --concepts FILE" in " ".join(out.split())  # most of tinylm's concepts cannot be scored on this text
    report = (r.dir / "report" / "report.md").read_text()
    assert "nan" not in report.lower().replace("nanmedian", "")
    assert {c["concept"] for c in emergence["baselines"]} == scored


def test_a_failing_arm_is_recorded_and_the_others_still_run(ckpt, monkeypatch, capsys):
    monkeypatch.setenv("SAE_FAULT", "error:step:5")
    code = main([*BASE, "--activation", "topk,relu", "--checkpoint-dir", str(ckpt), "--study-id", "f"])
    assert code == 1  # something failed, and the exit code says so
    assert "arm topk-k8 failed: InjectedFault: fault injected at step:5" in capsys.readouterr().err
    study = json.loads((ckpt / "f" / "study.json").read_text())
    topk, relu = study["arms"]
    assert topk["status"] == "failed" and topk["reason"] == "InjectedFault: fault injected at step:5"
    assert relu["status"] == "complete" and study["status"] == "failed"
    assert "InjectedFault" in (ckpt / "f" / topk["arm_id"] / "error.txt").read_text()
    summary = json.loads((ckpt / "f" / "summary.json").read_text())
    assert [a["status"] for a in summary["arms"]] == ["failed", "complete"]
    assert "topk-k8 | " in (ckpt / "f" / "report" / "report.md").read_text()


def test_sparsity_sweep_trains_one_arm_per_level(ckpt):
    assert main([*BASE, "--sparsity-sweep", "0.5,1", "--checkpoint-dir", str(ckpt), "--study-id", "sw"]) == 0
    arms = json.loads((ckpt / "sw" / "summary.json").read_text())["arms"]
    assert [a["name"] for a in arms] == ["topk-k4", "topk-k8"]
    assert [a["final"]["l0"] for a in arms] == [4.0, 8.0]


def test_concepts_probe_k_and_f1_threshold_shape_the_emergence_study(ckpt, tmp_path):
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text("animals: [cat, dog, bird]\nfunction: [the, a, and, was]\n")
    no_umap = tmp_path / "no-umap.yaml"  # UMAP is not what this test is about
    no_umap.write_text("probes: {umap_evals: 0}\n")

    def emergence(study_id, *extra):
        assert main([*BASE, "--study", "emergence", "--config", str(no_umap), "--checkpoint-dir", str(ckpt),
                     "--study-id", study_id, "--concepts", str(concepts), "--n-samples", "200", *extra]) == 0
        run = ckpt / study_id
        return (json.loads((run / "summary.json").read_text())["studies"]["emergence"],
                next((run / json.loads((run / "study.json").read_text())["arms"][0]["arm_id"]).glob("probes/eval-*.npz")))

    study, npz = emergence("c1", "--probe-k", "2", "--f1-threshold", "0.05")
    names = [c["concept"] for c in study["arms"][0]["concepts"]]
    listed = ["category:animals", "category:function", "word:cat", "word:dog", "word:bird", "word:the", "word:a",
              "word:and", "word:was"]
    # the file's concepts, in its order, but those the small eval text lacks (listed apart)
    assert names == [n for n in listed if n not in study["absent_concepts"]] and "word:the" in names
    assert set(names) | set(study["absent_concepts"]) == set(listed)
    assert study["probe_k"] == 2 and study["threshold"] == 0.05
    with np.load(npz, allow_pickle=False) as data:
        assert data["probe_latents"].shape == (len(names), 2)
    strict, _ = emergence("c2", "--probe-k", "2", "--f1-threshold", "1.0")
    emerged = lambda s: sum(c["emerged_single_tokens"] is not None for c in s["arms"][0]["concepts"])  # noqa: E731
    assert emerged(study) > emerged(strict) == 0  # at F1 >= 0.05 something emerges; at 1.0 nothing does


def test_lockstep_arms_equal_sequential_arms(ckpt, capsys):
    """Five arms stepping together over one batch read per step end exactly where the same arms
    trained one after another do: same final metrics, weights and logged curves."""
    args = [*COMMON, "--activation", "topk,batchtopk,relu,jumprelu,gated", "--k", "8", "--steps", "12",
            "--checkpoint-dir", str(ckpt)]
    assert main([*args, "--study-id", "lockstep"]) == 0
    assert "training 5 arms in lockstep" in capsys.readouterr().out
    assert main([*args, "--study-id", "sequential", "--sequential-arms"]) == 0
    assert "in lockstep" not in capsys.readouterr().out
    runs = [json.loads((ckpt / sid / "summary.json").read_text()) for sid in ("lockstep", "sequential")]
    assert [a["arm_id"] for a in runs[0]["arms"]] == [a["arm_id"] for a in runs[1]["arms"]]
    assert [a["final"] for a in runs[0]["arms"]] == [a["final"] for a in runs[1]["arms"]]
    for arm in runs[0]["arms"]:
        dirs = [ckpt / sid / arm["arm_id"] for sid in ("lockstep", "sequential")]
        w = [load_file(str(d / "sae.safetensors")) for d in dirs]
        assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
        assert (dirs[0] / "metrics.csv").read_text() == (dirs[1] / "metrics.csv").read_text()


def test_a_hook_point_narrower_than_the_residual_stream_gets_its_latents_described(ckpt):
    """tinylm's MLP hidden layer (512 wide, the residual stream 128): the feature analysis leaves
    out the direct logit effect, which needs decoder rows in the residual stream, and keeps the rest."""
    assert main([*BASE, "--hook-point", "blocks.0.mlp.hook_post", "--checkpoint-dir", str(ckpt),
                 "--study-id", "mlp"]) == 0
    (arm,) = json.loads((ckpt / "mlp" / "summary.json").read_text())["arms"]
    features = load_features(ckpt / "mlp" / arm["arm_id"])
    d_sae = 2 * 512  # --expansion-factor 2
    assert features.arrays["top_acts"].shape[0] == d_sae and "logit_top_ids" not in features.arrays
    assert len(features.labels) == d_sae
