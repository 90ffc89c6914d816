"""Typed configuration, grouped by concern: data, SAE, training, logging, study.

Each group is a small dataclass; `RunConfig` bundles them. `to_dict` gives the flat JSON form
stored in `study.json`, checkpoints and the W&B run config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


class UsageError(Exception):
    """Bad user input: reported as one line with exit code 2, never as a traceback."""


@dataclass
class DataConfig:
    source: str = "transformer"  # transformer | synthetic (then the `synthetic` group describes the data)
    model_name: str = "tinylm"
    layer: int = 0
    hook: str = "resid_post"
    hook_point: str | None = None  # full TransformerLens hook name; overrides layer + hook
    n_samples: int = 8192  # sequences harvested (BOS + seq_len - 1 text tokens each)
    seq_len: int = 64
    dataset: str | None = None  # text or JSONL file; default: the bundled tinylm corpus
    normalize: bool = True
    eval_fraction: float = 0.1  # held-out sequences for eval metrics
    harvest_batch_size: int = 64

    @property
    def hook_name(self) -> str:
        return self.hook_point or f"blocks.{self.layer}.hook_{self.hook}"


SOURCES = ("transformer", "synthetic")
WANDB_MODES = ("online", "offline", "disabled")
FREQUENCY_LAWS = ("uniform", "zipf")
MAGNITUDE_LAWS = ("constant", "uniform", "exponential", "lognormal")


@dataclass
class SyntheticConfig:
    """The toy model of superposition behind `--source synthetic` (§3.3).

    Features are laid out in blocks: `n_parents` parents, then their children
    (`children_per_parent` each, firing only with their parent), then `n_groups` correlated groups
    of `group_size`, then independent features."""

    n_features: int = 512
    d_in: int = 64
    n_tokens: int = 1_048_576  # activation vectors generated, train and eval split together
    mean_l0: float = 5.0  # expected number of active true features per vector
    frequency: str = "zipf"  # uniform | zipf: how firing probability falls with feature rank
    zipf_exponent: float = 0.5  # probability ~ rank^-exponent
    magnitude: str = "uniform"  # constant | uniform | exponential | lognormal, all with mean magnitude_mean
    magnitude_mean: float = 1.0
    magnitude_spread: float = 0.5  # uniform: half-width / mean; lognormal: sigma of log
    n_groups: int = 0  # correlated groups
    group_size: int = 4
    group_correlation: float = 0.5  # correlation of the latent Gaussians that decide group members' firing
    n_parents: int = 0  # hierarchies
    children_per_parent: int = 4
    child_probability: float = 0.25  # P(child fires | parent fires); exclusive: P(one of them fires | parent fires)
    exclusive_children: bool = False  # at most one child of a parent fires at a time (which one: uniform)
    noise_std: float = 0.0  # Gaussian noise per dimension, added to every vector


@dataclass
class SAEArmConfig:
    """One SAE to train. Fields that do not apply to `architecture` keep their defaults and are
    ignored; `for_architecture` fills in the architecture's own defaults."""

    architecture: str = "topk"
    expansion_factor: int = 8
    hidden_dim: int | None = None  # d_sae; overrides expansion_factor
    k: int = 32  # TopK family
    dead_handling: str = "auxk"  # auxk (TopK family) | resample | none
    aux_coef: float = 1 / 32  # AuxK weight; Gated's gate-reconstruction weight
    aux_k: int | None = None  # AuxK: dead latents that reconstruct the residual (TopK family); None -> d_in / 2
    sparsity_coef: float = 0.0  # lambda: L1 (relu, gated) or L0 (jumprelu)
    target_l0: float | None = None  # jumprelu: penalise (L0/target - 1)^2 instead of L0
    matryoshka_levels: int = 5  # matryoshka: nested prefixes d_sae / 2^(levels-1), ..., d_sae / 2, d_sae
    bandwidth: float = 0.001  # jumprelu: STE kernel width
    init_threshold: float = 0.001  # jumprelu: initial threshold

    def d_sae(self, d_in: int) -> int:
        return self.hidden_dim if self.hidden_dim is not None else self.expansion_factor * d_in

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


