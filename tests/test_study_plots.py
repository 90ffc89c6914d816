"""Study report figures (visualization/study_plots.py) and the decoder UMAP (experiments/eval/embedding.py).

Figures are built from small synthetic inputs, including edge cases (NaN, a single eval, arms that
never emerge, an all-dead arm, no CE), checked for axes, labels and titles, and saved as PNG; a
report's figures are drawn in other processes into the same files.
"""

import os
import signal
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from experiments.eval.embedding import decoder_embedding
from visualization import study_plots as sp
from visualization.plots import density_floor, log10_density, save_figure, save_figures

ARMS = {"topk-k32": "topk", "batchtopk-k32": "batchtopk", "relu": "relu", "jumprelu": "jumprelu", "gated": "gated"}


def _data_axes(fig: Figure) -> list:
    """Axes that are not colorbars."""
    return [ax for ax in fig.axes if not hasattr(ax, "_colorbar")]


def _check(fig: Figure, tmp_path: Path, n_axes: int, name: str) -> None:
    assert isinstance(fig, Figure)
    assert len(fig.axes) == n_axes, [ax.get_title() for ax in fig.axes]
    titles = [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]
    assert any(t.strip() for t in titles)
    for ax in _data_axes(fig):
        assert ax.get_title().strip(), "every panel has a title"
    assert any(ax.get_xlabel().strip() for ax in fig.axes)
    assert any(ax.get_ylabel().strip() for ax in fig.axes)
    width, _ = fig.get_size_inches()
    assert width <= 12.0 + 1e-9
    path = tmp_path / f"{name}.png"
    save_figure(fig, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _points(ax) -> set[tuple[float, float]]:
    """Every (x, y) the axes draw, as lines or scatter points, rounded to float32 precision."""
    xy = [line.get_xydata() for line in ax.get_lines()] + [c.get_offsets() for c in ax.collections]
    return {(round(float(x), 6), round(float(y), 6)) for arr in xy for x, y in np.asarray(arr).reshape(-1, 2)}


def _as_points(xs, ys) -> set[tuple[float, float]]:
    return {(round(float(x), 6), round(float(y), 6)) for x, y in zip(xs, ys) if np.isfinite(x) and np.isfinite(y)}


def test_save_figure_writes_the_bytes_savefig_writes(tmp_path):
    """save_figure draws a constrained-layout figure once where savefig draws it twice: same PNG."""
    import matplotlib.pyplot as plt

    def draw() -> Figure:
        fig, axs = plt.subplots(1, 2, figsize=(8, 3), layout="constrained")
        for i, ax in enumerate(axs):
            ax.plot([1, 2, 3], [3, 1, 2 + i], label=f"arm {i}")
            ax.set_title(f"panel {i}")
        fig.legend(loc="outside right upper", title="arms")
        fig.suptitle("a long title that the layout has to make room for")
        return fig

    draw().savefig(tmp_path / "savefig.png", dpi=120, format="png")
    save_figure(draw(), tmp_path / "ours.png")
    assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "savefig.png").read_bytes()


def test_format_tokens_and_palette():
    assert sp.format_tokens(0) == "0"
    assert sp.format_tokens(500) == "500"
    assert sp.format_tokens(1500) == "1.5k"
    assert sp.format_tokens(100_000) == "100k"
    assert sp.format_tokens(1_200_000) == "1.2M"
    assert sp.format_tokens(float("nan")) == ""
    assert sp.arch_color("topk") == sp.ARCH_COLORS["topk"]
    # stable across processes and runs (a CRC of the name, not Python's salted hash()): pinned values
    assert (sp.arch_color("mystery"), sp.arch_color("other")) == ("#e377c2", "#8c564b")
    assert sp.arch_color("mystery") not in sp.ARCH_COLORS.values()
    styles = sp.arm_styles({"topk-k16": "topk", "topk-k64": "topk", "relu": "relu"})
    assert styles["topk-k16"]["color"] != styles["topk-k64"]["color"]
    assert styles["topk-k16"]["marker"] != styles["topk-k64"]["marker"]


