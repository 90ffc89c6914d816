"""experiments/export/saelens.py: each architecture exported in SAELens's format, checked against an
independent reimplementation of SAELens's documented inference encode for the exported architecture
(SAELens itself is not in this venv; benchmarks/check_export.py runs the real library on a study)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

import config.files as files
from experiments.export.saelens import export_saelens, saelens_metadata
from models.sae import SAE, SAEConfig, build_sae

ROOT = Path(__file__).resolve().parents[1]
D_IN, D_SAE, K, SCALE = 8, 32, 4, 2.0
META = {"model_name": "tinylm", "hook_name": "blocks.0.hook_resid_post", "context_size": 64, "prepend_bos": True,
        "dataset_path": "tinylm-corpus"}
SAELENS_ARCH = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk", "batchtopk": "jumprelu",
                "matryoshka": "jumprelu", "gated": "gated"}
# SAELens 6.x inference weights of each architecture (saes/*_sae.py): W_enc [d_in, d_sae], W_dec
# [d_sae, d_in], b_dec [d_in] for all, plus these [d_sae] vectors.
SAELENS_VECTORS = {"standard": {"b_enc"}, "jumprelu": {"b_enc", "threshold"}, "topk": {"b_enc"},
                   "gated": {"b_gate", "r_mag", "b_mag"}}


def saelens_encode(cfg: dict, w: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens's inference encode, written from its formulas (normalize_activations "none")."""
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    sae_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"]) > 0
        return gate * torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    hidden = sae_in @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return torch.relu(hidden)
    if arch == "jumprelu":
        return torch.relu(hidden) * (hidden > w["threshold"])
    if arch == "topk":
        if cfg["rescale_acts_by_decoder_norm"]:
            hidden = hidden * w["W_dec"].norm(dim=-1)
        vals, idx = hidden.topk(cfg["k"], dim=-1)
        return torch.zeros_like(hidden).scatter(-1, idx, vals.relu())
    raise AssertionError(arch)


def saelens_decode(w: dict, f: torch.Tensor) -> torch.Tensor:
    return f @ w["W_dec"] + w["b_dec"]


def random_sae(arch: str, seed: int = 0, learned_threshold: bool = True):
    sae = build_sae(SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_levels=3, seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.25)
        if arch == "jumprelu":
            sae.threshold.abs_()
        if arch == "gated":
            sae.r_mag.mul_(2)  # exp(r_mag) mostly within [0.4, 2.7]
        if arch in ("batchtopk", "matryoshka") and learned_threshold:
            sae.threshold.fill_(0.3)
            sae.num_batches.fill_(5)
    return sae


def saved(tmp_path: Path, arch: str, **kw) -> tuple[Path, SAE]:
    sae = random_sae(arch, **kw)
    arm_dir = tmp_path / f"{arch}-arm"
    sae.save(arm_dir, scale=SCALE)
    return arm_dir, sae


def exported(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "cfg.json").read_text()), load_file(out / "sae_weights.safetensors")


