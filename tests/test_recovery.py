import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import betainc, gamma

from experiments.eval.recovery import (
    FiringMatch,
    Recovery,
    abs_cosine,
    feature_recovery,
    recovery_metrics,
)

E0, E1, E2 = np.eye(3)


def unit(*xs: float) -> np.ndarray:
    """A unit vector in 3-D: xs as given if there are 3, else xs then the component making norm 1."""
    if len(xs) == 3:
        return np.array(xs, dtype=float)
    return np.array([*xs, math.sqrt(1 - sum(x * x for x in xs))])


# --- abs_cosine ------------------------------------------------------------------------------


def test_abs_cosine_matches_direct_formula_and_accepts_torch():
    rng = np.random.default_rng(0)
    W, T = rng.standard_normal((7, 5)), rng.standard_normal((4, 5))
    expected = np.array([[abs(w @ t) / (np.linalg.norm(w) * np.linalg.norm(t)) for t in T] for w in W])
    for got in (abs_cosine(W, T), abs_cosine(torch.tensor(W, requires_grad=True), torch.tensor(T))):
        assert got.shape == (7, 4) and got.dtype == np.float64
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    # float32 / bf16 torch inputs are converted, not rejected
    assert abs_cosine(torch.tensor(W).bfloat16(), torch.tensor(T).float()).shape == (7, 4)


def test_zero_norm_rows_give_zero_not_nan():
    W = np.array([[0.0, 0, 0], [1, 0, 0], [0, 2, 0]])
    T = np.array([[3.0, 0, 0], [0, 0, 0]])
    c = abs_cosine(W, T)
    np.testing.assert_array_equal(c, [[0, 0], [1, 0], [0, 0]])
    rec = feature_recovery(torch.tensor(W), torch.tensor(T))
    assert not np.isnan(rec.best_cos).any() and not np.isnan(rec.matched_cos).any()
    assert rec.best_cos[0] == 1 and rec.best_cos[1] == 0 and rec.matched_latent[0] == 1
    assert rec.mcc == pytest.approx(0.5) and rec.frac_recovered == 0.5


