"""The four studies (§6, §7): each reads the files its arms left behind (study.json, metrics.csv,
probes/eval-*.npz) and turns them into tables, figures and findings. Nothing here trains or
recomputes a probe, so `--report` can rebuild every result from the study folder alone.
"""
from __future__ import annotations

import math
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.figure import Figure

from experiments.metrics import rank_stability
from experiments.probes import read_concepts, read_evals
from visualization import study_plots
from visualization.local_sink import MetricsCSV
from visualization.plots import density_floor, log10_density
from visualization.terminal import format_beside, round_beside

FINAL_METRICS = ("l0", "explained_variance", "mse", "cos", "dead_frac", "dense_frac", "ce_loss_recovered", "kl",
                 "mcc", "frac_recovered")
# Synthetic sources: frac_recovered by frequency quarter and by role (experiments/recovery.py).
RECOVERY_BREAKDOWN = (*(f"frac_recovered_q{i}" for i in range(1, 5)),
                      *(f"frac_recovered_{role}" for role in ("parent", "child", "group", "independent")))


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list]


@dataclass
class StudyResult:
    name: str
    question: str
    tables: dict[str, Table] = field(default_factory=dict)
    figures: dict[str, Callable[[], Figure]] = field(default_factory=dict)  # drawn when the report is written
    data: dict[str, Table] = field(default_factory=dict)  # long per-item tables: CSV files and W&B tables
    findings: list[str] = field(default_factory=list)  # one Markdown sentence each, the first the headline
    summary: dict = field(default_factory=dict)  # goes to summary.json["studies"][name]
    captions: dict[str, str] = field(default_factory=dict)  # per figure: what to look for in it

    def figure(self, key: str, draw: Callable[[], Figure], caption: str) -> None:
        self.figures[key] = draw
        self.captions[key] = caption


@dataclass
class ArmData:
    record: dict  # the arm's entry in study.json
    series: dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> (tokens, values), from metrics.csv
    evals: list[dict[str, np.ndarray]]  # probe arrays per eval, in step order
    concepts: dict | None  # names, kinds, skipped

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def architecture(self) -> str:
        return self.record["architecture"]

    @property
    def final(self) -> dict:
        return self.record.get("final") or {}

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        return self.series.get(metric, (np.zeros(0), np.zeros(0)))


def load_arm(study_dir: Path, record: dict) -> ArmData:
    arm_dir = study_dir / record["arm_id"]
    series: dict[str, tuple[list, list]] = {}
    csv = arm_dir / "metrics.csv"
    for row in MetricsCSV.read(csv) if csv.exists() else []:
        tokens, values = series.setdefault(row["name"], ([], []))
        tokens.append(row["tokens"])
        values.append(row["value"])
    arrays = {k: (np.array(t, dtype=np.float64), np.array(v, dtype=np.float64)) for k, (t, v) in series.items()}
    return ArmData(record, arrays, read_evals(arm_dir), read_concepts(arm_dir))


def _r(value, digits: int = 4):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), digits)


def _beside(value, threshold: float):
    """A score for a table beside its threshold: 3 decimals, more where rounding would cross it."""
    return None if value is None or np.isnan(value) else round_beside(float(value), threshold, 3)


def _tokens_text(tokens: float) -> str:
    return "never" if tokens is None or math.isnan(tokens) else study_plots.format_tokens(tokens)