def inputs(seed: int = 3) -> torch.Tensor:
    """Raw-scale inputs whose feature activations are of order 1-10, as on real activations. Gated's
    magnitude path is computed differently (rounded differently) on each side: the two agree to
    float32 rounding of the activations' size, which 1e-5 bounds at this scale."""
    return torch.randn(256, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("arch", list(SAELENS_ARCH))
def test_export_reproduces_our_encode_and_decode(tmp_path, arch):
    arm_dir, trained = saved(tmp_path, arch)
    out = export_saelens(arm_dir, tmp_path / "out", META)
    assert out == tmp_path / "out" and sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg, w = exported(out)

    sl_arch = SAELENS_ARCH[arch]
    assert cfg["architecture"] == sl_arch and cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["dtype"] == "float32" and cfg["reshape_activations"] == "none"
    if sl_arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    else:
        assert "k" not in cfg
    meta = cfg["metadata"]
    assert {k: meta[k] for k in META} == META
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # else SAELens converts it as a pre-6.0 config
    assert meta["sae_lens_training_version"] is None
    assert meta["training_architecture_details"]["harness_architecture"] == arch
    assert meta["training_architecture_details"]["folded_scale"] == SCALE

    assert set(w) == {"W_enc", "W_dec", "b_dec"} | SAELENS_VECTORS[sl_arch]
    assert w["W_enc"].shape == (D_IN, D_SAE) and w["W_dec"].shape == (D_SAE, D_IN) and w["b_dec"].shape == (D_IN,)
    assert all(w[v].shape == (D_SAE,) for v in SAELENS_VECTORS[sl_arch])
    assert all(t.dtype == torch.float32 for t in w.values())
    # The folded weights: they act on raw x where the trained model acted on x * SCALE.
    torch.testing.assert_close(w["W_enc"], trained.W_enc.detach() * SCALE)
    torch.testing.assert_close(w["W_dec"], trained.W_dec.detach() / SCALE)
    torch.testing.assert_close(w["b_dec"], trained.b_dec.detach() / SCALE)

    ours = SAE.load(arm_dir).eval()
    x = inputs()
    with torch.no_grad():
        f = ours.encode(x)
        assert (f > 0).any() and (f == 0).any()  # the inputs exercise both sides of the activation
        torch.testing.assert_close(saelens_encode(cfg, w, x), f, atol=1e-5, rtol=0)
        torch.testing.assert_close(saelens_decode(w, f), ours.decode(f), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_threshold_is_a_jumprelu_threshold_also_at_equality(tmp_path, arch):
    """A pre-activation exactly at the threshold is zeroed by ours (relu(pre) * 1[pre > theta]) and by
    SAELens's JumpReLU (same strict comparison)."""
    sae = SAE.load(saved(tmp_path, arch)[0]).eval()
    x = inputs()
    with torch.no_grad():
        pre = sae.pre_acts(x)
        theta = pre[pre > 0].median()
        sae.threshold.fill_(theta)
    sae.save(tmp_path / "at-theta", scale=1.0)  # already folded
    cfg, w = exported(export_saelens(tmp_path / "at-theta", tmp_path / "out", META))
    assert cfg["architecture"] == "jumprelu" and torch.equal(w["threshold"], torch.full((D_SAE,), theta.item()))
    ours = SAE.load(tmp_path / "at-theta").eval()
    with torch.no_grad():
        f = ours.encode(x)
        at = ours.pre_acts(x) == theta
        assert at.any() and (f[at] == 0).all()
        assert torch.equal(saelens_encode(cfg, w, x), f)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_before_any_threshold_is_exported_as_topk(tmp_path, arch):
    arm_dir, _ = saved(tmp_path, arch, learned_threshold=False)  # num_batches 0: our eval is per-row TopK
    cfg, w = exported(export_saelens(arm_dir, tmp_path / "out", META))
    assert cfg["architecture"] == "topk" and cfg["k"] == K
    ours = SAE.load(arm_dir).eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(saelens_encode(cfg, w, x), ours.encode(x), atol=1e-5, rtol=0)


def test_refuses_an_existing_out_folder_and_leaves_it_alone(tmp_path):
    arm_dir, _ = saved(tmp_path, "relu")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        export_saelens(arm_dir, out, META)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError):
        export_saelens(arm_dir, tmp_path / "empty", META)


def test_refusals_leave_nothing_behind(tmp_path, monkeypatch):
    arm_dir, sae = saved(tmp_path, "jumprelu")
    with pytest.raises(ValueError, match="lacks hook_name, dataset_path"):
        export_saelens(arm_dir, tmp_path / "out", {k: v for k, v in META.items()
                                                   if k not in ("hook_name", "dataset_path")})
    with torch.no_grad():
        sae.threshold[3] = -0.1
    sae.save(tmp_path / "negative")
    with pytest.raises(ValueError, match="negative thresholds"):
        export_saelens(tmp_path / "negative", tmp_path / "out", META)
    # A failure at the last step (the rename) removes the half-built folder.
    def rename_fails(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "rename", rename_fails)  # the export's folder write (write_new_folder)
    with pytest.raises(OSError, match="disk gone"):
        export_saelens(arm_dir, tmp_path / "out", META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jumprelu-arm", "negative"]


def test_sparsity_file_is_log10_of_the_feature_density(tmp_path):
    arm_dir, _ = saved(tmp_path, "topk")
    density = np.geomspace(1e-5, 0.9, D_SAE)
    density[7] = 0.0  # never fired
    (arm_dir / "features").mkdir()
    save_numpy({"density": density, "n_fired": (density * 1000).astype(np.int64)},
               str(arm_dir / "features" / "features.safetensors"))
    out = export_saelens(arm_dir, tmp_path / "out", META)
    sparsity = load_file(out / "sparsity.safetensors")
    assert list(sparsity) == ["sparsity"] and sparsity["sparsity"].dtype == torch.float32
    got = sparsity["sparsity"].double().numpy()
    fired = density > 0
    np.testing.assert_allclose(got[fired], np.log10(density[fired]), rtol=1e-6)
    assert got[7] == pytest.approx(-10.0)  # SAELens's log10(0 + 1e-10)

    save_numpy({"density": density[:-1]}, str(arm_dir / "features" / "features.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        export_saelens(arm_dir, tmp_path / "out2", META)
    assert not (tmp_path / "out2").exists()


def test_the_metadata_says_how_the_activations_were_made():
    about = {"source": "transformer", "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post",
             "context_size": 128, "prepend_bos": True, "dataset": "corpus.txt", "study_id": "s"}
    meta = saelens_metadata(about)
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["model_name"] == "gpt2"
    assert meta["context_size"] == 128 and meta["prepend_bos"] is True and meta["dataset_path"] == "corpus.txt"
    assert meta["seqpos_slice"] == [1, None]  # the BOS position is not trained on
    toy = saelens_metadata({"source": "synthetic", "cache": "ck/activations/abc"})
    assert toy["model_name"] is None and toy["hook_name"] is None and "synthetic" in toy["dataset_path"]


def test_the_export_module_imports_no_model_or_logging_library():
    """It runs in the peers venv beside SAELens: torch, numpy, safetensors and our config/models only."""
    code = ("import sys, experiments.export.saelens; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'transformer_lens', 'transformers', 'wandb', "
            "'sae_lens', 'umap', 'matplotlib', 'visualization'}); "
            "bad += sorted(m for m in sys.modules if m.startswith('experiments.') "
            "              and not m.startswith('experiments.export')); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
