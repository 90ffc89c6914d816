"""Matplotlib figures for the study report (PNG files and W&B images).

Every function takes plain numpy arrays, dicts and lists and returns a matplotlib Figure: no file
I/O and no W&B here (save with ``visualization.plots.save_figure``). Conventions shared by all
figures:

* one fixed colour per architecture (``ARCH_COLORS``); several arms of one architecture (a
  sparsity sweep) get shades of that colour and different markers;
* token axes read "training tokens" with ticks like 100k / 1.2M;
* constrained layout, legends outside the data area, figures at most 12 inches wide;
* missing values (None / NaN) are skipped, never plotted as zero.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # headless training boxes have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullFormatter, FuncFormatter, LogLocator, MaxNLocator, NullLocator

from visualization.terminal import format_beside

ARCH_COLORS: dict[str, str] = {
    "topk": "#1f77b4",  # blue
    "batchtopk": "#ff7f0e",  # orange
    "relu": "#2ca02c",  # green
    "jumprelu": "#d62728",  # red
    "gated": "#9467bd",  # purple
}
# Unknown architectures: picked by a stable hash of the name, so a name keeps its colour across figures.
_EXTRA_COLORS = ["#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f", "#393b79", "#637939", "#843c39"]
DEAD_HANDLING_COLORS: dict[str, str] = {"none": "#d62728", "resample": "#1f77b4", "auxk": "#2ca02c"}
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]
MAX_WIDTH = 12.0
TOKENS_LABEL = "training tokens"
UNMATCHED_COLOR = "#d9d9d9"
OTHER_CONCEPTS_COLOR = "#8c8c8c"
# 12 well-separated colours for concept categories (tab20's saturated half, then the rest).
_CATEGORY_COLORS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#7b4173",
]
MAX_CATEGORIES = len(_CATEGORY_COLORS)

__all__ = [
    "ARCH_COLORS",
    "DEAD_HANDLING_COLORS",
    "arch_color",
    "arm_styles",
    "format_tokens",
    "frontier",
    "emergence_curves",
    "emergence_steps",
    "score_heatmap",
    "dead_dense_over_time",
    "rank_stability",
    "freq_vs_magnitude",
    "density_over_training",
    "resampling_curves",
    "umap_scatter",
    "emergence_vs_frequency",
    "recovery_curves",
    "per_hook_lines",
]


# -- shared helpers ----------------------------------------------------------------------------
def arch_color(architecture: str) -> str:
    """The fixed colour of an architecture; unknown names get a stable colour from a spare list."""
    key = str(architecture).lower()
    if key in ARCH_COLORS:
        return ARCH_COLORS[key]
    return _EXTRA_COLORS[zlib.crc32(key.encode()) % len(_EXTRA_COLORS)]


def _shade(color: str, t: float) -> tuple[float, float, float]:
    """t < 0 mixes towards black, t > 0 towards white (|t| <= 1)."""
    rgb = np.array(mcolors.to_rgb(color))
    target = np.ones(3) if t > 0 else np.zeros(3)
    return tuple(rgb + abs(t) * (target - rgb))


def arm_styles(arch_by_arm: dict[str, str]) -> dict[str, dict]:
    """Colour and marker per arm: the architecture's colour, shaded when it has several arms."""
    groups: dict[str, list[str]] = {}
    for name, arch in arch_by_arm.items():
        groups.setdefault(str(arch), []).append(name)
    styles = {}
    for arch, names in groups.items():
        base = arch_color(arch)
        shades = [0.0] if len(names) == 1 else np.linspace(-0.35, 0.45, len(names))
        for i, name in enumerate(names):
            styles[name] = {"color": _shade(base, float(shades[i])), "marker": _MARKERS[i % len(_MARKERS)]}
    return styles


def format_tokens(x: float, _pos: object = None) -> str:
    """1500 -> 1.5k, 100000 -> 100k, 1200000 -> 1.2M."""
    if x is None or not np.isfinite(x):
        return ""
    ax = abs(x)
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if ax >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}" if ax else "0"


def _token_axis(ax, label: str = TOKENS_LABEL) -> None:
    ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, min_n_ticks=3))
    ax.set_xlabel(label)


def _floats(values: Iterable | None) -> np.ndarray:
    """1-D float array with None -> NaN; None or a scalar None gives an empty array."""
    if values is None:
        return np.zeros(0)
    arr = np.asarray(values, dtype=object).ravel()
    return np.array([np.nan if v is None else float(v) for v in arr], dtype=np.float64)


def _value(v) -> float:
    if v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _xy_series(tokens, values) -> tuple[np.ndarray, np.ndarray]:
    """Aligned (tokens, values); a series one shorter than tokens is taken to start at the 2nd eval."""
    t, v = _floats(tokens), _floats(values)
    if v.size == t.size - 1:
        t = t[1:]
    n = min(t.size, v.size)
    return t[:n], v[:n]


def _plot_series(ax, t: np.ndarray, v: np.ndarray, style: dict, label: str | None, **kw) -> None:
    """Line through finite points with markers (a single eval still shows as a marker)."""
    ok = np.isfinite(t) & np.isfinite(v)
    ax.plot(t[ok], v[ok], color=style["color"], marker=style["marker"], markersize=4, linewidth=1.6,
            label=label, **kw)


def _legend_right(fig: Figure, handles: list, labels: list[str], title: str | None = None) -> None:
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=9, title=title, title_fontsize=9,
                   frameon=False)


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10, color="0.4")


def _fig(ncols: int, nrows: int = 1, width: float = 11.0, height: float = 4.5, **kw):
    return plt.subplots(nrows, ncols, figsize=(min(width, MAX_WIDTH), height), layout="constrained",
                        squeeze=False, **kw)


def _grid_panels(fig: Figure, axs, n: int, xlabel: str):
    """Small multiples: yields (index, axes, is bottom row, is left column) for the first n panels
    of the grid `axs`, row by row, and removes the rest; a panel left ending its column gets x tick
    labels and `xlabel`."""
    nrows, ncols = len(axs), len(axs[0])
    for idx in range(nrows * ncols):
        r, c = divmod(idx, ncols)
        if idx >= n:
            fig.delaxes(axs[r][c])
            if r > 0:
                axs[r - 1][c].tick_params(labelbottom=True)
                axs[r - 1][c].set_xlabel(xlabel)
            continue
        yield idx, axs[r][c], r == nrows - 1, c == 0


