"""The comparison across hook points of a study over several (`--layer 0,1`, `--layer all`,
`--hook resid_post,mlp_out`): each arm's final fidelity and, where the emergence study ran, the
concepts its latents isolate against what the raw activations there hold, one row per arm and
hook point. Each study's own analysis runs at every hook point beside it (`activations@L1.resid_post`)."""
from __future__ import annotations

from functools import partial

import numpy as np

from config.records import hook_label
from experiments.studies.emergence import aligned_baselines, baseline_levels, median_by_kind
from experiments.studies.results import ArmData, StudyInputs, StudyResult, Table, rounded
from visualization import study_plots

# The final metrics compared, with their short table headers.
METRICS = {"l0": "L0", "explained_variance": "expl. var.", "ce_loss_recovered": "CE recov.", "kl": "KL"}
KINDS = {"category": "categories", "word": "words"}
PANELS = {"explained_variance": "explained variance", "ce_loss_recovered": "CE loss recovered",
          "l0": "L0 (active latents per token)"}


def base_name(arm: ArmData) -> str:
    """The arm's name without its hook point's suffix: the same SAE settings at every hook point."""
    return arm.name.rsplit("@", 1)[0]


def _concept_medians(arm: ArmData) -> dict[str, float]:
    """kind -> median over the concepts of that kind of the final best single latent's held-out F1."""
    if not (arm.concepts and arm.evals and "single_f1" in arm.evals[-1]):
        return {}
    kinds = arm.concepts["kinds"]
    if len(arm.evals[-1]["single_f1"]) != len(kinds):
        return {}
    return {kind: float(m[0]) for kind, m in median_by_kind(kinds, arm.evals[-1]["single_f1"][None]).items()}


def analyse(groups: list[tuple[str, list[ArmData], StudyInputs]]) -> StudyResult:
    """groups: (hook point, its arms, its inputs) in the study's order."""
    res = StudyResult("hook-points", "How do the SAEs, and the concepts their latents isolate, change from one hook "
                                     "point to the next?")
    hooks = [hook for hook, _, _ in groups]
    labels = {hook: hook_label(hook) for hook in hooks}
    finished = [(hook, a) for hook, arms, _ in groups for a in arms if a.final]
    metrics = [m for m in METRICS if any(rounded(a.final.get(m)) is not None for _, a in finished)]
    concepts = {(hook, a.name): _concept_medians(a) for hook, a in finished}
    kinds = [k for k in KINDS if any(k in c for c in concepts.values())]
    rows, points = [], []
    for hook, arm in finished:
        scores = concepts[(hook, arm.name)]
        f1 = " / ".join("—" if scores.get(k) is None else f"{scores[k]:.3f}" for k in kinds)
        rows.append([base_name(arm), labels[hook], *(rounded(arm.final.get(m)) for m in metrics),
                     *([f1] if kinds else [])])
        points.append({"arm": base_name(arm), "architecture": arm.architecture, "hook": labels[hook],
                       **{m: arm.final.get(m) for m in metrics}, **{f"f1_{k}": scores.get(k) for k in kinds}})
    res.tables["per_hook"] = Table(
        "Each arm at each hook point: final metrics" + (", and per concept kind the median held-out F1 of the "
                                                        "best single latent" if kinds else ""),
        ["arm", "hook point", *(METRICS[m] for m in metrics), *(["F1 " + " / ".join(KINDS[k] for k in kinds)] if kinds
                                                                else [])], rows)
    baselines = {}  # hook label -> kind -> {"dense", "neuron"}, where the hook point's baselines cover its concepts
    for hook, arms, inputs in groups:
        scored = next((a for a in arms if a.concepts and a.concepts.get("names")), None)
        base = aligned_baselines(inputs.baselines, scored.concepts["names"]) if scored is not None else None
        if base:
            baselines[labels[hook]] = baseline_levels(base, scored.concepts["kinds"])
    if baselines:
        res.tables["baselines"] = Table(
            "What the raw activations hold at each hook point: median held-out F1 of a dense probe (the ceiling) "
            "and of the best single raw neuron (the floor)",
            ["hook point", *(f"{KINDS[k]} {what}" for k in kinds for what in ("dense probe", "best neuron"))],
            [[hook, *(rounded(b.get(k, {}).get(what), 3) for k in kinds for what in ("dense", "neuron"))]
             for hook, b in baselines.items()])
    if not finished:
        res.findings.append("No arm has finished yet.")
        return res
    panels = [(m, label) for m, label in PANELS.items() if m in metrics]
    panels += [(f"f1_{k}", f"{KINDS[k]}: median F1 of one latent") for k in kinds]
    res.figure("per_hook", partial(study_plots.per_hook_lines, points, [labels[h] for h in hooks], panels,
                                   {f"f1_{k}": {hook: b[k]["dense"] for hook, b in baselines.items() if k in b}
                                    for k in kinds}),
               "Each arm's final metrics at each hook point, one line per arm's settings" +
               (" (concept panels: grey, the dense probe's median F1 on the raw activations there)" if baselines
                else "") + ".")
    for key, what in [("explained_variance", "explained variance"), ("ce_loss_recovered", "CE loss recovered")]:
        if key in metrics:
            res.findings.append(_by_hook(points, key, what, [labels[h] for h in hooks]))
    for k in kinds:
        line = _by_hook(points, f"f1_{k}", f"{KINDS[k]}' median best-latent F1", [labels[h] for h in hooks])
        if baselines:
            line += " The dense probe's: " + ", ".join(f"{hook} {b[k]['dense']:.3f}" for hook, b in baselines.items()
                                                        if k in b) + "."
        res.findings.append(line)
    res.summary = {"hooks": hooks, "arms": [{key: (rounded(v) if isinstance(v, float) else v)
                                              for key, v in p.items()} for p in points],
                   "baselines": baselines}
    return res


def _by_hook(points: list[dict], key: str, what: str, hooks: list[str]) -> str:
    """One sentence: the median over arms of `key` at each hook point, and where it is highest."""
    medians = {}
    for hook in hooks:
        values = [p[key] for p in points if p["hook"] == hook and p.get(key) is not None and np.isfinite(p[key])]
        if values:
            medians[hook] = float(np.median(values))
    if not medians:
        return f"No arm has a {what}."
    best = max(medians, key=medians.get)
    return (f"Median over arms of the {what} by hook point: "
            + ", ".join(f"{hook} {value:.4f}" for hook, value in medians.items()) + f"; highest at **{best}**.")
