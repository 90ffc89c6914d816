"""What each SAE latent means: per-latent statistics, examples and labels from streaming passes over
the eval split.

`analyse_features` (transformer cache) makes two batched passes over the eval rows -- the first
for the counts, the top rows and the concept counts, the second for the histogram and the
quantile samples, whose bins need each latent's maximum -- then encodes the rows of the selected
contexts once more (each distinct row once). `analyse_synthetic_features` does the same statistics
against a synthetic cache's true features. Both return a `FeatureAnalysis`.

Conventions. A row is an eval-row index (0 = the first row of eval_batches), -1 where none.
Activations are the SAE's, on `x * scale` (`scale` is 1.0 for an SAE read with SAE.load, which is
saved folded; cache.norm_scale(normalize) for one fresh from the trainer); decoder directions are
taken in the raw activation space (W_dec / scale), so both give the same analysis. Equal-width
bins split (0, max_act] of each latent: bin b of n holds (b, b+1] * max_act / n, so the top
activation sits in the last bin. A context is the 2*window+1 rows centred on a selected row;
slots outside the row's sequence hold token -1 and activation 0. BOS is never in a context: the
cache stores no row for it (SAEs are not trained on it).

`save_features(analysis, arm_dir)` writes `arm_dir/features/`:
  features.safetensors  the arrays named in FORMAT (only those that apply), read back without pickle
  features.json         {"version", "settings", "labels" [d_sae], "concept_names", "token_text"
                         {id: text} for every token id in the contexts and logit effects,
                         "format" {array: description} (FORMAT, for those arrays)}
"""
from __future__ import annotations

import functools
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from safetensors.numpy import load_file, save
from torch import Tensor

from config.files import read_json, write_json_atomic
from experiments.data.activation_cache import ActivationCache
from experiments.data.synthetic import SyntheticTruth
from experiments.eval.concepts import ConceptSet, f1_score
from experiments.eval.metrics import count_per_column
from experiments.eval.recovery import abs_cosine
from experiments.progress import BarFactory, silent_bar
from models.sae.base import SAE

FORMAT_VERSION = 1
LOGIT_K = 10  # token ids kept at each end of a latent's logit effects
NEIGHBOURS = 5
# Auto labels: a previous token this dominant while the firing token varies makes "after 'x'";
# otherwise the firing tokens holding at least MIN_SHARE of the activation, at most MAX_TOKENS.
AFTER_SHARE, VARIED_SHARE, MIN_SHARE, MAX_TOKENS = 0.8, 0.5, 0.1, 3
_PRIME = 2**31 - 1  # hash modulus; keys below 2**31 leave room for a 31-bit row in one int64 sort key