def _place_labels(fig: Figure, ax, xs: np.ndarray, ys: np.ndarray, labels: list[str], colors: list,
                  fontsize: float = 8) -> None:
    """Annotate points with short labels, greedily picking for each an offset whose text box
    overlaps as little as possible of earlier labels, markers and lines and stays inside the axes.
    Works in display coordinates: call after ``fig.canvas.draw()`` has fixed the layout."""
    if not labels:
        return
    renderer = fig.canvas.get_renderer()
    to_px = fig.dpi / 72.0
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    obstacles = []
    r = 4.5 * to_px  # markers
    for line in ax.get_lines():
        path = ax.transData.transform(np.column_stack(line.get_data()).astype(float))
        path = path[np.all(np.isfinite(path), axis=1)]
        for a, b in zip(path[:-1], path[1:]):  # sample segments every ~3 px
            n = max(2, int(np.hypot(*(b - a)) / (3 * to_px)))
            seg = a + np.linspace(0, 1, n)[:, None] * (b - a)
            obstacles.extend(np.column_stack([seg - 1.5 * to_px, seg + 1.5 * to_px]))
        for p in path:
            obstacles.append(np.array([p[0] - r, p[1] - r, p[0] + r, p[1] + r]))
    taken = np.array(obstacles).reshape(-1, 4)
    axbox = ax.get_window_extent(renderer)
    candidates = []
    for gap in (4.0, 9.0, 15.0):
        candidates += [(gap, gap, "left", "bottom"), (-gap, gap, "right", "bottom"), (gap, -gap, "left", "top"),
                       (-gap, -gap, "right", "top"), (0, 1.5 * gap, "center", "bottom"),
                       (0, -1.5 * gap, "center", "top"), (1.8 * gap, 0, "left", "center"),
                       (-1.8 * gap, 0, "right", "center")]

    def box(p, dx, dy, ha, va, w, h):
        x0 = p[0] + dx * to_px - {"left": 0, "right": w, "center": w / 2}[ha]
        y0 = p[1] + dy * to_px - {"bottom": 0, "top": h, "center": h / 2}[va]
        return np.array([x0, y0, x0 + w, y0 + h])

    for x, y, p, text, color in zip(xs, ys, pts, labels, colors):
        if not text or not np.all(np.isfinite(p)):
            continue
        probe = ax.text(0, 0, text, fontsize=fontsize)
        ext = probe.get_window_extent(renderer)
        probe.remove()
        w, h = ext.width, ext.height
        best, best_cost = None, np.inf
        for rank, (dx, dy, ha, va) in enumerate(candidates):
            b = box(p, dx, dy, ha, va, w, h)
            ow = np.clip(np.minimum(b[2], taken[:, 2]) - np.maximum(b[0], taken[:, 0]), 0, None)
            oh = np.clip(np.minimum(b[3], taken[:, 3]) - np.maximum(b[1], taken[:, 1]), 0, None)
            outside = (max(0, axbox.x0 - b[0]) + max(0, b[2] - axbox.x1)) * h + \
                      (max(0, axbox.y0 - b[1]) + max(0, b[3] - axbox.y1)) * w
            cost = float((ow * oh).sum()) + 3 * outside + 0.5 * rank  # prefer near offsets on ties
            if cost < best_cost:
                best, best_cost = (dx, dy, ha, va, b), cost
        dx, dy, ha, va, b = best
        taken = np.vstack([taken, b[None, :]])
        ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                          fontsize=fontsize, color=color)
        ann.set_in_layout(False)


