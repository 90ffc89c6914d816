"""Command line -> RunConfig. Flags of the original project keep their meaning.

Flags default to None so that we can tell what the user set: `--quick` changes the defaults,
never a value given explicitly.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any, Sequence

from pathlib import Path

from config.presets import (ARCHITECTURES, build_plans, load_config_file, load_source_preset,
                            parse_architectures, parse_studies, run_wide_train)
from config.presets import SWEEP_MULTIPLIER
from models.sae.catalog import ARCHITECTURE_DEFAULTS, DEAD_HANDLING_MODES, OPTION_ARCHITECTURES
from config.schema import (FREQUENCY_LAWS, STUDY_NAMES, DataConfig, LogConfig, ProbeConfig, RunConfig, SAEArmConfig,
                           Setting, StudyConfig, SyntheticConfig, TrainConfig, UsageError, check_setting, setting_of)

# --quick: a smoke run of every study, about 20 s on 2 cores once tinylm is cached (docs/usage.md).
QUICK_DEFAULTS = {
    "n_samples": 768,
    "seq_len": 32,
    "steps": 120,
    # 120 steps of 256 see the train split about 1.4 times. At 512 (2.8 times) training took 10.5 of
    # the run's 23 s; at 256 its arms lose 0.002-0.016 of explained variance and the findings name
    # the same best arms, bar one (docs/usage.md, "--quick").
    "batch_size": 256,
    "eval_every": 60,
    "checkpoint_every": 40,
    "log_every": 5,
    "warmup_steps": 10,
    "dead_window": 16_384,
    "ce_eval_sequences": 32,
    "n_tokens": 131_072,  # synthetic source
    "umap_evals": 1,  # the final eval's decoder directions only
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
    """An argparse type for a numeric or list setting, checked by the same check_setting as the YAML keys
    and the dataclasses: 'argument --lr: must be positive, got -1.0'."""
    def parse(text: str):
        if s.parse:
            value = text
        elif s.kind == "int":
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


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return "none" if value is None else str(value)


def _flag(group, cls: type, name: str, *, default: Any = None, quick: Any = None, metavar: str | None = None) -> None:
    """Add the flag --<name> that sets field `name` of `cls`, with the type or choices, range, help and
    default of the field table (config/schema.py). `default` replaces the field's default where a
    preset changes it; `quick` is the --quick default."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    s = setting_of(cls, name)
    kind = {"choices": s.choices} if s.choices else {
        "type": _setting(s) if s.kind in ("int", "float") or s.parse else _text}
    metavar = metavar or ("LIST" if s.parse else None)
    shown = f.metadata["shown"] or _shown(f.default if default is None else default)
    if quick is not None:
        shown += f"; --quick: {_shown(quick)}"
    group.add_argument("--" + name.replace("_", "-"), help=f"{f.metadata['help']} (default: {shown})".replace("%", "%%"),
                       metavar=metavar, **kind)