def test_frontier(tmp_path):
    pts = [{"name": f"{a}-k{k}", "architecture": a, "l0": k * (1 + 0.1 * i), "explained_variance": 0.6 + k / 200,
            "ce_loss_recovered": 0.5 + k / 200, "kl": 1 / k} for i, a in enumerate(ARMS.values()) for k in (16, 32, 64)]
    pts.append({"name": "odd", "architecture": "newarch", "l0": 20.0, "explained_variance": float("nan"),
                "ce_loss_recovered": None, "kl": None})
    fig = sp.frontier(pts)
    # each arm is drawn at its (L0, value) on both panels; the arm without a value is not drawn
    finite = [p for p in pts if np.isfinite(p["explained_variance"])]
    assert _as_points([p["l0"] for p in finite], [p["explained_variance"] for p in finite]) <= _points(fig.axes[0])
    assert _as_points([p["l0"] for p in finite], [p["ce_loss_recovered"] for p in finite]) <= _points(fig.axes[1])
    assert _as_points([p["l0"] for p in finite], [p["kl"] for p in finite]) <= _points(fig.axes[2])
    assert "KL" in fig.axes[2].get_ylabel()
    assert not any(x == 20.0 for x, _ in _points(fig.axes[0]))
    _check(fig, tmp_path, 3, "frontier")
    # No language model: only the explained-variance panel.
    no_lm = [dict(p, ce_loss_recovered=None, kl=float("nan")) for p in pts]
    fig = sp.frontier(no_lm)
    assert "explained variance" in fig.axes[0].get_ylabel()
    _check(fig, tmp_path, 1, "frontier_no_lm")
    # KL only.
    fig = sp.frontier([dict(p, ce_loss_recovered=None) for p in pts])
    assert "KL" in fig.axes[1].get_ylabel()
    _check(fig, tmp_path, 2, "frontier_kl")
    _check(sp.frontier(pts[:1]), tmp_path, 3, "frontier_one_point")


def _curves(n_evals: int, never: bool = False, kinds: tuple[str, ...] = ("category", "word")) -> dict:
    """Per arm the medians the analysis hands the plot, NaN at the first eval of one series."""
    rng = np.random.default_rng(0)
    tokens = np.linspace(1e5, 1e6, n_evals)
    out = {}
    for name, arch in ARMS.items():
        medians = {}
        for kind in kinds:
            single = rng.uniform(0, 1, n_evals) * (0.1 if never else 1.0)
            single[0] = np.nan
            medians[kind] = {"single": single, "probe": np.minimum(np.nan_to_num(single) + 0.1, 1.0)}
        out[name] = {"architecture": arch, "tokens": tokens, "counts": {"category": 4, "word": 10},
                     "medians": medians}
    return out


@pytest.mark.parametrize("n_evals,never", [(6, False), (1, False), (4, True)])
def test_emergence_curves(tmp_path, n_evals, never):
    arms = _curves(n_evals, never)
    fig = sp.emergence_curves(arms, 0.8)
    # each arm's curve is the medians it was given, at its eval tokens (NaN points left out)
    for ax, kind in zip(fig.axes, ("category", "word")):
        for key in ("single", "probe"):
            expected = _as_points(arms["topk-k32"]["tokens"], arms["topk-k32"]["medians"][kind][key])
            assert expected <= _points(ax), (kind, key)
        threshold = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert [tuple(line.get_ydata()) for line in threshold] == [(0.8, 0.8)]
        assert ax.get_title() == f"{kind.capitalize()} concepts (n={4 if kind == 'category' else 10})"
    _check(fig, tmp_path, 2, f"curves_{n_evals}_{never}")


def test_emergence_curves_single_kind(tmp_path):
    _check(sp.emergence_curves(_curves(3, kinds=("category",)), 0.8), tmp_path, 1, "curves_one_kind")