# -- activations study -------------------------------------------------------------------------
def frontier(points: list[dict]) -> Figure:
    """L0 vs explained variance, and where the source is a transformer L0 vs CE loss recovered and vs KL.

    points: {"name", "architecture", "l0", "explained_variance", "ce_loss_recovered", "kl"}. Points
    of one architecture are joined in order of L0; each point is labelled with its arm name (minus
    the architecture prefix when the name starts with it).
    """
    rows = [{"name": str(p.get("name", "")), "arch": str(p.get("architecture", "?")), "l0": _value(p.get("l0")),
             "ev": _value(p.get("explained_variance")), "ce": _value(p.get("ce_loss_recovered")),
             "kl": _value(p.get("kl"))} for p in points]
    has_ce = any(np.isfinite(r["ce"]) for r in rows)
    has_kl = any(np.isfinite(r["kl"]) for r in rows)
    panels = [("ev", "explained variance (fraction)", "Reconstruction")]
    if has_ce:
        panels.append(("ce", "CE loss recovered (fraction)", "CE loss, SAE spliced in"))
    if has_kl:  # near 1, CE recovered hardly tells arms apart; KL does
        panels.append(("kl", "KL(clean ‖ spliced), nats per token: lower is better", "KL, SAE spliced in"))
    fig, axs = _fig(len(panels), width=min(5.0, 10.2 / len(panels)) * len(panels) + 1.8, height=4.6)
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    l0s = np.array([r["l0"] for r in rows])
    finite_l0 = l0s[np.isfinite(l0s) & (l0s > 0)]
    log_x = finite_l0.size >= 2 and finite_l0.max() / finite_l0.min() >= 3
    handles, names = [], []
    for ax, (key, ylabel, title) in zip(axs[0], panels):
        lx, ly, ll, lc = [], [], [], []
        for i, arch in enumerate(archs):
            color = arch_color(arch)
            pts = sorted((r for r in rows if r["arch"] == arch and np.isfinite(r["l0"]) and np.isfinite(r[key])),
                         key=lambda r: r["l0"])
            if not pts:
                continue
            x = [r["l0"] for r in pts]
            y = [r[key] for r in pts]
            (h,) = ax.plot(x, y, color=color, marker=_MARKERS[i % len(_MARKERS)], markersize=6, linewidth=1.5)
            if ax is axs[0][0]:
                handles.append(h)
                names.append(arch)
            for r in pts:
                label = r["name"]
                if label.lower().startswith(arch.lower() + "-"):
                    label = label[len(arch) + 1:]
                if label.lower() != arch.lower():
                    lx.append(r["l0"]), ly.append(r[key]), ll.append(label), lc.append(color)
        if log_x:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.set_xlabel("L0 (mean active latents per token)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.15)
        if not lx:
            if not any(np.isfinite(r[key]) for r in rows):
                _empty_note(ax, "no values")
        ax._study_labels = (lx, ly, ll, lc)  # placed after the legend fixes the layout
    fig.suptitle("Fidelity against sparsity, one point per arm (final eval, held-out split)")
    _legend_right(fig, handles, names, title="architecture")
    fig.canvas.draw()  # run constrained layout so data -> display transforms are final
    for ax in axs[0]:
        lx, ly, ll, lc = ax._study_labels
        del ax._study_labels
        _place_labels(fig, ax, np.array(lx), np.array(ly), ll, lc)
    return fig


# -- emergence study ---------------------------------------------------------------------------
def _kind_panels(arms: dict[str, dict]) -> list[str]:
    kinds: list[str] = []
    for arm in arms.values():
        for k in arm.get("medians", {}):
            if k not in kinds:
                kinds.append(str(k))
    order = {"category": 0, "word": 1}
    return sorted(kinds, key=lambda k: (order.get(k, 2), kinds.index(k)))


def emergence_curves(arms: dict[str, dict], threshold: float, score_label: str = "F1",
                     baselines: dict[str, dict[str, float]] | None = None) -> Figure:
    """Median score over the concepts of each kind vs training tokens, one panel per kind (category,
    word); one colour per arm, solid = best single latent, dashed = k-sparse probe; the threshold
    dotted. Medians show progress even where no concept reaches the threshold. baselines: kind ->
    {"dense": median dense-probe score, "neuron": median best-raw-neuron score}, drawn as grey
    bands across the panel (what the raw activations give, without an SAE).

    arms: name -> {"architecture", "tokens": [E], "counts": {kind: concepts}, "medians": {kind:
    {"single": [E], "probe": [E]}}} (the analysis computes the medians; NaN points are not drawn).
    """
    kinds = _kind_panels(arms) or ["concepts"]
    styles = arm_styles({n: a.get("architecture", "?") for n, a in arms.items()})
    fig, axs = _fig(len(kinds), width=4.6 * len(kinds) + 2.6, height=4.6, sharey=True)
    handles, labels = [], []
    for ax, kind in zip(axs[0], kinds):
        n_kind = 0
        for name, arm in arms.items():
            tokens = _floats(arm.get("tokens"))
            n_kind = max(n_kind, int(arm.get("counts", {}).get(kind, 0)))
            for key, ls in (("single", "-"), ("probe", "--")):
                median = _floats(arm.get("medians", {}).get(kind, {}).get(key))
                if not median.size:
                    continue
                n = min(tokens.size, median.size)
                ok = np.isfinite(tokens[:n]) & np.isfinite(median[:n])
                # Probe markers are hollow so single-eval runs (markers only) still tell the two apart.
                ax.plot(tokens[:n][ok], median[:n][ok], color=styles[name]["color"], linestyle=ls,
                        marker=styles[name]["marker"], markersize=4.5 if key == "probe" else 4, linewidth=1.6,
                        markerfacecolor="white" if key == "probe" else styles[name]["color"])
                if key == "single" and name not in labels:
                    handles.append(Line2D([], [], color=styles[name]["color"], marker=styles[name]["marker"],
                                          markersize=5, linewidth=1.6))
                    labels.append(name)
        ax.axhline(threshold, color="0.3", linestyle=":", linewidth=1.2)
        _baseline_bands(ax, (baselines or {}).get(kind, {}))
        _token_axis(ax)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.set_title(f"{kind.capitalize()} concepts (n={n_kind})" if kind != "concepts" else "Concepts")
        if n_kind == 0:
            _empty_note(ax, f"no {kind} concepts")
    axs[0][0].set_ylabel(f"median best held-out {score_label}")
    for ax in axs[0][1:]:
        ax.tick_params(labelleft=True)
    handles += [Line2D([], [], color="none"), Line2D([], [], color="0.2", linestyle="-", marker="o", markersize=4),
                Line2D([], [], color="0.2", linestyle="--", marker="o", markersize=4.5, markerfacecolor="white"),
                Line2D([], [], color="0.3", linestyle=":")]
    labels += ["", "best single latent", "k-sparse probe", f"threshold {threshold:g}"]
    fig.suptitle(f"Concept emergence: median {score_label} over training")
    _legend_right(fig, handles, labels, title="arm")
    return fig


def _baseline_bands(ax, levels: dict[str, float]) -> None:
    """Grey bands at the dense-probe and best-raw-neuron levels, labelled at the right edge (one
    label for both where they nearly coincide)."""
    texts = {"dense": "dense probe", "neuron": "best raw neuron"}
    shown = {key: levels[key] for key in texts if levels.get(key) is not None}
    for level in shown.values():
        ax.axhline(level, color="0.55", linewidth=5, alpha=0.3, zorder=0)
    if len(shown) == 2 and abs(shown["dense"] - shown["neuron"]) < 0.06:
        labels = [(shown["dense"], f"dense probe {shown['dense']:.2f} · best raw neuron {shown['neuron']:.2f}")]
    else:
        labels = [(level, f"{texts[key]} {level:.2f}") for key, level in shown.items()]
    for level, text in labels:
        below = level > 0.93  # keep the label inside the axes
        ax.annotate(text, (0.99, level), xycoords=("axes fraction", "data"), xytext=(0, -9 if below else 4),
                    textcoords="offset points", ha="right", fontsize=8, color="0.3")


def emergence_steps(arms: dict[str, dict], concepts: list[str], threshold: float, score_label: str = "F1") -> Figure:
    """When each concept emerged, per arm: concepts on the y axis, training tokens on the x axis; arms
    where a concept never emerged appear in a "not emerged" column on the right with their best score.

    arms: name -> {"architecture", "emerged_tokens": [C] (NaN = never), "best": [C]}; C = len(concepts).
    An optional "tokens" entry (the arm's eval tokens) sets the x range to the whole of training.
    Optional "probe_emerged_tokens" and "probe_best" add a second score (the k-sparse probe): hollow
    markers, and "single / probe" best scores where neither emerged.
    """
    concepts = [str(c) for c in concepts]
    n_c, names = len(concepts), list(arms)
    styles = arm_styles({n: a.get("architecture", "?") for n, a in arms.items()})
    height = min(11.0, max(3.8, 1.7 + 0.58 * max(n_c, 1) * max(1.0, len(names) / 5)))
    fig, axs = _fig(2, width=11.0, height=height, sharey=True, gridspec_kw={"width_ratios": [4.2, 1.0]})
    ax, ax_ne = axs[0]
    n_a = max(len(names), 1)
    spread = min(0.68, 0.17 * (n_a - 1))
    offsets = np.linspace(-spread / 2, spread / 2, n_a) if n_a > 1 else np.zeros(1)
    x_max = 0.0
    for arm in arms.values():
        for key in ("tokens", "emerged_tokens", "probe_emerged_tokens"):
            v = _floats(arm.get(key))
            v = v[np.isfinite(v)]
            if v.size:
                x_max = max(x_max, float(v.max()))
    font = 8 if n_a <= 5 else 7
    for a_i, name in enumerate(names):
        arm, st = arms[name], styles[name]
        emerged = _floats(arm.get("emerged_tokens"))
        best = _floats(arm.get("best"))
        y = np.arange(n_c) + offsets[a_i]
        got = np.zeros(n_c, dtype=bool)
        got[: emerged.size] = np.isfinite(emerged[:n_c])
        e = np.full(n_c, np.nan)
        e[: min(n_c, emerged.size)] = emerged[:n_c]
        ax.plot(e[got], y[got], linestyle="none", marker=st["marker"], color=st["color"], markersize=7,
                markeredgecolor="white", markeredgewidth=0.5)
        has_probe = arm.get("probe_emerged_tokens") is not None
        p_e = np.full(n_c, np.nan)
        if has_probe:
            probe = _floats(arm.get("probe_emerged_tokens"))[:n_c]
            p_e[: probe.size] = probe
            ax.plot(p_e, y, linestyle="none", marker=st["marker"], markersize=10, markerfacecolor="none",
                    markeredgecolor=st["color"], markeredgewidth=1.2)
        miss = ~got
        ax_ne.plot(np.full(miss.sum(), 0.1), y[miss], linestyle="none", marker=st["marker"], markersize=6,
                   color=st["color"], markeredgecolor="white", markeredgewidth=0.5)
        probe_best = _floats(arm.get("probe_best"))
        for ci in np.flatnonzero(miss):
            b = best[ci] if ci < best.size else np.nan
            text = format_beside(b, threshold) if np.isfinite(b) else "–"
            if has_probe and not np.isfinite(p_e[ci]) and ci < probe_best.size and np.isfinite(probe_best[ci]):
                text += f" / {format_beside(probe_best[ci], threshold)}"
            ax_ne.text(0.2, y[ci], text, va="center", ha="left", fontsize=font, color=st["color"])
    for i in range(n_c + 1):
        for a in (ax, ax_ne):
            a.axhline(i - 0.5, color="0.88", linewidth=0.8, zorder=0)
    ax.set_yticks(np.arange(n_c), concepts)
    ax.set_ylim(n_c - 0.5, -0.5)
    ax.set_xlim(-0.03 * (x_max or 1.0), (x_max or 1.0) * 1.04)
    _token_axis(ax, "training tokens from which the score stays at or above the threshold")
    ax.set_ylabel("concept")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Emerged")
    if n_c and not any(np.isfinite(_floats(arms[n].get(key))).any() for n in names
                       for key in ("emerged_tokens", "probe_emerged_tokens") if arms[n].get(key) is not None):
        _empty_note(ax, "no concept emerged")
    with_probe = any(a.get("probe_emerged_tokens") is not None for a in arms.values())
    ax_ne.set_xlim(0, 1)
    ax_ne.set_xticks([])
    ax_ne.set_xlabel(f"best {score_label}" + (" (latent / probe)" if with_probe else " reached"))
    ax_ne.set_title("Not emerged")
    ax_ne.tick_params(left=False, labelleft=False)
    handles = [Line2D([], [], linestyle="none", marker=styles[n]["marker"], color=styles[n]["color"], markersize=6)
               for n in names]
    if with_probe:
        handles += [Line2D([], [], color="none"),
                    Line2D([], [], linestyle="none", marker="o", color="0.2", markersize=6),
                    Line2D([], [], linestyle="none", marker="o", markersize=9, markerfacecolor="none",
                           markeredgecolor="0.2")]
        names = [*names, "", "one latent", "k-sparse probe"]
    _legend_right(fig, handles, names, title="arm")
    fig.suptitle(f"When each concept reaches {score_label} ≥ {threshold:g} and stays there")
    return fig


def score_heatmap(arms: list[str], concepts: list[str], scores: np.ndarray, title: str, threshold: float,
                  cbar_label: str = "F1") -> Figure:
    """Annotated heatmap of scores in [0, 1]: arms on rows, concepts on columns (NaN shown grey, "–");
    the annotations never round across `threshold`, and those that reach it are bold."""
    arms, concepts = [str(a) for a in arms], [str(c) for c in concepts]
    s = np.asarray(scores, dtype=np.float64).reshape(len(arms), len(concepts))
    n_a, n_c = s.shape
    longest = max((len(a) for a in arms), default=4)
    width = min(MAX_WIDTH, max(5.0, 0.075 * longest + 0.62 * n_c + 2.2))
    height = min(10.0, max(2.6, 0.42 * n_a + 0.09 * max((len(c) for c in concepts), default=4) + 1.4))
    fig, axs = _fig(1, width=width, height=height)
    ax = axs[0][0]
    cmap = plt.get_cmap("viridis").with_extremes(bad="#bfbfbf")
    im = ax.imshow(np.ma.masked_invalid(s), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    annotate = n_c * n_a <= 600 and n_c <= 30
    if annotate:
        fontsize = 8 if n_c <= 16 else 6.5
        for i in range(n_a):
            for j in range(n_c):
                v = s[i, j]
                if np.isfinite(v):
                    r, g, b, _ = cmap(float(np.clip(v, 0, 1)))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.55
                    ax.text(j, i, format_beside(v, threshold), ha="center", va="center", fontsize=fontsize,
                            color="white" if dark else "black", fontweight="bold" if v >= threshold else "normal")
                else:
                    ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="0.25")
    ax.set_xticks(np.arange(n_c), concepts, rotation=45 if n_c > 4 else 0, ha="right" if n_c > 4 else "center",
                  rotation_mode="anchor", fontsize=9 if n_c <= 20 else 7)
    ax.set_yticks(np.arange(n_a), arms, fontsize=9)
    ax.set_xlabel("concept")
    ax.set_ylabel("arm")
    ax.set_title(title)
    ax.tick_params(length=0)
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cb.set_label(cbar_label)
    return fig


# -- frequency study ---------------------------------------------------------------------------
def _token_range(arms: dict[str, dict]) -> tuple[float, float] | None:
    t = np.concatenate([_floats(a.get("tokens")) for a in arms.values()] or [np.zeros(0)])
    t = t[np.isfinite(t)]
    if not t.size:
        return None
    lo, hi = float(t.min()), float(t.max())
    pad = 0.05 * (hi - lo) if hi > lo else max(0.05 * abs(hi), 1.0)
    return lo - pad, hi + pad


def _time_panels(arms: dict[str, dict], keys: Sequence[tuple[str, ...]], styles: dict, width: float,
                 empty_text: str = "no data") -> Figure:
    """One panel per key (key, ylabel, title[, the arm's field of its tokens, default "tokens"]): each
    arm's series vs training tokens. Empty panels keep the token range of the others and say why
    they are empty. The panels share the token axis, from the start of training."""
    fig, axs = _fig(len(keys), width=width, height=4.4, sharex=True)
    xlim = _token_range(arms)
    for ax, (key, ylabel, title, *tokens_key) in zip(axs[0], keys):
        any_data = False
        for name, arm in arms.items():
            t, v = _xy_series(arm.get(tokens_key[0] if tokens_key else "tokens"), arm.get(key))
            any_data |= bool((np.isfinite(t) & np.isfinite(v)).any())
            _plot_series(ax, t, v, styles[name], None, linestyle=styles[name].get("linestyle", "-"))
        _token_axis(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if not any_data:
            _empty_note(ax, empty_text)
            ax.set_ylim(0.0, 1.0)
            if xlim is not None:
                ax.set_xlim(*xlim)
    return fig


def _arm_time_panels(arms: dict[str, dict], keys: Sequence[tuple[str, str, str]], suptitle: str,
                     empty_text: str = "no data") -> Figure:
    styles = arm_styles({n: a.get("architecture", "?") for n, a in arms.items()})
    fig = _time_panels(arms, keys, styles, 4.6 * len(keys) + 2.4, empty_text)
    handles = [Line2D([], [], color=styles[n]["color"], marker=styles[n]["marker"], markersize=5) for n in arms]
    fig.suptitle(suptitle)
    _legend_right(fig, handles, list(arms), title="arm")
    return fig


def dead_dense_over_time(arms: dict[str, dict], dense_threshold: float) -> Figure:
    """Fractions of dead and dense latents vs training tokens (two panels).

    arms: name -> {"architecture", "tokens", "dead_frac", "dense_frac"}; dense_threshold: the firing
    frequency above which dense_frac counted a latent (for the title).
    """
    fig = _arm_time_panels(arms, [
        ("dead_frac", "fraction of latents", "Dead latents (never fired on the eval split)"),
        ("dense_frac", "fraction of latents", f"Dense latents (firing on > {dense_threshold:.0%} of tokens)"),
    ], "Dead and dense latents over training")
    for ax in fig.axes[:2]:
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.0), max(hi, 0.05))
    return fig


