"""Synthetic ground-truth source: a seeded toy model of superposition (`--source synthetic`).

Features (rows of a fixed dictionary) fire sparsely; an activation vector is the sum of the
firing features' directions scaled by their magnitudes, plus optional Gaussian noise.

Feature layout, by index (P = n_parents, C = children_per_parent):
  [0, P)                          parents
  [P, P + P*C)                    children; child j of parent p is P + p*C + j
  next n_groups * group_size      correlated groups of `group_size` consecutive features
  the rest                        independent features

Dictionary: `n_features` unit vectors in `d_in` dims (Gaussian, then normalised), from
`np.random.default_rng(seed)`.

Firing probabilities. Base weights w_i are 1 (uniform) or (i+1)^-zipf_exponent (zipf: rank by
index, so parents are the most frequent). A non-child feature has marginal p_i = min(1, s*w_i);
child c of parent q fires only when its parent fires: then with probability child_probability,
independently of its siblings (p_c = child_probability * p_q), or, with `exclusive_children`, one
child of the C at most does (with probability child_probability, which one uniform: p_c =
child_probability / C * p_q). The scale s is found by
bisection so that sum(p) = mean_l0, the expected L0; a mean_l0 beyond what s -> inf gives is a
UsageError.

Sampling, per vector. Parents and independent features fire iff U(0,1) < p_i. Group g draws a
shared G_g ~ N(0,1); member i has z_i = sqrt(rho) G_g + sqrt(1-rho) E_i (E_i ~ N(0,1)) and fires
iff z_i < Phi^-1(p_i) (a Gaussian copula: marginals exactly p_i, members positively correlated for
rho = group_correlation > 0). Firing features get a magnitude with mean m = magnitude_mean:
constant m; uniform U[m(1-spread), m(1+spread)]; exponential with mean m; lognormal
exp(N(log m - spread^2/2, spread)). Non-firing features have code 0, so codes are >= 0.
Activation x = codes @ dictionary + noise_std * N(0, I).

`sample` depends only on the generator it is given; callers seed one per chunk with
`chunk_rng(seed, chunk)`, so any chunk can be regenerated identically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from scipy.special import ndtri

from config.files import write_npz_atomic
from config.schema import SyntheticConfig, UsageError

_BLOCK_ELEMENTS = 1 << 22  # rows x features drawn at once in `sample`, to bound temporaries


def chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    """The generator for chunk `chunk` of a source seeded with `seed` (7 keeps it apart from the
    dictionary's generator)."""
    return np.random.default_rng([seed, 7, chunk])


def validate(cfg: SyntheticConfig) -> None:
    """Raise a one-line UsageError for a config the toy model cannot honour. Each setting's own range is
    SyntheticConfig's (checked when it is made); these rules join several settings."""
    used = cfg.n_parents * (1 + cfg.children_per_parent) + cfg.n_groups * cfg.group_size
    if used > cfg.n_features:
        raise UsageError(f"synthetic source: n_parents*(1+children_per_parent) + n_groups*group_size = {used} "
                         f"exceeds n_features = {cfg.n_features}")
    if cfg.magnitude == "uniform" and cfg.magnitude_spread > 1:
        raise UsageError(f"synthetic source: magnitude_spread must be <= 1 for uniform magnitudes (codes >= 0), got "
                         f"{cfg.magnitude_spread}")


def _structure(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """(parent, group) index arrays, -1 where a feature has none."""
    n, P, C = cfg.n_features, cfg.n_parents, cfg.children_per_parent
    parent = np.full(n, -1, dtype=np.int64)
    group = np.full(n, -1, dtype=np.int64)
    parent[P:P + P * C] = np.repeat(np.arange(P, dtype=np.int64), C)
    start = P * (1 + C)
    group[start:start + cfg.n_groups * cfg.group_size] = np.repeat(np.arange(cfg.n_groups, dtype=np.int64), cfg.group_size)
    return parent, group


def solve_probabilities(cfg: SyntheticConfig, parent: np.ndarray) -> np.ndarray:
    """Marginal firing probabilities summing to mean_l0 (see the module docstring)."""
    n = cfg.n_features
    idx = np.arange(n, dtype=np.float64)
    w = np.ones(n) if cfg.frequency == "uniform" else (idx + 1.0) ** -float(cfg.zipf_exponent)
    is_child = parent >= 0
    cp = float(cfg.child_probability) / (cfg.children_per_parent if cfg.exclusive_children else 1)

    def probs(s: float) -> np.ndarray:
        p = np.minimum(1.0, s * w)
        p[is_child] = cp * p[parent[is_child]]
        return p

    s_hi = 1.0 / w[~is_child].min()  # every non-child feature clipped at 1
    p_max = probs(s_hi)
    target = float(cfg.mean_l0)
    reach = p_max.sum()
    if target > reach * (1 + 1e-12):
        raise UsageError(f"synthetic source: mean_l0 = {target} is unreachable; at most {reach:.6g} features "
                         f"can fire on average with this layout and child_probability")
    if target >= reach:
        return p_max
    lo, hi = 0.0, s_hi
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if probs(mid).sum() < target:
            lo = mid
        else:
            hi = mid
    p_lo, p_hi = probs(lo), probs(hi)
    return p_hi if abs(p_hi.sum() - target) <= abs(p_lo.sum() - target) else p_lo


def feature_roles(parent: np.ndarray, group: np.ndarray) -> list[str]:
    """Per feature: "parent", "child", "group" or "independent"."""
    is_parent = np.isin(np.arange(len(parent)), parent[parent >= 0])
    return ["parent" if pa else "child" if c >= 0 else "group" if g >= 0 else "independent"
            for pa, c, g in zip(is_parent, parent, group)]


@dataclass
class ToyModel:
    cfg: SyntheticConfig
    dictionary: np.ndarray  # [n_features, d_in] float32, unit rows
    probability: np.ndarray  # [n_features] float64 marginal firing probabilities
    parent: np.ndarray  # [n_features] int64, parent index or -1
    group: np.ndarray  # [n_features] int64, group index or -1
    _plan: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        is_child = self.parent >= 0
        in_group = self.group >= 0
        uniform_idx = np.flatnonzero(~is_child & ~in_group)  # parents and independent features
        child_idx = np.flatnonzero(is_child)
        group_idx = np.flatnonzero(in_group)
        self._plan = {
            "uniform_idx": uniform_idx,
            "uniform_p": self.probability[uniform_idx],
            "child_idx": child_idx,
            "child_parent": self.parent[child_idx],
            "group_idx": group_idx,
            "group_of": self.group[group_idx],
            "group_threshold": ndtri(self.probability[group_idx]),  # +inf where p = 1
        }

    @classmethod
    def build(cls, cfg: SyntheticConfig, seed: int) -> "ToyModel":
        validate(cfg)
        parent, group = _structure(cfg)
        probability = solve_probabilities(cfg, parent)
        rng = np.random.default_rng(seed)
        d = rng.standard_normal((cfg.n_features, cfg.d_in))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return cls(cfg=cfg, dictionary=d.astype(np.float32), probability=probability, parent=parent, group=group)

    @property
    def roles(self) -> list[str]:
        return feature_roles(self.parent, self.group)

    def _magnitudes(self, n: int, rng: np.random.Generator) -> np.ndarray:
        m, s = float(self.cfg.magnitude_mean), float(self.cfg.magnitude_spread)
        kind = self.cfg.magnitude
        if kind == "constant":
            return np.full(n, m)
        if kind == "uniform":
            return rng.uniform(m * (1 - s), m * (1 + s), n)
        if kind == "exponential":
            return rng.exponential(m, n)
        return rng.lognormal(math.log(m) - 0.5 * s * s, s, n)

    def _fire(self, rows: int, rng: np.random.Generator) -> np.ndarray:
        plan, cfg = self._plan, self.cfg
        fire = np.zeros((rows, cfg.n_features), dtype=bool)
        fire[:, plan["uniform_idx"]] = rng.random((rows, plan["uniform_idx"].size)) < plan["uniform_p"]
        if plan["group_idx"].size:
            rho = float(cfg.group_correlation)
            shared = rng.standard_normal((rows, cfg.n_groups))
            z = rng.standard_normal((rows, plan["group_idx"].size))
            z *= math.sqrt(1 - rho)
            z += math.sqrt(rho) * shared[:, plan["group_of"]]
            fire[:, plan["group_idx"]] = z < plan["group_threshold"]
        if plan["child_idx"].size and cfg.exclusive_children:
            # One uniform draw per (row, parent): below child_probability it picks the child that fires.
            P, C, cp = cfg.n_parents, cfg.children_per_parent, float(cfg.child_probability)
            u = rng.random((rows, P))
            r, q = np.nonzero((u < cp) & fire[:, :P])
            fire[r, P + q * C + np.minimum((u[r, q] / cp * C).astype(np.int64), C - 1)] = True
        elif plan["child_idx"].size:
            own = rng.random((rows, plan["child_idx"].size)) < float(cfg.child_probability)
            fire[:, plan["child_idx"]] = own & fire[:, plan["child_parent"]]
        return fire

    def sample(self, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(acts [rows, d_in] float32, codes [rows, n_features] float32), a function of `rng` only."""
        cfg = self.cfg
        codes = np.zeros((rows, cfg.n_features), dtype=np.float32)
        block = max(1, _BLOCK_ELEMENTS // cfg.n_features)
        for start in range(0, rows, block):
            fire = self._fire(min(block, rows - start), rng)
            r, c = np.nonzero(fire)
            codes[start + r, c] = self._magnitudes(r.size, rng)
        acts = codes @ self.dictionary
        if cfg.noise_std > 0:
            acts += np.float32(cfg.noise_std) * rng.standard_normal(acts.shape, dtype=np.float32)
        return acts, codes

    def expected_pair_firing(self, i: int, j: int) -> float:
        """Exact P(features i and j both fire)."""
        p = self.probability
        if i == j:
            return float(p[i])
        pi_, pj_ = self.parent[i], self.parent[j]
        if pi_ == j:
            return float(p[i])
        if pj_ == i:
            return float(p[j])
        if pi_ >= 0 and pi_ == pj_:
            return 0.0 if self.cfg.exclusive_children else float(p[pi_]) * float(self.cfg.child_probability) ** 2
        if self.group[i] >= 0 and self.group[i] == self.group[j]:
            if p[i] >= 1 or p[j] >= 1:
                return float(min(p[i], p[j]))
            from scipy.stats import multivariate_normal  # here: scipy.stats takes 0.2 s to import, on every run

            rho = float(self.cfg.group_correlation)
            x = [ndtri(p[i]), ndtri(p[j])]
            return float(multivariate_normal(mean=[0.0, 0.0], cov=[[1.0, rho], [rho, 1.0]]).cdf(x))
        return float(p[i] * p[j])


CHUNK_ROWS = 16_384  # vectors per cache chunk
TRUTH_FILES = ("dictionary.npy", "probability.npy", "parent.npy", "group.npy")
CODE_FILES = ("codes_indptr.npy", "codes_indices.npy", "codes_values.npy")


class SyntheticWriter:
    """Fills an activation cache from the toy model (experiments.data.activation_cache.CacheWriter).

    Beside the activations it stores the true dictionary, the marginal firing probabilities, the
    hierarchy and group structure, and every row's true code as CSR (codes_indptr [n_rows + 1],
    codes_indices, codes_values), so any analysis can compare latents with the truth."""

    unit = "chunk"

    def __init__(self, model: ToyModel, seed: int, eval_fraction: float):
        self.model, self.seed = model, seed
        self.n_rows, self.d_in = model.cfg.n_tokens, model.cfg.d_in
        self.n_chunks = -(-self.n_rows // CHUNK_ROWS)
        self.n_eval_rows = max(1, int(self.n_rows * eval_fraction))

    def split(self) -> dict:
        return {"n_train_rows": self.n_rows - self.n_eval_rows, "n_eval_rows": self.n_eval_rows}

    def begin(self, path: Path) -> None:
        m = self.model
        for name, array in zip(TRUTH_FILES, (m.dictionary, m.probability, m.parent, m.group)):
            np.save(path / name, array)
        (path / "codes").mkdir(exist_ok=True)

    def fill(self, chunk: int, acts: np.ndarray, path: Path) -> Iterator[None]:
        start = chunk * CHUNK_ROWS
        stop = min(start + CHUNK_ROWS, self.n_rows)
        rows, codes = self.model.sample(stop - start, chunk_rng(self.seed, chunk))
        acts[start:stop] = rows
        r, c = np.nonzero(codes)
        target = path / "codes" / f"chunk-{chunk:05d}.npz"
        write_npz_atomic(target, {"counts": np.bincount(r, minlength=stop - start).astype(np.int64),
                                  "indices": c.astype(np.int32), "values": codes[r, c]})
        yield

    def finish(self, path: Path) -> list[str]:
        counts, indices, values = [], [], []
        for chunk in range(self.n_chunks):
            with np.load(path / "codes" / f"chunk-{chunk:05d}.npz", allow_pickle=False) as data:
                counts.append(data["counts"])
                indices.append(data["indices"])
                values.append(data["values"])
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
        for name, array in zip(CODE_FILES, (indptr, np.concatenate(indices), np.concatenate(values))):
            np.save(path / name, array)
        for chunk_file in (path / "codes").glob("*.npz"):
            chunk_file.unlink()
        (path / "codes").rmdir()
        return [*TRUTH_FILES, *CODE_FILES]


@dataclass
class SyntheticTruth:
    """What the metrics need from a synthetic cache: the true features and their firing on the
    eval split, plus what the studies plot against (probability, role)."""

    dictionary: np.ndarray  # [n_features, d_in]
    probability: np.ndarray  # [n_features]
    roles: list[str]
    eval_active: torch.Tensor  # [n_eval_rows, n_features] bool, rows in eval_batches' order
    threshold: float  # |cos| at which a feature counts as recovered

    @classmethod
    def load(cls, cache_path: Path, n_train_rows: int, threshold: float) -> "SyntheticTruth":
        def arr(name: str) -> np.ndarray:
            return np.load(cache_path / name, allow_pickle=False)

        dictionary, probability, parent, group = (arr(n) for n in TRUTH_FILES)
        indptr = np.load(cache_path / "codes_indptr.npy", mmap_mode="r")
        indices = np.load(cache_path / "codes_indices.npy", mmap_mode="r")
        n_rows = indptr.shape[0] - 1
        lo, hi = int(indptr[n_train_rows]), int(indptr[n_rows])
        rows = np.repeat(np.arange(n_rows - n_train_rows), np.diff(indptr[n_train_rows:]))
        active = torch.zeros(n_rows - n_train_rows, dictionary.shape[0], dtype=torch.bool)
        active[torch.from_numpy(rows), torch.from_numpy(np.asarray(indices[lo:hi], dtype=np.int64))] = True
        return cls(dictionary, probability, feature_roles(parent, group), active, threshold)