# Defaults per architecture, chosen so each lands near L0 = 32 on tinylm's default activations
# (blocks.0.hook_resid_post, d_sae 1024, 2 epochs at lr 3e-3), for a fair comparison at matched
# sparsity.
ARCHITECTURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "topk": {"k": 32, "dead_handling": "auxk", "aux_coef": 1 / 32},
    "batchtopk": {"k": 32, "dead_handling": "auxk", "aux_coef": 1 / 32},
    "matryoshka": {"k": 32, "dead_handling": "auxk", "aux_coef": 1 / 32},
    "relu": {"sparsity_coef": 0.0065, "dead_handling": "none"},
    "jumprelu": {"sparsity_coef": 0.00055, "bandwidth": 0.05, "init_threshold": 0.01, "dead_handling": "none"},
    "gated": {"sparsity_coef": 0.0084, "aux_coef": 1.0, "dead_handling": "none"},
}
# Which architectures each tunable option applies to, and the dead-latent handling each allows
# (its own way of reviving latents first: what --dead-resample picks).
OPTION_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "k": ("topk", "batchtopk", "matryoshka"),
    "aux_k": ("topk", "batchtopk", "matryoshka"),
    "matryoshka_levels": ("matryoshka",),
    "l1_coefficient": ("relu", "gated"),
    "l0_coefficient": ("jumprelu",),
    "target_l0": ("jumprelu",),
}
DEAD_HANDLING: dict[str, tuple[str, ...]] = {
    "topk": ("auxk", "resample", "none"),
    "batchtopk": ("auxk", "resample", "none"),
    "matryoshka": ("auxk", "resample", "none"),
    "relu": ("resample", "none"),
    "jumprelu": ("resample", "none"),
    "gated": ("resample", "none"),
}


@dataclass
class TrainConfig:
    lr: float = 3e-3
    batch_size: int = 1024
    epochs: int = 2  # passes over the train split; `steps` overrides
    steps: int | None = None
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # linear decay to zero over the last fraction of steps
    grad_clip: float = 1.0  # gradient-norm clip in units of the loss summed over d_in (see Trainer.train_step)
    sparsity_warmup_fraction: float = 0.05  # sparsity coefficient ramps up over this fraction of steps
    resample_inputs: int = 16_384  # training rows scored to pick new directions for dead latents
    seed: int = 0
    dead_window: int = 262_144  # a latent that has not fired in this many training tokens is dead; resampling every as many
    eval_every: int = 150  # steps; the final step is always evaluated
    log_every: int = 10
    checkpoint_every: int = 100
    ce_eval_sequences: int = 64  # eval sequences used for CE loss recovered / KL
    device: str = "cpu"


@dataclass
class LogConfig:
    use_wandb: bool = False
    wandb_project: str = "sae-interpretability"
    wandb_mode: str | None = None  # online | offline | disabled; None follows WANDB_MODE / login state
    checkpoint_dir: str = "checkpoints"
    progress: bool = True


STUDY_NAMES = ("activations", "emergence", "frequency", "resampling")


@dataclass
class ProbeConfig:
    """What the probes measure at each eval step; they never change what an arm learns."""

    concepts: str | None = None  # YAML of word lists; default: tinylm's grammar, or config/concepts/english.yaml
    probe_k: int = 8  # latents in the k-sparse concept probe
    f1_threshold: float = 0.8  # a concept has emerged once its held-out F1 reaches this
    cos_threshold: float = 0.9  # synthetic source: a true feature is recovered once a decoder row reaches this |cos|
    umap_evals: int = 3  # eval steps whose decoder directions get a UMAP embedding (first, ..., final)
    ultra_low_density: float = 1e-4  # alive latents firing less often than this form the ultra-low cluster
    dense_threshold: float = 0.1  # latents firing more often than this count as dense


@dataclass
class StudyConfig:
    names: list[str] = field(default_factory=lambda: list(STUDY_NAMES))
    study_id: str | None = None
    resume: bool = False
    quick: bool = False
    report: str | None = None  # rebuild this study's report from its files, train nothing
    docs: str | None = None  # with report: the Markdown file whose generated block gets the study's results
    lockstep: bool = True  # arms that read the same batches train step by step together (same results)

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
