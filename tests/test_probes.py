"""Probe and study building blocks on hand-computed inputs."""
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from experiments.eval.concepts import ConceptSet
from experiments.eval.metrics import EvalAccumulator, average_ranks, frequency_stats, rank_stability
from experiments.eval import embedding
from experiments.eval.embedding import embedding_workers
from experiments.eval.probes import ArmProbes, ConceptData, matched_categories, read_evals, umap_steps
from experiments.studies.emergence import _first_reach, _nanmax, _settled_reach, median_by_kind
from config.schema import ProbeConfig
from experiments.train.trainer import EvalOutput


def test_umap_steps_spread_from_first_to_final():
    assert umap_steps([150, 300, 450, 600, 750, 900, 906], 3) == {150, 600, 906}
    assert umap_steps([40], 3) == {40}
    assert umap_steps([10, 20], 0) == set() and umap_steps([], 3) == set()
    assert umap_steps([150, 300, 450], 1) == {450}  # one: the trained dictionary, as --quick takes it


def test_median_by_kind_leaves_out_nan_scores():
    kinds = ["category", "word", "category", "category"]
    scores = np.array([[0.2, 0.9, 0.4, np.nan],      # category: median of 0.2, 0.4
                       [np.nan, np.nan, np.nan, np.nan],
                       [0.1, 0.5, 0.7, 0.3]])
    medians = median_by_kind(kinds, scores)
    assert list(medians) == ["category", "word"]
    np.testing.assert_allclose(medians["category"], [0.3, np.nan, 0.3])
    np.testing.assert_allclose(medians["word"], [0.9, np.nan, 0.5])


def test_first_reach_and_nanmax():
    tokens = np.array([100.0, 200.0, 300.0])
    scores = np.array([[0.1, 0.9, np.nan, 0.5],
                       [0.85, 0.2, np.nan, 0.7],
                       [0.95, 0.95, np.nan, 0.79]])
    first = _first_reach(tokens, scores, 0.8)
    assert first[0] == 200 and first[1] == 100 and np.isnan(first[2]) and np.isnan(first[3])
    best = _nanmax(scores)
    assert best[0] == 0.95 and best[3] == 0.79 and np.isnan(best[2])


def test_a_concept_emerges_when_it_reaches_the_threshold_and_stays():
    tokens = np.array([100.0, 200.0, 300.0, 400.0])
    scores = np.array([[0.9, 0.1, 0.9, 0.0, np.nan],
                       [0.7, 0.9, 0.9, 0.0, 0.9],
                       [0.9, 0.85, 0.9, 0.0, np.nan],
                       [0.8, 0.95, 0.9, 0.9, 0.9]])
    settled = _settled_reach(tokens, scores, 0.8)
    # dips below at 200, back for good at 300 / crosses at 200 and stays / above throughout /
    # only the last eval / a missing score (NaN) counts as below
    np.testing.assert_array_equal(settled, [300.0, 200.0, 100.0, 400.0, 400.0])
    assert np.isnan(_settled_reach(tokens, scores[:3], 0.8)[3])  # ends below: never emerged
    np.testing.assert_array_equal(_first_reach(tokens, scores, 0.8), [100.0, 200.0, 100.0, 400.0, 200.0])