# d = d_sae, k = top_n, W = 2*window+1, Q = n_quantile_bins, P = per_bin, H = hist_bins, C = concepts
FORMAT = {
    "n_fired": "[d] int64: eval rows on which the latent fires (activation > 0)",
    "density": "[d] float64: n_fired / eval rows",
    "mean_act": "[d] float64: mean activation over all eval rows",
    "mean_firing_act": "[d] float64: mean activation over the rows it fires on (0 if none)",
    "max_act": "[d] float32: largest activation",
    "hist_counts": "[d, H] int64: firing rows per equal-width bin of (0, max_act]",
    "hist_edges": "[d, H+1] float32: the bins' edges, 0 to max_act",
    "top_rows": "[d, k] int64: rows of the largest activations, largest first (ties: lower row first); -1 pads",
    "top_acts": "[d, k] float32: their activations; 0 pads",
    "top_context_tokens": "[d, k, W] int32: token ids around each top row, centre at index window; -1 outside",
    "top_context_acts": "[d, k, W] float32: the latent's activation at each context token",
    "quantile_rows": "[d, Q, P] int64: per equal-width bin of (0, max_act], rows with the smallest seeded hash of"
                     " (row, latent): a uniform sample that does not depend on the batching; -1 pads",
    "quantile_acts": "[d, Q, P] float32: their activations",
    "quantile_context_tokens": "[d, Q, P, W] int32: as top_context_tokens",
    "quantile_context_acts": "[d, Q, P, W] float32: as top_context_acts",
    "logit_top_ids": f"[d, {LOGIT_K}] int64: tokens most promoted by W_dec[i] @ W_U (raw scale)",
    "logit_top_values": f"[d, {LOGIT_K}] float32: their logit effects, largest first",
    "logit_bottom_ids": f"[d, {LOGIT_K}] int64: tokens most suppressed",
    "logit_bottom_values": f"[d, {LOGIT_K}] float32: their logit effects, smallest first",
    "neighbours": f"[d, {NEIGHBOURS}] int64: latents with the most similar decoder direction (itself excluded)",
    "neighbour_cos": f"[d, {NEIGHBOURS}] float32: their decoder cosines, largest first",
    "concept_index": "[d] int64: concept (index into concept_names) with the best F1 of 'fires' vs 'token in "
                     "concept' on all eval rows (in-sample: a description, not a score); -1 if none overlaps",
    "concept_f1": "[d] float64: that F1",
    "true_feature": "[d] int64: true feature with the largest |cos| with the decoder row",
    "true_cos": "[d] float64: that |cos|",
    "firing_precision": "[d] float64: rows where latent and that feature both fire / rows the latent fires (NaN if 0)",
    "firing_recall": "[d] float64: rows where both fire / rows the feature fires (NaN if 0)",
}


@dataclass
class FeatureAnalysis:
    arrays: dict[str, np.ndarray]  # named as in FORMAT
    settings: dict[str, Any]
    labels: list[str]  # per latent; "" where there is none
    concept_names: list[str] = field(default_factory=list)
    token_text: dict[int, str] = field(default_factory=dict)  # id -> text, for the ids in arrays

    def text(self, token: int) -> str:
        """A token's text; "" for an id this analysis holds no text for (-1 padding, say)."""
        return self.token_text.get(int(token), "")


# --- streaming -------------------------------------------------------------------------------


@contextmanager
def _eval_mode(sae: SAE) -> Iterator[None]:
    """BatchTopK and friends use their inference rule in eval mode, as the trainer's evaluate does."""
    was_training = sae.training
    sae.eval()
    try:
        yield
    finally:
        sae.train(was_training)


@torch.no_grad()
def _encode(sae: SAE, x: Tensor, scale: float) -> Tensor:
    return sae.encode(x.to(sae.W_dec.device) * scale).float()


def _batches(sae: SAE, cache: ActivationCache, scale: float, batch_size: int, bar: BarFactory,
             desc: str) -> Iterator[tuple[int, Tensor]]:
    """(first eval row, activations [B, d_sae] float32) per eval batch."""
    progress = bar(total=cache.n_eval_rows, initial=0, desc=desc, unit="row")
    start = 0
    for x in cache.eval_batches(batch_size):
        yield start, _encode(sae, x, scale)
        start += len(x)
        progress.update(len(x))
    progress.close()


