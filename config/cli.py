"""Command line -> RunConfig. Flags of the original project keep their meaning.

Flags default to None so that we can tell what the user set: `--quick` changes the defaults,
never a value given explicitly.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pathlib import Path

from config.presets import (ARCHITECTURES, build_plans, load_config_file, load_source_preset,
                            parse_architectures, parse_studies, run_wide_train)
from config.presets import SWEEP_MULTIPLIER
from config.schema import (ARCHITECTURE_DEFAULTS, DEAD_HANDLING_MODES, FREQUENCY_LAWS, HOOKS, OPTION_ARCHITECTURES, SOURCES,
                           STUDY_NAMES, WANDB_MODES, DataConfig, LogConfig, ProbeConfig, RunConfig, SAEArmConfig,
                           Setting, StudyConfig, SyntheticConfig, TrainConfig, UsageError, check_setting, setting_of)

# --quick: a smoke run that finishes in well under a minute once tinylm is cached.
QUICK_DEFAULTS = {
    "n_samples": 768,
    "seq_len": 32,
    "steps": 120,
    "batch_size": 512,
    "eval_every": 60,
    "checkpoint_every": 40,
    "log_every": 5,
    "warmup_steps": 10,
    "dead_window": 16_384,
    "ce_eval_sequences": 32,
    "n_tokens": 131_072,  # synthetic source
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _text(text: str) -> str:
    """A non-empty string: `--study-id ""` and the like would otherwise fall back to the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _setting(s: Setting):
    """An argparse type for a numeric setting, checked by the same check_setting as the YAML keys and
    the dataclasses: 'argument --lr: must be positive, got -1.0'."""
    def parse(text: str):
        if s.kind == "int":
            value = _int(text)
        else:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        try:
            return check_setting(s, value, "")
        except UsageError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _field(cls: type, name: str):
    """The argparse type of the flag that sets field `name` of `cls`."""
    return _setting(setting_of(cls, name))