def _multipliers(text: str) -> list[float]:
    values = [_setting(SWEEP_MULTIPLIER)(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("needs at least one multiplier, e.g. 0.5,1,2")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="run_experiments.py",
        description="Train sparse autoencoders on transformer activations and compare them. "
        "Outputs go to CHECKPOINT_DIR/<study-id>/ (study.json, per-arm metrics.csv and weights, "
        "summary.json); --use-wandb also logs every arm to Weights & Biases.",
    )
    study = p.add_argument_group("study")
    study.add_argument("--study", type=_text, help=f"which studies to run, comma-separated: "
                       f"{', '.join(STUDY_NAMES)}, or all; arms shared by several studies are trained once "
                       f"(default: all)")
    study.add_argument("--config", type=_text, metavar="FILE", help="YAML file of settings (groups data, train, "
                       "sae, probes, log, study, studies); it overrides the study presets in config/studies/ and is "
                       "overridden by flags (default: none)")
    _flag(study, StudyConfig, "study_id")
    study.add_argument("--report", type=_text, metavar="STUDY_ID", help="rebuild the report of a finished (or "
                           "partly finished) study under --checkpoint-dir from its files alone, then exit "
                           "(default: off)")
    study.add_argument("--docs", type=_text, metavar="FILE", help="with --report: also write the study's findings "
                       "(and its setup and main tables) into the Markdown FILE, between the lines '<!-- generated "
                       "summary (or results) from study STUDY_ID -->' and '<!-- end of generated -->', stamped with "
                       "the commit and date; this is how README.md and docs/results.md get their figures "
                       "(default: off)")
    _flag(study, StudyConfig, "search", metavar="WORD")
    _flag(study, StudyConfig, "arm", metavar="NAME")
    _flag(study, StudyConfig, "export")
    _flag(study, StudyConfig, "out", metavar="DIR")
    _flag(study, StudyConfig, "serve", metavar="STUDY_ID")
    _flag(study, StudyConfig, "port")
    _flag(study, StudyConfig, "host")
    study.add_argument("--resume", action="store_true", default=False,
                       help="continue the most recent unfinished study run with the same settings "
                       "(or the one named by --study-id) from its last checkpoints (default: off)")
    study.add_argument("--quick", action="store_true", default=False,
                       help="smoke run: small harvest, %d steps of %d tokens, UMAP at the final eval only; explicit "
                       "flags still win (default: off)" % (QUICK_DEFAULTS["steps"], QUICK_DEFAULTS["batch_size"]))
    study.add_argument("--sequential-arms", action="store_true", default=False,
                       help="train arms one after another, each reading its own batches, instead of stepping arms "
                       "that share the activation cache, batch size and seed together over one batch read; the "
                       "results are the same, but each arm's are ready as soon as it finishes (default: off)")
    _flag(study, StudyConfig, "parallel_arms")
    _flag(study, TrainConfig, "seed")

    data = p.add_argument_group("activations")
    for name in ("source", "model_name", "layer", "hook", "hook_point", "n_samples", "seq_len", "dataset"):
        _flag(data, DataConfig, name)
    norm = data.add_mutually_exclusive_group()
    norm.add_argument("--normalize-activations", dest="normalize", action="store_true", default=None,
                      help="scale activations so their mean squared norm is d_in (default: on)")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false",
                      help="train on raw activations (default: off)")

    sy, sy_preset = SyntheticConfig(), load_source_preset("synthetic").get("synthetic", {})

    def synth_default(name: str):
        return sy_preset.get(name, getattr(sy, name))

    synth = p.add_argument_group("synthetic source (--source synthetic)", "correlated groups, hierarchies and "
                                 "magnitudes are set in the `synthetic` group of a --config file")
    for name in ("n_features", "d_in", "n_tokens", "mean_l0"):
        _flag(synth, SyntheticConfig, name, default=synth_default(name), quick=QUICK_DEFAULTS.get(name))
    synth.add_argument("--feature-frequency", choices=FREQUENCY_LAWS, help=f"firing probability across features: "
                       f"equal, or falling as rank^-zipf_exponent (default: {synth_default('frequency')}, exponent "
                       f"{synth_default('zipf_exponent')})")
    _flag(synth, SyntheticConfig, "noise_std", default=synth_default("noise_std"))
    sae = p.add_argument_group("SAE")
    sae.add_argument("--activation", type=_text, help=f"SAE architecture(s), comma-separated, or 'all': "
                     f"{', '.join(ARCHITECTURES)} (jump_relu is accepted for jumprelu); one arm each, in every "
                     f"study (default: the study preset's: all for activations, emergence and frequency, topk for "
                     f"resampling)")
    sae.add_argument("--sparsity-sweep", type=_multipliers, help="activations study: train each architecture at "
                     "several sparsity levels, e.g. 0.5,1,2, multiplying k (topk, batchtopk) or dividing the penalty "
                     "coefficient (relu, jumprelu, gated) (default: 1, no sweep)")
    for name in ("hidden_dim", "expansion_factor", "k"):
        _flag(sae, SAEArmConfig, name)
    coef = {arch: ARCHITECTURE_DEFAULTS[arch]["sparsity_coef"] for arch in ("relu", "gated", "jumprelu")}
    sae.add_argument("--l1-coefficient", type=_setting(setting_of(SAEArmConfig, "sparsity_coef")), help=f"L1 penalty weight for relu and gated, "
                     f"warmed up over the first 5%% of steps (default: relu {coef['relu']:g}, gated {coef['gated']:g})")
    sae.add_argument("--l0-coefficient", type=_setting(setting_of(SAEArmConfig, "sparsity_coef")), help=f"L0 penalty weight for jumprelu (of the "
                     f"target penalty while --target-l0 is set), warmed up over the first 5%% of steps (default: "
                     f"{coef['jumprelu']:g}; --source synthetic: 0.0156)")
    _flag(sae, SAEArmConfig, "target_l0")
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
    _flag(sae, TrainConfig, "dead_window", quick=QUICK_DEFAULTS["dead_window"])
    _flag(sae, SAEArmConfig, "matryoshka_levels")
    _flag(sae, SAEArmConfig, "aux_k")
    probes = p.add_argument_group("probes (emergence and frequency studies)")
    _flag(probes, ProbeConfig, "concepts", metavar="FILE")
    for name in ("probe_k", "f1_threshold", "cos_threshold"):
        _flag(probes, ProbeConfig, name)
    train = p.add_argument_group("training")
    for name in ("lr", "batch_size", "epochs", "steps", "device", "dtype"):
        _flag(train, TrainConfig, name)
    cluster = p.add_argument_group("executor (docs/cluster.md)")
    for name in CLUSTER_FLAGS:
        _flag(cluster, StudyConfig, name)
    log = p.add_argument_group("output and logging")
    _flag(log, LogConfig, "checkpoint_dir")
    log.add_argument("--use-wandb", action="store_true", default=False, help="log every arm to Weights & Biases (default: off)")
    _flag(log, LogConfig, "wandb_project")
    _flag(log, LogConfig, "wandb_mode")
    log.add_argument("--wandb-checkpoints", action="store_true", default=False,
                     help="with --use-wandb: log every checkpoint of every arm as a W&B artifact of type model "
                          "(checkpoint-<arm folder>, alias step-N), besides the final SAE that every W&B run logs "
                          "(sae-<arm folder>, alias final) (default: off)")
    log.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                     help="hide progress bars (default: shown)")
    return p