def rank_stability(arms: dict[str, dict]) -> Figure:
    """Spearman correlation of per-latent firing-frequency ranks between consecutive evals.

    arms: name -> {"architecture", "tokens", "spearman"}; the first eval has no value (NaN there, or
    a spearman series one shorter than tokens).
    """
    fig = _arm_time_panels(arms, [("spearman", "Spearman ρ vs the previous eval",
                                   "Firing-frequency rank stability between evals")],
                           "Do the same latents stay frequent?", empty_text="needs two or more evals")
    ax = fig.axes[0]
    lo, _hi = ax.get_ylim()
    ax.set_ylim(min(lo, 0.9) if np.isfinite(lo) else 0.0, 1.01)
    return fig


def freq_vs_magnitude(arms: dict[str, dict], dense_threshold: float) -> Figure:
    """Small multiples per arm: log10 firing frequency vs log10 mean activation when firing.

    arms: name -> {"architecture", "density": [d_sae], "mean_act": [d_sae]}. Latents that never fired
    are left out (their count is in each panel's title).
    """
    names = list(arms) or ["(no arms)"]
    n = len(names)
    ncols = min(3, n)
    nrows = int(np.ceil(n / ncols))
    fig, axs = _fig(ncols, nrows, width=3.8 * ncols + 0.8, height=3.2 * nrows + 0.8, sharex=True, sharey=True)
    styles = arm_styles({nm: a.get("architecture", "?") for nm, a in arms.items()})
    for idx, ax, bottom, left in _grid_panels(fig, axs, n, "log10 firing frequency"):
        name = names[idx]
        arm = arms.get(name, {})
        dens = _floats(arm.get("density"))
        act = _floats(arm.get("mean_act"))
        m = min(dens.size, act.size)
        dens, act = dens[:m], act[:m]
        fired = np.isfinite(dens) & (dens > 0)
        ok = fired & np.isfinite(act) & (act > 0)
        n_never = int((~fired).sum())
        if ok.any():
            ax.scatter(np.log10(dens[ok]), np.log10(act[ok]), s=5, alpha=0.45, linewidths=0,
                       color=styles.get(name, {"color": "0.3"})["color"], rasterized=True)
        else:
            _empty_note(ax, "no latent fired")
        ax.axvline(np.log10(dense_threshold), color="0.5", linestyle="--", linewidth=0.8)
        ax.set_title(f"{name}\n{m - n_never:,} fired, {n_never:,} never fired", fontsize=9.5)
        ax.grid(alpha=0.3)
        if bottom:
            ax.set_xlabel("log10 firing frequency")
        if left:
            ax.set_ylabel("log10 mean activation when firing")
    fig.suptitle(f"Firing frequency vs activation magnitude (final eval; dashed: dense threshold "
                 f"{dense_threshold:g})")
    return fig


