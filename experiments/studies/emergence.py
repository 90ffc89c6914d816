"""The emergence study: when latents come to represent known concepts (or, on a synthetic source,
the true features), and in what order."""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np

from experiments.eval.metrics import rank_stability
from experiments.studies.results import ArmData, StudyInputs, StudyResult, Table, beside, rounded, tokens_text
from visualization import study_plots
from visualization.plots import density_floor, log10_density
from visualization.terminal import format_beside, shortlist


def _nanmax(scores: np.ndarray) -> np.ndarray:
    """Column maxima ignoring NaN; NaN (without numpy's warning) where a column is all NaN."""
    filled = np.where(np.isnan(scores), -np.inf, scores).max(0)
    return np.where(np.isneginf(filled), np.nan, filled)


def median_by_kind(kinds: list[str], scores: np.ndarray) -> dict[str, np.ndarray]:
    """kind -> [E] median score over the concepts of that kind at each eval, NaN scores (a concept
    without held-out examples) left out; NaN where a kind has no score at an eval. scores [E, C]."""
    out = {}
    for kind in dict.fromkeys(kinds):
        part = scores[:, np.array([k == kind for k in kinds])]
        has = np.isfinite(part).any(axis=1)
        median = np.full(part.shape[0], np.nan)
        median[has] = np.nanmedian(part[has], axis=1)
        out[kind] = median
    return out


