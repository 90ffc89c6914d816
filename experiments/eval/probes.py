"""Probes that run at every eval step of an arm and record time series for the studies.

What an arm is probed for is the union of what the studies listing it need:
  frequency  firing-frequency statistics (rank stability between evals, ultra-low cluster)
  concepts   held-out F1 of the best single latent and of a k-sparse probe per concept (§7.2);
             on a synthetic source, each true feature's best |cos| with a decoder row instead
  umap       UMAP embedding of the decoder directions at a few eval steps, coloured by concept
             (synthetic: by the role of the true feature a latent recovers)

Each eval leaves `<arm>/probes/eval-<step>.npz` (plain arrays, read back with allow_pickle=False):
density and mean activation per latent always, concept scores and the embedding when probed.
Studies and `--report` read these files; nothing is recomputed.
"""
from __future__ import annotations

from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config.schema import ProbeConfig
from experiments.eval.concepts import ConceptSet, score_concepts
from experiments.eval.embedding import decoder_embedding, embedding_of
from experiments.eval.metrics import count_per_column, frequency_stats, rank_stability
from experiments.eval.recovery import abs_cosine
from experiments.data.synthetic import SyntheticTruth
from experiments.timing import phase
from config.files import read_json, write_json_atomic, write_npz_atomic

PROBE_KINDS = {"activations": set(), "emergence": {"concepts", "umap"}, "frequency": {"frequency"},
               "resampling": set()}
MATCH_PRECISION = 0.5  # a latent is matched to a concept category when most of its firings are on it


@dataclass
class ConceptData:
    """A concept set with its labels on the eval split and the tokens used to select latents."""

    concepts: ConceptSet
    labels: torch.Tensor  # [n_eval_rows, C] bool
    fit_mask: torch.Tensor  # [n_eval_rows] bool: even eval sequences select, odd ones score

    @classmethod
    def build(cls, concepts: ConceptSet, row_tokens: torch.Tensor, row_sequence: torch.Tensor) -> "ConceptData":
        """Labels the eval tokens. A concept with no token among the fit or the held-out tokens
        cannot be scored (no latent can be chosen, or no F1 measured), so it is left out and named
        in `concepts.absent`: the tables then hold a number for every concept they list."""
        # Split by sequence, not by token: a story repeats its names, so tokens of one sequence are not independent.
        fit = row_sequence % 2 == 0
        labels = concepts.labels(row_tokens)
        absent = ~(labels[fit].any(0) & labels[~fit].any(0))
        if absent.any():
            concepts, labels = concepts.without(absent.tolist()), labels[:, ~absent]
        return cls(concepts, labels, fit)


def eval_file(arm_dir: Path, step: int) -> Path:
    return arm_dir / "probes" / f"eval-{step:08d}.npz"


def read_evals(arm_dir: Path) -> list[dict[str, np.ndarray]]:
    """Every eval's probe arrays, in step order."""
    out = []
    for path in sorted((arm_dir / "probes").glob("eval-*.npz")):
        with np.load(path, allow_pickle=False) as data:
            out.append({k: data[k] for k in data.files})
    return out


def umap_steps(eval_steps: list[int], count: int) -> set[int]:
    """`count` eval steps spread evenly from the first to the final one (one: the final one)."""
    if count <= 0 or not eval_steps:
        return set()
    picks = np.unique(np.round(np.linspace(0 if count > 1 else len(eval_steps) - 1, len(eval_steps) - 1,
                                           count)).astype(int))
    return {eval_steps[i] for i in picks}


def matched_categories(fired: torch.Tensor, labels: torch.Tensor, kinds: list[str]) -> np.ndarray:
    """Per latent, the index of the category concept it fires on most precisely, or -1 when no
    category holds at least MATCH_PRECISION of its firings (or it never fires)."""
    cats = [i for i, kind in enumerate(kinds) if kind == "category"]
    if not cats:
        return np.full(fired.shape[1], -1, dtype=np.int64)
    tp = labels[:, cats].T.float() @ fired.float()  # [n_cat, d_sae], exact counts below 2**24
    n_fire = count_per_column(fired).float().clamp_min(1)
    best, idx = (tp / n_fire).max(0)
    return torch.where(best >= MATCH_PRECISION, torch.tensor(cats)[idx], -1).numpy()