def test_rejects_mismatched_or_non_finite_input():
    with pytest.raises(ValueError, match="d_in"):
        abs_cosine(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        feature_recovery(np.array([[np.nan, 1.0]]), np.ones((1, 2)))


# --- feature_recovery: known answers ---------------------------------------------------------


@pytest.mark.parametrize("extra", [0, 37])
@pytest.mark.parametrize("as_torch", [False, True])
def test_permuted_sign_flipped_scaled_dictionary_is_recovered_exactly(extra, as_torch):
    rng = np.random.default_rng(1)
    n, d_in = 64, 32
    d_sae = n + extra
    T = rng.standard_normal((n, d_in))
    W = rng.standard_normal((d_sae, d_in))  # the extra latents stay random
    pos = rng.permutation(d_sae)[:n]  # true feature j sits at latent pos[j]
    signs = rng.choice([-1.0, 1.0], n)
    scales = rng.uniform(0.1, 10, n)
    W[pos] = (signs * scales)[:, None] * T
    if as_torch:
        W, T = torch.tensor(W, dtype=torch.float32), torch.tensor(T, dtype=torch.float32)
    rec = feature_recovery(W, T)
    assert rec.mcc == pytest.approx(1, abs=1e-9)
    assert rec.frac_recovered == pytest.approx(1, abs=1e-9)
    np.testing.assert_allclose(rec.best_cos, 1, atol=1e-9)
    np.testing.assert_array_equal(rec.matched_latent, pos)
    np.testing.assert_array_equal(rec.best_latent, pos)
    assert rec.matched_latent.dtype == np.int64 and rec.best_latent.dtype == np.int64
    if extra == 0:  # W = T[perm] up to sign/scale; the matching inverts perm
        perm = np.argsort(pos)
        np.testing.assert_array_equal(rec.matched_latent[perm], np.arange(n))


def test_2x2_optimal_matching_differs_from_greedy():
    # |cos| [latent, feature] = [[0.8, 0.6], [0.7, 0.1]] (rows rescaled, one sign flipped).
    # Both features' best latent is latent 0. Options: L0-F0 + L1-F1 = 0.9, L0-F1 + L1-F0 = 1.3,
    # so the optimum is L1-F0, L0-F1 and mcc = 1.3 / 2 = 0.65. (Greedy one-to-one, taking the
    # largest pair first, would give (0.8 + 0.1) / 2 = 0.45; the unrestricted mean max is 0.7.)
    W = np.stack([3 * unit(0.8, 0.6), -unit(0.7, 0.1)])
    T = np.stack([2 * E0, E1])
    rec = feature_recovery(W, T, threshold=0.75)
    np.testing.assert_allclose(abs_cosine(W, T), [[0.8, 0.6], [0.7, 0.1]], atol=1e-12)
    np.testing.assert_array_equal(rec.matched_latent, [1, 0])
    np.testing.assert_allclose(rec.matched_cos, [0.7, 0.6], atol=1e-12)
    assert rec.mcc == pytest.approx(0.65, abs=1e-12)
    # best_cos / frac_recovered use the unrestricted max: feature 0 is recovered (0.8 >= 0.75)
    # through latent 0 even though it is matched to latent 1 at 0.7.
    np.testing.assert_array_equal(rec.best_latent, [0, 0])
    np.testing.assert_allclose(rec.best_cos, [0.8, 0.6], atol=1e-12)
    assert rec.frac_recovered == 0.5
    assert rec.mean_best_cos == pytest.approx(0.7, abs=1e-12)


def test_3x2_extra_latent_changes_the_matching():
    # As above plus latent 2 with |cos| [0.2, 0.55]. Options: L0-F0 + L2-F1 = 1.35,
    # L1-F0 + L0-F1 = 1.3, L1-F0 + L2-F1 = 1.25, L2-F0 + L0-F1 = 0.8, L0-F0 + L1-F1 = 0.9,
    # L2-F0 + L1-F1 = 0.3 -> optimum L0-F0, L2-F1, mcc = 0.675.
    W = np.stack([unit(0.8, 0.6), unit(0.7, 0.1), unit(0.2, -0.55)])
    T = np.stack([E0, E1])
    rec = feature_recovery(W, T, threshold=0.6)
    np.testing.assert_array_equal(rec.matched_latent, [0, 2])
    np.testing.assert_allclose(rec.matched_cos, [0.8, 0.55], atol=1e-12)
    assert rec.mcc == pytest.approx(0.675, abs=1e-12)
    np.testing.assert_array_equal(rec.best_latent, [0, 0])
    np.testing.assert_allclose(rec.best_cos, [0.8, 0.6], atol=1e-12)
    assert rec.frac_recovered == 1.0  # 0.6 >= 0.6 via latent 0, though matched at 0.55


def test_fewer_latents_than_features():
    # |cos| = [[0.8, 0.6, 0], [0.6, 0, 0.8]]. Options: L0-F0 + L1-F2 = 1.6, L0-F1 + L1-F2 = 1.4,
    # L0-F1 + L1-F0 = 1.2, ... -> feature 1 unmatched, mcc = 1.6 / 3 (not / 2).
    W = np.stack([unit(0.8, 0.6, 0), unit(0.6, 0, 0.8)])
    rec = feature_recovery(W, np.eye(3), threshold=0.7)
    np.testing.assert_array_equal(rec.matched_latent, [0, -1, 1])
    np.testing.assert_allclose(rec.matched_cos, [0.8, 0, 0.8], atol=1e-12)
    assert rec.mcc == pytest.approx(1.6 / 3, abs=1e-12)
    np.testing.assert_array_equal(rec.best_latent, [0, 0, 1])
    np.testing.assert_allclose(rec.best_cos, [0.8, 0.6, 0.8], atol=1e-12)
    assert rec.frac_recovered == pytest.approx(2 / 3)

    # Two of three features learnt perfectly: matched pairs are exact but mcc is 2/3, not 1.
    rec = feature_recovery(np.stack([E2, E0]), np.eye(3))
    np.testing.assert_array_equal(rec.matched_latent, [1, -1, 0])
    assert rec.mcc == pytest.approx(2 / 3, abs=1e-12)
    assert rec.frac_recovered == pytest.approx(2 / 3)


# --- feature_recovery: random decoder against derived expectations ----------------------------


def q_tail(t: float, d: int) -> float:
    """P(|cos| >= t) for two independent uniformly random directions in d dims: cos^2 ~ Beta(1/2, (d-1)/2)."""
    return 1 - betainc(0.5, (d - 1) / 2, t * t)


def expected_frac_recovered(m: int, d: int, threshold: float) -> float:
    """Each of m independent random latents reaches the threshold with probability q."""
    return 1 - (1 - q_tail(threshold, d)) ** m


def expected_best_cos(m: int, d: int) -> float:
    """E[max of m iid |cos|] = integral_0^1 P(max >= t) dt."""
    return quad(lambda t: 1 - (1 - q_tail(t, d)) ** m, 0, 1)[0]


def expected_abs_cos(d: int) -> float:
    return gamma(d / 2) / (math.sqrt(math.pi) * gamma((d + 1) / 2))


def test_derived_expectations_reduce_to_closed_forms_in_3d():
    # In 3-D cos is uniform on [-1, 1], so |cos| ~ U(0, 1), q(t) = 1 - t, E|cos| = 1/2 and the max
    # of m uniforms has mean m / (m + 1).
    for t in (0.0, 0.3, 0.9):
        assert q_tail(t, 3) == pytest.approx(1 - t, abs=1e-12)
    assert expected_best_cos(8, 3) == pytest.approx(8 / 9, abs=1e-9)
    assert expected_frac_recovered(8, 3, 0.9) == pytest.approx(1 - 0.9**8, abs=1e-12)
    assert expected_abs_cos(3) == pytest.approx(0.5, abs=1e-12)


def random_replicates(d: int, m: int, n_features: int, n_reps: int, seed: int) -> list[Recovery]:
    # Gaussian rows have uniformly random directions; abs_cosine normalises them.
    g = np.random.default_rng(seed)
    return [feature_recovery(g.standard_normal((m, d)), g.standard_normal((n_features, d)))
            for _ in range(n_reps)]


@pytest.mark.parametrize("d, m", [(3, 8), (4, 16)])
def test_random_decoder_matches_derived_expectations(d, m):
    # Why independent replicates instead of one run with 4000 true features: the true features
    # of a run all share the same m latents, so their "recovered" indicators are positively
    # correlated (how much of the sphere the m caps cover varies from draw to draw). The
    # binomial standard error over 4000 features (~0.008) would understate the real spread of a
    # run's frac_recovered about 4-fold (measured: per-run sd ~0.06 at 100 features, of which the
    # binomial part is 0.05). So we draw 200 independent runs (fresh latents and 100 features
    # each; 20,000 features in all) and use the standard error of the mean over runs, which
    # includes that shared-latent variance. Tolerance: 4 standard errors (two-sided p ~ 6e-5 for
    # a correct implementation), and we require the SE to be small enough (< 0.01) that the
    # test still discriminates (e.g. using signed rather than absolute cos, or a strict
    # threshold, shifts these values by far more).
    n_reps = 200
    recs = random_replicates(d, m, n_features=100, n_reps=n_reps, seed=10 * d + m)
    for name, measured, expected in [
        ("frac_recovered", [r.frac_recovered for r in recs], expected_frac_recovered(m, d, 0.9)),
        ("mean_best_cos", [r.mean_best_cos for r in recs], expected_best_cos(m, d)),
    ]:
        assert 0.1 < expected < 0.95, name  # well away from 0 and 1
        se = np.std(measured, ddof=1) / math.sqrt(n_reps)
        assert se < 0.01, name
        assert abs(np.mean(measured) - expected) < 4 * se, (name, np.mean(measured), expected, se)


def test_random_decoder_mcc_between_random_assignment_and_unrestricted_max():
    # With d_sae >= n_features every feature is matched. Lower bound: the optimal one-to-one
    # matching scores at least the average over all one-to-one matchings; in a uniformly random
    # one each (feature, latent) pair is used with probability 1/d_sae, so that average is
    # sum(|cos|) / d_sae and mcc >= mean(|cos|) holds exactly, whose expectation is
    # E|cos| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)). Upper bound: matched_cos <= best_cos per
    # feature, so mcc <= mean(best_cos) exactly, with expectation E[best_cos]; strictly below,
    # since with random latents some features share a best latent and all but one of them must
    # settle for a worse one.
    d, m = 4, 16
    n_reps = 200
    g = np.random.default_rng(7)
    mccs = []
    for _ in range(n_reps):
        W, T = g.standard_normal((m, d)), g.standard_normal((m, d))
        rec = feature_recovery(W, T)
        assert (rec.matched_latent >= 0).all()
        assert abs_cosine(W, T).mean() - 1e-12 <= rec.mcc <= rec.mean_best_cos + 1e-12
        mccs.append(rec.mcc)
    mean, se = np.mean(mccs), np.std(mccs, ddof=1) / math.sqrt(n_reps)
    lo, hi = expected_abs_cos(d), expected_best_cos(m, d)  # 0.424, 0.876
    assert lo + 4 * se < mean < hi - 4 * se, (lo, mean, hi, se)


# --- FiringMatch -----------------------------------------------------------------------------

# 6 tokens, 3 latents, 2 true features; feature 0 <-> latent 2, feature 1 <-> latent 0.
LATENT_FIRED = torch.tensor([
    # L0 L1 L2
    [1, 1, 1],
    [1, 1, 0],
    [0, 1, 1],
    [0, 1, 0],
    [1, 1, 0],
    [0, 1, 0],
], dtype=torch.bool)
TRUE_FIRED = torch.tensor([
    # F0 F1
    [1, 1],
    [0, 0],
    [1, 0],
    [1, 0],
    [0, 1],
    [0, 1],
], dtype=torch.bool)
# F0/L2: both on tokens 0, 2 -> 2; L2 fires 2; F0 fires 3 -> precision 1, recall 2/3.
# F1/L0: both on tokens 0, 4 -> 2; L0 fires 3; F1 fires 3 -> precision 2/3, recall 2/3.
HAND_PRECISION, HAND_RECALL = [1.0, 2 / 3], [2 / 3, 2 / 3]


def test_firing_match_hand_example_and_batching():
    one = FiringMatch(np.array([2, 0]))
    one.update(LATENT_FIRED, TRUE_FIRED)
    np.testing.assert_allclose(one.precision(), HAND_PRECISION)
    np.testing.assert_allclose(one.recall(), HAND_RECALL)
    counts = one.counts()
    np.testing.assert_array_equal(counts["both"], [2, 2])
    np.testing.assert_array_equal(counts["latent"], [2, 3])
    np.testing.assert_array_equal(counts["feature"], [3, 3])
    assert all(c.dtype == np.int64 for c in counts.values())

    batched = FiringMatch(np.array([2, 0]))
    for s in (slice(0, 4), slice(4, 4), slice(4, 6)):  # uneven, with an empty batch
        batched.update(LATENT_FIRED[s], TRUE_FIRED[s])
    np.testing.assert_array_equal(batched.precision(), one.precision())
    np.testing.assert_array_equal(batched.recall(), one.recall())

    # leading dims are flattened: [2, 3, d] is the same as [6, d]
    shaped = FiringMatch(np.array([2, 0]))
    shaped.update(LATENT_FIRED.reshape(2, 3, 3), TRUE_FIRED.reshape(2, 3, 2))
    np.testing.assert_array_equal(shaped.recall(), one.recall())


def test_firing_match_nan_cases():
    fm = FiringMatch(np.array([1, -1, 0]))
    assert np.isnan(fm.precision()).all() and np.isnan(fm.recall()).all()  # nothing seen yet
    latent = torch.tensor([[1, 0, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)  # L1 never fires
    true = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)  # F2 never fires
    fm.update(latent, true)
    p, r = fm.precision(), fm.recall()
    # F0 <-> L1: L1 never fired -> precision NaN; F0 fired twice, never with L1 -> recall 0.
    # F1 unmatched -> both NaN. F2 <-> L0: L0 fired twice, F2 never -> precision 0, recall NaN.
    assert np.isnan(p[0]) and r[0] == 0
    assert np.isnan(p[1]) and np.isnan(r[1])
    assert p[2] == 0 and np.isnan(r[2])


def test_firing_match_rejects_bad_input():
    fm = FiringMatch(np.array([2, 0]))
    with pytest.raises(TypeError):
        fm.update(LATENT_FIRED.float(), TRUE_FIRED)
    with pytest.raises(ValueError):
        fm.update(LATENT_FIRED, TRUE_FIRED[:, :1])
    with pytest.raises(ValueError):
        FiringMatch(np.array([5, 0])).update(LATENT_FIRED, TRUE_FIRED)


# --- recovery_metrics ------------------------------------------------------------------------


def hand_recovery() -> Recovery:
    # 3 latents, 4 true features: F0, F1 recovered and matched; F2 matched but not recovered;
    # F3 recovered (best latent 0) but unmatched, since d_sae < n_features.
    return Recovery(
        threshold=0.9,
        best_cos=np.array([0.95, 0.92, 0.5, 0.99]),
        best_latent=np.array([0, 1, 2, 0]),
        matched_latent=np.array([0, 1, 2, -1]),
        matched_cos=np.array([0.95, 0.92, 0.5, 0.0]),
    )


def test_recovery_metrics_averages_only_recovered_matched_features():
    rec = hand_recovery()
    fm = FiringMatch(rec.matched_latent)
    latent = torch.tensor([
        # L0 L1 L2
        [1, 0, 0],
        [0, 0, 0],
        [0, 0, 0],
        [0, 0, 1],
        [0, 0, 0],
    ], dtype=torch.bool)
    true = torch.tensor([
        # F0 F1 F2 F3
        [1, 0, 0, 1],
        [1, 0, 0, 1],
        [0, 1, 0, 1],
        [0, 0, 0, 1],
        [0, 0, 1, 0],
    ], dtype=torch.bool)
    fm.update(latent, true)
    # F0/L0: precision 1/1, recall 1/2. F1/L1: L1 never fires -> precision NaN, recall 0/1.
    # F2/L2 (not recovered, excluded): precision 0/1, recall 0/1; including it would give
    # precision 0.5 and recall 1/6. F3: unmatched, excluded.
    m = recovery_metrics(rec, fm)
    assert m["firing_precision"] == pytest.approx(1.0)
    assert m["firing_recall"] == pytest.approx(0.25)
    assert m["mcc"] == pytest.approx((0.95 + 0.92 + 0.5) / 4)
    assert m["frac_recovered"] == pytest.approx(0.75)
    assert m["mean_best_cos"] == pytest.approx((0.95 + 0.92 + 0.5 + 0.99) / 4)
    assert set(recovery_metrics(rec)) == {"mcc", "frac_recovered", "mean_best_cos"}

    # No recovered matched feature: NaN, without a "mean of empty slice" warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = recovery_metrics(dataclasses.replace(rec, threshold=0.999), fm)
    assert math.isnan(m["firing_precision"]) and math.isnan(m["firing_recall"])

    with pytest.raises(ValueError, match="different matching"):
        recovery_metrics(rec, FiringMatch(np.array([1, 0, 2, -1])))
