"""The concept baselines on raw activations (dense probe, best raw neuron), checked against
scikit-learn and a brute force, and the emergence study read against them on a hand-built
activation set where every answer is planted."""
import itertools

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from config.records import ArmRecord
from experiments.eval.baselines import _Ranked, best_neuron, concept_baselines, fit_balanced_logistic
from experiments.eval.concepts import ConceptSet, f1_score, score_concepts
from experiments.eval.probes import ConceptData
from experiments.studies.emergence import concept_emergence
from experiments.studies.results import ArmData, StudyInputs


def test_the_dense_probe_is_scikit_learns_balanced_logistic_regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5))
    y = np.stack([x @ rng.normal(size=5) + rng.normal(size=600) > 1.5,  # rare, noisy
                  x[:, 0] - x[:, 1] > 0,  # frequent, nearly separable
                  rng.random(600) < 0.2], axis=1)  # no signal at all
    coef, intercept = fit_balanced_logistic(x, y)
    for c in range(y.shape[1]):
        ref = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-10, max_iter=10_000).fit(x, y[:, c])
        np.testing.assert_allclose(coef[:, c], ref.coef_[0], atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(intercept[c], ref.intercept_[0], atol=2e-4, rtol=1e-4)


def _brute_best_cut(x, y):
    """Every column, direction and cut between distinct values: the best fit F1."""
    best = f1_score(y.sum(), len(y), y.sum())  # predict everything
    for j in range(x.shape[1]):
        values = np.unique(x[:, j])
        for lo, hi in zip(values[:-1], values[1:]):
            cut = (lo + hi) / 2
            for predicted in (x[:, j] > cut, x[:, j] < cut):
                best = max(best, f1_score(np.sum(predicted & y), predicted.sum(), y.sum()))
    return float(best)


@pytest.mark.parametrize("seed", range(4))
def test_the_best_cut_is_the_brute_forces_with_ties_never_split(seed):
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(80, 3)), 1)  # many tied values
    y = (x[:, 1] + rng.normal(0, 0.7, 80) < -0.4) if seed % 2 else (rng.random(80) < 0.3)
    cut = _Ranked(x).best_cut(y)
    assert cut.fit_f1 == pytest.approx(_brute_best_cut(x, y), abs=1e-12)
    # the cut it reports reproduces that F1 on the same tokens (so no tie group was split)
    assert cut.held_out_f1(x, y) == pytest.approx(cut.fit_f1, abs=1e-12)


def test_the_best_neuron_is_found_with_its_sign():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 6))
    y = np.stack([x[:, 4] > 1.0, x[:, 2] < -0.5], axis=1)
    fit = np.arange(2000) % 2 == 0
    f1, neuron, sign = best_neuron(x, y, fit)
    assert neuron.tolist() == [4, 2] and sign.tolist() == [1, -1]
    assert f1.min() > 0.98


N_SEQ, SEQ_LEN, D = 60, 100, 8