def _multipliers(text: str) -> list[float]:
    values = [_setting(SWEEP_MULTIPLIER)(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("needs at least one multiplier, e.g. 0.5,1,2")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    d, s, t, lg = DataConfig(), SAEArmConfig(), TrainConfig(), LogConfig()
    p = OneLineParser(
        prog="run_experiments.py",
        description="Train sparse autoencoders on transformer activations and compare them. "
        "Outputs go to CHECKPOINT_DIR/<study-id>/ (study.json, per-arm metrics.csv and weights, "
        "summary.json); --use-wandb also logs every arm to Weights & Biases.",
    )
    pr = ProbeConfig()
    study = p.add_argument_group("study")
    study.add_argument("--study", type=_text, help=f"which studies to run, comma-separated: "
                       f"{', '.join(STUDY_NAMES)}, or all; arms shared by several studies are trained once "
                       f"(default: all)")
    study.add_argument("--config", type=_text, metavar="FILE", help="YAML file of settings (groups data, train, "
                       "sae, probes, log, study, studies); it overrides the study presets in config/studies/ and is "
                       "overridden by flags (default: none)")
    study.add_argument("--study-id", type=_text, help="name of the study folder under --checkpoint-dir "
                       "(default: <study>-<date>-<time>; with --resume, the study to continue)")
    study.add_argument("--report", type=_text, metavar="STUDY_ID", help="rebuild the report of a finished (or "
                           "partly finished) study under --checkpoint-dir from its files alone, then exit "
                           "(default: off)")
    study.add_argument("--docs", type=_text, metavar="FILE", help="with --report: also write the study's findings "
                       "(and its setup and main tables) into the Markdown FILE, between the lines '<!-- generated "
                       "summary (or results) from study STUDY_ID -->' and '<!-- end of generated -->', stamped with "
                       "the commit and date; this is how README.md and docs/results.md get their figures "
                       "(default: off)")
    study.add_argument("--resume", action="store_true", default=False,
                       help="continue the most recent unfinished study run with the same settings "
                       "(or the one named by --study-id) from its last checkpoints (default: off)")
    study.add_argument("--quick", action="store_true", default=False,
                       help="smoke run: small harvest, %d steps; explicit flags still win (default: off)" % QUICK_DEFAULTS["steps"])
    study.add_argument("--sequential-arms", action="store_true", default=False,
                       help="train arms one after another, each reading its own batches, instead of stepping arms "
                       "that share the activation cache, batch size and seed together over one batch read; the "
                       "results are the same, but each arm's are ready as soon as it finishes (default: off)")
    study.add_argument("--seed", type=_field(TrainConfig, "seed"), help=f"seed for data order, SAE init and everything else (default: {t.seed})")

    data = p.add_argument_group("activations")
    data.add_argument("--source", choices=SOURCES, help="where activations come from: a transformer's hook, or a "
                      "synthetic toy model of superposition whose true features are known (settings from "
                      "config/studies/synthetic.yaml, then the --n-features ... flags) (default: transformer)")
    data.add_argument("--model-name", type=_text, help=f"subject model: 'tinylm' (bundled, trained on first use) or a "
                      f"Hugging Face name or local path such as gpt2 (default: {d.model_name})")
    data.add_argument("--layer", type=_field(DataConfig, "layer"), help=f"transformer block whose activations are read (default: {d.layer})")
    data.add_argument("--hook", choices=HOOKS, help=f"hook within the block; with --layer builds "
                      f"blocks.L.hook_<hook> (default: {d.hook})")
    data.add_argument("--hook-point", type=_text, help="full TransformerLens hook name, e.g. blocks.1.hook_mlp_out; "
                      "overrides --layer/--hook (default: none)")
    data.add_argument("--n-samples", type=_field(DataConfig, "n_samples"), help=f"sequences to harvest (default: {d.n_samples})")
    data.add_argument("--seq-len", type=_field(DataConfig, "seq_len"), help=f"tokens per sequence, BOS included; the BOS "
                      f"position is not used for training (default: {d.seq_len})")
    data.add_argument("--dataset", type=_text, help="text file (one document per line) or JSONL with a 'text' field to "
                      "harvest from (default: the bundled tinylm story corpus)")
    norm = data.add_mutually_exclusive_group()
    norm.add_argument("--normalize-activations", dest="normalize", action="store_true", default=None,
                      help="scale activations so their mean squared norm is d_in (default: on)")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false",
                      help="train on raw activations (default: off)")

    sy, sy_preset = SyntheticConfig(), load_source_preset("synthetic").get("synthetic", {})

    def synth_default(name: str):
        return sy_preset.get(name, getattr(sy, name))

    synth = p.add_argument_group("synthetic source (--source synthetic)")
    synth.add_argument("--n-features", type=_field(SyntheticConfig, "n_features"), help=f"true features of the toy model "
                       f"(default: {synth_default('n_features')})")
    synth.add_argument("--d-in", type=_field(SyntheticConfig, "d_in"), help=f"dimension they are superposed in "
                       f"(default: {synth_default('d_in')})")
    synth.add_argument("--n-tokens", type=_field(SyntheticConfig, "n_tokens"), help=f"activation vectors generated, train and eval "
                       f"(default: {synth_default('n_tokens'):,}; --quick: {QUICK_DEFAULTS['n_tokens']:,})")
    synth.add_argument("--mean-l0", type=_field(SyntheticConfig, "mean_l0"), help=f"expected number of true features active per vector "
                       f"(default: {synth_default('mean_l0')})")
    synth.add_argument("--feature-frequency", choices=FREQUENCY_LAWS, help=f"firing probability across features: "
                       f"equal, or falling as rank^-zipf_exponent (default: {synth_default('frequency')}, exponent "
                       f"{synth_default('zipf_exponent')})")
    synth.add_argument("--noise-std", type=_field(SyntheticConfig, "noise_std"), help=f"Gaussian noise added per dimension "
                       f"(default: {synth_default('noise_std')}); correlated groups, hierarchies and magnitudes are "
                       f"set in the `synthetic` group of a --config file")

    sae = p.add_argument_group("SAE")
    sae.add_argument("--activation", type=_text, help=f"SAE architecture(s), comma-separated, or 'all': "
                     f"{', '.join(ARCHITECTURES)} (jump_relu is accepted for jumprelu); one arm each, in every "
                     f"study (default: the study preset's: all for activations, emergence and frequency, topk for "
                     f"resampling)")
    sae.add_argument("--sparsity-sweep", type=_multipliers, help="activations study: train each architecture at "
                     "several sparsity levels, e.g. 0.5,1,2, multiplying k (topk, batchtopk) or dividing the penalty "
                     "coefficient (relu, jumprelu, gated) (default: 1, no sweep)")
    sae.add_argument("--hidden-dim", type=_field(SAEArmConfig, "hidden_dim"), help="number of SAE latents d_sae; overrides "
                     "--expansion-factor (default: expansion factor x d_in)")
    sae.add_argument("--expansion-factor", type=_field(SAEArmConfig, "expansion_factor"), help=f"d_sae / d_in (default: {s.expansion_factor})")
    sae.add_argument("--k", type=_field(SAEArmConfig, "k"), help=f"active latents per token for topk, and on average for "
                     f"batchtopk (default: {ARCHITECTURE_DEFAULTS['topk']['k']})")
    coef = {arch: ARCHITECTURE_DEFAULTS[arch]["sparsity_coef"] for arch in ("relu", "gated", "jumprelu")}
    sae.add_argument("--l1-coefficient", type=_field(SAEArmConfig, "sparsity_coef"), help=f"L1 penalty weight for relu and gated, "
                     f"warmed up over the first 5%% of steps (default: relu {coef['relu']:g}, gated {coef['gated']:g})")
    sae.add_argument("--l0-coefficient", type=_field(SAEArmConfig, "sparsity_coef"), help=f"L0 penalty weight for jumprelu (of the "
                     f"target penalty while --target-l0 is set), warmed up over the first 5%% of steps (default: "
                     f"{coef['jumprelu']:g}; --source synthetic: 0.0156)")
    sae.add_argument("--target-l0", type=_field(SAEArmConfig, "target_l0"), help="jumprelu: penalise (L0/target - 1)^2 instead of "
                     "L0, steering the arm to this L0 (default: off)")
    sae.add_argument("--dead-handling", choices=sorted(DEAD_HANDLING_MODES),
                     help="what to do about dead latents (no firing in --dead-window tokens): auxk = auxiliary TopK "
                     "loss that trains dead latents on the residual (Gao et al. 2024; TopK family), resample = "
                     "re-initialise them from badly reconstructed inputs each time another dead window has passed "
                     "(Anthropic 2023; any architecture), none (default: auxk for the TopK family; none for relu, "
                     "jumprelu and gated, as SAELens and dictionary_learning train them)")
    dead = sae.add_mutually_exclusive_group()
    dead.add_argument("--dead-resample", dest="dead_resample", action="store_true", default=None,
                      help="revive dead latents during training: AuxK for the TopK family, resampling for the "
                      "others (default: on for the TopK family, off for the others)")
    dead.add_argument("--no-dead-resample", dest="dead_resample", action="store_false",
                      help="leave dead latents alone, same as --dead-handling none (default: see --dead-resample)")
    sae.add_argument("--dead-window", type=_field(TrainConfig, "dead_window"), help=f"a latent that has not fired in this many training "
                     f"tokens counts as dead (for AuxK and resampling, which revives the dead latents each time "
                     f"another window has passed) (default: {t.dead_window:,}; --quick: "
                     f"{QUICK_DEFAULTS['dead_window']:,})")
    sae.add_argument("--matryoshka-levels", type=_field(SAEArmConfig, "matryoshka_levels"), help=f"matryoshka: nested prefixes of the dictionary "
                     f"that must each reconstruct the input, of d_sae / 2^(levels-1), ..., d_sae / 2, d_sae latents "
                     f"(default: {s.matryoshka_levels})")
    sae.add_argument("--aux-k", type=_field(SAEArmConfig, "aux_k"), help="AuxK (topk, batchtopk): dead latents per token that learn "
                     "to reconstruct the residual (default: d_in / 2, as Gao et al. 2024)")

    probes = p.add_argument_group("probes (emergence and frequency studies)")
    probes.add_argument("--concepts", type=_text, metavar="FILE", help="YAML of concept word lists "
                        "{category: [words]} to score latents against (default: tinylm's grammar vocabularies for "
                        "tinylm, config/concepts/english.yaml for other models)")
    probes.add_argument("--probe-k", type=_field(ProbeConfig, "probe_k"), help=f"latents in the k-sparse concept probe (default: {pr.probe_k})")
    probes.add_argument("--f1-threshold", type=_field(ProbeConfig, "f1_threshold"), help=f"held-out F1 at which a concept counts as "
                        f"emerged (default: {pr.f1_threshold})")
    probes.add_argument("--cos-threshold", type=_field(ProbeConfig, "cos_threshold"), help=f"synthetic source: |cos| between a decoder row "
                        f"and a true feature at which the feature counts as recovered (frac_recovered) and emerged "
                        f"(default: {pr.cos_threshold})")

    train = p.add_argument_group("training")
    train.add_argument("--lr", type=_field(TrainConfig, "lr"), help=f"Adam learning rate (default: {t.lr})")
    train.add_argument("--batch-size", type=_field(TrainConfig, "batch_size"), help=f"tokens per SAE training batch (default: {t.batch_size})")
    train.add_argument("--epochs", type=_field(TrainConfig, "epochs"), help=f"passes over the training activations (default: {t.epochs})")
    train.add_argument("--steps", type=_field(TrainConfig, "steps"), help="training steps; overrides --epochs (default: from --epochs)")
    train.add_argument("--device", type=_text, help=f"torch device (default: {t.device})")

    log = p.add_argument_group("output and logging")
    log.add_argument("--checkpoint-dir", type=_text, help=f"where studies, activation caches and tinylm live "
                     f"(default: {lg.checkpoint_dir})")
    log.add_argument("--use-wandb", action="store_true", default=False, help="log every arm to Weights & Biases (default: off)")
    log.add_argument("--wandb-project", type=_text, help=f"W&B project (default: {lg.wandb_project})")
    log.add_argument("--wandb-mode", choices=WANDB_MODES, help="W&B mode (default: WANDB_MODE if set, else "
                     "online when logged in, offline otherwise)")
    log.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                     help="hide progress bars (default: shown)")
    return p