def _first_reach(tokens: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """[C] tokens at the first eval whose score reaches threshold (NaN: never). scores [E, C]."""
    reached = np.nan_to_num(scores, nan=-1.0) >= threshold
    first = reached.argmax(0)
    return np.where(reached.any(0), tokens[first], np.nan)


def _settled_reach(tokens: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """[C] tokens at the first eval from which the score stays at or above threshold to the end of
    training (NaN: it ends below). This is when a concept has emerged: a threshold crossed at one
    eval and lost at the next is not an emergence step. scores [E, C]."""
    below = np.nan_to_num(scores, nan=-1.0) < threshold
    # index of the last eval below, +1; E means it ended below (never settled)
    last_below = np.where(below.any(0), below.shape[0] - 1 - below[::-1].argmax(0), -1)
    settled = last_below + 1
    return np.where(settled < below.shape[0], tokens[np.minimum(settled, below.shape[0] - 1)], np.nan)


CEILING_SHARE = 0.8  # a concept has also emerged once its score reaches this share of the dense probe's


def concept_emergence(arms: list[ArmData], study: StudyInputs) -> StudyResult:
    """Emergence on a transformer source: when a concept's best single latent (and k-sparse probe)
    reaches the F1 threshold on held-out tokens, and CEILING_SHARE of the dense probe's F1 on the
    raw activations; the dense probe and the best raw neuron are shown beside the latents."""
    threshold, k = study.probes["f1_threshold"], study.probes["probe_k"]
    res = StudyResult("emergence", "When do latents come to represent known concepts, and in what order?")
    scored = [a for a in arms if a.concepts and a.evals and "single_f1" in a.evals[0]]
    if not scored:
        res.findings.append("No arm has concept scores (the subject model has no concept vocabulary here).")
        return res
    names, kinds = scored[0].concepts["names"], scored[0].concepts["kinds"]
    absent = scored[0].concepts.get("absent", [])
    if not names:
        res.findings.append(f"No concept of the set occurs in both halves of the eval text ({len(absent)} left out); "
                            f"pass --concepts with words the text uses.")
        return res
    # A study resumed across the change that leaves absent concepts out scored fewer concepts after
    # the resume; its earlier evals' arrays do not line up with the names and are left out.
    kept = [replace(a, evals=[e for e in a.evals if len(e["single_f1"]) == len(names)]) for a in scored]
    dropped = sum(len(a.evals) for a in scored) - sum(len(a.evals) for a in kept)
    scored = [a for a in kept if a.evals]
    base = aligned_baselines(study.baselines, names)
    curves, final_scores, per_arm, summary_arms = {}, {}, {}, []
    cat = [i for i, kind in enumerate(kinds) if kind == "category"]
    word = [i for i, kind in enumerate(kinds) if kind == "word"]
    label = [n.split(":", 1)[1] for n in names]
    rows, detail, per_concept = [], [], []
    for a in scored:
        tokens = np.array([float(e["tokens"]) for e in a.evals])
        single = np.stack([e["single_f1"] for e in a.evals])
        probe = np.stack([e["probe_f1"] for e in a.evals])
        final_scores[a.name] = {"single": single[-1], "probe": probe[-1]}
        single_medians, probe_medians = median_by_kind(kinds, single), median_by_kind(kinds, probe)
        curves[a.name] = {"architecture": a.architecture, "tokens": tokens,
                          "counts": {kind: kinds.count(kind) for kind in single_medians},
                          "medians": {kind: {"single": single_medians[kind], "probe": probe_medians[kind]}
                                      for kind in single_medians}}
        first_single, first_probe = _settled_reach(tokens, single, threshold), _settled_reach(tokens, probe, threshold)
        crossed_single, crossed_probe = _first_reach(tokens, single, threshold), _first_reach(tokens, probe, threshold)
        best_single, best_probe = _nanmax(single), _nanmax(probe)
        # Where the dense probe itself scores 0 (a concept too rare to fit), there is no ceiling to reach.
        share = np.where(base["dense_f1"] > 0, CEILING_SHARE * base["dense_f1"], np.inf) if base else None
        near_single = _settled_reach(tokens, single, share) if base else None
        near_probe = _settled_reach(tokens, probe, share) if base else None
        per_arm[a.name] = (first_single, first_probe, best_single, best_probe, near_single, near_probe)
        n = lambda first, idx: int(np.sum(~np.isnan(first[idx])))  # noqa: E731
        rows.append([a.name, f"{n(first_single, cat)}/{len(cat)}", f"{n(first_probe, cat)}/{len(cat)}",
                     f"{n(first_single, word)}/{len(word)}", f"{n(first_probe, word)}/{len(word)}",
                     rounded(np.nanmedian(best_single[cat]), 3) if cat else None,
                     rounded(np.nanmedian(best_probe[cat]), 3) if cat else None])
        last = a.evals[-1]
        concepts_out = []
        for i in range(len(names)):
            entry = {"concept": names[i], "emerged_single_tokens": rounded(first_single[i], 0),
                     "emerged_probe_tokens": rounded(first_probe[i], 0),
                     "first_crossed_single_tokens": rounded(crossed_single[i], 0),
                     "first_crossed_probe_tokens": rounded(crossed_probe[i], 0),
                     "best_single_f1": rounded(best_single[i]), "best_probe_f1": rounded(best_probe[i]),
                     "final_single_f1": rounded(single[-1, i]), "final_probe_f1": rounded(probe[-1, i]),
                     "final_single_latent": int(last["single_latent"][i]),
                     "final_probe_latents": [int(x) for x in last["probe_latents"][i] if x >= 0]}
            if base:
                entry.update(near_ceiling_single_tokens=rounded(near_single[i], 0),
                             near_ceiling_probe_tokens=rounded(near_probe[i], 0))
            concepts_out.append(entry)
            per_concept.append([a.name, names[i]] + ([rounded(base["dense_f1"][i]), rounded(base["neuron_f1"][i])]
                                                     if base else [])
                               + [entry[key] for key in ("final_single_f1", "best_single_f1", "final_probe_f1",
                                                         "best_probe_f1", "emerged_single_tokens",
                                                         "first_crossed_single_tokens", "emerged_probe_tokens")]
                               + ([entry["near_ceiling_single_tokens"]] if base else []))
            if kinds[i] == "category":
                detail.append([a.name, label[i], tokens_text(first_single[i]), tokens_text(crossed_single[i]),
                               beside(best_single[i], threshold), tokens_text(first_probe[i]),
                               tokens_text(crossed_probe[i]), beside(best_probe[i], threshold),
                               len(entry["final_probe_latents"])]
                              + ([tokens_text(near_single[i])] if base else []))
        summary_arms.append({"name": a.name, "arm_id": a.record.arm_id, "concepts": concepts_out})
    res.tables["counts"] = Table(
        f"Concepts emerged (held-out F1 >= {threshold} from some eval to the end of training): best single "
        f"latent / {k}-sparse probe",
        ["arm", "categories (one latent)", "categories (probe)", "words (one latent)", "words (probe)",
         "median best cat. F1 (one latent)", "median best cat. F1 (probe)"], rows)
    levels = baseline_levels(base, kinds) if base else None
    if base:
        res.tables["ceiling"] = _ceiling_table(scored, final_scores, base, levels, kinds, label, k)
    res.tables["categories"] = Table(
        "Category concepts: when each emerged (reached the threshold and stayed; training tokens), when it "
        "first crossed it, and the best held-out F1 reached"
        + (f"; last column: when the best single latent reached {CEILING_SHARE:.0%} of the dense probe's F1 and "
           f"stayed" if base else ""),
        ["arm", "category", "emerged (single)", "first crossed (single)", "best F1 (single)", "emerged (probe)",
         "first crossed (probe)", "best F1 (probe)", "probe latents"]
        + ([f"at {CEILING_SHARE:.0%} of dense (single)"] if base else []), detail)
    res.data["concepts"] = Table(
        "Every concept and arm: the baselines, the final and best held-out F1 and when it emerged (tokens)",
        ["arm", "concept"] + (["dense_probe_f1", "best_neuron_f1"] if base else [])
        + ["final_single_f1", "best_single_f1", "final_probe_f1", "best_probe_f1", "emerged_single_tokens",
           "first_crossed_single_tokens", "emerged_probe_tokens"]
        + (["near_ceiling_single_tokens"] if base else []), per_concept)
    res.figure("curves", partial(study_plots.emergence_curves, curves, threshold, baselines=levels),
               f"Median over concepts of the best held-out F1 as training goes on (solid: one latent, dashed: "
               f"the {k}-sparse probe); a concept has emerged once its score reaches the dotted {threshold:g} and "
               f"stays there." + (" Grey bands: the dense probe on the raw activations (top, the ceiling) and the "
                                  "best raw neuron (bottom)." if base else ""))
    cat_names = [label[i] for i in cat]
    res.figure("steps", partial(study_plots.emergence_steps, {a.name: {
        "architecture": a.architecture, "tokens": curves[a.name]["tokens"],
        "emerged_tokens": per_arm[a.name][0][cat], "best": per_arm[a.name][2][cat],
        "probe_emerged_tokens": per_arm[a.name][1][cat], "probe_best": per_arm[a.name][3][cat]} for a in scored},
        cat_names, threshold),
        "When each category reached the threshold for good (filled: one latent, hollow: the probe); on the right, "
        "the best F1 of the arms where it did not stay above it.")
    for kind in ("single", "probe"):
        final = np.stack([final_scores[a.name][kind][cat] for a in scored])
        what = "best single latent" if kind == "single" else f"{k}-sparse probe"
        res.figure(f"final_f1_{kind}", partial(study_plots.score_heatmap, [a.name for a in scored], cat_names, final,
                                               f"Final held-out F1 per category, {what}", threshold),
                   f"Final held-out F1 of the {what} for each category and arm; bold cells reach {threshold:g}.")
    _umap_figures(res, scored)
    if base:
        res.findings.append(_baseline_finding(scored, final_scores, levels, kinds))
        if cat:
            near = {a.name: (int(np.sum(~np.isnan(per_arm[a.name][4][cat]))),
                             int(np.sum(~np.isnan(per_arm[a.name][5][cat])))) for a in scored}
            res.findings.append(
                f"Categories whose score reached {CEILING_SHARE:.0%} of the dense probe's F1 and stayed there (one "
                f"latent · probe, of {len(cat)}): " + ", ".join(f"{name} {one} · {probe}"
                                                                for name, (one, probe) in near.items()) + ".")
    single = {a.name: int(np.sum(~np.isnan(per_arm[a.name][0][cat]))) for a in scored}
    probe = {a.name: int(np.sum(~np.isnan(per_arm[a.name][1][cat]))) for a in scored}
    words = {a.name: int(np.sum(~np.isnan(per_arm[a.name][0][word]))) for a in scored}
    if cat:
        lead, lead_probe = max(single, key=single.get), max(probe, key=probe.get)
        res.findings.append(
            f"Most categories isolated in one latent (held-out F1 >= {threshold:g} to the end): **{lead}**, "
            f"{single[lead]} of {len(cat)}; with the {k}-sparse probe **{lead_probe}**, {probe[lead_probe]} of "
            f"{len(cat)}.")
    if word:
        res.findings.append(f"Words isolated in one latent: at most {max(words.values())} of {len(word)} "
                            f"(**{max(words, key=words.get)}**).")
    never = [i for i in cat if all(np.isnan(per_arm[a.name][1][i]) for a in scored)]
    if never:
        # NaN only in studies made before absent concepts were left out
        best = {i: max(float(np.nan_to_num(per_arm[a.name][3][i], nan=0.0)) for a in scored) for i in never}
        res.findings.append("No arm ended at the threshold even with the probe for: " + ", ".join(
            f"{label[i]} (best {format_beside(best[i], threshold)})" for i in never) + ".")
    if dropped:
        res.findings.append(f"{dropped} evals scored another concept set (before the study was resumed by a newer "
                            f"version) and are left out.")
    if absent:
        res.findings.append(f"Left out, as they do not occur in both halves of the eval text: {len(absent)} concepts "
                            f"({shortlist([n.split(':', 1)[1] for n in absent])}).")
    res.summary = {"threshold": threshold, "probe_k": k, "skipped_words": scored[0].concepts.get("skipped", []),
                   "absent_concepts": absent, "arms": summary_arms}
    if base:
        res.summary["ceiling_share"] = CEILING_SHARE
        res.summary["baselines"] = [{"concept": names[i], "dense_probe_f1": rounded(base["dense_f1"][i]),
                                     "best_neuron_f1": rounded(base["neuron_f1"][i]),
                                     "best_neuron": int(base["neuron"][i]),
                                     "best_neuron_sign": int(base["neuron_sign"][i])} for i in range(len(names))]
    return res


def aligned_baselines(baselines: dict | None, names: list[str]) -> dict[str, np.ndarray] | None:
    """The study's baselines in the order of the scored concepts; None where the study has none
    (measured since issue 21) or they do not cover every concept."""
    if baselines is None:
        return None
    where = {str(n): i for i, n in enumerate(baselines["names"])}
    if any(n not in where for n in names):
        return None
    order = np.array([where[n] for n in names])
    return {key: baselines[key][order] for key in ("dense_f1", "neuron_f1", "neuron", "neuron_sign")}


def baseline_levels(base: dict[str, np.ndarray], kinds: list[str]) -> dict[str, dict[str, float]]:
    """kind -> the median dense-probe and best-raw-neuron F1 over the concepts of that kind."""
    dense, neuron = median_by_kind(kinds, base["dense_f1"][None]), median_by_kind(kinds, base["neuron_f1"][None])
    return {kind: {"dense": float(dense[kind][0]), "neuron": float(neuron[kind][0])} for kind in dense}


def _ceiling_table(scored: list[ArmData], final_scores: dict, base: dict, levels: dict, kinds: list[str],
                   label: list[str], k: int) -> Table:
    """Per category (and the median over the words): the dense probe, the best raw neuron and each
    arm's final best single latent · k-sparse probe, side by side."""
    def pair(a: ArmData, idx) -> str:
        one, probe = (float(np.median(final_scores[a.name][kind][idx])) for kind in ("single", "probe"))
        return f"{one:.3f} · {probe:.3f}"

    side = {1: "high", -1: "low"}  # where the neuron's values mark the concept
    rows = [[label[i], f"{base['dense_f1'][i]:.3f}",
             f"{base['neuron_f1'][i]:.3f} (#{base['neuron'][i]} {side[int(base['neuron_sign'][i])]})",
             *(pair(a, [i]) for a in scored)] for i, kind in enumerate(kinds) if kind == "category"]
    word = [i for i, kind in enumerate(kinds) if kind == "word"]
    if word:
        rows.append([f"words (median of {len(word)})", f"{levels['word']['dense']:.3f}",
                     f"{levels['word']['neuron']:.3f}", *(pair(a, word) for a in scored)])
    return Table(f"Held-out F1 at the end of training beside what the raw activations give: the dense probe (a "
                 f"logistic regression on all dimensions, the ceiling), the best raw neuron (the floor: its index, and "
                 f"whether high or low values mark the concept), and per arm "
                 f"its best single latent · {k}-sparse probe",
                 ["category", "dense probe", "best raw neuron", *(a.name for a in scored)], rows)


def _baseline_finding(scored: list[ArmData], final_scores: dict, levels: dict, kinds: list[str]) -> str:
    """One sentence: the ceiling, the floor, and how far the best arm's single latents get."""
    parts = []
    for kind in ("category", "word"):
        idx = np.array(kinds) == kind
        if not idx.any():
            continue
        dense, neuron = levels[kind]["dense"], levels[kind]["neuron"]
        best = max(scored, key=lambda a: np.median(final_scores[a.name]["single"][idx]))
        sae = np.median(final_scores[best.name]["single"][idx])
        parts.append(f"{kind} concepts: dense probe {dense:.3f}, best raw neuron {neuron:.3f}, best single latent "
                     f"{sae:.3f} (**{best.name}**)")
    return ("Median held-out F1 on the raw activations against the SAEs at the end of training: "
            + "; ".join(parts) + ".")


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
            f"{a.name}: decoder directions at {tokens_text(float(e['tokens']))} tokens", freq_range),
            f"{a.name}'s latents laid out by UMAP of their decoder directions: left, the latents that best match "
            f"a concept, by concept; right, firing frequency (the same scale for every arm).")


