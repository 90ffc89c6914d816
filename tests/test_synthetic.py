"""The synthetic toy model: dictionary, firing probabilities, hierarchy, groups, magnitudes, noise.

Statistical checks use tolerances of several binomial (or sample) standard errors, so they do not
flake, yet a wrong implementation misses by far more."""
import math

import numpy as np
import pytest

from config.schema import SyntheticConfig, UsageError
from experiments.data.synthetic import ToyModel, chunk_rng

Z = 5.5  # standard errors allowed (max over <= ~100 checks per test: false alarm rate ~1e-6)


def cfg(**kw) -> SyntheticConfig:
    return SyntheticConfig(**{"n_features": 64, "d_in": 16, "n_tokens": 1000, "mean_l0": 4.0, **kw})


def close_to_rate(hits, n, p, z=Z):
    """|hits/n - p| within z binomial standard errors (elementwise)."""
    hits, p = np.asarray(hits, dtype=float), np.asarray(p, dtype=float)
    se = np.sqrt(np.maximum(p * (1 - p), 1e-12) / n)
    return np.abs(hits / n - p) <= z * se


# ---- dictionary and determinism

def test_dictionary_unit_rows_and_seeded():
    a, b, c = (ToyModel.build(cfg(), s) for s in (0, 0, 1))
    assert a.dictionary.dtype == np.float32 and a.dictionary.shape == (64, 16)
    np.testing.assert_allclose(np.linalg.norm(a.dictionary, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(a.dictionary, b.dictionary)
    assert not np.allclose(a.dictionary, c.dictionary)


def test_sample_depends_only_on_rng():
    m = ToyModel.build(cfg(n_parents=2, n_groups=2, noise_std=0.1), 0)
    acts1, codes1 = m.sample(3000, chunk_rng(5, 3))
    acts2, codes2 = m.sample(3000, chunk_rng(5, 3))
    assert acts1.dtype == codes1.dtype == np.float32
    assert acts1.shape == (3000, 16) and codes1.shape == (3000, 64)
    np.testing.assert_array_equal(acts1, acts2)
    np.testing.assert_array_equal(codes1, codes2)
    _, codes3 = m.sample(3000, chunk_rng(5, 4))
    assert not np.array_equal(codes1, codes3)


def test_roles_and_layout():
    m = ToyModel.build(cfg(n_parents=2, children_per_parent=3, n_groups=2, group_size=4), 0)
    roles = m.roles
    assert roles[:2] == ["parent"] * 2 and roles[2:8] == ["child"] * 6
    assert roles[8:16] == ["group"] * 8 and set(roles[16:]) == {"independent"}
    assert m.parent[2 + 1 * 3 + 2] == 1 and m.parent[0] == -1 and m.parent[20] == -1
    assert list(m.group[8:16]) == [0] * 4 + [1] * 4 and m.group[16] == -1


# ---- probabilities

@pytest.mark.parametrize("frequency", ["uniform", "zipf"])
def test_probabilities_sum_to_mean_l0(frequency):
    m = ToyModel.build(cfg(frequency=frequency, n_parents=3, n_groups=2), 0)
    assert m.probability.dtype == np.float64
    assert m.probability.sum() == pytest.approx(4.0, rel=1e-9)
    if frequency == "uniform":
        free = m.probability[m.parent < 0]
        np.testing.assert_allclose(free, free[0], rtol=1e-12)


def test_zipf_ratio_unclipped():
    a = 0.7
    m = ToyModel.build(cfg(frequency="zipf", zipf_exponent=a, mean_l0=2.0), 0)
    p = m.probability
    assert p.max() < 1 and np.all(np.diff(p) < 0)
    k = np.arange(64)
    np.testing.assert_allclose(p[0] / p, (k + 1.0) ** a, rtol=1e-9)


def test_clipping_still_hits_mean_l0():
    m = ToyModel.build(cfg(n_features=20, frequency="zipf", zipf_exponent=1.0, mean_l0=15.0), 0)
    p = m.probability
    assert p.sum() == pytest.approx(15.0, rel=1e-9)
    assert p[0] == 1.0 and p.max() <= 1.0 and p[-1] < 1.0
    full = ToyModel.build(cfg(n_features=10, frequency="uniform", mean_l0=10.0), 0)
    np.testing.assert_array_equal(full.probability, 1.0)


def test_children_scale_with_parent():
    m = ToyModel.build(cfg(frequency="zipf", n_parents=2, children_per_parent=3, child_probability=0.4), 0)
    p = m.probability
    for c in range(2, 8):
        assert p[c] == pytest.approx(0.4 * p[m.parent[c]], rel=1e-12)


@pytest.mark.parametrize("kw", [
    dict(n_features=10, mean_l0=10.5),
    # 6 free features + 2 parents * 2 children * 0.5 = at most 8 firing on average
    dict(n_features=10, n_parents=2, children_per_parent=2, child_probability=0.5, mean_l0=8.5),
])
def test_unreachable_mean_l0(kw):
    with pytest.raises(UsageError, match="mean_l0"):
        ToyModel.build(cfg(**kw), 0)


# ---- firing statistics

def test_firing_frequency_and_mean_l0():
    m = ToyModel.build(cfg(frequency="zipf", zipf_exponent=0.8, n_parents=2, n_groups=3, mean_l0=5.0), 1)
    n = 100_000
    _, codes = m.sample(n, chunk_rng(1, 0))
    assert codes.min() >= 0
    fired = codes > 0
    assert close_to_rate(fired.sum(0), n, m.probability).all()
    l0 = fired.sum(1)
    assert abs(l0.mean() - 5.0) <= Z * l0.std() / math.sqrt(n)


def test_hierarchy():
    cp = 0.3
    m = ToyModel.build(cfg(frequency="uniform", n_parents=2, children_per_parent=3, child_probability=cp,
                           mean_l0=6.0), 2)
    n = 60_000
    _, codes = m.sample(n, chunk_rng(2, 0))
    fired = codes > 0
    for c in range(2, 8):
        q = m.parent[c]
        assert not (fired[:, c] & ~fired[:, q]).any()  # never without its parent
        given = fired[fired[:, q], c]
        assert close_to_rate(given.sum(), given.size, cp)
        assert m.expected_pair_firing(c, q) == m.expected_pair_firing(q, c) == pytest.approx(m.probability[c])
    for a, b in [(2, 3), (3, 4), (5, 7)]:
        expect = m.expected_pair_firing(a, b)
        assert expect == pytest.approx(m.probability[m.parent[a]] * cp ** 2)
        assert close_to_rate((fired[:, a] & fired[:, b]).sum(), n, expect)
    # children of different parents are independent
    expect = m.expected_pair_firing(2, 5)
    assert expect == pytest.approx(m.probability[2] * m.probability[5])
    assert close_to_rate((fired[:, 2] & fired[:, 5]).sum(), n, expect)


def test_exclusive_children():
    """At most one child of a parent fires; P(some child | parent) = child_probability, each child
    equally likely, so p_child = child_probability / C * p_parent."""
    cp = 0.6
    m = ToyModel.build(cfg(frequency="uniform", n_parents=2, children_per_parent=3, child_probability=cp,
                           exclusive_children=True, mean_l0=6.0), 2)
    n = 60_000
    _, codes = m.sample(n, chunk_rng(2, 0))
    fired = codes > 0
    for q, kids in ((0, [2, 3, 4]), (1, [5, 6, 7])):
        assert fired[:, kids].sum(1).max() == 1  # never two siblings at once
        assert not (fired[:, kids].any(1) & ~fired[:, q]).any()  # never without the parent
        given = fired[fired[:, q]][:, kids].any(1)
        assert close_to_rate(given.sum(), given.size, cp)
        for c in kids:
            assert m.probability[c] == pytest.approx(cp / 3 * m.probability[q], rel=1e-12)
            assert close_to_rate(fired[:, c].sum(), n, m.probability[c])
    assert m.expected_pair_firing(2, 3) == 0.0
    assert close_to_rate(fired.sum(0), n, m.probability).all()


def test_groups_copula():
    m = ToyModel.build(cfg(frequency="uniform", n_groups=2, group_size=3, group_correlation=0.5, n_features=40,
                           mean_l0=4.0), 3)  # p = 0.1 each
    n = 100_000
    _, codes = m.sample(n, chunk_rng(3, 0))
    fired = codes > 0
    assert close_to_rate(fired[:, :6].sum(0), n, m.probability[:6]).all()
    p = m.probability[0]
    same = m.expected_pair_firing(0, 1)
    assert same == pytest.approx(0.0324015, abs=1e-5)  # bivariate normal at Phi^-1(0.1), rho 0.5
    assert same > 3 * p * p
    for a, b in [(0, 1), (0, 2), (4, 5)]:
        assert close_to_rate((fired[:, a] & fired[:, b]).sum(), n, same)
    for a, b in [(0, 3), (2, 5), (1, 10)]:
        expect = m.expected_pair_firing(a, b)
        assert expect == pytest.approx(p * p)
        assert close_to_rate((fired[:, a] & fired[:, b]).sum(), n, expect)


def test_groups_zero_correlation_independent():
    m = ToyModel.build(cfg(frequency="uniform", n_groups=1, group_size=2, group_correlation=0.0, mean_l0=6.4), 0)
    assert m.expected_pair_firing(0, 1) == pytest.approx(m.probability[0] ** 2, rel=1e-6)


# ---- magnitudes, activations, noise

@pytest.mark.parametrize("law,spread", [("constant", 0.5), ("uniform", 0.5), ("uniform", 1.0),
                                        ("exponential", 0.5), ("lognormal", 0.8)])
def test_magnitudes(law, spread):
    mean = 2.5
    m = ToyModel.build(cfg(magnitude=law, magnitude_mean=mean, magnitude_spread=spread, n_parents=2), 4)
    n = 20_000
    _, codes = m.sample(n, chunk_rng(4, 0))
    vals = codes[codes != 0].astype(np.float64)
    assert codes.min() >= 0
    l0 = (codes != 0).sum(1)  # nonzero exactly where firing: as many nonzeros as expected firings
    assert abs(l0.mean() - 4.0) <= Z * l0.std() / math.sqrt(n)
    if law == "constant":
        assert np.all(vals == np.float32(mean))
        return
    sd = {"uniform": mean * spread / math.sqrt(3), "exponential": mean,
          "lognormal": mean * math.sqrt(math.exp(spread ** 2) - 1)}[law]
    assert abs(vals.mean() - mean) <= Z * sd / math.sqrt(vals.size)
    if law == "uniform":
        assert vals.min() >= mean * (1 - spread) - 1e-5 and vals.max() <= mean * (1 + spread) + 1e-5
        assert vals.std() == pytest.approx(sd, rel=0.05)


def test_acts_are_codes_times_dictionary():
    m = ToyModel.build(cfg(n_groups=2, n_parents=1), 5)
    acts, codes = m.sample(2000, chunk_rng(5, 0))
    np.testing.assert_allclose(acts, codes @ m.dictionary, rtol=1e-5, atol=1e-6)


def test_noise_std():
    m = ToyModel.build(cfg(noise_std=0.2), 6)
    acts, codes = m.sample(20_000, chunk_rng(6, 0))
    resid = (acts - codes @ m.dictionary).astype(np.float64)
    k = resid.size
    assert abs(resid.mean()) <= Z * 0.2 / math.sqrt(k)
    assert abs(resid.std() - 0.2) <= Z * 0.2 / math.sqrt(2 * k)


def test_large_sample_block_boundaries():
    # more rows than one internal block: every row still gets codes, and L0 stays right
    m = ToyModel.build(cfg(n_features=2048, d_in=32, mean_l0=8.0), 7)
    n = 4096
    acts, codes = m.sample(n, chunk_rng(7, 0))
    l0 = (codes > 0).sum(1)
    assert abs(l0[:n // 2].mean() - 8.0) < 0.5 and abs(l0[n // 2:].mean() - 8.0) < 0.5
    np.testing.assert_allclose(acts, codes @ m.dictionary, rtol=1e-5, atol=1e-5)


# ---- validation

@pytest.mark.parametrize("kw,match", [
    (dict(n_features=0), "n_features"),
    (dict(d_in=-1), "d_in"),
    (dict(mean_l0=0.0), "mean_l0"),
    (dict(n_parents=10, children_per_parent=4, n_groups=5, group_size=4), "exceeds n_features"),
    (dict(group_correlation=1.0), "group_correlation"),
    (dict(group_correlation=-0.1), "group_correlation"),
    (dict(child_probability=0.0), "child_probability"),
    (dict(child_probability=1.5), "child_probability"),
    (dict(frequency="powerlaw"), "frequency"),
    (dict(magnitude="gamma"), "magnitude"),
    (dict(magnitude="uniform", magnitude_spread=1.5), "magnitude_spread"),
    (dict(magnitude="lognormal", magnitude_spread=-0.1), "magnitude_spread"),
    (dict(magnitude_mean=0.0), "magnitude_mean"),
    (dict(noise_std=-1.0), "noise_std"),
])
def test_bad_configs(kw, match):
    with pytest.raises(UsageError, match=match) as err:
        ToyModel.build(cfg(**kw), 0)
    assert "\n" not in str(err.value)