QUICK_SYNTHETIC = ("n_tokens",)
QUICK_TRAIN = ("steps", "batch_size", "eval_every", "checkpoint_every", "log_every", "warmup_steps", "dead_window",
               "ce_eval_sequences")
TRANSFORMER_FLAGS = ("model_name", "layer", "hook", "hook_point", "n_samples", "seq_len", "dataset")
DATA_FLAGS = (*TRANSFORMER_FLAGS, "source", "normalize")
SYNTHETIC_FLAGS = {"n_features": "n_features", "d_in": "d_in", "n_tokens": "n_tokens", "mean_l0": "mean_l0",
                   "feature_frequency": "frequency", "noise_std": "noise_std"}
TRAIN_FLAGS = ("lr", "batch_size", "epochs", "steps", "seed", "dead_window", "device")
SAE_FLAGS = ("expansion_factor", "hidden_dim", "k", "aux_k", "matryoshka_levels", "l1_coefficient", "l0_coefficient",
             "target_l0")
PROBE_FLAGS = ("concepts", "probe_k", "f1_threshold", "cos_threshold")


def _given(a: argparse.Namespace, names: Sequence[str]) -> dict:
    return {n: getattr(a, n) for n in names if getattr(a, n) is not None}


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    a = build_parser().parse_args(argv)
    config = load_config_file(a.config) if a.config else {}
    source = a.source or config.get("data", {}).get("source", "transformer")
    _check_source_flags(a, source)
    source_preset = load_source_preset(source)
    quick = {k: v for k, v in QUICK_DEFAULTS.items() if a.quick}
    quick_train = {k: v for k, v in quick.items() if k in QUICK_TRAIN}
    quick_synthetic = {k: v for k, v in quick.items() if k in QUICK_SYNTHETIC}
    quick_data = {k: v for k, v in quick.items() if k not in QUICK_TRAIN and k not in QUICK_SYNTHETIC}

    data = DataConfig(**{**quick_data, **config.get("data", {}), **_given(a, DATA_FLAGS)})
    synthetic = SyntheticConfig(**{**source_preset.get("synthetic", {}), **quick_synthetic,
                                   **config.get("synthetic", {}),
                                   **{field: getattr(a, flag) for flag, field in SYNTHETIC_FLAGS.items()
                                      if getattr(a, flag) is not None}})
    studies = parse_studies(a.study or config.get("study") or "all", "--study" if a.study else "study")

    flag_sae = _given(a, SAE_FLAGS)
    if a.dead_handling is not None:
        if a.dead_resample is not None and (a.dead_handling == "none") == a.dead_resample:
            flag = "--dead-resample" if a.dead_resample else "--no-dead-resample"
            raise UsageError(f"{flag} contradicts --dead-handling {a.dead_handling}")
        flag_sae["dead_handling"] = a.dead_handling
    elif a.dead_resample is not None:
        flag_sae["dead_handling"] = "revive" if a.dead_resample else "none"
    flags = {"sae": flag_sae, "train": _given(a, TRAIN_FLAGS),
             "architectures": parse_architectures(a.activation, "--activation") if a.activation else None,
             "sparsity_sweep": a.sparsity_sweep}
    if a.sparsity_sweep and "activations" not in studies:
        raise UsageError("--sparsity-sweep applies to the activations study, which is not part of this run")
    plans = build_plans(studies, [source_preset, {"train": quick_train}, config], flags)
    arms = [arm.sae for plan in plans for arm in plan.arms]
    for option, archs in OPTION_ARCHITECTURES.items():
        if getattr(a, option) is not None and not any(s.architecture in archs for s in arms):
            flag = "--" + option.replace("_", "-")
            raise UsageError(f"{flag} applies to {', '.join(archs)}, not to "
                             f"{', '.join(dict.fromkeys(s.architecture for s in arms))}")

    lg = LogConfig(**config.get("log", {}))
    log = LogConfig(
        use_wandb=a.use_wandb or a.wandb_mode is not None or lg.use_wandb,
        wandb_project=a.wandb_project or lg.wandb_project,
        wandb_mode=a.wandb_mode or lg.wandb_mode,
        checkpoint_dir=a.checkpoint_dir or lg.checkpoint_dir,
        progress=a.progress and lg.progress,
    )
    probes = ProbeConfig(**{**source_preset.get("probes", {}), **config.get("probes", {}), **_given(a, PROBE_FLAGS)})
    study = StudyConfig(names=studies, study_id=a.study_id or config.get("study_id"), resume=a.resume, quick=a.quick,
                        lockstep=not a.sequential_arms,
                        report=a.report, docs=a.docs)
    if a.docs is not None and a.report is None:
        raise UsageError("--docs works with --report STUDY_ID: it writes that study's results into the file")
    cfg = RunConfig(data=data, synthetic=synthetic, plans=plans, train=run_wide_train(plans), probes=probes, log=log, study=study)
    validate_static(cfg)
    return cfg