# -- activations ------------------------------------------------------------------------------
def activations(arms: list[ArmData], probes: dict) -> StudyResult:
    res = StudyResult("activations", "How do the sparsity mechanisms trade reconstruction against sparsity?")
    # CE/KL exist for transformer sources, mcc/frac_recovered for synthetic ones.
    metrics = [m for m in FINAL_METRICS if any(_r(a.final.get(m)) is not None for a in arms)] or list(FINAL_METRICS[:6])
    rows = [[a.name, a.record.get("status"), *(_r(a.final.get(m)) for m in metrics), a.record.get("steps"),
             a.record.get("seconds")] for a in arms]
    res.tables["final"] = Table("Final metrics on the eval split", ["arm", "status", *metrics, "steps", "time (s)"],
                                rows)
    done = [a for a in arms if a.final]
    if done:
        downstream = any(a.final.get("kl") is not None for a in done)
        res.figure("frontier", partial(study_plots.frontier, [
            {"name": a.name, "architecture": a.architecture, **{m: a.final.get(m) for m in
                                                                 ("l0", "explained_variance", "ce_loss_recovered", "kl")}}
            for a in done]), "Each arm's final fidelity against its L0: higher is better at equal L0"
                             + (", and lower KL (right) is better" if downstream else "")
                             + "; compare arms at similar L0.")
        best = max(done, key=lambda a: a.final.get("explained_variance", -1))
        l0s = [a.final["l0"] for a in done]
        res.findings.append(f"Highest explained variance: **{best.name}**, {best.final['explained_variance']:.4f} "
                            f"at L0 {best.final['l0']:.1f} (arms range over L0 {min(l0s):.1f}–{max(l0s):.1f}).")
        if downstream:
            kl = min((a for a in done if a.final.get("kl") is not None), key=lambda a: a.final["kl"])
            res.findings.append(f"Least damage to the model's predictions: **{kl.name}**, KL {kl.final['kl']:.4f} "
                                f"nats per token with the SAE spliced in.")
        if "frac_recovered" in metrics:
            top = max(done, key=lambda a: a.final.get("frac_recovered", -1))
            res.findings.append(f"Most true features recovered: **{top.name}**, {top.final['frac_recovered']:.1%} "
                                f"(MCC {top.final['mcc']:.3f}).")
    breakdown = [k for k in RECOVERY_BREAKDOWN if any(_r(a.final.get(k)) is not None for a in arms)]
    if breakdown:
        res.tables["recovery"] = Table(
            "Fraction of true features recovered, by frequency quarter (q1 the most frequent) and by role",
            ["arm", "all", *(k.removeprefix("frac_recovered_") for k in breakdown)],
            [[a.name, _r(a.final.get("frac_recovered")), *(_r(a.final.get(k)) for k in breakdown)] for a in arms])
    res.summary = {"arms": [{"name": a.name, "arm_id": a.record["arm_id"],
                             **{m: a.final.get(m) for m in (*metrics, *breakdown)}} for a in arms]}
    return res


# -- emergence --------------------------------------------------------------------------------
def _nanmax(scores: np.ndarray) -> np.ndarray:
    """Column maxima ignoring NaN; NaN (without numpy's warning) where a column is all NaN."""
    filled = np.where(np.isnan(scores), -np.inf, scores).max(0)
    return np.where(np.isneginf(filled), np.nan, filled)