class ArmProbes:
    def __init__(self, arm_dir: Path, kinds: set[str], cfg: ProbeConfig, concept_data: ConceptData | None,
                 umap_at: set[int], seed: int, n_eval_tokens: int, truth: SyntheticTruth | None = None,
                 workers: Executor | None = None):
        """`workers`: processes for the UMAP fits (embedding_workers), or None to fit them here."""
        self.arm_dir, self.kinds, self.cfg, self.seed = arm_dir, kinds, cfg, seed
        self.workers = workers
        self._fits: dict[int, Future] = {}  # step: its UMAP fit, started by prefetch
        self.n_eval_tokens = n_eval_tokens
        self.concepts = concept_data if "concepts" in kinds or "umap" in kinds else None
        self.truth = truth if "concepts" in kinds or "umap" in kinds else None
        self.umap_at = umap_at if "umap" in kinds else set()
        self._previous: np.ndarray | None = None
        if self.concepts is not None:
            c = self.concepts.concepts
            write_json_atomic(arm_dir / "probes" / "concepts.json",
                              {"names": c.names, "kinds": c.kinds, "skipped": c.skipped, "absent": c.absent})
        elif self.truth is not None:  # UMAP colours: the roles of true features
            roles = self.role_names
            write_json_atomic(arm_dir / "probes" / "concepts.json",
                              {"names": roles, "kinds": ["role"] * len(roles), "skipped": [],
                               "feature_probability": self.truth.probability.tolist(),
                               "feature_role": self.truth.roles})

    def prefetch(self, step: int, sae) -> None:
        """Start the UMAP fit of the eval at `step` (the SAE as it now is) in a worker, if there is
        one: it runs while the arms ahead of this one are evaluated."""
        if self.workers is not None and step in self.umap_at and step not in self._fits:
            try:
                self._fits[step] = self.workers.submit(decoder_embedding, sae.W_dec.detach().cpu().numpy(), self.seed)
            except BrokenProcessPool:  # a worker died earlier: run() fits it here
                pass

    @property
    def needs_firing(self) -> bool:
        return self.concepts is not None

    def resume_at(self, step: int) -> None:
        """Continue after a checkpoint: the previous density is that of the last eval at or before it."""
        self._previous = None
        for path in sorted((self.arm_dir / "probes").glob("eval-*.npz")):
            if int(path.stem.split("-")[1]) <= step:
                with np.load(path, allow_pickle=False) as data:
                    self._previous = data["density"]

    def run(self, step: int, tokens: int, sae, out) -> tuple[dict[str, float], dict | None]:
        """Probe one eval (`out`: the trainer's EvalOutput). Returns scalar metrics to log and, at UMAP
        steps, the embedding to log."""
        density, mean_act, fired = out.density, out.mean_act, out.fired
        arrays: dict[str, np.ndarray] = {"step": np.array(step), "tokens": np.array(tokens),
                                         "n_tokens": np.array(self.n_eval_tokens),
                                         "density": density, "mean_act": mean_act}
        metrics: dict[str, float] = {}
        if "frequency" in self.kinds:
            stats = frequency_stats(density, self.cfg.ultra_low_density)
            if self._previous is not None:
                stats["rank_spearman"] = rank_stability(self._previous, density)
            metrics.update({f"freq/{k}": v for k, v in stats.items()})
        self._previous = density
        if self.concepts is not None and fired is not None and "concepts" in self.kinds:
            scores = score_concepts(fired, self.concepts.labels, self.concepts.fit_mask, self.cfg.probe_k)
            arrays.update(scores)
            metrics.update(self._concept_metrics(scores))
        if self.truth is not None and "concepts" in self.kinds:
            rec = out.recovery
            arrays.update(best_cos=rec.best_cos, best_latent=rec.best_latent, matched_cos=rec.matched_cos)
            metrics.update(self._recovery_by_frequency(rec.best_cos))
        embedding = None
        if step in self.umap_at:
            W_dec = sae.W_dec.detach().cpu().numpy()
            with phase("umap"):
                xy = embedding_of(self._fits.pop(step, None), W_dec, self.seed)
            if self.truth is not None:
                cos = abs_cosine(W_dec, self.truth.dictionary)
                names = self.role_names
                role_index = np.searchsorted(names, [f"role:{r}" for r in self.truth.roles])[cos.argmax(1)]
                matched = np.where(cos.max(1) >= self.truth.threshold, role_index, -1)
            elif self.concepts is not None:
                matched = matched_categories(fired, self.concepts.labels, self.concepts.concepts.kinds)
                names = self.concepts.concepts.names
            else:
                matched, names = np.full(len(xy), -1, dtype=np.int64), []
            arrays.update(umap_xy=xy, umap_concept=matched)
            embedding = {"xy": xy, "density": density,
                         "concept": [names[i].split(":", 1)[1] if i >= 0 else None for i in matched]}
        path = eval_file(self.arm_dir, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npz_atomic(path, arrays)
        return metrics, embedding

    @property
    def role_names(self) -> list[str]:
        return sorted({f"role:{r}" for r in self.truth.roles})

    def _recovery_by_frequency(self, best_cos: np.ndarray) -> dict[str, float]:
        """Fraction of true features recovered among the most, middle and least frequent thirds:
        three curves that show in the dashboard whether frequent features are learned first."""
        order = np.argsort(-self.truth.probability, kind="stable")
        out = {}
        for name, part in zip(("frequent", "middle", "rare"), np.array_split(order, 3)):
            if part.size:
                out[f"concepts/recovered_{name}_third"] = float(np.mean(best_cos[part] >= self.truth.threshold))
        return out

    def _concept_metrics(self, scores: dict[str, np.ndarray]) -> dict[str, float]:
        c = self.concepts.concepts
        out: dict[str, float] = {}
        kinds = np.array(c.kinds)
        for kind in ("category", "word"):
            mask = kinds == kind
            for score in ("single", "probe"):
                values = scores[f"{score}_f1"][mask]
                out[f"concepts/{kind}_emerged_{score}"] = float(np.sum(values >= self.cfg.f1_threshold))
        # Per-concept curves for categories only: a W&B panel per word would bury the dashboard.
        for i, name in enumerate(c.names):
            if c.kinds[i] == "category":
                out[f"concepts/{name.split(':', 1)[1]}/single_f1"] = float(scores["single_f1"][i])
                out[f"concepts/{name.split(':', 1)[1]}/probe_f1"] = float(scores["probe_f1"][i])
        return out


def read_concepts(arm_dir: Path) -> dict | None:
    path = arm_dir / "probes" / "concepts.json"
    return read_json(path) if path.exists() else None
