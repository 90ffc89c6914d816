"""An arm's SAE as a SAELens 6.x SAE folder, loadable with `sae_lens.SAE.load_from_disk(out)`.

    out/cfg.json                  SAELens's inference config (architecture, d_in, d_sae, ..., metadata)
    out/sae_weights.safetensors   its weights, under SAELens's names and shapes (float32)
    out/sparsity.safetensors      "sparsity": log10(density + 1e-10) per latent [d_sae] (float32), as
                                  SAELens's trainer saves its log feature sparsity; written only when
                                  the arm has a feature analysis (arm_dir/features/features.safetensors,
                                  whose density is the firing rate over the eval split)

The weights are the saved, folded ones (models/sae/base.py: they act on raw activations), so the
config says normalize_activations "none" and SAELens applies no input scaling. SAELens subtracts
b_dec from the input before the encoder (apply_b_dec_to_input true), as all our architectures do.

Each of our architectures maps to the SAELens inference architecture whose encode computes the same
function of the raw input (benchmarks/check_export.py loads every arm of a study with SAELens and
compares encode and decode; tests/test_export_saelens.py checks the mapping against SAELens's
formulas):

    relu        standard   relu(pre)
    jumprelu    jumprelu   ours: pre * 1[pre > theta]; SAELens: relu(pre) * 1[pre > theta]. The same
                           for theta >= 0, which training keeps (clamped after every step); a
                           negative threshold is refused (ours would pass pre in (theta, 0] through).
    topk        topk       the k largest pre-activations per row, relu'd (torch.topk on both sides,
                           so ties resolve alike); rescale_acts_by_decoder_norm false
    batchtopk   jumprelu   our inference is relu(pre) * 1[pre > theta] with one learned theta:
                           SAELens's jumprelu with that theta for every latent is the same expression
                           (strict > on both sides, so a value equal to theta is zeroed by both).
                           This is also how SAELens itself saves its BatchTopK SAEs. Before any
                           training batch set theta (num_batches 0) ours falls back to per-row TopK:
                           that model is exported as topk with its k.
    matryoshka  jumprelu   as batchtopk (its inference is BatchTopK's; the nested prefixes only
                           shape the training loss), as SAELens saves its Matryoshka BatchTopK SAEs
    gated       gated      b_gate = our b_enc (the gate is pre > 0); r_mag and b_mag as they are. Our
                           magnitude path is (pre - b_enc) * exp(r_mag) + b_mag, SAELens's
                           (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag: the same value, rounded
                           differently (float32 rounding, about 1e-7 of the pre-activations); the gate
                           is the same expression on both sides.

This module needs only torch, numpy, safetensors and the harness's models/sae and config packages,
so it runs in the peers venv (.venv-peers, SAELens's) as well as in ours.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy_file
from safetensors.torch import save as save_tensors

from config.files import read_json, write_new_folder
from models.sae.base import SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SPARSITY_KEY = "sparsity"
SPARSITY_EPS = 1e-10  # SAELens's: log10(frequency + 1e-10), so a latent that never fired reads -10
# The SAELens release whose cfg.json format this writes (and that benchmarks/check_export.py loads it
# with). SAELens reads a config as 6.x only when metadata.sae_lens_version is >= 6.0.0; older or
# missing versions go through its pre-6.0 conversion.
SAE_LENS_VERSION = "6.54.12"
# What the caller's metadata must name: how the activations were made.
REQUIRED_METADATA = ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path")


def export_saelens(arm_dir: Path, out: Path, metadata: dict) -> Path:
    """Write arm_dir's saved SAE (sae.safetensors + config.json) as a SAELens SAE folder `out`.

    `metadata` goes under cfg.json's "metadata" and must name model_name, hook_name, context_size,
    prepend_bos and dataset_path (see `saelens_metadata`); its other keys are kept, and override the
    defaults written here. Refuses an existing `out` (FileExistsError) and a model SAELens cannot
    reproduce exactly (ValueError). `out` is written whole or not at all (config/files.py:
    write_new_folder). Returns `out`.
    """
    arm_dir = Path(arm_dir)
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {', '.join(missing)} (required: {', '.join(REQUIRED_METADATA)})")

    sae = SAE.load(arm_dir)
    saved = read_json(arm_dir / "config.json")
    architecture, extra_cfg, tensors, training_arch = _saelens_form(sae, arm_dir)
    details = {"harness_architecture": sae.cfg.architecture,  # and our SAEConfig, whose training it describes
               **{k: v for k, v in sae.cfg.to_dict().items() if k != "architecture"},
               "folded_scale": saved.get("folded_scale", 1.0)}
    if sae.cfg.architecture in ("batchtopk", "matryoshka"):
        details.update(inference_threshold=float(sae.threshold), threshold_batches=int(sae.num_batches))
    if sae.cfg.architecture == "matryoshka":
        details["matryoshka_widths"] = list(sae.widths)
    cfg = {
        "architecture": architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        **extra_cfg,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the scale is folded into the weights
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "sae_lens_training_version": None,  # trained by this harness, not by SAELens
            "hook_head_index": None,
            "model_from_pretrained_kwargs": {},
            "training_architecture": training_arch,
            "training_architecture_details": details,
            **metadata,
        },
    }
    try:
        cfg_bytes = (json.dumps(cfg, indent=2) + "\n").encode()
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata is not JSON-serialisable: {err}") from None
    files = {CFG_FILENAME: cfg_bytes, WEIGHTS_FILENAME: save_tensors(tensors)}
    sparsity = _log_sparsity(arm_dir, sae.cfg.d_sae)
    if sparsity is not None:
        files[SPARSITY_FILENAME] = save_tensors({SPARSITY_KEY: sparsity})
    return write_new_folder(out, files)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().clone()


def _saelens_form(sae: SAE, arm_dir: Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor], str]:
    """(SAELens inference architecture, its extra cfg keys, its weights, the training architecture
    SAELens would name) for our loaded SAE; ValueError where SAELens cannot reproduce its encode."""
    arch = sae.cfg.architecture
    common = {"W_enc": _f32(sae.W_enc), "W_dec": _f32(sae.W_dec), "b_dec": _f32(sae.b_dec)}
    if arch == "relu":
        return "standard", {}, {**common, "b_enc": _f32(sae.b_enc)}, "standard"
    if arch == "jumprelu":
        theta = _f32(sae.threshold)
        if (theta < 0).any():
            raise ValueError(f"{arch} SAE in {arm_dir} has {int((theta < 0).sum())} negative thresholds "
                             f"(min {float(theta.min()):.3g}): SAELens's JumpReLU zeroes the pre-activations "
                             f"in (theta, 0] that ours keeps, so it cannot be exported exactly")
        return "jumprelu", {}, {**common, "b_enc": _f32(sae.b_enc), "threshold": theta}, "jumprelu"
    topk_cfg = {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}  # selection on the plain pre-activations
    if arch == "topk":
        return "topk", topk_cfg, {**common, "b_enc": _f32(sae.b_enc)}, "topk"
    if arch in ("batchtopk", "matryoshka"):
        training = "batchtopk" if arch == "batchtopk" else "matryoshka_batchtopk"
        if int(sae.num_batches) == 0:  # no threshold learned yet: our inference is per-row TopK
            return "topk", topk_cfg, {**common, "b_enc": _f32(sae.b_enc)}, training
        theta = torch.full((sae.cfg.d_sae,), float(_f32(sae.threshold)), dtype=torch.float32)
        return "jumprelu", {}, {**common, "b_enc": _f32(sae.b_enc), "threshold": theta}, training
    if arch == "gated":
        return "gated", {}, {**common, "b_gate": _f32(sae.b_enc), "r_mag": _f32(sae.r_mag),
                             "b_mag": _f32(sae.b_mag)}, "gated"
    raise ValueError(f"architecture {arch!r} of {arm_dir} has no SAELens export")


def _log_sparsity(arm_dir: Path, d_sae: int) -> torch.Tensor | None:
    """log10(density + SPARSITY_EPS) from the arm's feature analysis, or None when it has none."""
    path = Path(arm_dir) / "features" / "features.safetensors"
    if not path.exists():
        return None
    arrays = load_numpy_file(str(path))
    if "density" not in arrays:
        raise ValueError(f"{path} has no 'density' array")
    density = np.asarray(arrays["density"], dtype=np.float64)
    if density.shape != (d_sae,):
        raise ValueError(f"{path}: density has shape {density.shape}, the SAE has d_sae {d_sae}")
    if not np.all((density >= 0) & (density <= 1)):
        raise ValueError(f"{path}: density values outside [0, 1]")
    return torch.from_numpy(np.log10(density + SPARSITY_EPS).astype(np.float32))


def saelens_metadata(about: dict) -> dict:
    """cfg.json metadata from what an arm was trained on (its config.json's "trained_on").

    Each cached sequence is context_size tokens, an explicit BOS then a window of the documents
    concatenated with BOS separators; the BOS position is not trained on (experiments/data/sources.py).
    In SAELens's terms: prepend_bos, sequence_separator_token "bos", concatenated sequences,
    seqpos_slice (1, None). A synthetic source has no model or hook: those keys are None.
    """
    if about.get("source") != "transformer":
        return {"model_name": None, "hook_name": None, "context_size": None, "prepend_bos": False,
                "dataset_path": f"synthetic toy model of superposition ({about.get('cache')})"}
    return {
        "model_name": about["model_name"],
        "hook_name": about["hook_name"],
        "context_size": about["context_size"],
        "prepend_bos": about["prepend_bos"],
        "dataset_path": about["dataset"],
        "seqpos_slice": [1, None],
        "sequence_separator_token": "bos",
        "disable_concat_sequences": False,
        "exclude_special_tokens": False,
    }
