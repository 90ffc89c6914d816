"""Command line -> RunConfig. Flags of the original project keep their meaning.

Flags default to None so that we can tell what the user set: `--quick` changes the defaults,
never a value given explicitly.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from config.schema import (ARCHITECTURE_DEFAULTS, DEAD_HANDLING, OPTION_ARCHITECTURES, DataConfig, LogConfig,
                           RunConfig, SAEArmConfig, StudyConfig, TrainConfig, UsageError)

STUDIES = ("activations",)
ARCHITECTURES = tuple(ARCHITECTURE_DEFAULTS)
ALIASES = {"jump_relu": "jumprelu", "batch_topk": "batchtopk"}
HOOKS = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")
WANDB_MODES = ("online", "offline", "disabled")

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
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float_type(accept, requirement: str):
    """An argparse type: a float for which accept(value) holds, else 'must be <requirement>'."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


_positive_float = _float_type(lambda v: 0 < v < float("inf"), "a positive number")
_nonnegative_float = _float_type(lambda v: 0 <= v < float("inf"), "a non-negative number")
_fraction = _float_type(lambda v: 0 <= v < 1, "in [0, 1)")


def build_parser() -> argparse.ArgumentParser:
    d, s, t, lg = DataConfig(), SAEArmConfig(), TrainConfig(), LogConfig()
    p = OneLineParser(
        prog="run_experiments.py",
        description="Train sparse autoencoders on transformer activations and compare them. "
        "Outputs go to CHECKPOINT_DIR/<study-id>/ (study.json, per-arm metrics.csv and weights, "
        "summary.json); --use-wandb also logs every arm to Weights & Biases.",
    )
    study = p.add_argument_group("study")
    study.add_argument("--study", choices=STUDIES, help=f"which study to run (default: {StudyConfig().study})")
    study.add_argument("--study-id", help="name of the study folder under --checkpoint-dir "
                       "(default: <study>-<date>-<time>; with --resume, the study to continue)")
    study.add_argument("--resume", action="store_true", default=False,
                       help="continue the most recent unfinished study run with the same settings "
                       "(or the one named by --study-id) from its last checkpoints (default: off)")
    study.add_argument("--quick", action="store_true", default=False,
                       help="smoke run: small harvest, %d steps; explicit flags still win (default: off)" % QUICK_DEFAULTS["steps"])
    study.add_argument("--seed", type=_int, help=f"seed for data order, SAE init and everything else (default: {t.seed})")

    data = p.add_argument_group("activations")
    data.add_argument("--model-name", help=f"subject model: 'tinylm' (bundled, trained on first use) or a "
                      f"Hugging Face name or local path such as gpt2 (default: {d.model_name})")
    data.add_argument("--layer", type=_int, help=f"transformer block whose activations are read (default: {d.layer})")
    data.add_argument("--hook", choices=HOOKS, help=f"hook within the block; with --layer builds "
                      f"blocks.L.hook_<hook> (default: {d.hook})")
    data.add_argument("--hook-point", help="full TransformerLens hook name, e.g. blocks.1.hook_mlp_out; "
                      "overrides --layer/--hook (default: none)")
    data.add_argument("--n-samples", type=_positive_int, help=f"sequences to harvest (default: {d.n_samples})")
    data.add_argument("--seq-len", type=_positive_int, help=f"tokens per sequence, BOS included; the BOS "
                      f"position is not used for training (default: {d.seq_len})")
    data.add_argument("--dataset", help="text file (one document per line) or JSONL with a 'text' field to "
                      "harvest from (default: the bundled tinylm story corpus)")
    norm = data.add_mutually_exclusive_group()
    norm.add_argument("--normalize-activations", dest="normalize", action="store_true", default=None,
                      help="scale activations so their mean squared norm is d_in (default: on)")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false",
                      help="train on raw activations (default: off)")

    sae = p.add_argument_group("SAE")
    sae.add_argument("--activation", help=f"SAE architecture(s), comma-separated, or 'all': "
                     f"{', '.join(ARCHITECTURES)} (jump_relu is accepted for jumprelu); one arm each "
                     f"(default: {s.architecture})")
    sae.add_argument("--hidden-dim", type=_positive_int, help="number of SAE latents d_sae; overrides "
                     "--expansion-factor (default: expansion factor x d_in)")
    sae.add_argument("--expansion-factor", type=_positive_int, help=f"d_sae / d_in (default: {s.expansion_factor})")
    sae.add_argument("--k", type=_positive_int, help=f"active latents per token for topk, and on average for "
                     f"batchtopk (default: {ARCHITECTURE_DEFAULTS['topk']['k']})")
    coef = {arch: ARCHITECTURE_DEFAULTS[arch]["sparsity_coef"] for arch in ("relu", "gated", "jumprelu")}
    sae.add_argument("--l1-coefficient", type=_nonnegative_float, help=f"L1 penalty weight for relu and gated, "
                     f"warmed up over the first 5%% of steps (default: relu {coef['relu']:g}, gated {coef['gated']:g})")
    sae.add_argument("--l0-coefficient", type=_nonnegative_float, help=f"L0 penalty weight for jumprelu, warmed up "
                     f"over the first 5%% of steps (default: {coef['jumprelu']:g})")
    sae.add_argument("--target-l0", type=_positive_float, help="jumprelu: penalise (L0/target - 1)^2 instead of "
                     "L0, steering the arm to this L0 (default: off)")
    sae.add_argument("--dead-handling", choices=sorted({m for ms in DEAD_HANDLING.values() for m in ms}),
                     help="what to do about dead latents: auxk = auxiliary TopK loss on dead latents (Gao et al. "
                     "2024; topk, batchtopk), resample = re-initialise them from badly reconstructed inputs at the "
                     "end of each dead window (Anthropic 2023; any architecture), none (default: auxk for the TopK "
                     "family, resample for the others)")
    dead = sae.add_mutually_exclusive_group()
    dead.add_argument("--dead-resample", dest="dead_resample", action="store_true", default=None,
                      help="revive dead latents during training, with the architecture's default method "
                      "(see --dead-handling) (default: on)")
    dead.add_argument("--no-dead-resample", dest="dead_resample", action="store_false",
                      help="leave dead latents alone, same as --dead-handling none (default: off)")
    sae.add_argument("--dead-threshold", type=_fraction, help=f"firing frequency within the dead window "
                     f"below which a latent counts as dead (default: {t.dead_threshold})")
    sae.add_argument("--dead-window", type=_positive_int, help=f"training tokens over which firing frequency is "
                     f"counted to decide which latents are dead (default: {t.dead_window:,}; --quick: "
                     f"{QUICK_DEFAULTS['dead_window']:,})")

    train = p.add_argument_group("training")
    train.add_argument("--lr", type=_positive_float, help=f"Adam learning rate (default: {t.lr})")
    train.add_argument("--batch-size", type=_positive_int, help=f"tokens per SAE training batch (default: {t.batch_size})")
    train.add_argument("--epochs", type=_positive_int, help=f"passes over the training activations (default: {t.epochs})")
    train.add_argument("--steps", type=_positive_int, help="training steps; overrides --epochs (default: from --epochs)")
    train.add_argument("--device", help=f"torch device (default: {t.device})")

    log = p.add_argument_group("output and logging")
    log.add_argument("--checkpoint-dir", help=f"where studies, activation caches and tinylm live (default: {lg.checkpoint_dir})")
    log.add_argument("--use-wandb", action="store_true", default=False, help="log every arm to Weights & Biases (default: off)")
    log.add_argument("--wandb-project", help=f"W&B project (default: {lg.wandb_project})")
    log.add_argument("--wandb-mode", choices=WANDB_MODES, help="W&B mode (default: WANDB_MODE if set, else "
                     "online when logged in, offline otherwise)")
    log.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                     help="hide progress bars (default: shown)")
    return p


