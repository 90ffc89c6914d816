"""Typed configuration, grouped by concern: data, SAE, training, logging, study.

Each group is a small dataclass; `RunConfig` bundles them. `to_dict` gives the flat JSON form
stored in `study.json`, checkpoints and the W&B run config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from models.sae.catalog import ARCHITECTURE_DEFAULTS, DEAD_HANDLING_MODES, OPTION_ARCHITECTURES


class UsageError(Exception):
    """Bad user input: reported as one line with exit code 2, never as a traceback."""


# The field table: every setting's range is its field's `rule` (in its metadata; by default integers
# are positive and other numbers >= 0) or `choices`, and a setting the command line sets carries its
# flag's `help` (and `shown`, the default as --help words it when the value alone would not say it).
# The dataclasses check themselves with it, the flags (config/cli.py) take their type, range, help
# and default from it, and the YAML checks (config/presets.py) call the same check_setting, so a bad
# value gets the same message however it arrives.
RULES = {
    "positive": (lambda v: v > 0, "must be positive"),
    "non_negative": (lambda v: v >= 0, "must be >= 0"),
    "at_least_2": (lambda v: v >= 2, "must be >= 2"),
    "fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "unit": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "port": (lambda v: 0 <= v <= 65535, "must be in [0, 65535]"),
    "any": (lambda v: True, ""),
}


def option(default: Any, rule: str | None = None, *, choices: tuple[str, ...] | None = None, help: str | None = None,
           shown: str | None = None, parse: Callable[[Any, str], Any] | None = None) -> Any:
    """A dataclass field with its range (`rule` from RULES, `choices` for a string, or for a field
    that takes a list its own `parse(value, where)`) and, when a flag sets it, the flag's help and
    the default as --help shows it (`shown`; the value otherwise)."""
    return field(default=default, metadata={"rule": rule, "choices": choices, "help": help, "shown": shown,
                                            "parse": parse})


@dataclass(frozen=True)
class Setting:
    kind: str  # int | float | bool | str
    optional: bool = False  # None allowed
    rule: str | None = None  # RULES key; None: the kind's default
    choices: tuple[str, ...] | None = None
    parse: Callable[[Any, str], Any] | None = None  # a list field's parser: value (list or text), where -> value


def setting_of(cls: type, name: str) -> Setting:
    """The Setting of field `name` of the dataclass `cls`, from its annotation and metadata."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    annotation = str(f.type)
    return Setting(annotation.split("|")[0].strip(), "None" in annotation, f.metadata.get("rule"),
                   f.metadata.get("choices"), f.metadata.get("parse"))


def check_setting(s: Setting, value: Any, where: str) -> Any:
    """`value` checked against `s` (ints are accepted for floats, and converted); UsageError
    '<where> must be ..., got <value>' otherwise."""
    def bad(requirement: str, shown: Any = value) -> UsageError:
        return UsageError(f"{where} {requirement}, got {shown!r}".lstrip())

    if value is None:
        if s.optional:
            return None
        raise UsageError(f"{where} must not be empty".lstrip())
    if s.parse is not None:
        return s.parse(value, where)
    if s.kind == "bool":
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if s.kind == "str":
        if not isinstance(value, str):
            raise bad("must be a string")
        if not value.strip():  # an empty path or name would silently mean the default or the cwd
            raise UsageError(f"{where} must not be empty".lstrip())
        if s.choices is not None and value not in s.choices:
            raise bad(f"must be one of {', '.join(s.choices)}")
        return value
    if s.kind not in ("int", "float"):
        return value  # lists and groups are checked by their own code
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (s.kind == "int" and not isinstance(value, int)):
        raise bad("must be an integer" if s.kind == "int" else "must be a number")
    value = float(value) if s.kind == "float" else value
    if value != value or value in (float("inf"), float("-inf")):
        raise bad("must be finite", value)
    accept, requirement = RULES[s.rule or ("positive" if s.kind == "int" else "non_negative")]
    if not accept(value):
        raise bad(requirement, value)
    return value


def validate_fields(obj: Any) -> None:
    """Check (and convert) every field of the dataclass instance `obj`: its __post_init__."""
    for f in dataclasses.fields(obj):
        value = check_setting(setting_of(type(obj), f.name), getattr(obj, f.name), f"{type(obj).__name__}.{f.name}")
        setattr(obj, f.name, value)


