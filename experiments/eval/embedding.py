"""2-D UMAP embedding of SAE decoder directions (one point per latent).

The layout is computed on cosine distances between decoder rows, so only a latent's direction
matters, not its norm. Two details keep it fast and well defined:

* Cosine distances are computed here with one matrix product and handed to UMAP as a precomputed
  matrix. With ``metric="cosine"`` on fewer than 4096 points umap-learn builds the same exact
  distance matrix through sklearn's per-pair Python callback (~1 s of Python overhead for 1024
  latents); the fuzzy neighbour graph comes out the same (max abs difference 5e-6). Above 4096
  latents a dense matrix would be wasteful, so UMAP's own approximate cosine neighbour search is
  used there.
* A decoder row that is all zeros (or non-finite) has no direction: its cosine distance to anything
  is undefined. Such rows are left out of the fit and placed together in a small, seeded cluster
  just below and to the left of the layout's bounding box, so they stay visible in a scatter but
  never pose as neighbours of real directions.

Timing (clustered synthetic decoder, d_sae 1024, d_in 128, 2 cores, best of 5 after JIT warm-up):
umap defaults (metric="cosine", 500 epochs) 2.26 s; precomputed cosine with 500 epochs 1.20 s,
300 epochs 0.79 s, 200 epochs 0.55 s, 100 epochs 0.37 s. Trustworthiness (15 neighbours) was
0.966 for 200-500 epochs and 0.963 at 100; 200 epochs keeps 52% of each point's 15 cosine nearest
neighbours (54% at 500, 51% at 100) and its layout overlaps a 500-epoch layout as much as two
500-epoch layouts with different seeds overlap each other (kNN overlap 0.55 vs 0.56), while at 100
epochs clusters visibly loosen. Hence ``n_epochs=200``.

umap-learn compiles its numba functions on first use in every process (17-22 s on 2 cores) and
asks numba to cache almost none of them, so every run of the harness paid that again. umap is
imported here with numba's on-disk cache switched on for its functions (`_import_umap`): the first
process compiles and stores them (beside umap's sources, or in NUMBA_CACHE_DIR), later ones load
them in well under a second. Same machine code, same layouts.

A study fits its embeddings in helper processes (`embedding_workers`): forked before the subject
model loads, they import umap (about 1.5 s each) one after the other on the core that loading leaves
idle, and at an eval step every arm's fit starts at once (`ArmProbes.prefetch`), to run while the
arms are evaluated one after another. One process where fits are made during training, beside it:
a second took a core from the arms' steps (the default study, 3 UMAP evals: 9 s slower, 171 s
against 162 s). Two where every fit is at the final eval (--quick), with nothing to run beside but
the evals: its 6 fits of 0.4 s left the evals waiting 1.7 s with one, 0.8 s with two. A fit is a
pure function of its decoder and seed, so where it runs changes nothing.
"""

from __future__ import annotations

import multiprocessing
import sys
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import numpy as np

from config.processes import forked_pool

N_NEIGHBORS = 15
MIN_DIST = 0.1
N_EPOCHS = 200
# umap-learn switches to approximate neighbours at this size; above it we do the same rather than
# materialise an n x n distance matrix.
_EXACT_MAX = 4096


def _zero_rows(w: np.ndarray) -> np.ndarray:
    return ~np.any(w != 0, axis=1)


def _cosine_distances(unit: np.ndarray) -> np.ndarray:
    d = 1.0 - unit @ unit.T
    np.clip(d, 0.0, 2.0, out=d)
    np.fill_diagonal(d, 0.0)
    # Exactly symmetric, so UMAP's graph symmetrisation sees identical values both ways.
    return ((d + d.T) * 0.5).astype(np.float32)


def _fallback_layout(unit: np.ndarray) -> np.ndarray:
    """Tiny inputs (< 4 directions) where UMAP is meaningless: first two principal axes."""
    n = unit.shape[0]
    out = np.zeros((n, 2), dtype=np.float64)
    if n < 2:
        return out
    centred = unit - unit.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[: min(2, vt.shape[0])].T
    out[:, : proj.shape[1]] = proj
    return out


