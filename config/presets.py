"""Study presets (`config/studies/<study>.yaml`) and `--config FILE`, merged into study plans.

Settings come in layers, later ones winning:
    dataclass defaults < study preset < source preset < --quick < --config FILE < command-line flags.
The source preset (`config/studies/synthetic.yaml`, applied with `--source synthetic`) has the
form of a config file: it sets the toy model and the SAE settings that suit it, for every study.
A preset describes one study: which architectures, which dead-latent handling modes, an optional
sparsity sweep, and `sae`/`train` settings of its own (the resampling preset raises the learning
rate, for instance). A `--config` file holds any of the groups `data`, `train`, `sae`, `probes`,
`log`, `study`, plus `studies: {<study>: <preset keys>}` to change one study only.

Identical arms in different studies (same SAE and training settings) are one arm: the runner
trains it once and every study that lists it reads its results.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from models.sae.catalog import ALIASES, ARCHITECTURE_DEFAULTS, DEAD_HANDLING, DEAD_HANDLING_MODES, OPTION_ARCHITECTURES
from config.schema import (STUDY_NAMES, ArmSpec, DataConfig, LogConfig, ProbeConfig, SAEArmConfig, Setting, StudyPlan, SyntheticConfig,
                           TrainConfig, UsageError, check_setting, setting_of)

PRESET_DIR = Path(__file__).resolve().parent / "studies"
ARCHITECTURES = tuple(ARCHITECTURE_DEFAULTS)

# The penalty coefficients are named as the flags name them, because one value means different
# things per architecture (an L1 weight, an L0 weight).
SAE_KEY_FIELD = {"l1_coefficient": "sparsity_coef", "l0_coefficient": "sparsity_coef"}
PRESET_KEYS = ("description", "architectures", "dead_handling", "sparsity_sweep", "sae", "train")
GROUPS = {"data": DataConfig, "synthetic": SyntheticConfig, "train": TrainConfig, "probes": ProbeConfig,
          "log": LogConfig}
SOURCE_PRESET_KEYS = ("description", "synthetic", "sae", "train", "probes", "studies")
STUDY_KEYS = ("study", "study_id")
# Settings that must stay the same for every arm of a run (one cache, one device).
RUN_WIDE_TRAIN = ("seed", "device", "dtype", "ce_eval_sequences")
# The SAE settings a preset or --config file takes: SAEArmConfig's fields, the penalty coefficient under
# the names the flags give it.
SAE_KEYS = (*[f.name for f in dataclasses.fields(SAEArmConfig) if f.name not in ("architecture", "sparsity_coef")],
            *SAE_KEY_FIELD)
SWEEP_MULTIPLIER = Setting("float", rule="positive")
TEXT = Setting("str")


def _where(source: str, path: str) -> str:
    return f"{source}: {path}" if source else path


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a mapping of settings, got {type(value).__name__}")
    return value


def _check_group(values: Any, cls, source: str, path: str) -> dict:
    values = _mapping(values, _where(source, path))
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in values.items():
        if key not in names:
            raise UsageError(f"{_where(source, f'{path}.{key}')}: unknown setting; {path} takes {', '.join(names)}")
        out[key] = check_setting(setting_of(cls, key), value, _where(source, f"{path}.{key}"))
    return out


def _check_sae(values: Any, source: str, path: str, architecture: str | None = None) -> dict:
    """SAE settings shared by the architectures, with `<architecture>: {settings}` for one of them;
    there (`architecture` given), a setting it has no use for is refused, as its flag would be,
    where a shared one is left to the architectures it applies to."""
    values = _mapping(values, _where(source, path))
    out = {}
    for key, value in values.items():
        where = _where(source, f"{path}.{key}")
        if architecture is None and key in ARCHITECTURE_DEFAULTS:
            out[key] = _check_sae(value, source, f"{path}.{key}", architecture=key)
            continue
        if key not in SAE_KEYS:
            also = (f", or an architecture ({', '.join(ARCHITECTURE_DEFAULTS)}) with settings of its own"
                    if architecture is None else "")
            raise UsageError(f"{where}: unknown setting; {path} takes {', '.join(SAE_KEYS)}{also}")
        out[key] = check_setting(setting_of(SAEArmConfig, SAE_KEY_FIELD.get(key, key)), value, where)
        applies_to = OPTION_ARCHITECTURES.get(key, ())
        if architecture is not None and applies_to and architecture not in applies_to:
            raise UsageError(f"{where}: {key} applies to {', '.join(applies_to)}, not to {architecture}")
        if architecture is not None and key == "dead_handling" and value not in DEAD_HANDLING[architecture]:
            raise UsageError(f"{where}: {value} does not apply to {architecture}; it takes "
                             f"{', '.join(DEAD_HANDLING[architecture])}")
    return out


def parse_architectures(value: Any, where: str) -> list[str]:
    """'all', 'topk,relu' or a list of names (aliases allowed) -> distinct architecture names."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{where} must be 'all' or a list of architecture names, got {value!r}")
    names = [n.strip().lower() for n in names if n.strip()]
    if names == ["all"]:
        return list(ARCHITECTURES)
    out: list[str] = []
    for name in names:
        name = ALIASES.get(name, name)
        if name not in ARCHITECTURES:
            raise UsageError(f"{where}: unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}, or all")
        if name not in out:
            out.append(name)
    if not out:
        raise UsageError(f"{where} needs at least one architecture")
    return out