def density_over_training(name: str, tokens: np.ndarray, log10_density: np.ndarray, floor: float,
                          dense_threshold: float) -> Figure:
    """How one arm's log10 feature-density histogram moves over training.

    Heatmap of latent counts: x = log10 firing-frequency bins, y = eval (training tokens, first eval
    on top). Latents that never fired (value <= floor) are counted in a separate column on the left.
    """
    tokens = _floats(tokens)
    d = np.asarray(log10_density, dtype=np.float64)
    if d.ndim == 1:
        d = d[None, :]
    n_e = d.shape[0]
    lo = float(floor) + 1.0  # rarest observable firing: one token in the eval window
    n_bins = 50
    edges = np.linspace(lo, 0.0, n_bins + 1)
    never = np.isfinite(d) & (d <= floor + 1e-9)
    counts = np.zeros((n_e, n_bins))
    for e in range(n_e):
        alive = d[e][np.isfinite(d[e]) & ~never[e]]
        counts[e], _ = np.histogram(np.clip(alive, lo, 0.0), bins=edges)
    n_never = never.sum(axis=1)

    height = min(9.0, max(3.4, 1.7 + 0.38 * n_e))
    fig, axs = _fig(2, width=11.0, height=height, sharey=True, gridspec_kw={"width_ratios": [0.9, 8.0]})
    ax_n, ax = axs[0]
    norm = mcolors.PowerNorm(gamma=0.5, vmin=0, vmax=max(1.0, counts.max()))
    im = ax.imshow(counts, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest",
                   extent=(lo, 0.0, n_e - 0.5, -0.5))
    ax.axvline(np.log10(dense_threshold), color="white", linestyle="--", linewidth=1.0)
    ax.text(np.log10(dense_threshold), -0.5, " dense →", color="0.2", fontsize=8, ha="left", va="bottom",
            clip_on=False)
    ax.set_xlabel("log10 firing frequency")
    ax.set_title("Fired latents per log10-frequency bin", pad=14)
    cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.04)
    cb.set_label("latents per bin (sqrt colour scale)")

    d_sae = d.shape[1]
    ax_n.imshow(n_never[:, None] / max(d_sae, 1), aspect="auto", cmap="Reds", vmin=0, vmax=1,
                interpolation="nearest", extent=(0, 1, n_e - 0.5, -0.5))
    for e in range(n_e):
        frac = n_never[e] / max(d_sae, 1)
        ax_n.text(0.5, e, f"{n_never[e]:,}", ha="center", va="center", fontsize=8,
                  color="white" if frac > 0.5 else "black")
    ax_n.set_xticks([])
    ax_n.set_xlabel("latents")
    ax_n.set_title("never\nfired", fontsize=10)
    labels = [format_tokens(t) if np.isfinite(t) else f"eval {i}" for i, t in enumerate(
        np.concatenate([tokens[:n_e], np.full(max(0, n_e - tokens.size), np.nan)]))]
    ax_n.set_yticks(np.arange(n_e), labels)
    ax_n.set_ylabel(TOKENS_LABEL)
    ax_n.set_ylim(n_e - 0.5, -0.5)
    fig.suptitle(f"{name}: feature density over training ({d_sae:,} latents)")
    return fig