SOURCES = ("transformer", "synthetic")
WANDB_MODES = ("online", "offline", "disabled")
FREQUENCY_LAWS = ("uniform", "zipf")
MAGNITUDE_LAWS = ("constant", "uniform", "exponential", "lognormal")
HOOKS = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _one_or_list(items: list):
    return items[0] if len(items) == 1 else items


def _items(value, where: str) -> list:
    """A list, or comma-separated text, as a list of distinct non-empty items in their order."""
    raw = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else [value]
    items = [item.strip() if isinstance(item, str) else item for item in raw]
    if not items or any(item == "" or item is None for item in items):
        raise UsageError(f"{where} must not have an empty entry, got {value!r}".lstrip())
    return list(dict.fromkeys(items))


def parse_layers(value, where: str) -> list[int] | int | str:
    """A layer, a list of layers, or "all"; entries are integers >= 0."""
    if value == "all":
        return value
    layers = []
    for item in _items(value, where):
        if isinstance(item, (bool, float)) or not (str(item).isascii() and str(item).isdigit()):
            raise UsageError(f"{where} takes layers (integers >= 0, comma-separated) or all, "
                             f"got {str(item)!r}".lstrip())
        layers.append(int(item))
    return _one_or_list(list(dict.fromkeys(layers)))


def parse_hook_points(value, where: str) -> list[str] | str:
    return _one_or_list(_items(value, where))


def parse_hooks(value, where: str) -> list[str] | str:
    hooks = _items(value, where)
    for hook in hooks:
        if hook not in HOOKS:
            raise UsageError(f"{where} must be one of {', '.join(HOOKS)} (or a comma-separated list), "
                             f"got {hook!r}".lstrip())
    return _one_or_list(hooks)


@dataclass
class DataConfig:
    source: str = option("transformer", choices=SOURCES, help="where activations come from: a transformer's hook, or a "
                         "synthetic toy model of superposition whose true features are known (settings from "
                         "config/studies/synthetic.yaml, then the --n-features ... flags)")
    model_name: str = option("tinylm", help="subject model: 'tinylm' (bundled, trained on first use) or a Hugging Face "
                             "name or local path such as gpt2")
    # layer, hook and hook_point each take one value or several (a list, or comma-separated text):
    # several hook points make a study over all of them, an arm per architecture and hook point.
    # One value stays a scalar, so the stored settings of a one-hook study keep their form.
    layer: list[int] | int | str = option(0, parse=parse_layers, help="transformer block(s) whose activations are "
                                          "read: N, a list such as 0,1, or all")
    hook: list[str] | str = option("resid_post", parse=parse_hooks, help=f"hook(s) within each block: "
                                   f"{', '.join(HOOKS)}, or a list such as resid_post,mlp_out; with --layer builds "
                                   f"blocks.L.hook_<hook>")
    hook_point: list[str] | str | None = option(None, parse=parse_hook_points, help="full TransformerLens hook "
                                                "name(s), comma-separated, e.g. blocks.1.hook_mlp_out; overrides "
                                                "--layer/--hook")
    n_samples: int = option(8192, help="sequences to harvest")
    seq_len: int = option(64, "at_least_2", help="tokens per sequence, BOS included; the BOS position is not used for "
                          "training")
    dataset: str | None = option(None, help="text file (one document per line) or JSONL with a 'text' field to harvest "
                                 "from", shown="the bundled tinylm story corpus")
    normalize: bool = True
    eval_fraction: float = option(0.1, "fraction")  # held-out sequences for eval metrics
    harvest_batch_size: int = 64

    def __post_init__(self) -> None:
        validate_fields(self)

    def layers(self, n_layers: int) -> list[int]:
        """The --layer blocks of a model with n_layers (all of them for "all")."""
        return list(range(n_layers)) if self.layer == "all" else _as_list(self.layer)

    def hook_names(self, n_layers: int) -> list[str]:
        """The hook points to read, in order: --hook-point's, or every --hook of every --layer."""
        if self.hook_point is not None:
            return _as_list(self.hook_point)
        return [f"blocks.{layer}.hook_{hook}" for layer in self.layers(n_layers) for hook in _as_list(self.hook)]