def test_emergence_steps(tmp_path):
    concepts = [f"CAT_{i}" for i in range(12)]
    rng = np.random.default_rng(1)
    arms = {}
    for j, (name, arch) in enumerate(ARMS.items()):
        emerged = rng.choice([1e5, 3e5, 6e5, np.nan], size=12)
        if j == 4:
            emerged[:] = np.nan  # an arm where nothing emerges
        arms[name] = {"architecture": arch, "emerged_tokens": emerged, "best": rng.uniform(0.3, 1.0, 12)}
    fig = sp.emergence_steps(arms, concepts, 0.8)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == concepts
    # Not-emerged entries carry their best score as text.
    n_missing = sum(int(np.isnan(a["emerged_tokens"]).sum()) for a in arms.values())
    assert len(fig.axes[1].texts) == n_missing
    # each emerged concept is a marker at its emergence tokens, on its concept's row (arms offset within it)
    for line, arm in zip(fig.axes[0].get_lines(), arms.values()):
        got = ~np.isnan(arm["emerged_tokens"])
        assert np.array_equal(line.get_xdata(), arm["emerged_tokens"][got])
        assert np.array_equal(np.round(line.get_ydata()), np.flatnonzero(got))
    _check(fig, tmp_path, 2, "steps")
    # with the probe: hollow markers at the probe's emergence, both best scores where neither emerged
    tokens = np.linspace(1e5, 1e6, 10)
    both = {n: dict(a, tokens=tokens, probe_emerged_tokens=np.where(np.isnan(a["emerged_tokens"]), np.nan, 1e5),
                    probe_best=np.full(12, 0.7996)) for n, a in arms.items()}
    fig = sp.emergence_steps(both, concepts, 0.8)
    hollow = [line for line in fig.axes[0].get_lines() if line.get_markerfacecolor() == "none"]
    assert len(hollow) == len(arms) and all(np.nanmax(line.get_xdata()) == 1e5 for line in hollow[:4])
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert texts and all(t.endswith(" / 0.7996") for t in texts)  # the probe's best, not rounded to 0.80
    assert fig.axes[0].get_xlim()[1] >= 1e6  # the axis spans the whole of training
    nothing = {n: dict(a, emerged_tokens=np.full(12, np.nan)) for n, a in arms.items()}
    _check(sp.emergence_steps(nothing, concepts, 0.8), tmp_path, 2, "steps_nothing")


def test_score_heatmap(tmp_path):
    scores = np.random.default_rng(2).uniform(0, 1, (5, 12))
    scores[1, 3] = np.nan
    scores[0, :3] = [0.7996, 0.8, 0.80004]  # beside the 0.8 threshold
    fig = sp.score_heatmap(list(ARMS), [f"C{i}" for i in range(12)], scores, "Final F1", 0.8)
    texts = fig.axes[0].texts
    shown = np.array([t.get_text() for t in texts]).reshape(5, 12)  # one annotation per cell, row by row
    assert list(shown[0, :3]) == ["0.7996", "0.80", "0.80"]  # 0.7996 is not printed 0.80
    assert shown[1, 3] == "–" and shown[2, 5] == f"{scores[2, 5]:.2f}"
    bold = np.array([t.get_fontweight() == "bold" for t in texts]).reshape(5, 12)
    assert (bold == (np.nan_to_num(scores) >= 0.8)).all()
    _check(fig, tmp_path, 2, "heatmap")  # heatmap + colorbar


def _over_time(n_evals: int) -> dict:
    tokens = np.linspace(1e5, 1e6, n_evals)
    out = {}
    for j, (name, arch) in enumerate(ARMS.items()):
        dead = np.linspace(0.3, 0.05, n_evals) * (j + 1) / 5
        if j == 2:
            dead = np.ones(n_evals)  # all dead
        dense = np.full(n_evals, 0.01 * j)
        dense[0] = np.nan
        out[name] = {"architecture": arch, "tokens": tokens, "dead_frac": dead, "dense_frac": dense}
    return out


@pytest.mark.parametrize("n_evals", [1, 6])
def test_dead_dense_and_rank_stability(tmp_path, n_evals):
    over_time = _over_time(n_evals)
    fig = sp.dead_dense_over_time(over_time, 0.1)
    for arm in over_time.values():  # every arm's series, at its eval tokens, on its panel
        assert _as_points(arm["tokens"], arm["dead_frac"]) <= _points(fig.axes[0])
        assert _as_points(arm["tokens"], arm["dense_frac"]) <= _points(fig.axes[1])
    _check(fig, tmp_path, 2, f"dead_dense_{n_evals}")
    tokens = np.linspace(1e5, 1e6, n_evals)
    stab = {}
    for j, (name, arch) in enumerate(ARMS.items()):
        if j % 2:  # series one shorter than tokens
            stab[name] = {"architecture": arch, "tokens": tokens, "spearman": np.linspace(0.8, 0.99, n_evals - 1)}
        else:  # NaN at the first eval
            stab[name] = {"architecture": arch, "tokens": tokens,
                          "spearman": np.concatenate([[np.nan], np.linspace(0.8, 0.99, n_evals - 1)])}
    _check(sp.rank_stability(stab), tmp_path, 1, f"rank_{n_evals}")
    _check(sp.rank_stability({"x": {"architecture": "topk", "tokens": [], "spearman": []}}), tmp_path, 1, "rank_empty")