def _first_reach(tokens: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """[C] tokens at the first eval whose score reaches threshold (NaN: never). scores [E, C]."""
    reached = np.nan_to_num(scores, nan=-1.0) >= threshold
    first = reached.argmax(0)
    return np.where(reached.any(0), tokens[first], np.nan)


def emergence(arms: list[ArmData], probes: dict) -> StudyResult:
    if any(a.evals and "best_cos" in a.evals[0] for a in arms):
        return feature_emergence(arms, probes)
    threshold = probes["f1_threshold"]
    res = StudyResult("emergence", "When do latents come to represent known concepts, and in what order?")
    scored = [a for a in arms if a.concepts and a.evals and "single_f1" in a.evals[0]]
    if not scored:
        res.findings.append("No arm has concept scores (the subject model has no concept vocabulary here).")
        return res
    curves, per_arm, summary_arms = {}, {}, []
    names, kinds = scored[0].concepts["names"], scored[0].concepts["kinds"]
    cat = [i for i, k in enumerate(kinds) if k == "category"]
    word = [i for i, k in enumerate(kinds) if k == "word"]
    label = [n.split(":", 1)[1] for n in names]
    rows, detail = [], []
    for a in scored:
        tokens = np.array([float(e["tokens"]) for e in a.evals])
        single = np.stack([e["single_f1"] for e in a.evals])
        probe = np.stack([e["probe_f1"] for e in a.evals])
        curves[a.name] = {"architecture": a.architecture, "tokens": tokens, "kinds": kinds, "single": single,
                          "probe": probe}
        first_single, first_probe = _first_reach(tokens, single, threshold), _first_reach(tokens, probe, threshold)
        best_single, best_probe = _nanmax(single), _nanmax(probe)
        per_arm[a.name] = (first_single, first_probe, best_single, best_probe)
        n = lambda first, idx: int(np.sum(~np.isnan(first[idx])))  # noqa: E731
        rows.append([a.name, f"{n(first_single, cat)}/{len(cat)}", f"{n(first_probe, cat)}/{len(cat)}",
                     f"{n(first_single, word)}/{len(word)}", f"{n(first_probe, word)}/{len(word)}",
                     _r(np.nanmedian(best_single[cat]), 3), _r(np.nanmedian(best_probe[cat]), 3)])
        last = a.evals[-1]
        concepts_out = []
        for i in range(len(names)):
            entry = {"concept": names[i], "emerged_single_tokens": _r(first_single[i], 0),
                     "emerged_probe_tokens": _r(first_probe[i], 0), "best_single_f1": _r(best_single[i]),
                     "best_probe_f1": _r(best_probe[i]), "final_single_latent": int(last["single_latent"][i]),
                     "final_probe_latents": [int(x) for x in last["probe_latents"][i] if x >= 0]}
            concepts_out.append(entry)
            if kinds[i] == "category":
                detail.append([a.name, label[i], _tokens_text(first_single[i]), _beside(best_single[i], threshold),
                               _tokens_text(first_probe[i]), _beside(best_probe[i], threshold),
                               len(entry["final_probe_latents"])])
        summary_arms.append({"name": a.name, "arm_id": a.record["arm_id"], "concepts": concepts_out})
    k = probes["probe_k"]
    res.tables["counts"] = Table(
        f"Concepts emerged (held-out F1 >= {threshold}): best single latent / {k}-sparse probe",
        ["arm", "categories (one latent)", "categories (probe)", "words (one latent)", "words (probe)",
         "median best cat. F1 (one latent)", "median best cat. F1 (probe)"], rows)
    res.tables["categories"] = Table(
        "Category concepts: when each emerged (training tokens) and the best held-out F1 reached",
        ["arm", "category", "emerged (single)", "best F1 (single)", "emerged (probe)", "best F1 (probe)",
         "probe latents"], detail)
    res.figure("curves", partial(study_plots.emergence_curves, curves, threshold),
               f"Median over concepts of the best held-out F1 as training goes on (solid: one latent, dashed: "
               f"the {k}-sparse probe); a concept has emerged once its score reaches the dotted {threshold:g}.")
    cat_names = [label[i] for i in cat]
    res.figure("steps", partial(study_plots.emergence_steps, {a.name: {
        "architecture": a.architecture, "tokens": curves[a.name]["tokens"],
        "emerged_tokens": per_arm[a.name][0][cat], "best": per_arm[a.name][2][cat],
        "probe_emerged_tokens": per_arm[a.name][1][cat], "probe_best": per_arm[a.name][3][cat]} for a in scored},
        cat_names, threshold),
        "When each category first reached the threshold (filled: one latent, hollow: the probe); on the right, "
        "the best F1 of the arms where it never did.")
    for kind in ("single", "probe"):
        final = np.stack([curves[a.name][kind][-1][cat] for a in scored])
        what = "best single latent" if kind == "single" else f"{k}-sparse probe"
        res.figure(f"final_f1_{kind}", partial(study_plots.score_heatmap, [a.name for a in scored], cat_names, final,
                                               f"Final held-out F1 per category, {what}", threshold),
                   f"Final held-out F1 of the {what} for each category and arm; bold cells reach {threshold:g}.")
    _umap_figures(res, scored)
    single = {a.name: int(np.sum(~np.isnan(per_arm[a.name][0][cat]))) for a in scored}
    probe = {a.name: int(np.sum(~np.isnan(per_arm[a.name][1][cat]))) for a in scored}
    words = {a.name: int(np.sum(~np.isnan(per_arm[a.name][0][word]))) for a in scored}
    lead, lead_probe = max(single, key=single.get), max(probe, key=probe.get)
    res.findings.append(
        f"Most categories isolated in one latent (held-out F1 >= {threshold:g}): **{lead}**, {single[lead]} of "
        f"{len(cat)}; with the {k}-sparse probe **{lead_probe}**, {probe[lead_probe]} of {len(cat)}.")
    if word:
        res.findings.append(f"Words isolated in one latent: at most {max(words.values())} of {len(word)} "
                            f"(**{max(words, key=words.get)}**).")
    never = [i for i in cat if all(np.isnan(per_arm[a.name][1][i]) for a in scored)]
    if never:
        best = {i: max(float(np.nan_to_num(per_arm[a.name][3][i], nan=0.0)) for a in scored) for i in never}
        res.findings.append("No arm reached the threshold even with the probe for: " + ", ".join(
            f"{label[i]} (best {format_beside(best[i], threshold)})" for i in never) + ".")
    res.summary = {"threshold": threshold, "probe_k": k, "skipped_words": scored[0].concepts.get("skipped", []),
                   "arms": summary_arms}
    return res


def _umap_figures(res: StudyResult, arms: list[ArmData]) -> None:
    """Each arm's decoder embedding at its last UMAP eval (W&B has every eval's), on one colour
    scale of firing frequency for all arms."""
    floors = [density_floor(int(a.evals[-1]["n_tokens"])) for a in arms]
    freq_range = (min(floors), 0.0) if floors else None
    for a in arms:
        label = [n.split(":", 1)[1] for n in a.concepts["names"]]
        e = next((e for e in reversed(a.evals) if "umap_xy" in e), None)
        if e is None:
            continue
        concept = [label[i] if i >= 0 else None for i in e["umap_concept"]]
        res.figure(f"umap_{a.name}", partial(
            study_plots.umap_scatter, e["umap_xy"], concept, log10_density(e["density"], int(e["n_tokens"])),
            f"{a.name}: decoder directions at {_tokens_text(float(e['tokens']))} tokens", freq_range),
            f"{a.name}'s latents laid out by UMAP of their decoder directions: left, the latents that best match "
            f"a concept, by concept; right, firing frequency (the same scale for every arm).")


FREQUENCY_BINS = 4


def feature_emergence(arms: list[ArmData], probes: dict) -> StudyResult:
    """Emergence on a synthetic source: the concepts are the true features, and a feature has
    emerged at the first eval where some decoder row reaches |cos| >= threshold with it."""
    threshold = probes["cos_threshold"]
    res = StudyResult("emergence", "When does each true feature get a latent of its own, and do frequent features "
                                   "come first?")
    scored = [a for a in arms if a.concepts and a.evals and "best_cos" in a.evals[0]]
    probability = np.array(scored[0].concepts["feature_probability"])
    roles = scored[0].concepts["feature_role"]
    n = len(probability)
    # Features binned by probability rank, most frequent first: the table version of the scatter.
    bins = np.array_split(np.argsort(-probability, kind="stable"), FREQUENCY_BINS)
    bin_names = [f"p {probability[b].min():.2g}–{probability[b].max():.2g}" for b in bins]
    rows, by_bin, per_feature, scatter, curves, summary_arms = [], [], [], {}, {}, []
    for a in scored:
        tokens = np.array([float(e["tokens"]) for e in a.evals])
        best_cos = np.stack([e["best_cos"] for e in a.evals])
        emerged = _first_reach(tokens, best_cos, threshold)
        best = _nanmax(best_cos)
        done = ~np.isnan(emerged)
        # Negative: frequent features emerge first (the sign the scatter's titles show too).
        rho = rank_stability(probability[done], emerged[done]) if done.sum() >= 3 else float("nan")
        scatter[a.name] = {"architecture": a.architecture, "probability": probability, "emerged_tokens": emerged,
                           "best_cos": best, "tokens": tokens}
        ev_tokens, frac = a.curve("eval/frac_recovered")
        _, mcc = a.curve("eval/mcc")
        curves[a.name] = {"architecture": a.architecture, "tokens": ev_tokens, "frac_recovered": frac, "mcc": mcc}
        rows.append([a.name, f"{int(done.sum())}/{n}", _tokens_text(np.nanmin(emerged) if done.any() else np.nan),
                     _tokens_text(np.nanmedian(emerged) if done.any() else np.nan), _r(rho, 3),
                     _r(a.final.get("frac_recovered")), _r(a.final.get("mcc"))])
        by_bin.append([a.name] + [f"{int(done[b].sum())}/{b.size} emerged" + (
            f", median {_tokens_text(np.nanmedian(emerged[b]))}" if done[b].any() else "") for b in bins])
        final = a.evals[-1]
        features = [{"feature": i, "role": roles[i], "probability": _r(probability[i], 6),
                     "emerged_tokens": _r(emerged[i], 0), "best_cos": _r(best[i]),
                     "final_best_cos": _r(final["best_cos"][i]), "final_best_latent": int(final["best_latent"][i])}
                    for i in range(n)]
        per_feature += [[a.name, *f.values()] for f in features]
        summary_arms.append({"name": a.name, "arm_id": a.record["arm_id"], "emerged": int(done.sum()),
                             "spearman_probability_vs_emergence_tokens": _r(rho), "features": features})
    res.tables["counts"] = Table(
        f"True features emerged (some decoder row with |cos| >= {threshold:g})",
        ["arm", "emerged", "first at", "median emergence", "Spearman(probability, emergence)", "frac_recovered (final)",
         "mcc (final)"], rows)
    res.tables["by_frequency"] = Table(
        "Features emerged by frequency quarter (most frequent first): emerged / features, median emergence tokens",
        ["arm", *bin_names], by_bin)
    res.data["features"] = Table("Every true feature: when it emerged and the best |cos| reached",
                                 ["arm", "feature", "role", "probability", "emerged_tokens", "best_cos",
                                  "final_best_cos", "final_best_latent"], per_feature)
    if scored:
        lead = max(summary_arms, key=lambda arm: arm["emerged"])
        res.findings.append(f"Most true features given a latent of their own (best |cos| >= {threshold:g}): "
                            f"**{lead['name']}**, {lead['emerged']} of {n}.")
        rhos = {arm["name"]: arm["spearman_probability_vs_emergence_tokens"] for arm in summary_arms
                if arm["spearman_probability_vs_emergence_tokens"] is not None}
        if rhos:
            first = [name for name, rho in rhos.items() if rho < 0]
            res.findings.append(f"Frequent features emerge first (Spearman of probability against emergence "
                                f"tokens below 0) in {len(first)} of {len(rhos)} arms; from "
                                f"{min(rhos.values()):.2f} to {max(rhos.values()):.2f}.")
    res.figure("emergence_vs_frequency", partial(study_plots.emergence_vs_frequency, scatter, threshold),
               "When each true feature got a latent against how often it fires: frequent features (right) "
               "should emerge first (low); features that never did sit in the top band.")
    res.figure("recovery_curves", partial(study_plots.recovery_curves, curves, threshold),
               "Share of true features recovered, and the mean max correlation, as training goes on.")
    _umap_figures(res, scored)
    res.summary = {"threshold": threshold, "source": "synthetic", "arms": summary_arms}
    return res


# -- frequency --------------------------------------------------------------------------------
def frequency(arms: list[ArmData], probes: dict) -> StudyResult:
    res = StudyResult("frequency", "How are firing frequencies distributed, and how do they move in training?")
    with_evals = [a for a in arms if a.evals]
    rows, over_time, stability, magnitude = [], {}, {}, {}
    for a in with_evals:
        last = a.evals[-1]
        tokens, dead = a.curve("eval/dead_frac")
        _, dense = a.curve("eval/dense_frac")
        over_time[a.name] = {"architecture": a.architecture, "tokens": tokens, "dead_frac": dead, "dense_frac": dense}
        st_tokens, spearman = a.curve("freq/rank_spearman")
        stability[a.name] = {"architecture": a.architecture, "tokens": st_tokens, "spearman": spearman}
        magnitude[a.name] = {"architecture": a.architecture, "density": last["density"], "mean_act": last["mean_act"]}
        _, ultra = a.curve("freq/ultra_low_frac")
        _, median = a.curve("freq/median_log10_density")
        rows.append([a.name, _r(dead[-1] if dead.size else None), _r(dense[-1] if dense.size else None),
                     _r(ultra[-1] if ultra.size else None), _r(median[-1] if median.size else None, 3),
                     _r(spearman[-1] if spearman.size else None), _r(np.nanmin(spearman) if spearman.size else None)])
        n_tokens = int(last["n_tokens"])
        res.figure(f"density_{a.name}", partial(study_plots.density_over_training,
            a.name, np.array([float(e["tokens"]) for e in a.evals]),
            np.stack([log10_density(e["density"], n_tokens) for e in a.evals]), density_floor(n_tokens),
            probes["dense_threshold"]),
            f"{a.name}: the histogram of latent firing frequencies at each eval (rows, training going down); "
            f"mass at the left edge is dead latents, right of the marker dense ones.")
    res.tables["final"] = Table(
        f"Firing frequencies on the eval split (ultra-low: alive but below {probes['ultra_low_density']:g}; "
        f"dense: above {probes['dense_threshold']:g})",
        ["arm", "dead", "dense", "ultra-low", "median log10 freq", "rank Spearman (last)", "rank Spearman (min)"], rows)
    if with_evals:
        res.figure("dead_dense", partial(study_plots.dead_dense_over_time, over_time, probes["dense_threshold"]),
                   "Dead and dense latents as training goes on: both should fall and stay low.")
        res.figure("rank_stability", partial(study_plots.rank_stability, stability),
                   "Spearman correlation of latent frequency ranks between consecutive evals: near 1 once the "
                   "dictionary has settled.")
        res.figure("freq_vs_magnitude", partial(study_plots.freq_vs_magnitude, magnitude, probes["dense_threshold"]),
                   "Each latent's firing frequency against its mean activation when firing, at the last eval.")
        known = [row for row in rows if row[1] is not None]
        if known:
            fewest, most = min(known, key=lambda r: r[1]), max(known, key=lambda r: r[1])
            res.findings.append(f"Dead latents range from {_pct(fewest[1])} (**{fewest[0]}**) to {_pct(most[1])} "
                                f"(**{most[0]}**) on the eval split.")
        dense = [row for row in rows if row[2]]
        res.findings.append("Dense latents: " + (", ".join(f"**{r[0]}** {_pct(r[2])}" for r in dense) if dense
                                                  else "none in any arm") + ".")
        settled = [row[5] for row in rows if row[5] is not None]
        if settled:
            res.findings.append(f"Frequency ranks between the last two evals correlate at {min(settled):.3f} to "
                                f"{max(settled):.3f} across arms.")
    res.summary = {"arms": [dict(zip(["name", "dead_frac", "dense_frac", "ultra_low_frac", "median_log10_density",
                                      "rank_spearman_last", "rank_spearman_min"], row)) for row in rows]}
    return res


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


# -- resampling -------------------------------------------------------------------------------
def resampling(arms: list[ArmData], probes: dict) -> StudyResult:
    res = StudyResult("resampling", "What does dead-latent handling do to dead latents and reconstruction?")
    rows, curves = [], {}
    for a in arms:
        tokens, dead = a.curve("eval/dead_frac")
        _, ev = a.curve("eval/explained_variance")
        train_tokens, train_dead = a.curve("train/dead_frac")
        resampled_tokens, resampled = a.curve("train/resampled")
        curves[a.name] = {"architecture": a.architecture, "dead_handling": a.record["dead_handling"],
                          "tokens": tokens, "dead_frac": dead, "explained_variance": ev,
                          "train_tokens": train_tokens, "train_dead_frac": train_dead,
                          "resampled_tokens": resampled_tokens[resampled > 0]}
        rows.append([a.name, a.record["dead_handling"], _r(a.final.get("dead_frac")),
                     _r(np.max(dead) if dead.size else None), _r(train_dead[-1] if train_dead.size else None),
                     int(resampled.sum()) if resampled.size else 0, _r(a.final.get("explained_variance")),
                     _r(a.final.get("l0"), 2)])
    recovery = any(a.final.get("frac_recovered") is not None for a in arms)  # a synthetic source
    res.tables["final"] = Table(
        "Dead latents by handling mode (dead: never fired on the eval split; window-dead: not fired in the "
        "last dead window of training)",
        ["arm", "handling", "dead (final)", "dead (peak)", "window-dead (final)", "resampled", "explained variance",
         "l0", *(["frac_recovered"] if recovery else [])],
        [row + ([_r(a.final.get("frac_recovered"))] if recovery else []) for row, a in zip(rows, arms)])
    if curves:
        res.figure("curves", partial(study_plots.resampling_curves, curves),
                   "Dead latents during training (left, dotted lines where latents were resampled), on the eval "
                   "split (middle), and reconstruction (right), by dead-latent handling.")
        by_mode = {r[1]: r for r in rows}
        if "none" in by_mode:
            base = by_mode["none"]
            for mode in ("resample", "auxk"):
                if mode in by_mode and base[2] is not None and by_mode[mode][2] is not None:
                    r = by_mode[mode]
                    res.findings.append(f"{'Resampling' if mode == 'resample' else 'AuxK'} leaves {_pct(r[2])} of "
                                        f"the latents dead at the end against {_pct(base[2])} without handling, at "
                                        f"explained variance {r[6]} against {base[6]}.")
    res.summary = {"arms": [dict(zip(["name", "dead_handling", "dead_frac", "dead_frac_peak", "window_dead_frac",
                                      "resampled", "explained_variance", "l0"], row)) for row in rows]}
    return res


ANALYSES = {"activations": activations, "emergence": emergence, "frequency": frequency, "resampling": resampling}


def analyse(study_dir: Path, meta: dict) -> list[StudyResult]:
    """Every study of the run, from its files. `meta` is the study.json content."""
    probes = meta["spec"]["probes"]
    loaded: dict[str, ArmData] = {}
    results = []
    for name in meta["spec"]["study"]["names"]:
        records = [r for r in meta["arms"] if name in r.get("studies", [])]
        arms = []
        for r in records:
            if r["arm_id"] not in loaded:
                loaded[r["arm_id"]] = load_arm(study_dir, r)
            arms.append(loaded[r["arm_id"]])
        results.append(ANALYSES[name](arms, probes))
    return results