def _float_list(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where} must be a non-empty list of positive numbers, got {value!r}")
    return [check_setting(SWEEP_MULTIPLIER, v, f"{where}[{i}]") for i, v in enumerate(value)]


def check_preset(values: Any, source: str, path: str) -> dict:
    values = _mapping(values, _where(source, path))
    out: dict[str, Any] = {}
    for key, value in values.items():
        where = _where(source, f"{path}.{key}")
        if key not in PRESET_KEYS:
            raise UsageError(f"{where}: unknown setting; a study takes {', '.join(PRESET_KEYS)}")
        if key == "architectures":
            out[key] = parse_architectures(value, where)
        elif key == "dead_handling":
            modes = value if isinstance(value, list) else [value]
            allowed = sorted(DEAD_HANDLING_MODES)
            if not modes or any(m not in allowed for m in modes):
                raise UsageError(f"{where} must list modes from {', '.join(allowed)}, got {value!r}")
            out[key] = modes
        elif key == "sparsity_sweep":
            out[key] = _float_list(value, where)
        elif key == "sae":
            out[key] = _check_sae(value, source, f"{path}.sae")
        elif key == "train":
            out[key] = _check_group(value, TrainConfig, source, f"{path}.train")
        else:
            out[key] = check_setting(TEXT, value, _where(source, f"{path}.{key}"))
    return out