QUICK_SYNTHETIC = ("n_tokens",)
QUICK_PROBES = ("umap_evals",)
QUICK_TRAIN = ("steps", "batch_size", "eval_every", "checkpoint_every", "log_every", "warmup_steps", "dead_window",
               "ce_eval_sequences")
TRANSFORMER_FLAGS = ("model_name", "layer", "hook", "hook_point", "n_samples", "seq_len", "dataset")
DATA_FLAGS = (*TRANSFORMER_FLAGS, "source", "normalize")
SYNTHETIC_FLAGS = {"n_features": "n_features", "d_in": "d_in", "n_tokens": "n_tokens", "mean_l0": "mean_l0",
                   "feature_frequency": "frequency", "noise_std": "noise_std"}
TRAIN_FLAGS = ("lr", "batch_size", "epochs", "steps", "seed", "dead_window", "device", "dtype")
SAE_FLAGS = ("expansion_factor", "hidden_dim", "k", "aux_k", "matryoshka_levels", "l1_coefficient", "l0_coefficient",
             "target_l0")
PROBE_FLAGS = ("concepts", "probe_k", "f1_threshold", "cos_threshold")
CLUSTER_FLAGS = ("executor", "ray_address", "cpus_per_arm", "gpus_per_arm", "max_retries")


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
    quick_probes = {k: v for k, v in quick.items() if k in QUICK_PROBES}
    quick_data = {k: v for k, v in quick.items() if k not in (*QUICK_TRAIN, *QUICK_SYNTHETIC, *QUICK_PROBES)}

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
        wandb_checkpoints=a.wandb_checkpoints or lg.wandb_checkpoints,
    )
    if log.wandb_checkpoints and not log.use_wandb:
        raise UsageError("--wandb-checkpoints works with --use-wandb: it logs the checkpoints to the W&B runs")
    probes = ProbeConfig(**{**source_preset.get("probes", {}), **quick_probes, **config.get("probes", {}),
                            **_given(a, PROBE_FLAGS)})
    study = StudyConfig(names=studies, study_id=a.study_id or config.get("study_id"), resume=a.resume, quick=a.quick,
                        lockstep=not a.sequential_arms, **_given(a, ("parallel_arms",)),
                        report=a.report, docs=a.docs, search=a.search, arm=a.arm,
                        export=a.export, out=a.out, serve=a.serve,
                        **{k: v for k, v in (("port", a.port), ("host", a.host)) if v is not None},
                        **_given(a, CLUSTER_FLAGS))
    for name in CLUSTER_FLAGS[1:]:
        if getattr(a, name) is not None and study.executor != "ray":
            raise UsageError(f"--{name.replace('_', '-')} works with --executor ray: it says how arms run on Ray")
    modes = [flag for flag, value in (("--report", a.report), ("--search", a.search), ("--export", a.export),
                                      ("--serve", a.serve)) if value is not None]
    if len(modes) > 1 or (modes and a.resume):
        raise UsageError(f"{' and '.join(modes + ['--resume'] * a.resume)} do not combine: each is a command of its "
                         f"own (--resume runs a study); give one")
    for flag, value in (("--search", a.search), ("--export", a.export)):
        if value is not None and a.study_id is None:
            raise UsageError(f"{flag} needs --study-id: the study whose arms to use")
    if a.arm is not None and a.search is None and a.export is None:
        raise UsageError("--arm works with --search WORD or --export FORMAT: it picks one arm of the study")
    if a.out is not None and a.export is None:
        raise UsageError("--out works with --export FORMAT: it is the folder the export is written to")
    for flag, value in (("--port", a.port), ("--host", a.host)):
        if value is not None and a.serve is None:
            raise UsageError(f"{flag} works with --serve STUDY_ID: it says where the explorer listens")
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