def test_frequency_stats_and_rank_stability():
    density = np.array([0.0, 0.00005, 0.0002, 0.01, 0.5])
    stats = frequency_stats(density, ultra_low=1e-4)
    assert stats["ultra_low_frac"] == pytest.approx(1 / 5)
    assert stats["median_log10_density"] == pytest.approx(np.median(np.log10(density[1:])))
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    a[:5] = b[:5] = 0  # ties (dead latents) get average ranks, as scipy does
    assert rank_stability(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert rank_stability(a, a * 3) == pytest.approx(1.0)
    assert np.isnan(rank_stability(np.zeros(4), a[:4]))  # all dead: no ranking at all


def test_average_ranks_share_ties_as_scipy_does():
    # by hand: 0.1 is lowest; the two 0.5s share ranks 2 and 3; the three 2.0s share 4, 5 and 6
    np.testing.assert_array_equal(average_ranks(np.array([2.0, 0.5, 0.1, 2.0, 0.5, 2.0])), [5, 2.5, 1, 5, 2.5, 5])
    values = np.random.default_rng(1).integers(0, 7, 200).astype(np.float64)  # many ties
    np.testing.assert_array_equal(average_ranks(values), rankdata(values))


def test_mean_activation_counts_only_firing_tokens():
    acc = EvalAccumulator(3)
    f = torch.tensor([[1.0, 0.0, 0.0], [3.0, 2.0, 0.0]])
    acc.update(torch.ones(2, 2), torch.ones(2, 2), f)
    assert acc.mean_activation().tolist() == [2.0, 2.0, 0.0]
    assert acc.firing_counts().tolist() == [2, 1, 0]


def test_matched_categories_needs_most_firings_on_one_category():
    kinds = ["category", "category", "word"]
    labels = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    fired = torch.tensor([[1, 0, 1, 0],
                          [1, 0, 1, 0],
                          [0, 1, 1, 0],
                          [0, 1, 0, 0]], dtype=torch.bool)
    # latent 0 fires only on category 0; latent 1 half on category 1 (precision 0.5); latent 2
    # two thirds on category 0; latent 3 never fires
    assert matched_categories(fired, labels, kinds).tolist() == [0, 1, 0, -1]


def test_arm_probes_write_readable_evals_and_resume_their_spearman(tmp_path):
    concepts = ConceptSet(names=["category:a", "word:x"], kinds=["category", "word"], token_ids=[[1, 2], [1]])
    tokens = torch.tensor([1, 2, 3, 1, 3, 2])
    data = ConceptData.build(concepts, tokens, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert data.fit_mask.tolist() == [True, True, True, False, False, False]
    cfg = ProbeConfig(probe_k=2)
    probes = ArmProbes(tmp_path, {"concepts", "frequency"}, cfg, data, set(), seed=0, n_eval_tokens=6)
    fired = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 0], [0, 1], [1, 0]], dtype=torch.bool)
    d1, d2 = np.array([4 / 6, 2 / 6]), np.array([0.5, 0.5])
    m1, _ = probes.run(10, 100, None, EvalOutput({}, d1, np.ones(2), fired, None))
    assert "freq/rank_spearman" not in m1 and m1["concepts/a/single_f1"] == 1.0  # latent 0 = {1, 2} exactly
    assert m1["concepts/category_emerged_single"] == 1 and m1["concepts/word_emerged_single"] == 0
    m2, _ = probes.run(20, 200, None, EvalOutput({}, d2, np.ones(2), fired, None))
    assert np.isnan(m2["freq/rank_spearman"])  # constant second density: no ranking
    evals = read_evals(tmp_path)
    assert [int(e["step"]) for e in evals] == [10, 20] and int(evals[0]["n_tokens"]) == 6
    assert evals[0]["single_latent"].tolist() == [0, 0]
    # a resumed arm picks up the density of the last eval at or before its checkpoint
    resumed = ArmProbes(tmp_path, {"frequency"}, cfg, None, set(), seed=0, n_eval_tokens=6)
    resumed.resume_at(15)
    m3, _ = resumed.run(20, 200, None, EvalOutput({}, np.array([0.9, 0.1]), np.ones(2), None, None))
    assert m3["freq/rank_spearman"] == pytest.approx(1.0)


@pytest.mark.skipif(sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2,
                    reason="helper processes run on Linux with 2+ cores")
def test_the_embedding_workers_import_umap_one_after_the_other(tmp_path, monkeypatch):
    """Two workers, whose imports take turns on the core the subject model's loading leaves idle."""
    log = tmp_path / "imports.txt"

    def slow_import():
        start = time.time()
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {start} {time.time()}\n")

    monkeypatch.setattr(embedding, "_import_umap", slow_import)  # before the fork: the workers inherit it
    workers = embedding_workers(2)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and len(log.read_text().splitlines() if log.exists() else []) < 2:
            time.sleep(0.05)
        (pid_a, start_a, end_a), (pid_b, start_b, end_b) = [map(float, line.split()) for line in
                                                          log.read_text().splitlines()]
        assert pid_a != pid_b and pid_a != os.getpid() and end_a <= start_b
    finally:
        workers.shutdown(wait=False, cancel_futures=True)


@pytest.mark.skipif(sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2,
                    reason="helper processes run on Linux with 2+ cores")
def test_umap_fits_prefetched_into_a_worker_give_the_embedding_fitted_here(tmp_path):
    w_dec = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    sae = SimpleNamespace(W_dec=torch.from_numpy(w_dec))
    density = np.full(64, 0.1)
    here = ArmProbes(tmp_path / "here", {"umap"}, ProbeConfig(), None, {5}, seed=3, n_eval_tokens=10)
    _, expected = here.run(5, 50, sae, EvalOutput({}, density, density, None, None))

    workers = embedding_workers()
    try:
        probes = ArmProbes(tmp_path / "worker", {"umap"}, ProbeConfig(), None, {5}, seed=3, n_eval_tokens=10,
                           workers=workers)
        probes.prefetch(4, sae)  # not a UMAP step: nothing started
        assert probes._fits == {}
        probes.prefetch(5, sae)
        worker = probes._fits[5]
        _, embedding = probes.run(5, 50, sae, EvalOutput({}, density, density, None, None))
        assert worker.done() and probes._fits == {}
        np.testing.assert_array_equal(embedding["xy"], expected["xy"])
        written = [read_evals(tmp_path / where)[0]["umap_xy"].tobytes() for where in ("worker", "here")]
        assert written[0] == written[1]

        # A worker killed mid-study (the OOM killer, say): this eval's fit and later ones are made here.
        for process in list(workers._processes.values()):
            process.kill()
        probes.prefetch(5, sae)
        _, embedding = probes.run(5, 50, sae, EvalOutput({}, density, density, None, None))
        np.testing.assert_array_equal(embedding["xy"], expected["xy"])
        probes.prefetch(5, sae)  # the pool is broken now: submitting fails, and run() fits here
        _, embedding = probes.run(5, 50, sae, EvalOutput({}, density, density, None, None))
        np.testing.assert_array_equal(embedding["xy"], expected["xy"])
    finally:
        workers.shutdown(wait=False, cancel_futures=True)