# -- resampling study --------------------------------------------------------------------------
def resampling_curves(arms: dict[str, dict]) -> Figure:
    """Three panels vs tokens, coloured by dead-latent handling (none / resample / auxk;
    architectures told apart by line style when there are several): the fraction of latents dead
    during training (not fired in the last dead window, at every logged step) with each resampling
    marked by a dotted line, the fraction dead on the eval split, and explained variance.

    arms: name -> {"architecture", "dead_handling", "tokens", "dead_frac", "explained_variance",
    "train_tokens", "train_dead_frac", "resampled_tokens"} (the last three may be missing).
    """
    archs = list(dict.fromkeys(str(a.get("architecture", "?")) for a in arms.values()))
    linestyles = ["-", "--", ":", "-."]
    styles, seen = {}, Counter()
    for name, arm in arms.items():
        mode = str(arm.get("dead_handling", "?"))
        color = DEAD_HANDLING_COLORS.get(mode, arch_color(mode))
        i = seen[mode]
        seen[mode] += 1
        styles[name] = {"color": color, "marker": _MARKERS[i % len(_MARKERS)],
                        "linestyle": linestyles[archs.index(str(arm.get("architecture", "?"))) % len(linestyles)]}

    def label(name: str) -> str:
        return f"{name} ({arms[name].get('dead_handling', '?')})"

    keys = [("train_dead_frac", "fraction not fired in the last window", "Dead in training (dotted: resampling)",
             "train_tokens"),
            ("dead_frac", "fraction never fired on the eval split", "Dead on the eval split"),
            ("explained_variance", "explained variance (fraction)", "Reconstruction (held-out)")]
    fig = _time_panels(arms, keys, styles, width=15.5)
    for name, arm in arms.items():
        for tokens in np.asarray(arm.get("resampled_tokens", []), dtype=np.float64):
            fig.axes[0].axvline(tokens, color=styles[name]["color"], linestyle=":", linewidth=1.0, alpha=0.7)
    handles = [Line2D([], [], color=styles[n]["color"], marker=styles[n]["marker"], markersize=5,
                      linestyle=styles[n]["linestyle"]) for n in arms]
    fig.suptitle("Dead-latent handling: dead latents and reconstruction over training")
    _legend_right(fig, handles, [label(n) for n in arms], title="arm (dead handling)")
    return fig