def decoder_embedding(w_dec: np.ndarray, seed: int) -> np.ndarray:
    """UMAP of decoder directions ``w_dec`` [d_sae, d_in] to [d_sae, 2] float32.

    Cosine metric, ``n_neighbors=15``, ``min_dist=0.1``, ``random_state=seed``: the same input and
    seed give an identical layout. All-zero rows are placed in a separate cluster (module doc).
    """
    w = np.asarray(w_dec, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"w_dec must be 2-D [d_sae, d_in], got shape {w.shape}")
    n = w.shape[0]
    out = np.zeros((n, 2), dtype=np.float64)
    if n == 0:
        return out.astype(np.float32)

    zero = _zero_rows(w) | ~np.all(np.isfinite(w), axis=1)
    live = np.flatnonzero(~zero)
    unit = w[live] / np.linalg.norm(w[live], axis=1, keepdims=True)

    if live.size >= 4:
        out[live] = _umap(unit, seed)
    elif live.size:
        out[live] = _fallback_layout(unit)

    n_zero = int(zero.sum())
    if n_zero:
        if live.size:
            lo = out[live].min(axis=0)
            span = np.maximum(out[live].max(axis=0) - lo, 1.0)
        else:
            lo, span = np.zeros(2), np.ones(2)
        centre = lo - 0.08 * span
        rng = np.random.default_rng(seed)
        out[zero] = centre + rng.normal(scale=0.015 * span, size=(n_zero, 2))
    return out.astype(np.float32)


def embedding_workers(workers: int = 1) -> ProcessPoolExecutor | None:
    """Processes for decoder_embedding, started now, each importing umap as it starts, one after
    the other (see the module docstring); None where helper processes are not used (one core, not
    Linux)."""
    turn = multiprocessing.get_context("fork").Lock()
    return forked_pool(workers, warm_up=partial(_import_umap_in_turn, turn))


def _import_umap_in_turn(turn) -> None:
    with turn:
        _import_umap()


def embedding_of(fit: Future | None, w_dec: np.ndarray, seed: int) -> np.ndarray:
    """decoder_embedding(w_dec, seed): what a worker computed (`fit`), or computed here, without a
    worker or when one died."""
    if fit is not None:
        try:
            return fit.result()
        except BrokenProcessPool:
            pass
    return decoder_embedding(w_dec, seed)


def _import_umap():
    """umap-learn, its numba functions compiled with cache=True (see the module docstring).

    umap declares them at import time through `numba.njit` / `numba.jit`, so those two are wrapped
    for the duration of the import only. Importing umap-learn (numba, pynndescent) takes seconds,
    hence lazily."""
    if "umap" in sys.modules:
        return sys.modules["umap"]
    import numba

    plain = numba.njit, numba.jit

    def caching(decorator):
        def wrapped(*args, **kwargs):
            kwargs.setdefault("cache", True)
            return decorator(*args, **kwargs)
        return wrapped

    numba.njit, numba.jit = caching(numba.njit), caching(numba.jit)
    try:
        import umap
    finally:
        numba.njit, numba.jit = plain
    return umap


def _umap(unit: np.ndarray, seed: int) -> np.ndarray:
    n = unit.shape[0]
    common = dict(
        n_components=2,
        n_neighbors=min(N_NEIGHBORS, n - 1),
        min_dist=MIN_DIST,
        n_epochs=N_EPOCHS,
        random_state=seed,
        n_jobs=1,  # a fixed random_state forces a single thread anyway
    )
    with warnings.catch_warnings():
        # "n_jobs value ... overridden to 1 by setting random_state", "using precomputed metric;
        # inverse_transform will be unavailable", spectral-init and disconnection notices: all
        # expected here and not actionable by the caller.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"umap\..*")
        warnings.filterwarnings("ignore", message=r".*n_jobs.*overridden.*")
        warnings.filterwarnings("ignore", message=r".*precomputed metric.*")
        warnings.filterwarnings("ignore", message=r".*ParametricUMAP will be unavailable.*")
        umap = _import_umap()

        if n <= _EXACT_MAX:
            reducer = umap.UMAP(metric="precomputed", **common)
            xy = reducer.fit_transform(_cosine_distances(unit))
        else:
            reducer = umap.UMAP(metric="cosine", **common)
            xy = reducer.fit_transform(unit.astype(np.float32))
    return np.asarray(xy, dtype=np.float64)
