"""What the raw activations already say about each concept, without an SAE: the two baselines an
SAE latent's concept score is read against (issue 21).

- dense probe: a class-balanced, L2-regularised logistic regression on all d_in dimensions, the
  ceiling of what any single direction (hence any latent) can reach;
- best raw neuron: the one activation dimension, thresholded, that best predicts the concept, the
  floor that says what the SAE adds.

Both follow the latents' rule (experiments/eval/concepts.py): everything that is chosen (the
probe's weights and decision threshold, the neuron, its sign and threshold) is chosen on the fit
tokens, and F1 is measured on the held-out ones. The decision threshold is chosen for F1 rather
than left at the balanced probe's 0, because class balancing moves that point far into the
negatives for a rare word, and a latent is credited with its best F1 too.

The probe's objective is scikit-learn's `LogisticRegression(C=1, class_weight="balanced")` on
features standardised over the fit tokens (the test checks the weights against scikit-learn). It is
solved for every concept at once by Newton's method with conjugate-gradient steps, one matrix
product over the tokens per step for all concepts: scikit-learn fits them one by one, 64 s for
tinylm's 166 concepts on 26k tokens, where this takes a few seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config.files import write_npz_atomic
from experiments.eval.concepts import f1_score

LEGACY_BASELINES_FILE = "baselines.npz"  # where studies recorded before several hook points keep their one
NEWTON_STEPS = 40
CG_STEPS = 60
GRAD_TOL = 1e-6  # stop once every concept's gradient norm is below this share of its start


@dataclass
class ConceptBaselines:
    dense_f1: np.ndarray  # [C] held-out F1 of the dense probe
    neuron_f1: np.ndarray  # [C] held-out F1 of the best raw neuron
    neuron: np.ndarray  # [C] int: that neuron
    neuron_sign: np.ndarray  # [C] +1: the concept where the neuron is high, -1: where it is low

    def arrays(self) -> dict[str, np.ndarray]:
        return {"dense_f1": self.dense_f1, "neuron_f1": self.neuron_f1, "neuron": self.neuron,
                "neuron_sign": self.neuron_sign}


def baselines_file(study_dir: Path, hook: str) -> Path:
    """The concept baselines of the activations at `hook`, in the study folder."""
    return study_dir / "baselines" / f"{hook}.npz"


def write_baselines(path: Path, names: list[str], baselines: ConceptBaselines) -> None:
    path.parent.mkdir(exist_ok=True)
    write_npz_atomic(path, {"names": np.array(names, dtype=str), **baselines.arrays()})


def read_baselines(study_dir: Path, hook: str | None) -> dict[str, np.ndarray] | None:
    """The study's concept baselines at `hook` (names and the arrays of ConceptBaselines), None before
    they exist."""
    path = baselines_file(study_dir, hook) if hook is not None else None
    if path is None or not path.exists():
        path = study_dir / LEGACY_BASELINES_FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def concept_baselines(acts: np.ndarray, labels: np.ndarray, fit: np.ndarray) -> ConceptBaselines:
    """acts [N, d] float, labels [N, C] bool (token in concept), fit [N] bool (tokens that choose;
    F1 is scored on the others). Every concept needs a positive among the fit tokens."""
    acts = np.asarray(acts, dtype=np.float32)
    labels, fit = np.asarray(labels, dtype=bool), np.asarray(fit, dtype=bool)
    mean, std = acts[fit].mean(0), acts[fit].std(0)
    z = (acts - mean) / np.where(std > 0, std, 1.0)  # constant dimensions stay 0 and get no weight
    weights, bias = fit_balanced_logistic(z[fit], labels[fit])
    dense = threshold_f1(z @ weights + bias, labels, fit)
    neuron_f1, neuron, sign = best_neuron(acts, labels, fit)
    return ConceptBaselines(dense, neuron_f1, neuron, sign)


def fit_balanced_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One logistic regression per column of y [N, C] bool on x [N, d]: minimise
    sum_i w_i log(1 + exp(-s_i z_i)) + l2 / 2 |coef|^2 with s = x coef + intercept (not penalised),
    z = +-1 and class weights w = N / (2 N_class). Returns coef [d, C] and intercept [C] (float64).

    Newton's method for all columns together: each Hessian-vector product is two products with x
    for every column at once; conjugate gradients and a backtracking step run per column, so an
    easy concept stops early and a hard one does not hold back the others' steps."""
    xt = torch.from_numpy(np.hstack([x, np.ones((len(x), 1), x.dtype)])).double()  # intercept as a last column
    x32 = xt.float()
    yt = torch.from_numpy(y).double()
    n, n_pos = yt.shape[0], yt.sum(0)
    sample_w = torch.where(yt > 0, n / (2 * n_pos.clamp_min(1)), n / (2 * (n - n_pos).clamp_min(1)))
    penalty = torch.full((xt.shape[1], 1), l2, dtype=torch.float64)
    penalty[-1] = 0.0

    def loss(w: torch.Tensor) -> torch.Tensor:  # [C]
        s = xt @ w
        return (sample_w * torch.nn.functional.binary_cross_entropy_with_logits(s, yt, reduction="none")).sum(0) \
            + 0.5 * (penalty * w * w).sum(0)

    w = torch.zeros(xt.shape[1], y.shape[1], dtype=torch.float64)
    g0 = None
    for _ in range(NEWTON_STEPS):
        p = torch.sigmoid(xt @ w)
        grad = xt.T @ (sample_w * (p - yt)) + penalty * w
        norm = grad.norm(dim=0)
        g0 = norm if g0 is None else g0
        active = norm > GRAD_TOL * g0.clamp_min(1e-12)
        if not active.any():
            break
        # Hessian-vector products in float32 (they only shape the step; the gradient and loss that
        # judge it are float64), for the columns still solving only.
        hvp = _HessianProduct(x32, (sample_w * p * (1 - p)).float(), penalty)
        # Forcing term sqrt(|g| / |g0|): solve more exactly as the gradient shrinks (superlinear steps).
        forcing = torch.sqrt(norm / g0.clamp_min(1e-300)).clamp(max=0.1)
        step = _cg(hvp, -grad, active, forcing)
        # Backtracking per column: halve the step where it does not lower the loss enough.
        current, t = loss(w), torch.ones(w.shape[1], dtype=torch.float64)
        slope = (grad * step).sum(0)
        for _ in range(30):
            trial = loss(w + t * step)
            ok = trial <= current + 1e-4 * t * slope
            if ok.all():
                break
            t = torch.where(ok, t, t / 2)
        w = w + torch.where(active, t, torch.zeros_like(t)) * step
    return w[:-1].numpy(), w[-1].numpy()