def test_freq_vs_magnitude(tmp_path):
    rng = np.random.default_rng(3)
    arms = {}
    for j, (name, arch) in enumerate(ARMS.items()):
        density = 10 ** rng.uniform(-5, -1, 300)
        density[: 20 * j] = 0
        mean_act = np.where(density > 0, rng.uniform(0.1, 5, 300), np.nan)
        arms[name] = {"architecture": arch, "density": density, "mean_act": mean_act}
    arms["relu"] = {"architecture": "relu", "density": np.zeros(300), "mean_act": np.full(300, np.nan)}  # all dead
    fig = sp.freq_vs_magnitude(arms, 0.1)
    assert "300 never fired" in fig.axes[2].get_title()
    assert "0 never fired" in fig.axes[0].get_title()
    _check(fig, tmp_path, 5, "freq_mag")
    _check(sp.freq_vs_magnitude({"topk-k32": arms["topk-k32"]}, 0.1), tmp_path, 1, "freq_mag_one")


@pytest.mark.parametrize("n_evals", [1, 8])
def test_density_over_training(tmp_path, n_evals):
    n_tokens = 50_000
    rng = np.random.default_rng(4)
    dens = np.clip(np.round(10 ** rng.normal(-2.5, 0.8, (n_evals, 256)) * n_tokens) / n_tokens, 1 / n_tokens, 1)
    dens[:, :30] = 0
    ld = np.stack([log10_density(d, n_tokens) for d in dens])
    fig = sp.density_over_training("topk-k32", np.linspace(1e5, 1e6, n_evals), ld, density_floor(n_tokens), 0.1)
    never_counts = [t.get_text() for t in fig.axes[0].texts]
    assert never_counts == ["30"] * n_evals
    # the histogram rows are the evals' histograms of log10 frequency over the fired latents
    image = fig.axes[1].get_images()[0].get_array()
    assert image.shape[0] == n_evals and np.asarray(image).sum(axis=1).tolist() == [256 - 30] * n_evals
    _check(fig, tmp_path, 3, f"density_{n_evals}")  # never-fired column + histogram + colorbar
    all_dead = np.full((n_evals, 256), density_floor(n_tokens))
    _check(sp.density_over_training("dead", np.linspace(1e5, 1e6, n_evals), all_dead, density_floor(n_tokens), 0.1),
           tmp_path, 3, f"density_dead_{n_evals}")


def test_resampling_curves(tmp_path):
    tokens = np.linspace(1e5, 1e6, 5)
    arms = {f"topk-{m}": {"architecture": "topk", "dead_handling": m, "tokens": tokens,
                          "dead_frac": np.linspace(0.1, f, 5), "explained_variance": np.linspace(0.5, 0.9 - f / 4, 5)}
            for m, f in (("none", 0.6), ("resample", 0.2), ("auxk", 0.05))}
    train_tokens = np.linspace(1e4, 1e6, 50)
    arms["topk-resample"].update(train_tokens=train_tokens, train_dead_frac=np.tile([0.0, 0.1, 0.2, 0.3, 0.4], 10),
                                 resampled_tokens=np.array([2e5, 4e5]))
    arms["relu-none"] = dict(arms["topk-none"], architecture="relu", explained_variance=[np.nan] * 5)
    fig = sp.resampling_curves(arms)
    colors = {line.get_color() for line in fig.axes[1].get_lines()}
    assert colors == {sp.DEAD_HANDLING_COLORS[m] for m in ("none", "resample", "auxk")}
    # the training panel plots the resample arm's logged series and a dotted line per resampling
    lines = fig.axes[0].get_lines()
    curve = [line for line in lines if len(line.get_xdata()) == 50]
    assert len(curve) == 1 and np.array_equal(curve[0].get_ydata(), arms["topk-resample"]["train_dead_frac"])
    events = [line for line in lines if line.get_linestyle() == ":"]
    assert sorted(line.get_xdata()[0] for line in events) == [2e5, 4e5]
    assert {line.get_color() for line in events} == {sp.DEAD_HANDLING_COLORS["resample"]}
    _check(fig, tmp_path, 3, "resampling")


