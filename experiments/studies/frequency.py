"""The frequency study: how often latents fire, which die or turn dense, and how stable their ranking is."""
from __future__ import annotations

from functools import partial

import numpy as np

from experiments.studies.results import ArmData, StudyInputs, StudyResult, Table, percent, rounded
from visualization import study_plots
from visualization.plots import density_floor, log10_density


def analyse(arms: list[ArmData], study: StudyInputs) -> StudyResult:
    probes = study.probes
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
        rows.append([a.name, rounded(dead[-1] if dead.size else None), rounded(dense[-1] if dense.size else None),
                     rounded(ultra[-1] if ultra.size else None), rounded(median[-1] if median.size else None, 3),
                     rounded(spearman[-1] if spearman.size else None), rounded(np.nanmin(spearman) if spearman.size else None)])
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
            res.findings.append(f"Dead latents range from {percent(fewest[1])} (**{fewest[0]}**) to {percent(most[1])} "
                                f"(**{most[0]}**) on the eval split.")
        dense = [row for row in rows if row[2]]
        res.findings.append("Dense latents: " + (", ".join(f"**{r[0]}** {percent(r[2])}" for r in dense) if dense
                                                  else "none in any arm") + ".")
        settled = [row[5] for row in rows if row[5] is not None]
        if settled:
            res.findings.append(f"Frequency ranks between the last two evals correlate at {min(settled):.3f} to "
                                f"{max(settled):.3f} across arms.")
    res.summary = {"arms": [dict(zip(["name", "dead_frac", "dense_frac", "ultra_low_frac", "median_log10_density",
                                      "rank_spearman_last", "rank_spearman_min"], row)) for row in rows]}
    return res