def _pairs(f: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
    """(row, latent, activation) of every firing entry: sparse, so later work scales with L0."""
    r, i = (f > 0).nonzero(as_tuple=True)
    return r + start, i, f[r, i]


class _Moments:
    def __init__(self, d: int, device: torch.device) -> None:
        self.n_fired = torch.zeros(d, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.max_act = torch.zeros(d, dtype=torch.float32, device=device)

    def update(self, f: Tensor) -> None:
        # amax, not max(0).values: the same numbers, but torch's CPU column max with indices takes 20x as long.
        self.n_fired += count_per_column(f > 0)
        self.act_sum += f.sum(0, dtype=torch.float64)
        torch.maximum(self.max_act, f.amax(0), out=self.max_act)

    def arrays(self, n_rows: int) -> dict[str, Tensor]:
        return {"n_fired": self.n_fired, "density": self.n_fired.double() / n_rows,
                "mean_act": self.act_sum / n_rows, "mean_firing_act": self.act_sum / self.n_fired.clamp_min(1),
                "max_act": self.max_act}


def _rank_in_run(cell: Tensor) -> Tensor:
    """Position of each entry within its run of equal `cell` values (cell sorted)."""
    idx = torch.arange(len(cell), device=cell.device)
    first = torch.ones_like(cell, dtype=torch.bool)
    first[1:] = cell[1:] != cell[:-1]
    return idx - torch.cummax(torch.where(first, idx, 0), 0).values


def _keep_smallest(state: dict[str, Tensor] | None, new: dict[str, Tensor], per_cell: int) -> dict[str, Tensor]:
    """The `per_cell` entries of smallest `key` in each `cell`, of state and new together, sorted by
    (cell, key). Keys are unique within a cell, so the result is a function of the set of entries
    seen, whatever the batching: a running top-k / reservoir merged batch by batch."""
    both = new if state is None else {k: torch.cat([state[k], v]) for k, v in new.items()}
    order = torch.sort(both["key"], stable=True).indices
    order = order[torch.sort(both["cell"][order], stable=True).indices]
    keep = order[_rank_in_run(both["cell"][order]) < per_cell]
    return {k: v[keep] for k, v in both.items()}


def _dense(entries: dict[str, Tensor], shape: tuple[int, ...], name: str, fill: float) -> Tensor:
    """Entries sorted by (cell, key) as an array of `shape`: cells flattened over its leading dims,
    a cell's entries along the last, `fill` where a cell has fewer."""
    per_cell = shape[-1]
    out = torch.full((int(np.prod(shape)),), fill, dtype=entries[name].dtype, device=entries[name].device)
    out[entries["cell"] * per_cell + _rank_in_run(entries["cell"])] = entries[name]
    return out.view(shape).cpu()


def _largest_first_key(acts: Tensor, rows: Tensor) -> Tensor:
    """Sort key: larger activation first, then lower row. A non-negative float32's bit pattern
    orders like its value, so the key is exact (no ties, no rounding)."""
    return ((2**31 - 1 - acts.view(torch.int32).long()) << 31) | rows


def _sample_key(rows: Tensor, latents: Tensor, seed: int) -> Tensor:
    """Sort key from a seeded hash of (row, latent), then the row: uniform-looking, reproducible and
    independent of the batching. Every product stays below 2**62 (no int64 overflow)."""
    h = ((rows % _PRIME) * 0x5BD1E995 + latents * 0x27D4EB2F + seed % _PRIME) % _PRIME
    for _ in range(3):
        h = ((h ^ (h >> 15)) * 0x2C1B3C6D) % _PRIME
    return (h << 31) | rows


def _bin_of(acts: Tensor, top: Tensor, n: int) -> Tensor:
    """Equal-width bin of (0, top] holding each activation: bin b holds (b, b+1] * top / n."""
    return ((acts.double() / top.double() * n).ceil().long() - 1).clamp(0, n - 1)


def _binned_pass(sae: SAE, cache: ActivationCache, scale: float, max_act: Tensor, hist_bins: int,
                 quantiles: tuple[int, int, int] | None, batch_size: int, bar: BarFactory
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """The histogram arrays and, with quantiles = (bins, per_bin, seed), the sampled entries of each
    (latent, bin) cell."""
    d = max_act.shape[0]
    counts = torch.zeros(d * hist_bins, dtype=torch.int64, device=max_act.device)
    samples = None
    for start, f in _batches(sae, cache, scale, batch_size, bar, "features: bins"):
        rows, lat, acts = _pairs(f, start)
        counts += torch.bincount(lat * hist_bins + _bin_of(acts, max_act[lat], hist_bins), minlength=d * hist_bins)
        if quantiles is not None:
            n_bins, per_bin, seed = quantiles
            cell = lat * n_bins + _bin_of(acts, max_act[lat], n_bins)
            samples = _keep_smallest(samples, {"cell": cell, "key": _sample_key(rows, lat, seed), "row": rows,
                                               "act": acts}, per_bin)
    edges = max_act[:, None] * torch.arange(hist_bins + 1, device=max_act.device) / hist_bins
    return {"hist_counts": counts.view(d, hist_bins), "hist_edges": edges}, samples


def _contexts(sae: SAE, cache: ActivationCache, scale: float, selected: dict[str, Tensor], window: int,
              row_tokens: Tensor, batch_size: int) -> dict[str, Tensor]:
    """`<name>_context_tokens` and `_acts` [d, ..., W] around every row of each `selected[name]`
    [d, ...] (latent = the first index). Each distinct window row is read and encoded once, in
    batches, and its entries gathered from the batch. A row of -1 (padding) gets an empty window:
    -1 // per_seq is the sequence of no row >= 0."""
    n, per_seq = cache.n_eval_rows, cache.tokens_per_seq
    rows = torch.cat([r.reshape(-1) for r in selected.values()])
    latents = torch.cat([torch.arange(len(r)).repeat_interleave(r[0].numel()) for r in selected.values()])
    win = rows[:, None] + torch.arange(-window, window + 1)
    inside = (win >= 0) & (win < n) & (win // per_seq == rows[:, None] // per_seq)
    tokens = torch.where(inside, row_tokens[win.clamp(0, n - 1)], -1).int()
    want, lat = win[inside], latents[:, None].expand_as(win)[inside]
    unique, inv = torch.unique(want, return_inverse=True)
    order = torch.argsort(inv, stable=True)
    bounds = torch.searchsorted(inv[order], torch.arange(0, len(unique) + batch_size, batch_size))
    values = torch.zeros(len(want))
    for b, lo in enumerate(range(0, len(unique), batch_size)):
        x = torch.from_numpy(np.asarray(cache.acts[cache.n_train_rows + unique[lo:lo + batch_size].numpy()]))
        f = _encode(sae, x, scale).cpu()
        sel = order[bounds[b]:bounds[b + 1]]
        values[sel] = f[inv[sel] - lo, lat[sel]]
    acts = torch.zeros(win.shape)
    acts[inside] = values
    out, at = {}, 0
    for name, r in selected.items():
        shape = (*r.shape, 2 * window + 1)
        out[f"{name}_context_tokens"] = tokens[at:at + r.numel()].view(shape)
        out[f"{name}_context_acts"] = acts[at:at + r.numel()].view(shape)
        at += r.numel()
    return out


def _row_topk(a: Tensor, b: Tensor, k: int, largest: bool, skip_self: bool = False) -> tuple[Tensor, Tensor]:
    """Top k per row of a @ b, in chunks of rows (the full product can be d_sae x vocab)."""
    vals, idx = [], []
    for lo in range(0, a.shape[0], 1024):
        s = a[lo:lo + 1024] @ b
        if skip_self:
            s[torch.arange(len(s)), lo + torch.arange(len(s))] = -torch.inf
        v, i = s.topk(k, dim=1, largest=largest)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals).cpu(), torch.cat(idx).cpu()


def _decoder_arrays(sae: SAE, scale: float, unembed: Tensor | None) -> dict[str, Tensor]:
    w = sae.W_dec.detach().float() / scale  # the decoder in the raw activation space
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero row has cos 0 with everything
    out = dict(zip(("neighbour_cos", "neighbours"),
                   _row_topk(unit, unit.T, min(NEIGHBOURS, len(w) - 1), True, skip_self=True)))
    if unembed is not None:
        w_u = unembed.detach().to(w.device, torch.float32)
        out.update(zip(("logit_top_values", "logit_top_ids"), _row_topk(w, w_u, LOGIT_K, True)))
        out.update(zip(("logit_bottom_values", "logit_bottom_ids"), _row_topk(w, w_u, LOGIT_K, False)))
    return out


def _as_numpy(arrays: dict[str, Tensor]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in arrays.items()}


# --- analyses --------------------------------------------------------------------------------


def analyse_features(sae: SAE, cache: ActivationCache, scale: float, *, top_n: int = 20, window: int = 8,
                     n_quantile_bins: int = 10, per_bin: int = 5, hist_bins: int = 32, seed: int = 0,
                     unembed: Tensor | None = None, decode: Callable[[int], str] | None = None,
                     concepts: ConceptSet | None = None, batch_size: int = 4096,
                     bar: BarFactory | None = None) -> FeatureAnalysis:
    """Per-latent statistics, examples, logit effects, neighbours and labels on a transformer
    cache's eval split (see the module docstring and FORMAT). `unembed` is W_U [d_in, vocab];
    `decode` (token id -> text) enables the labels and the stored token texts."""
    if cache.tokens is None:
        raise ValueError("analyse_features needs a transformer cache (with tokens); use analyse_synthetic_features")
    if cache.n_eval_rows >= 2**31:
        raise ValueError("more than 2**31 eval rows do not fit the packed sort keys")
    bar = bar or silent_bar
    d, dev = sae.cfg.d_sae, sae.W_dec.device
    concepts = concepts if concepts else None  # an empty set has nothing to match
    row_tokens = cache.eval_row_tokens()
    moments, top = _Moments(d, dev), None
    if concepts is not None:
        tp = torch.zeros(d, len(concepts), dtype=torch.float64, device=dev)
        n_pos = torch.zeros(len(concepts), dtype=torch.float64, device=dev)
    with _eval_mode(sae):
        for start, f in _batches(sae, cache, scale, batch_size, bar, "features: statistics"):
            moments.update(f)
            rows, lat, acts = _pairs(f, start)
            top = _keep_smallest(top, {"cell": lat, "key": _largest_first_key(acts, rows), "row": rows,
                                       "act": acts}, top_n)
            if concepts is not None:
                labels = concepts.labels(row_tokens[start:start + len(f)].to(dev)).float()
                tp += (f > 0).float().T @ labels  # exact: counts below 2**24 per batch
                n_pos += labels.sum(0)
        hist, samples = _binned_pass(sae, cache, scale, moments.max_act, hist_bins,
                                     (n_quantile_bins, per_bin, seed), batch_size, bar)
        q_shape = (d, n_quantile_bins, per_bin)
        out = {**moments.arrays(cache.n_eval_rows), **hist,
               "top_rows": _dense(top, (d, top_n), "row", -1), "top_acts": _dense(top, (d, top_n), "act", 0.0),
               "quantile_rows": _dense(samples, q_shape, "row", -1),
               "quantile_acts": _dense(samples, q_shape, "act", 0.0)}
        out.update(_contexts(sae, cache, scale, {"top": out["top_rows"], "quantile": out["quantile_rows"]}, window,
                             row_tokens, batch_size))
    out.update(_decoder_arrays(sae, scale, unembed))
    if concepts is not None:
        out.update(_best_concepts(tp, moments.n_fired.double(), n_pos))
    arrays = _as_numpy(out)
    settings = {"kind": "transformer", "top_n": top_n, "window": window, "n_quantile_bins": n_quantile_bins,
                "per_bin": per_bin, "hist_bins": hist_bins, "seed": seed, "scale": scale,
                "n_eval_rows": cache.n_eval_rows, "d_sae": d}
    names = list(concepts.names) if concepts is not None else []
    if decode is None:
        return FeatureAnalysis(arrays, settings, [""] * d, names)
    shown = [arrays[k].ravel() for k in ("top_context_tokens", "quantile_context_tokens", "logit_top_ids",
                                         "logit_bottom_ids") if k in arrays]
    token_text = {int(t): decode(int(t)) for t in _distinct_tokens(np.concatenate(shown))}
    labels = auto_labels(arrays["top_context_tokens"], arrays["top_acts"], token_text.__getitem__)
    return FeatureAnalysis(arrays, settings, labels, names, token_text)


def _distinct_tokens(tokens: np.ndarray) -> np.ndarray:
    """The token ids in `tokens`, ascending, padding (-1) left out. Ids are below the vocabulary
    size, so counting them is a single pass where np.unique sorts (a few times faster)."""
    tokens = tokens.ravel()
    return np.flatnonzero(np.bincount(tokens[tokens >= 0]))


def _best_concepts(tp: Tensor, n_fired: Tensor, n_pos: Tensor) -> dict[str, Tensor]:
    """F1 for every (latent, concept) as concept scoring computes it; the first best concept per latent."""
    f1 = f1_score(tp.cpu().numpy(), n_fired.cpu().numpy()[:, None], n_pos.cpu().numpy()[None, :])
    idx = f1.argmax(1)
    best = f1[np.arange(len(f1)), idx]
    return {"concept_index": torch.from_numpy(np.where(best > 0, idx, -1)), "concept_f1": torch.from_numpy(best)}


def analyse_synthetic_features(sae: SAE, cache: ActivationCache, scale: float, truth: SyntheticTruth, *,
                               hist_bins: int = 32, batch_size: int = 4096,
                               bar: BarFactory | None = None) -> FeatureAnalysis:
    """Density, activation statistics, histogram and neighbours per latent, with the true feature
    its decoder row matches best (largest |cos|) and how well its firing predicts that feature's."""
    bar = bar or silent_bar
    d, dev = sae.cfg.d_sae, sae.W_dec.device
    cos = abs_cosine(sae.W_dec.detach().float().cpu(), truth.dictionary)  # [d, n_features]
    match = cos.argmax(1)
    match_t = torch.from_numpy(match).to(dev)
    moments, both = _Moments(d, dev), torch.zeros(d, dtype=torch.int64, device=dev)
    with _eval_mode(sae):
        for start, f in _batches(sae, cache, scale, batch_size, bar, "features: statistics"):
            moments.update(f)
            active = truth.eval_active[start:start + len(f)].to(dev).index_select(1, match_t)
            both += count_per_column((f > 0) & active)
        hist, _ = _binned_pass(sae, cache, scale, moments.max_act, hist_bins, None, batch_size, bar)
    feature_fires = count_per_column(truth.eval_active).to(dev)[match_t]
    out = {**moments.arrays(cache.n_eval_rows), **hist,
           **_decoder_arrays(sae, scale, None), "true_feature": torch.from_numpy(match).long(),
           "true_cos": torch.from_numpy(cos[np.arange(d), match]),
           "firing_precision": _ratio(both, moments.n_fired), "firing_recall": _ratio(both, feature_fires)}
    arrays = _as_numpy(out)
    labels = [f"true feature {j}" if c >= truth.threshold else "" for j, c in zip(match, arrays["true_cos"])]
    settings = {"kind": "synthetic", "hist_bins": hist_bins, "scale": scale, "n_eval_rows": cache.n_eval_rows,
                "d_sae": d, "threshold": truth.threshold}
    return FeatureAnalysis(arrays, settings, labels)


def _ratio(num: Tensor, denom: Tensor) -> Tensor:
    return torch.where(denom > 0, num.double() / denom.clamp_min(1), torch.nan)


# --- labels, search, rendering -------------------------------------------------------------------


def _text(decode: Callable[[int], str], token: int) -> str:
    raw = decode(int(token))
    return raw.strip() or repr(raw)  # a whitespace token stays visible


def token_shares(tokens: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `tokens` [L, K] (ids, -1 included), each distinct token's share of the row's
    `weight` [L, K] (entries with weight <= 0 left out): ids [L, K] and shares [L, K], each row
    largest share first, then lowest id, padded with id -1 and share 0. One sort for every row:
    a report describes every latent of every arm."""
    ids, shares = np.full(tokens.shape, -1, dtype=np.int64), np.zeros(tokens.shape)
    rows, cols = np.nonzero(weight > 0)
    if not rows.size:
        return ids, shares
    tok, w = tokens[rows, cols].astype(np.int64), weight[rows, cols].astype(np.float64)
    order = np.lexsort((tok, rows))  # stable: a token's entries keep their order, as they are summed
    rows, tok, w = rows[order], tok[order], w[order]
    first = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]) | (tok[1:] != tok[:-1])])  # of each token's run
    g_row, g_tok = rows[first], tok[first]
    g_share = np.add.reduceat(w, first) / np.bincount(rows, weights=w)[g_row]
    order = np.lexsort((g_tok, -g_share, g_row))
    g_row, g_tok, g_share = g_row[order], g_tok[order], g_share[order]
    place = np.arange(g_row.size) - np.searchsorted(g_row, g_row)  # within its row
    ids[g_row, place], shares[g_row, place] = g_tok, g_share
    return ids, shares


def auto_labels(context_tokens: np.ndarray, top_acts: np.ndarray, decode: Callable[[int], str]) -> list[str]:
    """A short label per latent from its top contexts ([L, k, W] ids, [L, k] activations), weighting
    each context by its activation: "after 'x'" when the token before the firing one is x in at
    least AFTER_SHARE of the weight while no firing token holds VARIED_SHARE; else the firing tokens
    holding at least MIN_SHARE (at most MAX_TOKENS, always the first), as "the / a / an". "" for a
    latent that never fired."""
    w = context_tokens.shape[2] // 2
    firing, firing_share = token_shares(context_tokens[:, :, w], top_acts)
    before, before_share = (token_shares(context_tokens[:, :, w - 1], top_acts) if w > 0 else
                            (np.full_like(firing, -1), np.zeros_like(firing_share)))
    after = (before[:, 0] >= 0) & (before_share[:, 0] >= AFTER_SHARE) & (firing_share[:, 0] < VARIED_SHARE)
    picked = firing_share[:, :MAX_TOKENS] >= MIN_SHARE
    picked[:, 0] = firing[:, 0] >= 0  # the first always, if the latent fired
    return [f"after '{_text(decode, before[i, 0])}'" if after[i] else
            " / ".join(_text(decode, t) for t in firing[i, :MAX_TOKENS][picked[i]]) for i in range(len(firing))]


def top_tokens(analysis: FeatureAnalysis, latents: np.ndarray, n: int = 5) -> list[list[str]]:
    """Per latent of `latents`, the tokens it fires on most in its top contexts (weighted by
    activation), at most n."""
    a = analysis.arrays
    if "top_context_tokens" not in a:
        return [[] for _ in latents]
    centre = a["top_context_tokens"].shape[2] // 2
    ids, _ = token_shares(a["top_context_tokens"][latents, :, centre], a["top_acts"][latents])
    return [[_text(analysis.text, t) for t in row[:n] if t >= 0] for row in ids]


def features_done(arm_dir: Path) -> bool:
    """Whether arm_dir holds a complete feature analysis in this format (the JSON is written last)."""
    path = Path(arm_dir) / "features" / "features.json"
    try:
        return path.exists() and read_json(path).get("version") == FORMAT_VERSION
    except ValueError:
        return False


class Match(NamedTuple):
    latent: int
    score: float  # within its tier: density (label), or fraction of the top contexts
    why: str
    tier: int  # 3 label, 2 firing token, 1 anywhere in a top context


def search_features(analysis: FeatureAnalysis, query: str,
                    decode: Callable[[int], str] | None = None) -> list[Match]:
    """Latents matching the word `query` (case-insensitive, whole word), as (latent, score, why):
    label matches first (score: density), then latents whose firing token is the word in some top
    contexts, then latents with the word anywhere in a top context (score: fraction of the valid top
    contexts); ties by latent index. `decode` defaults to the stored token_text."""
    decode = decode or analysis.text
    word = re.compile(rf"(?<!\w){re.escape(query.strip())}(?!\w)", re.IGNORECASE)
    a = analysis.arrays
    # A synthetic analysis has labels but no contexts: every latent then has 0 valid contexts.
    tokens = a.get("top_context_tokens", np.full((len(analysis.labels), 1, 1), -1, dtype=np.int32))
    valid_rows = a["top_acts"] > 0 if "top_acts" in a else np.zeros(tokens.shape[:2], dtype=bool)
    text = {int(t): decode(int(t)) for t in _distinct_tokens(tokens)}
    matching = np.array([t for t in text if word.search(text[t])], dtype=np.int64)
    w = tokens.shape[2] // 2
    hits = []
    for i, label in enumerate(analysis.labels):
        valid = valid_rows[i]
        n = int(valid.sum())
        if label and word.search(label):
            hits.append((3, float(a["density"][i]), i, f"label {label!r}"))
        elif n and (on := int(np.isin(tokens[i, valid, w], matching).sum())):
            hits.append((2, on / n, i, f"fires on {query!r} in {on} of {n} top contexts"))
        elif n and (inside := sum(bool(word.search("".join(text[int(t)] for t in row if t >= 0)))
                                  for row in tokens[i, valid])):
            hits.append((1, inside / n, i, f"{query!r} in {inside} of {n} top contexts"))
    hits.sort(key=lambda h: (-h[0], -h[1], h[2]))
    return [Match(i, score, why, tier) for tier, score, i, why in hits]


# Characters that would format inline Markdown. "|" is left to the table that holds the context.
_MARKDOWN = re.compile(r"([\\`*_\[\]<>#])")


@functools.lru_cache(maxsize=65_536)  # a report renders every latent's context: the same tokens over and over
def _markdown_text(token: str) -> str:
    """A token's text with Markdown characters escaped and newlines as ↵."""
    return _MARKDOWN.sub(r"\\\1", token.replace("\n", "↵"))


def render_context(tokens: np.ndarray, acts: np.ndarray, centre: int, decode: Callable[[int], str]) -> str:
    """One context as Markdown text: the centre token as **⟦token⟧**, other tokens on which the latent
    fires as ⟦token⟧, Markdown characters escaped, newlines as ↵; slots with token -1 are skipped."""
    parts = []
    for j, (t, v) in enumerate(zip(tokens, acts)):
        if t < 0:
            continue
        raw = _markdown_text(decode(int(t)))
        core = raw.strip()
        if core and (j == centre or v > 0):
            lead, trail = raw[:len(raw) - len(raw.lstrip())], raw[len(raw.rstrip()):]
            raw = f"{lead}**⟦{core}⟧**{trail}" if j == centre else f"{lead}⟦{core}⟧{trail}"
        elif j == centre:
            raw = f"**⟦{raw}⟧**"
        parts.append(raw)
    return "".join(parts)


# --- storage -------------------------------------------------------------------------------------


def save_features(analysis: FeatureAnalysis, arm_dir: Path) -> Path:
    """Write arm_dir/features/features.{safetensors,json} (each replaced whole); returns the folder."""
    out = Path(arm_dir) / "features"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".features.safetensors.tmp"
    tmp.write_bytes(save({k: np.ascontiguousarray(v) for k, v in analysis.arrays.items()}))
    os.replace(tmp, out / "features.safetensors")
    write_json_atomic(out / "features.json", {
        "version": FORMAT_VERSION, "settings": analysis.settings, "labels": analysis.labels,
        "concept_names": analysis.concept_names,
        "token_text": {str(k): v for k, v in sorted(analysis.token_text.items())},
        "format": {k: FORMAT[k] for k in analysis.arrays}})
    return out


def load_features(arm_dir: Path) -> FeatureAnalysis:
    """Read what save_features wrote (safetensors and JSON only: nothing is unpickled)."""
    folder = Path(arm_dir) / "features"
    meta = read_json(folder / "features.json")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: features format {meta.get('version')}, this code reads {FORMAT_VERSION}")
    return FeatureAnalysis(load_file(folder / "features.safetensors"), meta["settings"], meta["labels"],
                           meta["concept_names"], {int(k): v for k, v in meta["token_text"].items()})