def read_yaml(path: Path, what: str) -> Any:
    """Parsed YAML (safe_load); an unreadable or malformed file is one UsageError line naming `what`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise UsageError(f"cannot read {what} {path}: {reason}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"{what} {path} is not valid YAML{at}: {problem}") from None


def load_yaml(path: Path, what: str) -> dict:
    return _mapping(read_yaml(path, what), f"{what} {path}")


def load_preset(study: str) -> dict:
    return check_preset(load_yaml(PRESET_DIR / f"{study}.yaml", "study preset"), f"preset {study}.yaml", study)


def load_source_preset(source: str) -> dict:
    """The preset of a non-default source (config/studies/<source>.yaml); {} for the transformer source."""
    if source == "transformer":
        return {}
    name = f"{source}.yaml"
    raw = load_yaml(PRESET_DIR / name, "source preset")
    for key in raw:
        if key not in SOURCE_PRESET_KEYS:
            raise UsageError(f"preset {name}: unknown key {key!r}; a source preset takes {', '.join(SOURCE_PRESET_KEYS)}")
    return _check_layer(raw, f"preset {name}")


def load_config_file(path: str) -> dict:
    """A --config file, checked: unknown groups or keys and wrongly typed values are errors."""
    return _check_layer(load_yaml(Path(path), "--config file"), path)


def _check_layer(raw: dict, path: str) -> dict:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in GROUPS:
            out[key] = _check_group(value, GROUPS[key], path, key)
        elif key == "sae":
            out[key] = _check_sae(value, path, "sae")
        elif key == "study":
            out[key] = value if isinstance(value, (str, list)) else check_setting(TEXT, value, f"{path}: study")
        elif key in ("study_id", "description"):
            out[key] = check_setting(TEXT, value, f"{path}: {key}")
        elif key == "studies":
            studies = _mapping(value, f"{path}: studies")
            for name in studies:
                if name not in STUDY_NAMES:
                    raise UsageError(f"{path}: studies.{name}: unknown study; choose from {', '.join(STUDY_NAMES)}")
            out[key] = {name: check_preset(v, path, f"studies.{name}") for name, v in studies.items()}
        else:
            raise UsageError(f"{path}: unknown key {key!r}; a config file takes "
                             f"{', '.join([*GROUPS, 'sae', *STUDY_KEYS, 'studies'])}")
    return out


def parse_studies(value: Any, where: str) -> list[str]:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{where} must be 'all' or study names, got {value!r}")
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(STUDY_NAMES)
    for name in names:
        if name not in STUDY_NAMES:
            raise UsageError(f"{where}: unknown study {name!r}; choose from {', '.join(STUDY_NAMES)}, or all")
    if not names:
        raise UsageError(f"{where} needs at least one study")
    return [n for n in STUDY_NAMES if n in names]


def _arm_sae(architecture: str, layers: list[dict], mode: str | None, multiplier: float) -> SAEArmConfig:
    """The arm's settings from `sae` layers, lowest first; within a layer, the architecture's own
    section wins over the shared settings."""
    fields: dict[str, Any] = {}
    for layer in layers:
        for key, value in {**layer, **layer.get(architecture, {})}.items():
            applies_to = OPTION_ARCHITECTURES.get(key)
            if key in ARCHITECTURE_DEFAULTS or key == "dead_handling" or (
                    applies_to is not None and architecture not in applies_to):
                continue
            fields[SAE_KEY_FIELD.get(key, key)] = value
    sae = SAEArmConfig.for_architecture(architecture, **fields)
    if mode is not None:
        sae.dead_handling = mode
    if multiplier != 1:
        # A sweep multiplies the sparsity budget: more active latents for a larger multiplier.
        if architecture in OPTION_ARCHITECTURES["k"]:
            sae.k = max(1, round(sae.k * multiplier))
        elif sae.target_l0 is not None:
            sae.target_l0 *= multiplier
        else:
            sae.sparsity_coef /= multiplier
    return sae


def _user_mode(stack: list[dict], architecture: str) -> str | None:
    """The dead-latent handling the user names for this architecture, which replaces a preset's list
    of modes: from the highest sae layer that names one, its architecture section winning within it."""
    for layer in reversed(stack):
        sae = layer.get("sae", {})
        mode = sae.get(architecture, {}).get("dead_handling") or sae.get("dead_handling")
        if mode:
            return mode
    return None


def _modes(architecture: str, user_mode: str | None, preset_modes: list[str] | None, where: str) -> list[str | None]:
    allowed = DEAD_HANDLING[architecture]
    if user_mode is not None:
        if user_mode == "revive":  # --dead-resample: the architecture's own way of reviving latents
            return [allowed[0]]
        if user_mode not in allowed:
            raise UsageError(f"{where} {user_mode} does not apply to {architecture}; it takes {', '.join(allowed)}")
        return [user_mode]
    if preset_modes is None:
        return [None]
    return [m for m in preset_modes if m in allowed]


def build_plans(studies: list[str], layers: list[dict], flags: dict) -> list[StudyPlan]:
    """One plan per study. `layers` are config-file-shaped dicts, lowest first (source preset,
    --quick, --config); each may hold `sae`, `train` and `studies: {study: preset keys}`, the
    study-specific part winning within its layer. `flags` is the command-line layer:
    'architectures', 'sparsity_sweep' (activations only), 'sae' and 'train' dicts of given values."""
    plans = []
    for study in studies:
        stack = [load_preset(study)]
        for layer in layers:
            stack += [layer, layer.get("studies", {}).get(study, {})]
        stack.append({**flags, "sparsity_sweep": flags.get("sparsity_sweep") if study == "activations" else None})

        def last(key: str):
            for layer in reversed(stack):
                value = layer.get(key)
                if value:
                    return value
            return None

        arches = last("architectures") or ["topk"]
        sweep = last("sparsity_sweep") or [1.0]
        train = TrainConfig(**{k: v for layer in stack for k, v in layer.get("train", {}).items()})
        where = "--dead-handling" if "dead_handling" in flags.get("sae", {}) else f"{study}: dead_handling"
        arms = [ArmSpec(_arm_sae(arch, [layer.get("sae", {}) for layer in stack], mode, m), train)
                for arch in arches for mode in _modes(arch, _user_mode(stack, arch), last("dead_handling"), where)
                for m in sweep]
        if not arms:
            raise UsageError(f"study {study}: no arm left (no dead-latent handling mode applies to "
                             f"{', '.join(arches)})")
        plans.append(StudyPlan(study, arms))
    return plans


def run_wide_train(plans: list[StudyPlan]) -> TrainConfig:
    """Training settings shared by the whole run; arms may not disagree on them."""
    first = plans[0].arms[0].train
    for plan in plans:
        for arm in plan.arms:
            for key in RUN_WIDE_TRAIN:
                if getattr(arm.train, key) != getattr(first, key):
                    raise UsageError(f"study {plan.name} sets train.{key} = {getattr(arm.train, key)!r}, but it must "
                                     f"be the same for every study of a run ({getattr(first, key)!r})")
    return first
