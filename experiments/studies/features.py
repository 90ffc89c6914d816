"""What the latents of each finished arm mean, for the report, the terminal and W&B: per arm the
most and the least frequent latents and the best latent for each concept (on a synthetic source:
each latent's true feature), with labels and top contexts; and every latent in one long table
(a CSV beside the report and a W&B table the dashboard can sort and search). The numbers come
from the feature analysis each arm's folder holds (experiments/eval/features.py)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from config.records import ArmRecord
from experiments.eval.features import (FeatureAnalysis, Match, features_done, load_features, render_context,
                                      search_features, top_tokens)
from experiments.studies.results import StudyResult, Table, rounded

SHOWN = 5  # latents in each "most / least frequent" table
CONCEPTS_SHOWN = 12  # concepts in each "best latent per concept" table, best first
MATCH_F1 = 0.5  # a latent matches its concept when its (in-sample) F1 reaches this


def load_arm_features(study_dir: Path, arms: list[ArmRecord]) -> dict[str, FeatureAnalysis]:
    """arm name -> its feature analysis, for the arms that have one."""
    return {a.name: load_features(study_dir / a.arm_id) for a in arms if features_done(study_dir / a.arm_id)}


SEARCH_ROWS = 30  # matches printed per search, best first
SEARCH_CONTEXT_WIDTH = 60  # characters of a context in the search table: it fits 100 columns beside the arm


def strongest_context(fa: FeatureAnalysis, latent: int) -> str:
    """The latent's strongest context, the firing token marked; "" without contexts."""
    a = fa.arrays
    if "top_context_tokens" not in a or a["top_acts"][latent, 0] <= 0:
        return ""
    tokens = a["top_context_tokens"][latent, 0]
    return render_context(tokens, a["top_context_acts"][latent, 0], len(tokens) // 2, fa.text)


def terminal_context(markdown: str, width: int = SEARCH_CONTEXT_WIDTH) -> str:
    """A context rendered as Markdown, for the terminal: escapes and bold undone, and cut to `width`
    characters around its centre token (a third of them before it at least), "…" where cut."""
    centre = max(markdown.find("**⟦"), 0)

    def plain(text: str) -> str:
        return re.sub(r"\\(.)", r"\1", text.replace("**", ""))

    before, after = plain(markdown[:centre]), plain(markdown[centre:])
    keep = min(len(before), max(width // 3, width - len(after)))
    text = before[len(before) - keep:] + after
    return ("…" if keep < len(before) else "") + text[:width] + ("…" if len(text) > width else "")


def _logits(fa: FeatureAnalysis, latent: int, end: str) -> str:
    ids = fa.arrays.get(f"logit_{end}_ids")
    if ids is None:
        return ""
    return " ".join(fa.text(t).strip() or "·" for t in ids[latent][:5])


def _concept(fa: FeatureAnalysis, latent: int) -> tuple[str, float | None]:
    a = fa.arrays
    if "concept_index" not in a or a["concept_index"][latent] < 0:
        return "", None
    return fa.concept_names[int(a["concept_index"][latent])], rounded(float(a["concept_f1"][latent]), 3)


def latent_rows(fa: FeatureAnalysis, latents: np.ndarray) -> tuple[list[str], list[list]]:
    """The columns and rows that describe `latents`: a transformer arm's contexts, logit effects and
    concept, or a synthetic arm's true feature with its |cos| and firing precision and recall."""
    a = fa.arrays
    if "true_feature" in a:
        headers = ["latent", "label", "density", "mean act (firing)", "true feature", "|cos|", "precision", "recall"]
        rows = [[int(i), fa.labels[i], rounded(a["density"][i], 6), rounded(a["mean_firing_act"][i], 4),
                 int(a["true_feature"][i]), rounded(a["true_cos"][i], 3), rounded(a["firing_precision"][i], 3),
                 rounded(a["firing_recall"][i], 3)] for i in latents]
        return headers, rows
    headers = ["latent", "label", "density", "mean act (firing)", "top tokens", "top context", "promotes",
               "suppresses", "concept", "F1"]
    rows = [[int(i), fa.labels[i], rounded(a["density"][i], 6), rounded(a["mean_firing_act"][i], 4),
             " / ".join(tokens), strongest_context(fa, i), _logits(fa, i, "top"), _logits(fa, i, "bottom"),
             *_concept(fa, i)] for i, tokens in zip(latents, top_tokens(fa, latents))]
    return headers, rows


def _best_per_concept(fa: FeatureAnalysis) -> list[list]:
    """Per concept that some latent matches best, that latent (the highest F1 among them), best first."""
    a = fa.arrays
    index, f1 = a["concept_index"], a["concept_f1"]
    rows = []
    for c, name in enumerate(fa.concept_names):
        mine = np.flatnonzero(index == c)
        if mine.size:
            i = int(mine[np.argmax(f1[mine])])
            rows.append([name, i, rounded(float(f1[i]), 3), fa.labels[i], strongest_context(fa, i)])
    rows.sort(key=lambda r: -r[2])
    return rows[:CONCEPTS_SHOWN]


def analyse(study_dir: Path, arms: list[ArmRecord]) -> StudyResult | None:
    """The "features" section; None when no arm has a feature analysis."""
    loaded = load_arm_features(study_dir, arms)
    if not loaded:
        return None
    res = StudyResult("features", "What does each latent respond to?", in_docs=False)
    summary, arm_summaries = [], []
    for name, fa in loaded.items():
        a = fa.arrays
        alive = np.flatnonzero(a["n_fired"] > 0)
        by_density = alive[np.lexsort((alive, -a["density"][alive]))]
        res.tables[f"{name} frequent"] = Table(f"{name}: the {SHOWN} most frequent latents",
                                               *latent_rows(fa, by_density[:SHOWN]))
        res.tables[f"{name} rare"] = Table(f"{name}: the {SHOWN} least frequent latents that fire",
                                           *latent_rows(fa, by_density[::-1][:SHOWN]))
        if "concept_index" in a:
            res.tables[f"{name} concepts"] = Table(
                f"{name}: the latent that matches each concept best (F1 of 'fires' against 'token is in the "
                f"concept' over the eval split), the {CONCEPTS_SHOWN} best concepts",
                ["concept", "latent", "F1", "label", "top context"], _best_per_concept(fa))
        res.data[f"latents {name}"] = Table(f"{name}: every latent", *latent_rows(fa, np.arange(len(fa.labels))))
        if "true_feature" in a:
            matched = int(np.unique(a["true_feature"][a["true_cos"] >= fa.settings["threshold"]]).size)
            what = ["true features matched", matched]
        else:
            matched = int((a.get("concept_f1", np.zeros(0)) >= MATCH_F1).sum())
            what = [f"latents matching a concept (F1 ≥ {MATCH_F1})", matched]
        summary.append([name, len(fa.labels), int(alive.size), sum(bool(label) for label in fa.labels),
                        rounded(float(np.median(a["density"][alive])), 6) if alive.size else None, what[1]])
        arm_summaries.append({"arm": name, "latents": len(fa.labels), "alive": int(alive.size), "matched": matched})
        match_header = what[0]
    res.tables = {"summary": Table("Latents per arm (alive: fires on the eval split)",
                                   ["arm", "latents", "alive", "labelled", "median density (alive)", match_header],
                                   summary), **res.tables}
    best = max(summary, key=lambda r: r[-1])
    res.findings.append(f"Every latent of {len(loaded)} arms is described in `features/` of its arm's folder; "
                        f"**{best[0]}** has the most {match_header.split(' (')[0]} ({best[-1]:,}). Search them "
                        f"with `--search WORD --study-id {study_dir.name}`.")
    res.summary = {"arms": arm_summaries}
    return res




def ranked(hits: list[tuple[Any, FeatureAnalysis, Match]]) -> list[tuple[Any, FeatureAnalysis, Match]]:
    """(arm, its analysis, a match) of several arms, best first: by the search's tier, then its score;
    arms keep their study order within a tie (the sort is stable)."""
    return sorted(hits, key=lambda h: (-h[2].tier, -h[2].score))


def search(study_dir: Path, arms: list[ArmRecord], word: str) -> Table | None:
    """The latents of `arms` that match `word` (experiments/eval/features.py: search_features), best
    first across arms; None when no arm has a feature analysis."""
    loaded = load_arm_features(study_dir, arms)
    if not loaded:
        return None
    hits = ranked([(name, fa, match) for name, fa in loaded.items() for match in search_features(fa, word)])
    rows = [[name, m.latent, fa.labels[m.latent], rounded(fa.arrays["density"][m.latent], 6), m.why,
             terminal_context(strongest_context(fa, m.latent))] for name, fa, m in hits[:SEARCH_ROWS]]
    return Table(f"latents matching {word!r} ({len(hits):,}; the first {len(rows)})",
                 ["arm", "latent", "label", "density", "why", "top context"], rows)