@pytest.fixture(scope="module")
def planted():
    """Activations with concepts planted along known directions: A along a diagonal direction
    (no single neuron holds it), B along another, C labelled at random with no direction at all.
    Five evals of a 4-latent SAE whose firing is written by hand: latent 0 matches A exactly at
    evals 1, 3 and 4 but fires on many other tokens at eval 2; latents 1 and 2 each cover one half
    of B (a split concept) from eval 1 on; latent 3 fires at random."""
    rng = np.random.default_rng(0)
    n = N_SEQ * SEQ_LEN
    kind = rng.choice(3, size=n, p=[0.8, 0.1, 0.1])  # 0 none, 1 A, 2 B
    tokens = torch.from_numpy(np.where(kind == 1, 1 + rng.integers(0, 3, n), np.where(kind == 2, 4, 10)))
    c_tokens = rng.random(n) < 0.1
    tokens = torch.where(torch.from_numpy(c_tokens & (kind == 0)), torch.tensor(7), tokens)
    u, v = np.ones(D) / np.sqrt(D), np.eye(D)[0] - np.eye(D)[1]
    acts = rng.normal(size=(n, D)).astype(np.float32)
    acts += 6 * np.outer(kind == 1, u) + 6 * np.outer(kind == 2, v / np.linalg.norm(v))
    concepts = ConceptSet(["category:A", "category:B", "category:C", "word:absent"],
                          ["category", "category", "category", "word"], [[1, 2, 3], [4], [7], [99]])
    data = ConceptData.build(concepts, tokens, torch.arange(n) // SEQ_LEN)
    a, b = (kind == 1), (kind == 2)
    half = np.arange(n) % 2 == 0
    fired = []
    for e in range(5):
        f = np.zeros((n, 4), bool)
        if e >= 1:
            f[:, 0] = a | (rng.random(n) < 0.3) if e == 2 else a
            f[:, 1], f[:, 2] = b & half, b & ~half
        f[:, 3] = rng.random(n) < 0.2
        fired.append(torch.from_numpy(f))
    return acts, data, fired


def test_planted_concepts_get_the_ceiling_the_floor_and_chance(planted):
    acts, data, _ = planted
    assert data.concepts.names == ["category:A", "category:B", "category:C"]  # never occurs: left out
    assert data.concepts.absent == ["word:absent"]
    base = concept_baselines(acts, data.labels.numpy(), data.fit_mask.numpy())
    assert base.dense_f1[0] > 0.97 and base.dense_f1[1] > 0.97  # planted: the probe finds them
    rate = data.labels[:, 2].float().mean().item()
    assert base.dense_f1[2] < 2 * rate / (1 + rate) + 0.05  # C: no better than "always yes"
    # A lies along a diagonal: one neuron sees a quarter of its signal; B along e0 - e1: half
    assert base.neuron_f1[0] < base.dense_f1[0] - 0.15 and base.neuron[1] in (0, 1)


def test_emergence_is_read_where_it_was_planted(planted):
    acts, data, fired = planted
    base = concept_baselines(acts, data.labels.numpy(), data.fit_mask.numpy())
    evals = []
    for e, f in enumerate(fired):
        scores = score_concepts(f, data.labels, data.fit_mask, probe_k=2)
        evals.append({"tokens": np.array(1000 * (e + 1)), "n_tokens": np.array(len(f)), **scores})
    c = data.concepts
    arm = ArmData(ArmRecord("topk-x", "topk-x", "topk", "auxk", status="complete"), {}, evals,
                  {"names": c.names, "kinds": c.kinds, "skipped": [], "absent": c.absent})
    inputs = StudyInputs({"f1_threshold": 0.8, "probe_k": 2},
                         {"names": np.array(c.names), **base.arrays()})
    res = concept_emergence([arm], inputs)
    got = {x["concept"]: x for x in res.summary["arms"][0]["concepts"]}
    a, b, c_ = got["category:A"], got["category:B"], got["category:C"]
    assert (a["first_crossed_single_tokens"], a["emerged_single_tokens"]) == (2000, 4000)  # lost at eval 2
    assert a["near_ceiling_single_tokens"] == 4000
    assert b["emerged_single_tokens"] is None and b["best_single_f1"] == pytest.approx(2 / 3, abs=0.03)
    assert b["emerged_probe_tokens"] == 2000 and b["final_probe_f1"] == 1.0  # the split, joined by the probe
    assert c_["emerged_single_tokens"] is None and c_["emerged_probe_tokens"] is None
    assert res.summary["absent_concepts"] == ["word:absent"]
    baselines = {x["concept"]: x for x in res.summary["baselines"]}
    assert baselines["category:A"]["dense_probe_f1"] == round(float(base.dense_f1[0]), 4)
    table = res.tables["ceiling"]
    assert [row[0] for row in table.rows] == ["A", "B", "C"]
    assert table.rows[1][3] == f"{b['final_single_f1']:.3f} · 1.000"
    side = "high" if base.neuron_sign[1] > 0 else "low"
    assert table.rows[1][2] == f"{base.neuron_f1[1]:.3f} (#{base.neuron[1]} {side})"
    for row in itertools.chain(*(t.rows for t in res.tables.values())):
        assert not any(isinstance(x, float) and np.isnan(x) for x in row) and "nan" not in " ".join(map(str, row))


def _arm(evals, names, kinds):
    return ArmData(ArmRecord("relu-x", "relu-x", "relu", "none", status="complete"), {}, evals,
                   {"names": names, "kinds": kinds, "skipped": []})


def _evals(scores):
    """Evals whose single-latent and probe F1 are the given [E, C] scores."""
    return [{"tokens": np.array(1000 * (e + 1)), "n_tokens": np.array(100), "single_f1": np.array(row, float),
             "probe_f1": np.array(row, float), "single_latent": np.zeros(len(row), np.int64),
             "probe_latents": np.zeros((len(row), 2), np.int64)} for e, row in enumerate(scores)]


def test_a_study_from_before_the_baselines_is_still_reported_without_nan():
    """Made before absent concepts were left out: a concept without scores (NaN), and no baselines."""
    arm = _arm(_evals([[0.5, np.nan], [0.6, np.nan]]), ["category:A", "category:B"], ["category", "category"])
    res = concept_emergence([arm], StudyInputs({"f1_threshold": 0.8, "probe_k": 2}))
    assert "ceiling" not in res.tables and "baselines" not in res.summary
    assert res.tables["counts"].rows[0][5:] == [0.6, 0.6]
    assert "nan" not in " ".join(res.findings) and "B (best 0.00)" in res.findings[-1]


def test_evals_of_another_concept_set_are_left_out_and_said():
    """A study resumed across the change scored 3 concepts before the resume and 2 after."""
    evals = _evals([[0.1, 0.2, 0.3]]) + _evals([[0.85, 0.9], [0.9, 0.95]])[0:2]
    arm = _arm(evals, ["category:A", "category:B"], ["category", "category"])
    res = concept_emergence([arm], StudyInputs({"f1_threshold": 0.8, "probe_k": 2}))
    assert res.tables["counts"].rows[0][1] == "2/2"
    assert any(f.startswith("1 evals scored another concept set") for f in res.findings)


def test_no_ceiling_is_reached_where_the_dense_probe_scores_zero():
    names = ["category:A", "word:rare"]
    base = {"names": np.array(names), "dense_f1": np.array([1.0, 0.0]), "neuron_f1": np.array([0.5, 0.0]),
            "neuron": np.array([3, 0]), "neuron_sign": np.array([1, 1])}
    arm = _arm(_evals([[0.9, 0.0], [0.95, 0.0]]), names, ["category", "word"])
    res = concept_emergence([arm], StudyInputs({"f1_threshold": 0.8, "probe_k": 2}, base))
    a, rare = res.summary["arms"][0]["concepts"]
    assert a["near_ceiling_single_tokens"] == 1000 and rare["near_ceiling_single_tokens"] is None