def _pick(explicit, quick_key: str | None, quick: bool, default):
    if explicit is not None:
        return explicit
    if quick and quick_key in QUICK_DEFAULTS:
        return QUICK_DEFAULTS[quick_key]
    return default


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    a = build_parser().parse_args(argv)
    q = a.quick
    d, s, t, lg = DataConfig(), SAEArmConfig(), TrainConfig(), LogConfig()

    data = DataConfig(
        model_name=_pick(a.model_name, None, q, d.model_name),
        layer=_pick(a.layer, None, q, d.layer),
        hook=_pick(a.hook, None, q, d.hook),
        hook_point=a.hook_point,
        n_samples=_pick(a.n_samples, "n_samples", q, d.n_samples),
        seq_len=_pick(a.seq_len, "seq_len", q, d.seq_len),
        dataset=a.dataset,
        normalize=_pick(a.normalize, None, q, d.normalize),
    )
    saes = [_arm_config(a, arch) for arch in _architectures(a.activation or s.architecture)]
    for option, archs in OPTION_ARCHITECTURES.items():
        if getattr(a, option) is not None and not any(c.architecture in archs for c in saes):
            flag = "--" + option.replace("_", "-")
            raise UsageError(f"{flag} applies to {', '.join(archs)}, not to {', '.join(c.architecture for c in saes)}")
    train = TrainConfig(
        lr=_pick(a.lr, None, q, t.lr),
        batch_size=_pick(a.batch_size, "batch_size", q, t.batch_size),
        epochs=_pick(a.epochs, None, q, t.epochs),
        steps=_pick(a.steps, "steps", q, t.steps),
        warmup_steps=_pick(None, "warmup_steps", q, t.warmup_steps),
        seed=_pick(a.seed, None, q, t.seed),
        dead_window=_pick(a.dead_window, "dead_window", q, t.dead_window),
        dead_threshold=_pick(a.dead_threshold, None, q, t.dead_threshold),
        eval_every=_pick(None, "eval_every", q, t.eval_every),
        log_every=_pick(None, "log_every", q, t.log_every),
        checkpoint_every=_pick(None, "checkpoint_every", q, t.checkpoint_every),
        ce_eval_sequences=_pick(None, "ce_eval_sequences", q, t.ce_eval_sequences),
        device=_pick(a.device, None, q, t.device),
    )
    log = LogConfig(
        use_wandb=a.use_wandb or a.wandb_mode is not None,
        wandb_project=a.wandb_project or lg.wandb_project,
        wandb_mode=a.wandb_mode,
        checkpoint_dir=a.checkpoint_dir or lg.checkpoint_dir,
        progress=a.progress,
    )
    study = StudyConfig(study=a.study or StudyConfig().study, study_id=a.study_id, resume=a.resume, quick=q)
    cfg = RunConfig(data=data, saes=saes, train=train, log=log, study=study)
    validate_static(cfg)
    return cfg