class _HessianProduct:
    """hvp(v, cols): the logistic Hessian of the columns `cols` times v [d + 1, len(cols)], that is
    x^T diag(curvature[:, col]) x v + penalty v per column. The columns' curvature [N, len(cols)] is
    gathered once for as long as the same columns keep solving, not at every CG step (a copy of tens
    of MB, a fifth of the product at tinylm's 166 concepts)."""

    def __init__(self, x32: torch.Tensor, curvature: torch.Tensor, penalty: torch.Tensor) -> None:
        self.x32, self.curvature, self.penalty = x32, curvature, penalty
        self.cols: torch.Tensor | None = None
        self.gathered = curvature

    def __call__(self, v: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        if self.cols is None or not torch.equal(cols, self.cols):
            self.cols, self.gathered = cols, self.curvature[:, cols]
        return (self.x32.T @ (self.gathered * (self.x32 @ v.float()))).double() + self.penalty * v


def _cg(hvp, rhs: torch.Tensor, active: torch.Tensor, forcing: torch.Tensor) -> torch.Tensor:
    """Solve H v = rhs column by column (H symmetric positive definite; hvp(v, cols) multiplies the
    columns cols of H with v), each column stopping when its residual falls below `forcing` times
    its right-hand side (truncated Newton). Finished columns leave the products."""
    v = torch.zeros_like(rhs)
    r, d = rhs.clone(), rhs.clone()
    rr = (r * r).sum(0)
    target = forcing ** 2 * rr
    running = active.clone()
    for _ in range(CG_STEPS):
        running &= rr > target
        cols = torch.nonzero(running).squeeze(1)
        if not cols.numel():
            break
        dc, rc, rrc = d[:, cols], r[:, cols], rr[cols]
        hd = hvp(dc, cols)
        alpha = rrc / (dc * hd).sum(0).clamp_min(1e-300)
        v[:, cols] += alpha * dc
        rc = rc - alpha * hd
        rr_new = (rc * rc).sum(0)
        r[:, cols], d[:, cols] = rc, rc + (rr_new / rrc.clamp_min(1e-300)) * dc
        rr[cols] = rr_new
    return v


def threshold_f1(scores: np.ndarray, labels: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """[C] held-out F1 of predicting "in the concept" where scores [N, C] is at least the cut that
    maximises F1 on the fit tokens."""
    out = np.zeros(labels.shape[1])
    for c in range(labels.shape[1]):
        cut = _Ranked(scores[fit, c:c + 1]).best_cut(labels[fit, c], directions=(1,))
        out[c] = cut.held_out_f1(scores[~fit, c:c + 1], labels[~fit, c])
    return out


def best_neuron(acts: np.ndarray, labels: np.ndarray, fit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per concept, the raw dimension and direction (high or low values) whose cut, chosen on the
    fit tokens, gives the best F1 there; returns its held-out F1, the dimension and the sign."""
    ranked = _Ranked(acts[fit])  # every dimension sorted once
    n_concepts = labels.shape[1]
    f1, neuron, sign = np.zeros(n_concepts), np.zeros(n_concepts, np.int64), np.ones(n_concepts, np.int64)
    for c in range(n_concepts):
        cut = ranked.best_cut(labels[fit, c])
        neuron[c], sign[c] = cut.column, cut.direction
        f1[c] = cut.held_out_f1(acts[~fit], labels[~fit, c])
    return f1, neuron, sign


@dataclass
class _Cut:
    column: int
    direction: int  # +1: predict the values above `value`, -1: below
    value: float
    fit_f1: float

    def held_out_f1(self, x: np.ndarray, positive: np.ndarray) -> float:
        values = x[:, self.column]
        predicted = values > self.value if self.direction > 0 else values < self.value
        return float(f1_score(np.count_nonzero(predicted & positive), np.count_nonzero(predicted),
                              np.count_nonzero(positive)))


class _Ranked:
    """The columns of x [N, d] sorted high to low, for finding each concept's best cut.

    The best "value above a cut" set for F1 always ends at a positive token (a trailing negative
    only costs precision), so only the positives' ranks are read: per concept, P ranks per column
    instead of N. A cut never splits tokens with equal values; it lies halfway between two
    distinct values."""

    def __init__(self, x: np.ndarray) -> None:
        n = x.shape[0]
        order = np.argsort(-x, axis=0, kind="stable")
        self.values = np.take_along_axis(x, order, 0).astype(np.float64)  # [N, d] high to low
        self.rank = np.empty_like(order)
        np.put_along_axis(self.rank, order, np.arange(n)[:, None], 0)  # rank of each token in each column
        index = np.broadcast_to(np.arange(n)[:, None], x.shape)
        ends = np.ones(x.shape, bool)
        ends[:-1] = self.values[:-1] != self.values[1:]  # last row of a run of equal values
        starts = np.ones(x.shape, bool)
        starts[1:] = ends[:-1]
        self.run_end = np.minimum.accumulate(np.where(ends, index, n)[::-1], axis=0)[::-1]
        self.run_start = np.maximum.accumulate(np.where(starts, index, -1), axis=0)

    def best_cut(self, positive: np.ndarray, directions: tuple[int, ...] = (1, -1)) -> _Cut:
        n, d = self.values.shape
        n_pos = int(positive.sum())
        ranks = np.sort(self.rank[positive], axis=0)  # [P, d] the positives' ranks, top first
        m = np.arange(1, n_pos + 1)[:, None]  # positives in the predicted set
        columns = np.arange(d)[None, :]
        best = _Cut(0, 1, -np.inf, float(f1_score(n_pos, n, n_pos)))  # everything predicted
        if 1 in directions:  # the top values down to the run of the m-th positive
            end = self.run_end[ranks, columns]
            # m undercounts the positives where the run holds more after the m-th; that candidate
            # scores below the run's last positive, which counts them all, and is never chosen.
            f1 = f1_score(m, end + 1, n_pos)
            i, j = np.unravel_index(np.argmax(f1), f1.shape)
            e = end[i, j]
            if f1[i, j] > best.fit_f1:
                best = _Cut(int(j), 1, (self.values[e, j] + self.values[e + 1, j]) / 2, float(f1[i, j]))
        if -1 in directions:  # the bottom values up to the run of the m-th positive from the bottom
            low = ranks[::-1]
            start = self.run_start[low, columns]
            f1 = f1_score(m, n - start, n_pos)
            i, j = np.unravel_index(np.argmax(f1), f1.shape)
            s = start[i, j]
            if f1[i, j] > best.fit_f1:
                best = _Cut(int(j), -1, (self.values[s - 1, j] + self.values[s, j]) / 2, float(f1[i, j]))
        return best