def test_umap_scatter(tmp_path):
    rng = np.random.default_rng(5)
    xy = rng.normal(size=(400, 2))
    cats = [f"CAT_{i}" for i in range(15)]  # more than the 12 that get colours
    concept = [None if rng.random() < 0.4 else cats[rng.integers(0, 15)] for _ in range(400)]
    freq = rng.uniform(-5, -1, 400)
    freq[:10] = np.nan
    fig = sp.umap_scatter(xy, concept, freq, "decoder directions")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0].startswith("unmatched") and any("other concepts" in t for t in legend)
    assert len(legend) <= sp.MAX_CATEGORIES + 1
    assert fig.axes[2].get_ylabel() == "log10 firing frequency"  # colorbar
    _check(fig, tmp_path, 3, "umap")
    _check(sp.umap_scatter(xy[:5], [None] * 5, freq[:5], "all unmatched"), tmp_path, 3, "umap_unmatched")
    shared = sp.umap_scatter(xy, concept, freq, "one scale for all arms", freq_range=(-6.0, 0.0))
    points = shared.axes[1].collections[0]
    assert points.get_clim() == (-6.0, 0.0)
    finite = np.isfinite(freq)
    assert _as_points(*points.get_offsets().T) == _as_points(*xy[finite].T)  # every latent with a frequency
    assert sorted(points.get_array()) == pytest.approx(sorted(freq[finite]))


def test_decoder_embedding():
    rng = np.random.default_rng(6)
    d_in, per = 16, 60
    basis = np.eye(d_in)[:3] * 3.0
    groups = np.repeat(np.arange(3), per)
    w = basis[groups] + 0.15 * rng.normal(size=(3 * per, d_in))
    w = np.vstack([w, np.zeros((20, d_in))])  # dead decoder rows
    xy = decoder_embedding(w, seed=0)
    assert xy.shape == (3 * per + 20, 2) and xy.dtype == np.float32
    assert np.isfinite(xy).all()
    np.testing.assert_array_equal(xy, decoder_embedding(w, seed=0))  # deterministic

    live = xy[: 3 * per]
    d = np.linalg.norm(live[:, None] - live[None], axis=-1)
    same = groups[:, None] == groups[None]
    np.fill_diagonal(same, False)
    diff = groups[:, None] != groups[None]
    within = np.median(d[same])
    between = d[diff].min()
    assert between > 3 * within, (within, between)
    # Zero rows sit together, apart from every real direction.
    zeros = xy[3 * per:]
    assert np.ptp(zeros, axis=0).max() < between
    assert np.linalg.norm(zeros.mean(0) - live.mean(0)) > 0


def test_umap_functions_are_compiled_with_numba_cache():
    """Without the on-disk cache every process recompiles umap (17-22 s on 2 cores)."""
    import numba
    from numba.core.caching import NullCache

    from experiments.eval.embedding import _import_umap

    plain = numba.njit, numba.jit
    umap = _import_umap()
    assert (numba.njit, numba.jit) == plain  # the wrapping ends with the import
    used = [umap.umap_.smooth_knn_dist, umap.umap_.compute_membership_strengths,
            umap.layouts._nb_optimize_layout_euclidean_single_epoch]
    assert all(not isinstance(f._cache, NullCache) for f in used)


def test_decoder_embedding_small_inputs():
    assert decoder_embedding(np.zeros((0, 4)), 0).shape == (0, 2)
    for n in (1, 2, 3):
        xy = decoder_embedding(np.random.default_rng(n).normal(size=(n, 4)), 0)
        assert xy.shape == (n, 2) and np.isfinite(xy).all()
    assert np.isfinite(decoder_embedding(np.zeros((5, 4)), 0)).all()
    with pytest.raises(ValueError):
        decoder_embedding(np.zeros(4), 0)


# -- synthetic emergence study -------------------------------------------------------------------
def _freq_arms(n_features: int = 60, seed: int = 7) -> dict:
    """Toy-model arms where rarer features emerge later (and the rarest never, in some arms)."""
    rng = np.random.default_rng(seed)
    evals = np.arange(1, 21) * 50_000.0
    prob = 10 ** rng.uniform(-3.5, -0.5, n_features)
    out = {}
    for j, (name, arch) in enumerate(ARMS.items()):
        need = 1.5e3 / prob ** (0.6 + 0.1 * j) * 10 ** rng.normal(0, 0.2, n_features)
        idx = np.searchsorted(evals, need)
        emerged = np.where(idx < evals.size, evals[np.minimum(idx, evals.size - 1)], np.nan)
        best = np.where(np.isfinite(emerged), rng.uniform(0.9, 1.0, n_features), rng.uniform(0.2, 0.9, n_features))
        out[name] = {"architecture": arch, "probability": prob, "emerged_tokens": emerged, "best_cos": best,
                     "spearman": -0.5 - 0.1 * j}
    return out


