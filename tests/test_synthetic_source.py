"""The synthetic source end to end: its cache (true dictionary and codes beside the activations),
the recovery metrics an SAE gets during evaluation, the CLI and preset, and a short real run."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from config.cli import parse_args
from experiments.eval.features import load_features
from config.schema import SyntheticConfig
from experiments.data import activation_cache as ac
from experiments.data.synthetic import CODE_FILES, SyntheticTruth, SyntheticWriter, ToyModel
from experiments.train.trainer import EvalContext, build_arm_sae, evaluate
from config.schema import SAEArmConfig, TrainConfig
from tests.forked import run_forked
from tests.test_end_to_end import summary, wandb_env  # noqa: F401  (fixture)
from tests.wandb_readback import read_offline_runs

SMALL = SyntheticConfig(n_features=24, d_in=8, n_tokens=40_000, mean_l0=2.0)


def build(root: Path, cfg: SyntheticConfig = SMALL, seed: int = 0, writer=None) -> ac.ActivationCache:
    spec = {"source": "synthetic", "cfg": cfg.__dict__, "seed": seed}
    return ac.build_or_open(root, spec, writer or SyntheticWriter(ToyModel.build(cfg, seed), seed, 0.1))


def csr_codes(path: Path) -> np.ndarray:
    indptr, indices, values = (np.load(path / name) for name in CODE_FILES)
    dense = np.zeros((len(indptr) - 1, SMALL.n_features), dtype=np.float32)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    dense[rows, indices] = values
    return dense


def test_cache_holds_the_truth_and_the_codes_reproduce_every_row(tmp_path):
    cache = build(tmp_path)
    model = ToyModel.build(SMALL, 0)
    assert cache.acts.shape == (40_000, 8) and cache.tokens is None
    assert cache.n_train_rows == 36_000 and cache.n_eval_rows == 4_000
    assert np.array_equal(np.load(cache.path / "dictionary.npy"), model.dictionary)
    assert np.array_equal(np.load(cache.path / "probability.npy"), model.probability)
    codes = csr_codes(cache.path)
    np.testing.assert_allclose(codes @ model.dictionary, np.asarray(cache.acts), atol=1e-5)
    assert abs((codes > 0).sum(1).mean() - SMALL.mean_l0) < 0.05  # the true L0 of what was stored
    assert not (cache.path / "codes").exists()  # per-chunk files are assembled, then removed
    assert set(cache.manifest["checksums"]) == {"acts.npy", "dictionary.npy", "probability.npy", "parent.npy",
                                                "group.npy", *CODE_FILES}
    truth = SyntheticTruth.load(cache.path, cache.n_train_rows, 0.9)
    assert torch.equal(truth.eval_active, torch.from_numpy(codes[36_000:] > 0))
    assert truth.roles == ["independent"] * 24


def test_interrupted_generation_resumes_to_the_same_cache(tmp_path):
    model = ToyModel.build(SMALL, 0)

    class Failing(SyntheticWriter):
        def fill(self, chunk, acts, path):
            if chunk == 2:
                raise KeyboardInterrupt
            yield from super().fill(chunk, acts, path)

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, writer=Failing(model, 0, 0.1))
    manifest = json.loads(next((tmp_path / "activations").glob("*/manifest.json")).read_text())
    assert manifest["chunks_done"] == 2 and not manifest["complete"]
    resumed = build(tmp_path)
    reference = build(tmp_path / "ref")
    assert np.array_equal(np.asarray(resumed.acts), np.asarray(reference.acts))
    for name in CODE_FILES:
        assert np.array_equal(np.load(resumed.path / name), np.load(reference.path / name))


def test_another_seed_or_setting_is_another_cache(tmp_path):
    a = build(tmp_path)
    assert build(tmp_path, seed=1).path != a.path
    assert build(tmp_path, SyntheticConfig(**{**SMALL.__dict__, "noise_std": 0.1})).path != a.path
    assert build(tmp_path).path == a.path


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_an_sae_holding_the_truth_scores_one(tmp_path, architecture):
    """8 true features in 8 dims, so the dictionary D is invertible. An SAE with decoder rows D
    (permuted, plus 4 extra latents that never fire) and encoder D^-1 (a small negative bias keeps
    float noise on absent features below zero) recovers every feature and fires exactly with it:
    mcc = frac_recovered = precision = recall = 1."""
    square = SyntheticConfig(n_features=8, d_in=8, n_tokens=20_000, mean_l0=2.0)
    cache = build(tmp_path, square)
    truth = SyntheticTruth.load(cache.path, cache.n_train_rows, 0.9)
    sae = build_arm_sae(SAEArmConfig.for_architecture(architecture, hidden_dim=12, k=8, dead_handling="none"),
                        TrainConfig(), 8, 100)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))  # latent perm[j] holds feature j
    D = torch.from_numpy(truth.dictionary).double()
    with torch.no_grad():
        W_dec, W_enc = torch.zeros(12, 8), torch.zeros(8, 12)
        W_dec[perm[:8]] = D.float()
        W_dec[perm[8:]] = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        W_enc[:, perm[:8]] = torch.linalg.inv(D).float()
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_enc)
        sae.b_enc.fill_(-1e-3)  # true magnitudes are >= 0.5
        sae.b_dec.zero_()
    out = evaluate(sae, cache, 1.0, EvalContext(truth=truth))
    m = out.metrics
    assert m["mcc"] == pytest.approx(1.0, abs=1e-6) and m["mean_best_cos"] == pytest.approx(1.0, abs=1e-6)
    assert m["frac_recovered"] == 1.0 and m["firing_precision"] == 1.0 and m["firing_recall"] == 1.0
    assert np.array_equal(out.recovery.matched_latent, perm[:8].numpy())
    assert m["explained_variance"] > 0.999


def test_probes_record_best_cos_per_feature_and_colour_umap_by_role(tmp_path):
    """6 true features: parent 0 with children 1, 2, then 3 independent ones (probabilities
    falling). Latents 0-3 hold features 0, 1, 3, 4 exactly; latents 4-39 are random."""
    from types import SimpleNamespace

    from config.schema import ProbeConfig
    from experiments.eval.probes import ArmProbes, read_concepts, read_evals
    from experiments.eval.recovery import feature_recovery
    from experiments.train.trainer import EvalOutput

    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((8, 8)))[0].T.astype(np.float32)  # orthonormal rows
    dictionary = basis[:6]
    truth = SyntheticTruth(dictionary, np.array([0.5, 0.2, 0.2, 0.1, 0.05, 0.01]),
                           ["parent", "child", "child", "independent", "independent", "independent"],
                           torch.zeros(4, 6, dtype=torch.bool), 0.9)
    W = rng.standard_normal((40, 2)).astype(np.float32) @ basis[6:]  # orthogonal to every true feature
    W[:4] = dictionary[[0, 1, 3, 4]]
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    rec = feature_recovery(W, dictionary, 0.9)
    probes = ArmProbes(tmp_path, {"concepts", "umap"}, ProbeConfig(), None, {10}, seed=0, n_eval_tokens=4,
                       truth=truth)
    metrics, embedding = probes.run(10, 1000, SimpleNamespace(W_dec=torch.from_numpy(W)),
                                    EvalOutput({}, np.full(40, 0.1), np.ones(40), None, rec))
    # thirds by probability: {0, 1|2}, {1|2, 3}, {4, 5}; features 0, 1, 3, 4 are recovered
    assert metrics == {"concepts/recovered_frequent_third": 1.0, "concepts/recovered_middle_third": 0.5,
                       "concepts/recovered_rare_third": 0.5}
    (e,) = read_evals(tmp_path)
    assert np.allclose(e["best_cos"][[0, 1, 3, 4]], 1) and (e["best_cos"][[2, 5]] < 0.9).all()
    assert e["best_latent"][[0, 1, 3, 4]].tolist() == [0, 1, 2, 3]
    names = read_concepts(tmp_path)["names"]
    assert names == ["role:child", "role:independent", "role:parent"]
    labels = [names[i] if i >= 0 else None for i in e["umap_concept"]]
    assert labels[:4] == ["role:parent", "role:child", "role:independent", "role:independent"]
    assert all(label is None for label in labels[4:]) and e["umap_xy"].shape == (40, 2)
    assert embedding["concept"][:2] == ["parent", "child"]


def test_cli_source_flags_preset_and_layers(tmp_path):
    cfg = parse_args(["--source", "synthetic", "--study", "activations"])
    preset = cfg.synthetic
    assert (preset.n_features, preset.d_in, preset.mean_l0, preset.frequency) == (512, 64, 5.0, "zipf")
    assert {a.sae.architecture: a.sae.hidden_dim for a in cfg.arms} == dict.fromkeys(
        ["topk", "batchtopk", "matryoshka", "relu", "jumprelu", "gated"], 512)
    assert cfg.result_spec()["synthetic"]["n_features"] == 512
    assert parse_args([]).result_spec()["synthetic"] is None  # not part of a transformer study's identity

    cfg = parse_args(["--source", "synthetic", "--quick", "--n-features", "100", "--d-in", "20", "--mean-l0", "3",
                      "--feature-frequency", "uniform", "--noise-std", "0.05", "--cos-threshold", "0.8"])
    s = cfg.synthetic
    assert (s.n_features, s.d_in, s.mean_l0, s.frequency, s.noise_std, s.n_tokens) == (
        100, 20, 3.0, "uniform", 0.05, 131_072)
    assert cfg.probes.cos_threshold == 0.8

    config = tmp_path / "c.yaml"
    config.write_text("data: {source: synthetic}\nsynthetic: {n_groups: 3, group_size: 5, n_parents: 2}\n"
                      "sae: {relu: {l1_coefficient: 0.5}, l1_coefficient: 0.1}\n")
    cfg = parse_args(["--config", str(config), "--study", "activations", "--n-tokens", "5000"])
    assert cfg.data.source == "synthetic" and cfg.synthetic.n_tokens == 5000
    assert (cfg.synthetic.n_groups, cfg.synthetic.group_size, cfg.synthetic.n_parents) == (3, 5, 2)
    coef = {a.sae.architecture: a.sae.sparsity_coef for a in cfg.arms}
    assert coef["relu"] == 0.5 and coef["gated"] == 0.1  # an architecture's own section wins within a layer
    # ... and a flag beats every config layer
    cfg = parse_args(["--config", str(config), "--study", "activations", "--l1-coefficient", "0.2"])
    assert {a.sae.architecture: a.sae.sparsity_coef for a in cfg.arms}["relu"] == 0.2


def exit_code(args: list[str]) -> int:
    """run_experiments.main's exit status, whether it returns it or argparse exits with it."""
    from run_experiments import main

    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("args, message", [
    (["--source", "synthetic", "--layer", "1"], "--layer does not apply to --source synthetic"),
    (["--source", "synthetic", "--model-name", "gpt2"], "--model-name does not apply"),
    (["--n-features", "10"], "--n-features does not apply to --source transformer"),
    (["--source", "synthetic", "--concepts", "x.yaml"], "its concepts are the true features"),
    (["--source", "synthetic", "--n-tokens", "5"], "too small to split"),
    (["--source", "synthetic", "--cos-threshold", "1.5"], "must be in (0, 1]"),
    (["--source", "toy"], "invalid choice"),
])
def test_bad_synthetic_input_is_one_line(args, message, capsys):
    assert exit_code([*args, "--checkpoint-dir", "/nonexistent-never-made"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("yaml, message", [
    ("synthetic: {frequency: pareto}", "must be one of uniform, zipf"),
    ("synthetic: {n_featurez: 3}", "unknown setting"),
    ("synthetic: {group_correlation: 1.0}", "must be in [0, 1)"),
    ("sae: {relu: {l1_coefficient: 0.1, bogus: 1}}", "sae.relu.bogus: unknown setting"),
    ("sae: {relu: {k: 3}}", "sae.relu.k: k applies to topk, batchtopk, matryoshka, not to relu"),
])
def test_bad_synthetic_config_is_one_line(tmp_path, yaml, message, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: {source: synthetic}\n" + yaml + "\n")
    assert exit_code(["--config", str(config), "--checkpoint-dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_toy_model_that_cannot_exist_fails_before_anything_is_written(tmp_path, capsys):
    # 40 features cannot average 50 active ones
    code = exit_code(["--source", "synthetic", "--n-features", "40", "--mean-l0", "50", "--checkpoint-dir",
                 str(tmp_path / "ck"), "--study-id", "x", "--no-progress"])
    assert code == 2
    assert "mean_l0 = 50.0 is unreachable" in capsys.readouterr().err
    assert not (tmp_path / "ck" / "x").exists() and not list((tmp_path / "ck").glob("activations/*"))


@pytest.mark.slow
def test_emergence_on_a_small_toy_logs_features_and_recovers_them(tmp_path, wandb_env):  # noqa: F811
    """A small toy model (32 features in 16 dims, L0 2): TopK with one latent per feature recovers
    most of them within 600 steps (a random decoder would recover none: |cos| >= 0.9 between random
    directions in 16 dims has probability ~1e-8), and the run logs what the emergence study needs."""
    ckpt = tmp_path / "ck"
    config = tmp_path / "no-umap.yaml"
    config.write_text("probes: {umap_evals: 0}\n")  # UMAP on synthetic decoders is covered in-process above
    out = run_forked(["--source", "synthetic", "--study", "emergence", "--use-wandb", "--activation", "topk",
                      "--n-features", "32", "--d-in", "16", "--mean-l0", "2", "--n-tokens", "65536", "--hidden-dim",
                      "32", "--k", "2", "--batch-size", "256", "--steps", "600", "--lr", "0.01",
                      "--config", str(config), "--checkpoint-dir", str(ckpt), "--study-id", "syn", "--no-progress"],
                     env=wandb_env)
    assert out.returncode == 0, out.stderr[-3000:]
    s = summary(ckpt / "syn")
    topk = next(a for a in s["arms"] if a["architecture"] == "topk")
    assert topk["final"]["frac_recovered"] >= 0.75 and topk["final"]["mcc"] >= 0.85, topk["final"]
    emergence = s["studies"]["emergence"]
    assert emergence["source"] == "synthetic" and emergence["threshold"] == 0.9
    arm = next(a for a in emergence["arms"] if a["name"] == topk["name"])
    features = arm["features"]
    assert len(features) == 32 and {"probability", "emerged_tokens", "best_cos", "role"} <= features[0].keys()
    emerged = [f for f in features if f["emerged_tokens"] is not None]
    assert len(emerged) == arm["emerged"] >= round(32 * topk["final"]["frac_recovered"])
    # emerged: at the threshold from some eval to the end, so at the end too; the others end below it
    assert all(f["final_best_cos"] >= 0.9 for f in emerged)
    assert all(f["final_best_cos"] < 0.9 for f in features if f not in emerged)
    report = ckpt / "syn" / "report"
    assert (report / "emergence" / "emergence_vs_frequency.png").exists()
    assert (report / "emergence" / "features.csv").read_text().count("\n") == 32 + 1
    assert "Features emerged by frequency quarter" in (report / "report.md").read_text()
    # each latent's description names its true feature: the recovered features are each some latent's match
    latents = load_features(ckpt / "syn" / topk["arm_id"])
    recovered = {f["feature"] for f in features if f["final_best_cos"] >= 0.9}
    matched = set(latents.arrays["true_feature"][latents.arrays["true_cos"] >= 0.9].tolist())
    # (a latent within 0.9 of a feature matches it best unless two true features are themselves close)
    assert matched <= recovered and len(matched) >= 0.9 * len(recovered) and all(latents.labels[i] == f"true feature {latents.arrays['true_feature'][i]}"
                                        for i in np.flatnonzero(latents.arrays["true_cos"] >= 0.9))
    precise = latents.arrays["firing_precision"][latents.arrays["true_cos"] >= 0.9]
    assert np.nanmedian(precise) >= 0.8, precise  # a recovered feature's latent fires when it does
    assert "true features matched" in (report / "report.md").read_text().split("## features", 1)[1]

    wb_root = Path(wandb_env["WANDB_DIR"])
    run_log = read_offline_runs(wb_root, topk["wandb_run_id"])
    evals = run_log.steps("eval/mcc")
    assert evals == [150, 300, 450, 600] == run_log.steps("concepts/recovered_rare_third")
    assert run_log.values("eval/frac_recovered")[-1] == pytest.approx(topk["final"]["frac_recovered"])
    summary_run = read_offline_runs(wb_root, s["summary_runs"]["emergence"])
    assert summary_run.values("tables/features")[0]["nrows"] == 32
    assert summary_run.values("plots/emergence_vs_frequency")[0]["_type"] == "image-file"