@dataclass
class SyntheticConfig:
    """The toy model of superposition behind `--source synthetic` (§3.3).

    Features are laid out in blocks: `n_parents` parents, then their children
    (`children_per_parent` each, firing only with their parent), then `n_groups` correlated groups
    of `group_size`, then independent features."""

    n_features: int = option(512, help="true features of the toy model")
    d_in: int = option(64, help="dimension they are superposed in")
    n_tokens: int = option(1_048_576, help="activation vectors generated, train and eval")
    mean_l0: float = option(5.0, "positive", help="expected number of true features active per vector")
    frequency: str = option("zipf", choices=FREQUENCY_LAWS)  # uniform | zipf: how firing probability falls with feature rank
    zipf_exponent: float = 0.5  # probability ~ rank^-exponent
    magnitude: str = option("uniform", choices=MAGNITUDE_LAWS)  # constant | uniform | exponential | lognormal, all with mean magnitude_mean
    magnitude_mean: float = option(1.0, "positive")
    magnitude_spread: float = 0.5  # uniform: half-width / mean; lognormal: sigma of log
    n_groups: int = option(0, "non_negative")  # correlated groups
    group_size: int = 4
    group_correlation: float = option(0.5, "fraction")  # correlation of the latent Gaussians that decide group members' firing
    n_parents: int = option(0, "non_negative")  # hierarchies
    children_per_parent: int = 4
    child_probability: float = option(0.25, "unit")  # P(child fires | parent fires); exclusive: P(one of them fires | parent fires)
    exclusive_children: bool = False  # at most one child of a parent fires at a time (which one: uniform)
    noise_std: float = option(0.0, help="Gaussian noise added per dimension")

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class SAEArmConfig:
    """One SAE to train. Fields that do not apply to `architecture` keep their defaults and are
    ignored; `for_architecture` fills in the architecture's own defaults."""

    architecture: str = option("topk", choices=tuple(ARCHITECTURE_DEFAULTS))
    expansion_factor: int = option(8, help="d_sae / d_in")
    hidden_dim: int | None = option(None, help="number of SAE latents d_sae; overrides --expansion-factor",
                                    shown="expansion factor x d_in")
    k: int = option(32, help="active latents per token for topk, and on average for batchtopk")
    dead_handling: str = option("auxk", choices=DEAD_HANDLING_MODES)  # auxk (TopK family) | resample | none
    aux_coef: float = 1 / 32  # AuxK weight; Gated's gate-reconstruction weight
    aux_k: int | None = option(None, help="AuxK (topk, batchtopk): dead latents per token that learn to reconstruct "
                               "the residual", shown="d_in / 2, as Gao et al. 2024")
    sparsity_coef: float = 0.0  # lambda: L1 (relu, gated) or L0 (jumprelu)
    target_l0: float | None = option(None, "positive", help="jumprelu: penalise (L0/target - 1)^2 instead of L0, "
                                     "steering the arm to this L0", shown="off")
    matryoshka_levels: int = option(5, help="matryoshka: nested prefixes of the dictionary that must each reconstruct "
                                    "the input, of d_sae / 2^(levels-1), ..., d_sae / 2, d_sae latents")
    bandwidth: float = option(0.001, "positive")  # jumprelu: STE kernel width
    init_threshold: float = option(0.001, "positive")  # jumprelu: initial threshold

    def __post_init__(self) -> None:
        validate_fields(self)

    def d_sae(self, d_in: int) -> int:
        return self.hidden_dim if self.hidden_dim is not None else self.expansion_factor * d_in

    def check_sizes(self, d_sae: int, what: str) -> None:
        """The settings counted in latents fit in d_sae (`what` names it in the message): the TopK
        family's k and a given aux_k (the default, d_in/2, is capped at d_sae), and Matryoshka's
        levels, whose smallest prefix, d_sae / 2^(levels-1), must hold a latent. An SAE would
        otherwise run with fewer than its record says."""
        if self.architecture in OPTION_ARCHITECTURES["k"] and self.k > d_sae:
            raise UsageError(f"--k {self.k} exceeds {what}")
        if self.architecture in OPTION_ARCHITECTURES["aux_k"] and self.aux_k is not None and self.aux_k > d_sae:
            raise UsageError(f"--aux-k {self.aux_k} exceeds {what}")
        if self.architecture in OPTION_ARCHITECTURES["matryoshka_levels"] and d_sae >> (self.matryoshka_levels - 1) < 1:
            raise UsageError(f"--matryoshka-levels {self.matryoshka_levels} halves {what} below one latent; it takes "
                             f"at most {d_sae.bit_length()} levels")

    def sparsity_setting(self) -> str:
        """What sets this arm's sparsity, as a report names it: "k 32", "L1 coef 0.0065", "target L0 40"."""
        if self.architecture in OPTION_ARCHITECTURES["k"]:
            return f"k {self.k}"
        if self.architecture in OPTION_ARCHITECTURES["target_l0"] and self.target_l0 is not None:
            return f"target L0 {self.target_l0:g}"
        penalty = "L0" if self.architecture in OPTION_ARCHITECTURES["l0_coefficient"] else "L1"
        return f"{penalty} coef {self.sparsity_coef:g}"

    @classmethod
    def for_architecture(cls, architecture: str, **overrides: Any) -> "SAEArmConfig":
        return cls(**{**ARCHITECTURE_DEFAULTS[architecture], "architecture": architecture, **overrides})


DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    lr: float = option(3e-3, "positive", help="Adam learning rate")
    batch_size: int = option(1024, help="tokens per SAE training batch")
    epochs: int = option(2, help="passes over the training activations")
    steps: int | None = option(None, help="training steps; overrides --epochs", shown="from --epochs")
    warmup_steps: int = option(50, "non_negative")
    decay_fraction: float = option(0.2, "fraction")  # linear decay to zero over the last fraction of steps
    grad_clip: float = 1.0  # gradient-norm clip in units of the loss summed over d_in (see Trainer.train_step)
    sparsity_warmup_fraction: float = option(0.05, "fraction")  # sparsity coefficient ramps up over this fraction of steps
    resample_inputs: int = 16_384  # training rows scored to pick new directions for dead latents
    seed: int = option(0, "any", help="seed for data order, SAE init and everything else")
    dead_window: int = option(262_144, help="a latent that has not fired in this many training tokens counts as dead "
                              "(for AuxK and resampling, which revives the dead latents each time another window has "
                              "passed)")
    eval_every: int = 150  # steps; the final step is always evaluated
    log_every: int = 10
    checkpoint_every: int = 100
    ce_eval_sequences: int = 64  # eval sequences used for CE loss recovered / KL
    device: str = option("cpu", help="torch device of the subject model and the SAEs' training: cpu, cuda, cuda:N")
    dtype: str = option("float32", choices=DTYPES, help="precision of the SAEs' training steps and the evals during "
                        "training: bfloat16 runs matmuls in bfloat16 (torch.autocast) with float32 weights, Adam "
                        "state and activation cache")

    def __post_init__(self) -> None:
        validate_fields(self)

    def identity(self) -> dict[str, Any]:
        """The settings as an arm's folder hash and a study's spec hold them: a setting added after
        studies were run is left out while at its default, so those studies keep their arm folders
        and still resume."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


# TrainConfig settings that came after the first studies, at their defaults (see TrainConfig.identity).
LATER_DEFAULTS = {"dtype": "float32"}


@dataclass
class LogConfig:
    use_wandb: bool = False
    wandb_project: str = option("sae-interpretability", help="W&B project")
    wandb_mode: str | None = option(None, choices=WANDB_MODES, help="W&B mode",
                                    shown="WANDB_MODE if set, else online when logged in, offline otherwise")
    checkpoint_dir: str = option("checkpoints", help="where studies, activation caches and tinylm live")
    progress: bool = True
    wandb_checkpoints: bool = False  # also log every checkpoint as a W&B artifact (the final SAE always is)

    def __post_init__(self) -> None:
        validate_fields(self)


STUDY_NAMES = ("activations", "emergence", "frequency", "resampling")
EXPORT_FORMATS = ("saelens", "neuronpedia")
EXECUTORS = ("local", "ray")


@dataclass
class ProbeConfig:
    """What the probes measure at each eval step; they never change what an arm learns."""

    concepts: str | None = option(None, help="YAML of concept word lists {category: [words]} to score latents against",
                                  shown="tinylm's grammar vocabularies for tinylm, config/concepts/english.yaml for "
                                  "other models")
    probe_k: int = option(8, help="latents in the k-sparse concept probe")
    f1_threshold: float = option(0.8, "unit", help="held-out F1 at which a concept counts as emerged")
    cos_threshold: float = option(0.9, "unit", help="synthetic source: |cos| between a decoder row and a true feature at "
                                  "which the feature counts as recovered (frac_recovered) and emerged")
    umap_evals: int = option(3, "non_negative")  # eval steps whose decoder directions get a UMAP embedding (first, ..., final; one: the final)
    ultra_low_density: float = option(1e-4, "positive")  # alive latents firing less often than this form the ultra-low cluster
    dense_threshold: float = option(0.1, "positive")  # latents firing more often than this count as dense

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class StudyConfig:
    names: list[str] = field(default_factory=lambda: list(STUDY_NAMES))
    study_id: str | None = option(None, help="name of the study folder under --checkpoint-dir",
                                  shown="<study>-<date>-<time>; with --resume, the study to continue")
    resume: bool = False
    quick: bool = False
    report: str | None = None  # rebuild this study's report from its files, train nothing
    docs: str | None = None  # with report: the Markdown file whose generated block gets the study's results
    lockstep: bool = True  # arms that read the same batches train step by step together (same results)
    parallel_arms: int = option(2, "positive", help="on the CPU, arms in lockstep that take their training step at "
                                "the same time, each in a thread (1: one after another); the results are the same")
    search: str | None = option(None, help="print the latents of study --study-id whose label, top tokens or top "
                                "contexts contain the word, ranked (labels first), then exit", shown="off")
    arm: str | None = option(None, help="with --search or --export: only this arm (its name, as the report's tables "
                             "give it, or its folder)", shown="every arm")
    export: str | None = option(None, choices=EXPORT_FORMATS, help="write the finished arms of study --study-id for "
                                "another tool, then exit: saelens (a folder SAELens's SAE.load_from_disk reads) or "
                                "neuronpedia (feature batches in Neuronpedia's upload schema)", shown="off")
    out: str | None = option(None, help="with --export: the folder to write, which must not exist",
                             shown="<checkpoint-dir>/<study-id>/exports/<format>/, a folder per arm")
    serve: str | None = option(None, help="start the explorer, a local web app over the finished arms of this study "
                               "under --checkpoint-dir (feature pages, prompt analyser, steering; docs/explorer.md), "
                               "print its URL and serve until Ctrl-C", shown="off")
    port: int = option(8000, "port", help="with --serve: the port to listen on (0: any free port)")
    host: str = option("127.0.0.1", help="with --serve: the address to bind; anything but a loopback address lets "
                       "whoever can reach the port run the model")
    # Where the arms train (docs/cluster.md); the results are the same either way.
    executor: str = option("local", choices=EXECUTORS, help="local: every arm in this process, arms that read the same "
                           "batches in lockstep; ray: each arm a Ray task, on a Ray cluster (--ray-address) or on a "
                           "Ray instance started on this machine")
    ray_address: str | None = option(None, help="with --executor ray: the cluster to join, auto or HOST:PORT",
                                     shown="a Ray instance started for the run on this machine, then stopped")
    cpus_per_arm: float = option(1.0, "positive", help="with --executor ray: CPUs each arm's task reserves (and its "
                                 "torch threads)")
    gpus_per_arm: float = option(0.0, help="with --executor ray: GPUs each arm's task reserves (fractions share one)")
    max_retries: int = option(2, "non_negative", help="with --executor ray: times an arm whose worker or node is lost "
                              "is started again from its last checkpoint before it is recorded failed")

    @property
    def label(self) -> str:
        """Short name for folder names and messages: 'all' when every study runs."""
        return "all" if list(self.names) == list(STUDY_NAMES) else "+".join(self.names)


@dataclass
class ArmSpec:
    """One SAE to train: its architecture settings and its training settings."""

    sae: SAEArmConfig
    train: TrainConfig


@dataclass
class StudyPlan:
    name: str
    arms: list[ArmSpec]


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # used when data.source is synthetic
    plans: list[StudyPlan] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)  # run-wide: data seed, device, CE sequences
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    @property
    def arms(self) -> list[ArmSpec]:
        """Distinct arms over all studies, in order of first appearance."""
        out: list[ArmSpec] = []
        for plan in self.plans:
            out.extend(arm for arm in plan.arms if arm not in out)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_spec(self) -> dict[str, Any]:
        """Everything that changes a study's results (not where or how it is logged)."""
        spec = self.to_dict()
        del spec["log"]
        spec["train"] = self.train.identity()
        for plan, stored in zip(self.plans, spec["plans"]):
            for arm, arm_stored in zip(plan.arms, stored["arms"]):
                arm_stored["train"] = arm.train.identity()
        if self.data.source != "synthetic":
            spec["synthetic"] = None
        spec["study"] = {"names": list(self.study.names), "quick": self.study.quick}
        return spec


def flatten(d: dict[str, Any], prefix: str = "", lists: bool = False) -> dict[str, Any]:
    """{"data": {"layer": 0}} -> {"data.layer": 0}: the form W&B and tables want. With `lists`,
    list items become keys too ({"plans": [{"name": "a"}]} -> {"plans.0.name": "a"}), so two
    configs can be compared leaf by leaf."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if lists and isinstance(value, list):
            value = dict(enumerate(value))
        if isinstance(value, dict):
            out.update(flatten(value, name + ".", lists))
        else:
            out[name] = value
    return out


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-able object, independent of key order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