def _ytick_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels()]


def test_emergence_vs_frequency(tmp_path):
    arms = _freq_arms()
    assert all(np.isnan(a["emerged_tokens"]).any() for a in list(arms.values())[3:])  # the data has never-emerged
    fig = sp.emergence_vs_frequency(arms, 0.9)
    panels = _data_axes(fig)
    assert len(panels) == 5
    assert "never" in _ytick_texts(panels[0])  # the "never" band
    assert panels[0].get_yscale() == "log" and panels[0].get_xscale() == "log"
    for ax, arm in zip(panels, arms.values()):
        n_got = int(np.isfinite(arm["emerged_tokens"]).sum())
        assert f"emerged {n_got}/60" in ax.get_title()
        assert f"Spearman ρ = {arm['spearman']:+.2f}" in ax.get_title()  # the analysis's value, as given
    _check(fig, tmp_path, 6, "emergence_freq")  # 5 panels + best-|cos| colorbar


def test_emergence_vs_frequency_edge_cases(tmp_path):
    full = _freq_arms()
    arms = {"gated": full["gated"]}  # one panel keeps this test fast
    # Nothing emerged: every feature in the band, no Spearman.
    nothing = {n: dict(a, emerged_tokens=np.full(60, np.nan), spearman=np.nan) for n, a in arms.items()}
    fig = sp.emergence_vs_frequency(nothing, 0.9)
    assert "never" in _ytick_texts(fig.axes[0])
    assert all("emerged 0/60" in ax.get_title() and "Spearman" not in ax.get_title() for ax in _data_axes(fig))
    _check(fig, tmp_path, 2, "emergence_freq_nothing")  # panel + colorbar
    # Everything emerged: no band, no colorbar.
    everything = {n: dict(a, emerged_tokens=np.where(np.isnan(a["emerged_tokens"]), 1e6, a["emerged_tokens"]))
                  for n, a in arms.items()}
    fig = sp.emergence_vs_frequency(everything, 0.9)
    assert "never" not in _ytick_texts(fig.axes[0])
    assert all("emerged 60/60" in ax.get_title() for ax in fig.axes)
    _check(fig, tmp_path, 1, "emergence_freq_all")
    # A single feature in a single arm (emerged, then not).
    one = {"topk-k32": {"architecture": "topk", "probability": [0.01], "emerged_tokens": [2e5], "best_cos": [0.95]}}
    fig = sp.emergence_vs_frequency(one, 0.9)
    assert "emerged 1/1" in fig.axes[0].get_title() and "Spearman" not in fig.axes[0].get_title()
    _check(fig, tmp_path, 1, "emergence_freq_one")
    one["topk-k32"].update(emerged_tokens=[np.nan], best_cos=[None])
    fig = sp.emergence_vs_frequency(one, 0.9)
    assert _ytick_texts(fig.axes[0]) == ["never"]
    _check(fig, tmp_path, 1, "emergence_freq_one_never")  # no best |cos|: no colorbar
    # NaN probabilities are left out (and counted); one arm has none at all.
    holes = {n: dict(a, probability=np.where(np.arange(60) < 5, np.nan, a["probability"])) for n, a in arms.items()}
    holes["relu"] = dict(full["relu"], probability=np.full(60, np.nan))
    fig = sp.emergence_vs_frequency(holes, 0.9)
    assert "5 without probability" in fig.axes[0].get_title()
    assert "60 without probability" in fig.axes[1].get_title()
    _check(fig, tmp_path, 3, "emergence_freq_nan_prob")  # 2 panels + colorbar
    # Emergence within one decade: linear token axis.
    narrow = {n: dict(a, emerged_tokens=np.where(np.isnan(a["emerged_tokens"]), np.nan, 3e5)) for n, a in arms.items()}
    narrow["gated"]["emerged_tokens"][:20] = np.linspace(2e5, 8e5, 20)
    fig = sp.emergence_vs_frequency(narrow, 0.9)
    assert fig.axes[0].get_yscale() == "linear" and "never" in _ytick_texts(fig.axes[0])
    _check(fig, tmp_path, 2, "emergence_freq_linear")
    fig = sp.emergence_vs_frequency({}, 0.9)
    assert fig.axes[0].texts[0].get_text() == "no arms"
    _check(fig, tmp_path, 1, "emergence_freq_empty")