def _check_source_flags(a: argparse.Namespace, source: str) -> None:
    """Flags of the other source would have no effect: say so rather than ignore them."""
    other = TRANSFORMER_FLAGS if source == "synthetic" else SYNTHETIC_FLAGS
    for name in other:
        if getattr(a, name) is not None:
            raise UsageError(f"--{name.replace('_', '-')} does not apply to --source {source}")
    if source == "synthetic" and a.concepts is not None:
        raise UsageError("--concepts does not apply to --source synthetic: its concepts are the true features")


def validate_static(cfg: RunConfig) -> None:
    """Checks that need no model; model-dependent ones (layer, hook, seq_len) happen at load."""
    flag, n, unit = (("--n-tokens", cfg.synthetic.n_tokens, "vectors") if cfg.data.source == "synthetic"
                     else ("--n-samples", cfg.data.n_samples, "sequences"))
    n_eval = int(n * cfg.data.eval_fraction)
    if n_eval < 1 or n - n_eval < 1:
        raise UsageError(f"{flag} {n} is too small to split into train and eval {unit}")
    for arm in cfg.arms:
        if arm.sae.hidden_dim is not None:  # known before the model is: checked now, not after the harvest
            arm.sae.check_k(arm.sae.hidden_dim, f"--hidden-dim {arm.sae.hidden_dim}")
    if cfg.study.study_id is not None and (not cfg.study.study_id or "/" in cfg.study.study_id
                                           or cfg.study.study_id.startswith(".")
                                           or cfg.study.study_id in ("models", "activations")):
        raise UsageError(f"--study-id {cfg.study.study_id!r} is not a usable folder name")
    if cfg.study.study_id is not None and (Path(cfg.log.checkpoint_dir) / cfg.study.study_id).is_file():
        raise UsageError(f"--study-id {cfg.study.study_id!r} names a file in {cfg.log.checkpoint_dir}, "
                         f"not a study folder")
    if cfg.train.device != "cpu" and not cfg.train.device.startswith(("cuda", "mps")):
        raise UsageError(f"unknown --device {cfg.train.device!r}; use cpu, cuda or cuda:N")
    if cfg.probes.concepts is not None and not Path(cfg.probes.concepts).is_file():
        raise UsageError(f"--concepts {cfg.probes.concepts}: no such file")