def _check_ray_resources(study: StudyConfig, device: str) -> None:
    """What each arm's task reserves must fit what it uses, in the units Ray takes."""
    for flag, value in (("--cpus-per-arm", study.cpus_per_arm), ("--gpus-per-arm", study.gpus_per_arm)):
        if round(value, 4) != value:
            raise UsageError(f"{flag} {value:g}: Ray takes at most 4 decimal places")
    if device.startswith("cuda:"):
        raise UsageError(f"--device {device} with --executor ray: Ray gives each task its GPUs; use --device cuda")
    if device == "cuda" and study.gpus_per_arm == 0:
        raise UsageError("--device cuda with --executor ray needs --gpus-per-arm (1, or 0.5 for two arms on a GPU)")
    if study.gpus_per_arm > 0 and device != "cuda":
        raise UsageError(f"--gpus-per-arm reserves GPUs that --device {device} does not use; add --device cuda")


def validate_static(cfg: RunConfig) -> None:
    """Checks that need no model; model-dependent ones (layer, hook, seq_len) happen at load."""
    flag, n, unit = (("--n-tokens", cfg.synthetic.n_tokens, "vectors") if cfg.data.source == "synthetic"
                     else ("--n-samples", cfg.data.n_samples, "sequences"))
    n_eval = int(n * cfg.data.eval_fraction)
    if n_eval < 1 or n - n_eval < 1:
        raise UsageError(f"{flag} {n} is too small to split into train and eval {unit}")
    for arm in cfg.arms:
        if arm.sae.hidden_dim is not None:  # known before the model is: checked now, not after the harvest
            arm.sae.check_sizes(arm.sae.hidden_dim, f"--hidden-dim {arm.sae.hidden_dim}")
    if cfg.study.study_id is not None and (not cfg.study.study_id or "/" in cfg.study.study_id
                                           or cfg.study.study_id.startswith((".", "-"))
                                           or cfg.study.study_id in ("models", "activations")):
        raise UsageError(f"--study-id {cfg.study.study_id!r} is not a usable folder name")
    if cfg.study.study_id is not None and (Path(cfg.log.checkpoint_dir) / cfg.study.study_id).is_file():
        raise UsageError(f"--study-id {cfg.study.study_id!r} names a file in {cfg.log.checkpoint_dir}, "
                         f"not a study folder")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", cfg.train.device):
        raise UsageError(f"unknown --device {cfg.train.device!r}; use cpu, cuda or cuda:N")
    if cfg.study.executor == "ray":
        _check_ray_resources(cfg.study, cfg.train.device)
    if cfg.probes.concepts is not None and not Path(cfg.probes.concepts).is_file():
        raise UsageError(f"--concepts {cfg.probes.concepts}: no such file")