def _recovery_arms(n_evals: int) -> dict:
    tokens = np.linspace(5e4, 1e6, n_evals)
    out = {}
    for j, (name, arch) in enumerate(ARMS.items()):
        frac = 1 - np.exp(-tokens / (2e5 * (j + 1)))
        mcc = 0.5 + 0.45 * frac
        if j == 1:
            frac[0] = np.nan
        if j == 2:
            mcc = np.full(n_evals, np.nan)
        out[name] = {"architecture": arch, "tokens": tokens, "frac_recovered": frac, "mcc": mcc}
    return out


@pytest.mark.parametrize("n_evals", [1, 8])
def test_recovery_curves(tmp_path, n_evals):
    fig = sp.recovery_curves(_recovery_arms(n_evals), 0.9)
    assert "0.9" in fig.axes[0].get_title() and "MCC" in fig.axes[1].get_title()
    for ax in fig.axes:
        assert ax.get_ylim() == (0.0, 1.02)
    assert len(fig.legends[0].get_texts()) == 5
    _check(fig, tmp_path, 2, f"recovery_{n_evals}")
    if n_evals == 1:
        fig = sp.recovery_curves({}, 0.9)
        assert fig.axes[0].texts[0].get_text() == "no arms"
        _check(fig, tmp_path, 2, "recovery_empty")


def test_plots_mark_the_dense_threshold_they_are_given():
    # the threshold is the study's probes.dense_threshold, which eval/dense_frac used: not a constant
    fig = sp.dead_dense_over_time(_over_time(3), 0.02)
    assert "> 2% of tokens" in fig.axes[1].get_title()
    rng = np.random.default_rng(0)
    arms = {"topk-k32": {"architecture": "topk", "density": rng.uniform(1e-4, 0.5, 64), "mean_act": rng.uniform(0.1, 2, 64)}}
    fig = sp.freq_vs_magnitude(arms, 0.02)
    dashed = [line.get_xdata()[0] for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert dashed == [pytest.approx(np.log10(0.02))] and "dense threshold 0.02" in fig._suptitle.get_text()
    ld = np.log10(rng.uniform(1e-4, 0.5, (3, 64)))
    fig = sp.density_over_training("topk-k32", np.linspace(1e5, 1e6, 3), ld, density_floor(10_000), 0.02)
    marks = [line.get_xdata()[0] for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert marks == [pytest.approx(np.log10(0.02))]


def _drawn_in(pid_file: Path, title: str) -> Figure:
    pid_file.write_text(str(os.getpid()))
    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.plot(np.arange(10) ** 2)
    ax.set_title(title)
    return fig


def _fails() -> Figure:
    raise ValueError("this figure cannot be drawn")


def _kills_its_figure_process(parent: int, pid_file: Path) -> Figure:
    if os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)  # as a SIGTERM to the whole job or the OOM killer would
    return _drawn_in(pid_file, "drawn after all")


@pytest.mark.skipif(sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2,
                    reason="figures are drawn in other processes on Linux with 2+ cores")
def test_a_reports_figures_are_drawn_in_other_processes_into_the_same_files(tmp_path):
    jobs = [(partial(_drawn_in, tmp_path / f"{i}.pid", f"figure {i}"), tmp_path / "parallel" / f"{i}.png")
            for i in range(5)]
    assert list(save_figures(jobs)) == [path for _, path in jobs]  # in order, each once saved
    assert str(os.getpid()) not in {(tmp_path / f"{i}.pid").read_text() for i in range(5)}
    for i, (draw, path) in enumerate(jobs):
        save_figure(draw(), tmp_path / f"{i}.png")  # here, one by one
        assert path.read_bytes() == (tmp_path / f"{i}.png").read_bytes()
    with pytest.raises(ValueError, match="cannot be drawn"):
        list(save_figures([*jobs[:2], (_fails, tmp_path / "failed.png")]))
    # A figure process killed mid-report: its figure and the rest are drawn here instead.
    killed = [*jobs[:2], (partial(_kills_its_figure_process, os.getpid(), tmp_path / "k.pid"), tmp_path / "k.png"),
              *jobs[2:]]
    assert list(save_figures(killed)) == [path for _, path in killed]
    assert (tmp_path / "k.pid").read_text() == str(os.getpid()) and (tmp_path / "k.png").stat().st_size > 0