# -- UMAP ----------------------------------------------------------------------------------------
def umap_scatter(xy: np.ndarray, concept: list[str | None], log10_freq: np.ndarray, title: str,
                 freq_range: tuple[float, float] | None = None) -> Figure:
    """Decoder-direction embedding, two panels: left coloured by matched concept (the 12 most common
    categories; the rest as "other"; unmatched latents small and light grey, drawn first), right
    coloured by log10 firing frequency, on `freq_range` when given (one scale for several arms)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    n = xy.shape[0]
    concept = [None if (c is None or c == "" or (isinstance(c, float) and np.isnan(c))) else str(c)
               for c in list(concept)[:n]] + [None] * max(0, n - len(concept))
    freq = _floats(log10_freq)[:n]
    if freq.size < n:
        freq = np.concatenate([freq, np.full(n - freq.size, np.nan)])
    fig, axs = _fig(2, width=12.0, height=5.4)
    ax_c, ax_f = axs[0]
    size = 7 if n <= 2000 else 3

    counts = Counter(c for c in concept if c is not None)
    top = [c for c, _ in counts.most_common(MAX_CATEGORIES)]
    if len(counts) > MAX_CATEGORIES:  # keep legend order stable: most common first
        top = top[: MAX_CATEGORIES - 1]
    others = sorted(set(counts) - set(top))
    labels = np.array([c if c is not None else "" for c in concept], dtype=object)
    unmatched = np.array([c is None for c in concept], dtype=bool)
    ax_c.scatter(xy[unmatched, 0], xy[unmatched, 1], s=size * 0.5, color=UNMATCHED_COLOR, alpha=0.6, linewidths=0,
                 label=f"unmatched ({int(unmatched.sum()):,})", rasterized=True)
    if others:
        m = np.isin(labels, others)
        ax_c.scatter(xy[m, 0], xy[m, 1], s=size, color=OTHER_CONCEPTS_COLOR, alpha=0.8, linewidths=0,
                     label=f"{len(others)} other concepts ({int(m.sum()):,})", rasterized=True)
    for i, c in enumerate(top):
        m = labels == c
        ax_c.scatter(xy[m, 0], xy[m, 1], s=size + 12, color=_CATEGORY_COLORS[i % len(_CATEGORY_COLORS)], alpha=0.9,
                     linewidths=0.4, edgecolors="white", label=f"{c} ({int(m.sum()):,})", rasterized=True)
    ax_c.set_title("Matched concept")
    leg = ax_c.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, markerscale=1.8,
                      title="concept (latents)", title_fontsize=8, borderaxespad=0.0)
    for h in leg.legend_handles:
        h.set_alpha(1.0)

    order = np.argsort(np.where(np.isfinite(freq), freq, -np.inf), kind="stable")  # frequent latents on top
    ok = order[np.isfinite(freq[order])]
    vmin, vmax = freq_range if freq_range is not None else (None, None)
    sc = ax_f.scatter(xy[ok, 0], xy[ok, 1], c=freq[ok], s=size, cmap="viridis", alpha=0.85, linewidths=0,
                      rasterized=True, vmin=vmin, vmax=vmax)
    if (~np.isfinite(freq)).any():
        bad = ~np.isfinite(freq)
        ax_f.scatter(xy[bad, 0], xy[bad, 1], s=size, color=UNMATCHED_COLOR, linewidths=0, rasterized=True)
    cb = fig.colorbar(sc, ax=ax_f, pad=0.01, fraction=0.05)
    cb.set_label("log10 firing frequency")
    ax_f.set_title("Firing frequency")
    for ax in (ax_c, ax_f):
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        ax.tick_params(labelbottom=False, labelleft=False, length=0)
        if n == 0:
            _empty_note(ax, "no latents")
    fig.suptitle(title)
    return fig


# -- synthetic emergence study (toy model of superposition) -------------------------------------
NEVER_CMAP = mcolors.LinearSegmentedColormap.from_list("never_emerged", ["#d4d4d4", "#1a1a1a"])
NO_SCORE_COLOR = "#ffffff"


def _never_band(values: np.ndarray, log: bool) -> dict:
    """Layout of a y axis with the emerged values below and a "never" band on top, in axis units
    (log10 of tokens on a log axis): bottom, sep (dashed separator), never (where the never-emerged
    points sit), top."""
    if values.size:
        a, b = (np.log10(values.min()), np.log10(values.max())) if log else (values.min(), values.max())
    else:
        a, b = 0.0, 1.0
    span = b - a
    if span <= 0:
        span = 0.5 if log else max(abs(b), 1.0) * 0.5
        a, b = a - span / 2, b + span / 2
    bottom, sep = a - 0.06 * span, b + 0.06 * span
    if not log and values.size and values.min() >= 0:
        bottom = max(bottom, -0.03 * sep)  # tokens are never negative
    band = 0.25 * (sep - bottom)
    return {"bottom": bottom, "sep": sep, "never": sep + band / 2, "top": sep + band, "log": log,
            "nonneg": bool(values.size and values.min() >= 0) or not values.size, "empty": not values.size}


def _never_ticks(layout: dict, with_band: bool) -> tuple[list[float], list[str], list[float]]:
    """Major ticks (data units) and labels of the emerged region, "never" on the band; minor ticks."""
    lo, sep = layout["bottom"], layout["sep"]
    major, minor = [], []
    if layout["empty"]:  # no token values at all: the emerged region has no scale to show
        pass
    elif layout["log"]:
        decades = sep - lo
        subs = (1.0, 2.0, 5.0) if decades < 2 else (1.0, 3.0) if decades < 4 else (1.0,)
        major = [t for t in LogLocator(base=10, subs=subs).tick_values(10 ** lo, 10 ** sep)
                 if lo <= np.log10(t) <= sep]
        minor = [t for t in LogLocator(base=10, subs=np.arange(2, 10)).tick_values(10 ** lo, 10 ** sep)
                 if lo <= np.log10(t) <= sep and not np.isclose(major, t).any()]
    else:
        major = [t for t in MaxNLocator(nbins=5, min_n_ticks=3).tick_values(lo, sep) if lo <= t <= sep]
        if layout["nonneg"]:
            major = [t for t in major if t >= 0]
    labels = [format_tokens(t) for t in major]
    if with_band:
        major.append(10 ** layout["never"] if layout["log"] else layout["never"])
        labels.append("never")
    return [float(t) for t in major], labels, [float(t) for t in minor]


def emergence_vs_frequency(arms: dict[str, dict], threshold: float) -> Figure:
    """Do frequent features emerge first? Small multiples per arm on a toy model of superposition:
    x = true firing probability of each feature (log), y = training tokens at the first eval where
    some latent's decoder direction reaches |cos| >= threshold with it (log when the emerged values
    span more than a decade). Features that never emerged sit in a shaded "never" band on top,
    shaded by the best |cos| they reached. Each title gives "emerged n/F" and the arm's "spearman"
    (the analysis's rank correlation between probability and emergence tokens), where finite.

    arms: name -> {"architecture", "probability": [F], "emerged_tokens": [F] (NaN = never),
    "best_cos": [F], "spearman"}; an optional "tokens" entry (the arm's eval tokens) widens the y range.
    Features without a finite positive probability are not drawn (their count is in the title).
    """
    names = list(arms) or ["(no arms)"]
    n = len(names)
    ncols = min(3, n)
    nrows = int(np.ceil(n / ncols))
    styles = arm_styles({nm: a.get("architecture", "?") for nm, a in arms.items()})

    data = {}
    for name in names:
        arm = arms.get(name, {})
        p, e, b = _floats(arm.get("probability")), _floats(arm.get("emerged_tokens")), _floats(arm.get("best_cos"))
        f = max(p.size, e.size)
        pad = lambda v: np.concatenate([v[:f], np.full(max(0, f - v.size), np.nan)])  # noqa: E731
        p, e, b = pad(p), pad(e), pad(b)
        data[name] = {"p": p, "e": e, "b": b, "f": f, "has_p": np.isfinite(p) & (p > 0), "got": np.isfinite(e)}

    emerged = np.concatenate([d["e"][d["got"]] for d in data.values()] + [np.zeros(0)])
    evals = np.concatenate([_floats(a.get("tokens")) for a in arms.values()] + [np.zeros(0)])
    evals = evals[np.isfinite(evals)]
    if not emerged.size or emerged.min() > 0:
        evals = evals[evals > 0]  # a first eval at 0 tokens does not force a linear axis
    y_vals = np.concatenate([emerged, evals])
    log_y = bool(y_vals.size and y_vals.min() > 0 and y_vals.max() / y_vals.min() > 10)
    layout = _never_band(y_vals, log_y)
    with_band = any((d["has_p"] & ~d["got"]).any() for d in data.values())
    to_y = (lambda u: 10 ** u) if log_y else (lambda u: u)  # noqa: E731

    p_all = np.concatenate([d["p"][d["has_p"]] for d in data.values()] + [np.zeros(0)])
    if p_all.size:
        p_lo, p_hi = float(p_all.min()), float(p_all.max())
        ratio = 1.5 if p_hi > p_lo else 3.0
        xlim = (p_lo / ratio, p_hi * ratio)
    else:
        xlim = (1e-3, 1.0)

    fig, axs = _fig(ncols, nrows, width=max(5.6, 3.8 * ncols + (1.4 if with_band else 0.6)), height=3.3 * nrows + 1.1,
                    sharex=True, sharey=True)
    jitter = np.random.default_rng(0)
    band_h = layout["top"] - layout["sep"]
    sc = None
    for idx, ax, bottom, left in _grid_panels(fig, axs, n, "true firing probability"):
        name = names[idx]
        d = data[name]
        st = styles.get(name, {"color": "0.3", "marker": "o"})
        ax.set_xscale("log")
        ax.set_yscale("log" if log_y else "linear")
        ok = d["has_p"] & d["got"]
        if ok.any():
            ax.scatter(d["p"][ok], d["e"][ok], s=20, color=st["color"], marker=st["marker"], alpha=0.8,
                       edgecolors="white", linewidths=0.4, zorder=3)
        miss = d["has_p"] & ~d["got"]
        if miss.any():
            y = to_y(layout["never"] + jitter.uniform(-0.22, 0.22, int(miss.sum())) * band_h)
            cos = d["b"][miss]
            scored = np.isfinite(cos)
            if scored.any():
                sc = ax.scatter(d["p"][miss][scored], y[scored], c=cos[scored], cmap=NEVER_CMAP, vmin=0.0,
                                vmax=threshold, s=20, marker=st["marker"], edgecolors="0.35", linewidths=0.4,
                                zorder=3)
            if (~scored).any():
                ax.scatter(d["p"][miss][~scored], y[~scored], s=20, marker=st["marker"], color=NO_SCORE_COLOR,
                           edgecolors="0.35", linewidths=0.6, zorder=3)
        if with_band:
            ax.axhspan(to_y(layout["sep"]), to_y(layout["top"]), color="0.94", zorder=0, linewidth=0)
            ax.axhline(to_y(layout["sep"]), color="0.45", linestyle="--", linewidth=0.9, zorder=1)

        n_got = int(d["got"].sum())
        stats = f"emerged {n_got}/{d['f']}"
        rho = _value(arms.get(name, {}).get("spearman"))
        if np.isfinite(rho):
            stats += f", Spearman ρ = {rho:+.2f}"
        n_nop = int((~d["has_p"]).sum())
        if n_nop:
            stats += f"\n({n_nop} without probability not shown)"
        ax.set_title(f"{name}\n{stats}" if name in arms else "No arms", fontsize=9.5)
        if name not in arms:
            _empty_note(ax, "no arms")
        elif d["f"] == 0:
            _empty_note(ax, "no features")
        elif not ok.any():
            _empty_note(ax, "no feature emerged" if not n_got else "no emerged feature with a probability")
        ax.grid(alpha=0.3)
        if bottom:
            ax.set_xlabel("true firing probability")
        if left:
            ax.set_ylabel(f"training tokens at emergence (|cos| ≥ {threshold:g})")

    ticks, labels, minor = _never_ticks(layout, with_band)
    # Decades only (plus 2 and 5 on narrow ranges) and no minor ticks: minor log ticks on every panel
    # double the drawing time.
    x_subs = (1.0, 2.0, 5.0) if np.log10(xlim[1] / xlim[0]) < 2.5 else (1.0,)
    for ax in fig.axes:
        ax.set_xlim(*xlim)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=x_subs, numticks=12))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.set_ylim(to_y(layout["bottom"]), to_y(layout["top"] if with_band else layout["sep"]))
        ax.set_yticks(ticks, labels)
        ax.yaxis.set_minor_locator(FixedLocator(minor) if minor else NullLocator())
        ax.yaxis.set_minor_formatter(NullFormatter())  # the log axis would label minor ticks as 6x10^5
    if sc is not None:
        cb = fig.colorbar(sc, ax=fig.axes, fraction=0.04, pad=0.02, shrink=0.6 if nrows > 1 else 0.85)
        cb.set_label("best |cos| reached (never emerged)")
    fig.suptitle(f"Do frequent features emerge first?\nemerged: some decoder direction "
                 f"reaches |cos| ≥ {threshold:g} with the feature", fontsize=11)
    return fig


def recovery_curves(arms: dict[str, dict], threshold: float) -> Figure:
    """Recovery of the true features of a toy model over training, two panels: fraction of features
    whose best decoder |cos| >= threshold, and MCC (mean |cos| under a one-to-one matching).

    arms: name -> {"architecture", "tokens": [E], "frac_recovered": [E], "mcc": [E]}.
    """
    fig = _arm_time_panels(arms, [
        ("frac_recovered", "fraction of true features",
         f"Fraction of true features recovered (best |cos| ≥ {threshold:g})"),
        ("mcc", "MCC (mean |cos| of matched pairs)", "MCC (one-to-one matching)"),
    ], "Recovery of the true features over training", empty_text="no arms" if not arms else "no values")
    for ax in fig.axes[:2]:
        ax.set_ylim(0.0, 1.02)
    return fig


# -- several hook points -----------------------------------------------------------------------
def per_hook_lines(points: list[dict], hooks: list[str], panels: list[tuple[str, str]],
                   ceilings: dict[str, dict[str, float]]) -> Figure:
    """One panel per metric of `panels` (key, title), the hook points along x in the study's order
    and a line per arm setting (points: {"arm", "architecture", "hook", key: value}) in its
    architecture's colour; ceilings: panel key -> {hook: value}, drawn as a grey dashed line (the
    dense probe on the raw activations), on panels of scores in [0, 1] (keys f1_*)."""
    styles = arm_styles({p["arm"]: p["architecture"] for p in points})
    where = {hook: i for i, hook in enumerate(hooks)}
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axs = _fig(ncols, nrows, width=3.6 * ncols + 2.2, height=3.3 * nrows + 0.6)
    handles, names = [], []
    for idx, ax, _bottom, _left in _grid_panels(fig, axs, len(panels), "hook point"):
        key, title = panels[idx]
        for arm, style in styles.items():
            xy = sorted((where[p["hook"]], _value(p.get(key))) for p in points if p["arm"] == arm)
            xy = [(x, y) for x, y in xy if np.isfinite(y)]
            if not xy:
                continue
            (line,) = ax.plot(*zip(*xy), color=style["color"], marker=style["marker"], markersize=6, linewidth=1.5)
            if idx == 0:
                handles.append(line)
                names.append(arm)
        ceiling = ceilings.get(key) or {}
        if ceiling:
            ax.plot([where[h] for h in ceiling], list(ceiling.values()), color="0.5", linestyle="--", marker="_",
                    markersize=12, linewidth=1.5, label="dense probe (raw activations)")
            ax.legend(loc="lower left", fontsize=8, frameon=False)
        if key.startswith("f1_"):
            ax.set_ylim(-0.03, 1.05)
        ax.set_xticks(range(len(hooks)), hooks, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.4, len(hooks) - 0.6)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("Final metrics by hook point (held-out split)")
    _legend_right(fig, handles, names, title="arm")
    return fig
