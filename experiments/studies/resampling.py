"""The resampling study: what dead-latent handling does to dead latents and reconstruction."""
from __future__ import annotations

from functools import partial

import numpy as np

from experiments.studies.results import ArmData, StudyInputs, StudyResult, Table, percent, rounded
from visualization import study_plots


def analyse(arms: list[ArmData], study: StudyInputs) -> StudyResult:
    res = StudyResult("resampling", "What does dead-latent handling do to dead latents and reconstruction?")
    rows, curves = [], {}
    for a in arms:
        tokens, dead = a.curve("eval/dead_frac")
        _, ev = a.curve("eval/explained_variance")
        train_tokens, train_dead = a.curve("train/dead_frac")
        resampled_tokens, resampled = a.curve("train/resampled")
        curves[a.name] = {"architecture": a.architecture, "dead_handling": a.record.dead_handling,
                          "tokens": tokens, "dead_frac": dead, "explained_variance": ev,
                          "train_tokens": train_tokens, "train_dead_frac": train_dead,
                          "resampled_tokens": resampled_tokens[resampled > 0]}
        rows.append([a.name, a.record.dead_handling, rounded(a.final.get("dead_frac")),
                     rounded(np.max(dead) if dead.size else None), rounded(train_dead[-1] if train_dead.size else None),
                     int(resampled.sum()) if resampled.size else 0, rounded(a.final.get("explained_variance")),
                     rounded(a.final.get("l0"), 2)])
    recovery = any(a.final.get("frac_recovered") is not None for a in arms)  # a synthetic source
    res.tables["final"] = Table(
        "Dead latents by handling mode (dead: never fired on the eval split; window-dead: not fired in the "
        "last dead window of training)",
        ["arm", "handling", "dead (final)", "dead (peak)", "window-dead (final)", "resampled", "explained variance",
         "l0", *(["frac_recovered"] if recovery else [])],
        [row + ([rounded(a.final.get("frac_recovered"))] if recovery else []) for row, a in zip(rows, arms)])
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
                    res.findings.append(f"{'Resampling' if mode == 'resample' else 'AuxK'} leaves {percent(r[2])} of "
                                        f"the latents dead at the end against {percent(base[2])} without handling, at "
                                        f"explained variance {r[6]} against {base[6]}.")
    res.summary = {"arms": [dict(zip(["name", "dead_handling", "dead_frac", "dead_frac_peak", "window_dead_frac",
                                      "resampled", "explained_variance", "l0"], row)) for row in rows]}
    return res