FREQUENCY_BINS = 4


def feature_emergence(arms: list[ArmData], study: StudyInputs) -> StudyResult:
    """Emergence on a synthetic source: the concepts are the true features, and a feature has
    emerged at the first eval from which some decoder row keeps |cos| >= threshold with it."""
    threshold = study.probes["cos_threshold"]
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
        emerged = _settled_reach(tokens, best_cos, threshold)
        best = _nanmax(best_cos)
        done = ~np.isnan(emerged)
        # Negative: frequent features emerge first (the sign the scatter's titles show too).
        rho = rank_stability(probability[done], emerged[done]) if done.sum() >= 3 else float("nan")
        scatter[a.name] = {"architecture": a.architecture, "probability": probability, "emerged_tokens": emerged,
                           "best_cos": best, "tokens": tokens, "spearman": rho}
        ev_tokens, frac = a.curve("eval/frac_recovered")
        _, mcc = a.curve("eval/mcc")
        curves[a.name] = {"architecture": a.architecture, "tokens": ev_tokens, "frac_recovered": frac, "mcc": mcc}
        rows.append([a.name, f"{int(done.sum())}/{n}", tokens_text(np.nanmin(emerged) if done.any() else np.nan),
                     tokens_text(np.nanmedian(emerged) if done.any() else np.nan), rounded(rho, 3),
                     rounded(a.final.get("frac_recovered")), rounded(a.final.get("mcc"))])
        by_bin.append([a.name] + [f"{int(done[b].sum())}/{b.size} emerged" + (
            f", median {tokens_text(np.nanmedian(emerged[b]))}" if done[b].any() else "") for b in bins])
        final = a.evals[-1]
        features = [{"feature": i, "role": roles[i], "probability": rounded(probability[i], 6),
                     "emerged_tokens": rounded(emerged[i], 0), "best_cos": rounded(best[i]),
                     "final_best_cos": rounded(final["best_cos"][i]), "final_best_latent": int(final["best_latent"][i])}
                    for i in range(n)]
        per_feature += [[a.name, *f.values()] for f in features]
        summary_arms.append({"name": a.name, "arm_id": a.record.arm_id, "emerged": int(done.sum()),
                             "spearman_probability_vs_emergence_tokens": rounded(rho), "features": features})
    res.tables["counts"] = Table(
        f"True features emerged (some decoder row with |cos| >= {threshold:g} from some eval to the end)",
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
