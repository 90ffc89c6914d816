"""The activations study: how the sparsity mechanisms trade reconstruction against sparsity."""
from __future__ import annotations

from functools import partial


from experiments.studies.results import (FINAL_METRICS, RECOVERY_BREAKDOWN, ArmData, StudyInputs, StudyResult, Table,
                                        rounded)
from visualization import study_plots


def analyse(arms: list[ArmData], study: StudyInputs) -> StudyResult:
    res = StudyResult("activations", "How do the sparsity mechanisms trade reconstruction against sparsity?")
    # CE/KL exist for transformer sources, mcc/frac_recovered for synthetic ones.
    metrics = [m for m in FINAL_METRICS if any(rounded(a.final.get(m)) is not None for a in arms)] or list(FINAL_METRICS[:6])
    rows = [[a.name, a.record.status, *(rounded(a.final.get(m)) for m in metrics), a.record.steps, a.record.seconds]
            for a in arms]
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
    breakdown = [k for k in RECOVERY_BREAKDOWN if any(rounded(a.final.get(k)) is not None for a in arms)]
    if breakdown:
        res.tables["recovery"] = Table(
            "Fraction of true features recovered, by frequency quarter (q1 the most frequent) and by role",
            ["arm", "all", *(k.removeprefix("frac_recovered_") for k in breakdown)],
            [[a.name, rounded(a.final.get("frac_recovered")), *(rounded(a.final.get(k)) for k in breakdown)] for a in arms])
    res.summary = {"arms": [{"name": a.name, "arm_id": a.record.arm_id,
                             **{m: a.final.get(m) for m in (*metrics, *breakdown)}} for a in arms]}
    return res