def _architectures(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(ARCHITECTURES)
    out: list[str] = []
    for name in names:
        name = ALIASES.get(name, name)
        if name not in ARCHITECTURES:
            raise UsageError(f"unknown --activation {name!r}; choose from {', '.join(ARCHITECTURES)}, or all")
        if name not in out:
            out.append(name)
    if not out:
        raise UsageError("--activation needs at least one architecture")
    return out


def _arm_config(a: argparse.Namespace, architecture: str) -> SAEArmConfig:
    """The arm for one architecture: its defaults, then the flags that apply to it."""
    overrides: dict = {}
    if a.expansion_factor is not None:
        overrides["expansion_factor"] = a.expansion_factor
    if a.hidden_dim is not None:
        overrides["hidden_dim"] = a.hidden_dim
    if a.k is not None and architecture in OPTION_ARCHITECTURES["k"]:
        overrides["k"] = a.k
    if a.l1_coefficient is not None and architecture in OPTION_ARCHITECTURES["l1_coefficient"]:
        overrides["sparsity_coef"] = a.l1_coefficient
    if a.l0_coefficient is not None and architecture in OPTION_ARCHITECTURES["l0_coefficient"]:
        overrides["sparsity_coef"] = a.l0_coefficient
    if a.target_l0 is not None and architecture in OPTION_ARCHITECTURES["target_l0"]:
        overrides["target_l0"] = a.target_l0
    cfg = SAEArmConfig.for_architecture(architecture, **overrides)
    allowed = DEAD_HANDLING[architecture]
    if a.dead_handling is not None:
        if a.dead_resample is not None and (a.dead_handling == "none") == a.dead_resample:
            flag = "--dead-resample" if a.dead_resample else "--no-dead-resample"
            raise UsageError(f"{flag} contradicts --dead-handling {a.dead_handling}")
        if a.dead_handling not in allowed:
            raise UsageError(f"--dead-handling {a.dead_handling} does not apply to {architecture}; "
                             f"it takes {', '.join(allowed)}")
        cfg.dead_handling = a.dead_handling
    elif a.dead_resample is False:
        cfg.dead_handling = "none"
    return cfg


def validate_static(cfg: RunConfig) -> None:
    """Checks that need no model; model-dependent ones (layer, hook, seq_len) happen at load."""
    if cfg.data.seq_len < 2:
        raise UsageError("--seq-len must be at least 2 (a BOS token and one text token)")
    if cfg.data.layer < 0:
        raise UsageError(f"--layer must be >= 0, got {cfg.data.layer}")
    n_eval = int(cfg.data.n_samples * cfg.data.eval_fraction)
    if n_eval < 1 or cfg.data.n_samples - n_eval < 1:
        raise UsageError(f"--n-samples {cfg.data.n_samples} is too small to split into train and eval sequences")
    for sae in cfg.saes:
        if sae.architecture in OPTION_ARCHITECTURES["k"] and sae.hidden_dim is not None and sae.k > sae.hidden_dim:
            raise UsageError(f"--k {sae.k} exceeds --hidden-dim {sae.hidden_dim}")
    if cfg.study.study_id is not None and (not cfg.study.study_id or "/" in cfg.study.study_id
                                           or cfg.study.study_id.startswith(".")
                                           or cfg.study.study_id in ("models", "activations")):
        raise UsageError(f"--study-id {cfg.study.study_id!r} is not a usable folder name")
    if cfg.train.device != "cpu" and not cfg.train.device.startswith(("cuda", "mps")):
        raise UsageError(f"unknown --device {cfg.train.device!r}; use cpu, cuda or cuda:N")
