"""Matplotlib figures for SAE diagnostics (headless: Agg backend, no W&B)."""

from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless training boxes have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from config.processes import forked_pool

N_BINS = 60


def density_floor(n_tokens: int) -> float:
    """log10 value used for never-firing latents: one decade below the rarest observable firing (1/n_tokens)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    return float(np.log10(1.0 / n_tokens) - 1.0)


def log10_density(density: np.ndarray, n_tokens: int) -> np.ndarray:
    """log10 firing frequency per latent; latents that never fired sit at density_floor(n_tokens)."""
    density = np.asarray(density, dtype=np.float64).ravel()
    out = np.full_like(density, density_floor(n_tokens))
    fired = density > 0
    out[fired] = np.log10(density[fired])
    return out


def density_histogram(density: np.ndarray, n_tokens: int, title: str, dense_threshold: float) -> Figure:
    """Histogram of log10 firing frequency with never-fired latents as a separate, labelled bar, and
    the study's dense threshold (`probes.dense_threshold`, what eval/dense_frac counts) marked."""
    density = np.asarray(density, dtype=np.float64).ravel()
    floor = density_floor(n_tokens)
    n_dead = int((density <= 0).sum())
    n_dense = int((density > dense_threshold).sum())
    alive = np.log10(density[density > 0])

    # Fixed range [log10(1/n), 0] so histograms from successive evals are comparable.
    counts, edges = np.histogram(alive, bins=N_BINS, range=(floor + 1.0, 0.0))
    width = edges[1] - edges[0]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(edges[:-1], counts, width=width, align="edge", color="tab:blue", edgecolor="white", linewidth=0.3,
           label="fired")
    ax.bar([floor], [n_dead], width=max(width, 0.15), color="tab:red", label=f"never fired (plotted at {floor:.2f})")
    if n_dead:
        ax.annotate(f"{n_dead:,}", (floor, n_dead), ha="center", va="bottom", fontsize=9, color="tab:red")
    ax.axvline(np.log10(dense_threshold), color="gray", linestyle="--", linewidth=0.8, label="dense threshold")

    ax.set_xlim(floor - 0.5, 0.25)
    ax.set_ylim(0, 1.6 * max(int(counts.max(initial=0)), n_dead, 1))  # headroom for legend and note
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(title)
    # The counts go in the legend title so one box holds all the annotation.
    note = (
        f"{density.size:,} latents, {n_tokens:,} tokens\n"
        f"dead (never fired): {n_dead:,} ({n_dead / max(density.size, 1):.1%})\n"
        f"dense (>{dense_threshold:.0%} of tokens): {n_dense:,}"
    )
    ax.legend(loc="upper right", fontsize=9, title=note, title_fontsize=9, alignment="left")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    """Save as PNG and close, so long sweeps don't accumulate open figures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Agg's own PNG writer: fig.savefig lays out and draws a constrained-layout figure twice (once to
    # place it, once to paint it); this draws it once, to the same bytes, in 0.87x the time.
    fig.set_dpi(120)
    FigureCanvasAgg(fig).print_png(path)
    plt.close(fig)


FigureJob = tuple[Callable[[], Figure], Path]  # draw the figure, save it there
MAX_FIGURE_PROCESSES = 8  # a report has a few tens of figures: more processes would mostly cost their forks
_jobs: list[FigureJob] = []  # what the forked figure processes draw (they inherit it; nothing is pickled)


def save_figures(jobs: list[FigureJob]) -> Iterator[Path]:
    """Draw and save each job's figure, yielding its path as it is saved, in order. Drawing is
    matplotlib's Python (layout, ticks, text: about 0.2 s a figure) and a report has tens of
    figures, so on a Linux machine with several cores they are drawn in forked processes, one core
    each; elsewhere, or for a single figure, one after another here."""
    global _jobs
    _jobs = jobs  # before the fork: the processes inherit it
    pool = forked_pool(min(len(jobs), MAX_FIGURE_PROCESSES)) if len(jobs) > 1 else None
    if pool is None:
        yield from _save_here(jobs)
        return
    saved = 0
    try:
        for i in pool.map(_save_job, range(len(jobs))):
            saved += 1
            yield jobs[i][1]
    except BrokenProcessPool:  # a worker was killed (a SIGTERM to the whole job, the OOM killer): the rest here
        yield from _save_here(jobs[saved:])
    finally:
        pool.shutdown(cancel_futures=True)
        _jobs = []


def _save_here(jobs: list[FigureJob]) -> Iterator[Path]:
    for draw, path in jobs:
        save_figure(draw(), path)
        yield path


def _save_job(i: int) -> int:
    draw, path = _jobs[i]
    save_figure(draw(), path)
    return i
