"""Per-latent feature analysis (experiments/eval/features.py) on a tiny in-memory cache and a
hand-set SAE, against naive per-row references computed here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.data.activation_cache import ActivationCache
from experiments.data.synthetic import SyntheticTruth
from experiments.eval.concepts import ConceptSet
from experiments.eval.features import (
    FORMAT,
    FeatureAnalysis,
    analyse_features,
    analyse_synthetic_features,
    auto_labels,
    load_features,
    render_context,
    save_features,
    search_features,
    token_shares,
    top_tokens,
)
from models.sae.base import SAEConfig, build_sae

N_TRAIN_SEQ, N_EVAL_SEQ, SEQ_LEN, D_IN, D_SAE, VOCAB = 2, 5, 9, 4, 6, 12
PER_SEQ = SEQ_LEN - 1
N_EVAL = N_EVAL_SEQ * PER_SEQ  # 40 eval rows
SMALL = dict(top_n=5, window=3, n_quantile_bins=3, per_bin=2, hist_bins=4)


def make_cache(tmp_path: Path, seed: int = 0) -> ActivationCache:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(N_TRAIN_SEQ + N_EVAL_SEQ, SEQ_LEN)).astype(np.int32)
    tokens[:, 0] = 0  # BOS, which has no activation row
    acts = rng.standard_normal(((N_TRAIN_SEQ + N_EVAL_SEQ) * PER_SEQ, D_IN)).astype(np.float32)
    manifest = {"split": {"n_train_rows": N_TRAIN_SEQ * PER_SEQ, "n_train_seq": N_TRAIN_SEQ},
                "normalization": {"scale": 1.0}}
    return ActivationCache(tmp_path, manifest, acts, tokens)


def make_sae(d_sae: int = D_SAE, seed: int = 1):
    """ReLU SAE with random weights; latent 4 fires rarely (fewer rows than top_n), latent 5 never."""
    sae = build_sae(SAEConfig(architecture="relu", d_in=D_IN, d_sae=d_sae, k=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, d_sae, generator=g))
        sae.W_dec.copy_(torch.randn(d_sae, D_IN, generator=g))
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.1)
        b = torch.randn(d_sae, generator=g) * 0.1
        if d_sae == D_SAE:
            b[4], b[5] = -3.5, -100.0
        sae.b_enc.copy_(b)
    return sae


def naive_acts(sae, cache: ActivationCache, scale: float = 1.0) -> np.ndarray:
    """[N_EVAL, d_sae] float64: the ReLU encoder written out, on every eval row at once."""
    x = np.asarray(cache.acts[cache.n_train_rows:], dtype=np.float64) * scale
    p = {k: v.detach().double().numpy() for k, v in sae.state_dict().items()}
    return np.maximum((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0.0)


def token_at(cache: ActivationCache, row: int) -> int:
    """Token of eval row `row`, straight from the [n_seq, seq_len] token array."""
    return int(cache.tokens[N_TRAIN_SEQ + row // PER_SEQ, row % PER_SEQ + 1])


def naive_bin(a: float, top: float, n: int) -> int:
    for b in range(n):
        if a <= (b + 1) * top / n:
            return b
    return n - 1


@pytest.fixture
def cache(tmp_path):
    return make_cache(tmp_path)


def test_statistics_and_top_rows_equal_the_naive_answer_across_batch_boundaries(cache):
    sae = make_sae()
    f = naive_acts(sae, cache)
    got = analyse_features(sae, cache, 1.0, batch_size=7, **SMALL).arrays
    fired = f > 0
    assert 0 < fired[:, 4].sum() < SMALL["top_n"] and not fired[:, 5].any()  # the fixture's premise
    np.testing.assert_array_equal(got["n_fired"], fired.sum(0))
    np.testing.assert_allclose(got["density"], fired.mean(0))
    np.testing.assert_allclose(got["mean_act"], f.mean(0), rtol=1e-5)
    np.testing.assert_allclose(got["mean_firing_act"], f.sum(0) / np.maximum(fired.sum(0), 1), rtol=1e-5)
    np.testing.assert_allclose(got["max_act"], f.max(0), rtol=1e-5)
    for i in range(D_SAE):
        order = [r for r in np.argsort(-f[:, i], kind="stable") if f[r, i] > 0][:SMALL["top_n"]]
        pad = SMALL["top_n"] - len(order)
        np.testing.assert_array_equal(got["top_rows"][i], order + [-1] * pad)
        np.testing.assert_allclose(got["top_acts"][i], [f[r, i] for r in order] + [0.0] * pad, rtol=1e-5)
    one_batch = analyse_features(sae, cache, 1.0, batch_size=1000, **SMALL).arrays
    for name in ("top_rows", "top_acts", "n_fired", "max_act"):
        np.testing.assert_array_equal(one_batch[name], got[name])


def test_contexts_stay_inside_their_sequence_and_hold_the_encoded_activations(cache):
    sae = make_sae()
    f = naive_acts(sae, cache)
    w = SMALL["window"]
    got = analyse_features(sae, cache, 1.0, batch_size=7, **SMALL).arrays
    clipped_left = clipped_right = 0
    for name in ("top", "quantile"):
        rows = got[f"{name}_rows"].reshape(D_SAE, -1)
        toks = got[f"{name}_context_tokens"].reshape(D_SAE, rows.shape[1], -1)
        acts = got[f"{name}_context_acts"].reshape(D_SAE, rows.shape[1], -1)
        for i in range(D_SAE):
            for slot, r in enumerate(rows[i]):
                for j in range(2 * w + 1):
                    q = r + j - w
                    if r >= 0 and 0 <= q < N_EVAL and q // PER_SEQ == r // PER_SEQ:
                        assert toks[i, slot, j] == token_at(cache, q)
                        assert acts[i, slot, j] == pytest.approx(f[q, i], rel=1e-5, abs=1e-6)
                    else:
                        assert toks[i, slot, j] == -1 and acts[i, slot, j] == 0
                        clipped_left += r >= 0 and j < w
                        clipped_right += r >= 0 and j > w
                if r >= 0:
                    assert acts[i, slot, w] == pytest.approx(f[r, i], rel=1e-5)  # the centre is the row itself
    assert clipped_left and clipped_right  # both ends of a sequence were exercised


def test_histogram_and_quantile_samples_come_from_the_right_bins_deterministically(cache):
    sae = make_sae()
    f = naive_acts(sae, cache)
    Q, P, H = SMALL["n_quantile_bins"], SMALL["per_bin"], SMALL["hist_bins"]
    runs = [analyse_features(sae, cache, 1.0, batch_size=b, **SMALL).arrays for b in (7, 7, 13, 1000)]
    got = runs[0]
    crowded = 0
    for i in range(D_SAE):
        top = f[:, i].max()
        firing = np.flatnonzero(f[:, i] > 0)
        hist = np.bincount([naive_bin(f[r, i], top, H) for r in firing], minlength=H)
        np.testing.assert_array_equal(got["hist_counts"][i], hist)
        np.testing.assert_allclose(got["hist_edges"][i], np.linspace(0, top, H + 1), rtol=1e-5)
        for b in range(Q):
            members = [r for r in firing if naive_bin(f[r, i], top, Q) == b]
            rows = got["quantile_rows"][i, b]
            picked = rows[rows >= 0]
            assert len(picked) == min(P, len(members)) and len(set(picked)) == len(picked)
            assert set(picked) <= set(members)
            np.testing.assert_allclose(got["quantile_acts"][i, b][rows >= 0], f[picked, i], rtol=1e-5)
            crowded += len(members) > P
    assert crowded  # some bin had to choose among its rows
    for other in runs[1:]:  # same rows, run after run and whatever the batch size
        np.testing.assert_array_equal(other["quantile_rows"], got["quantile_rows"])
    reseeded = analyse_features(sae, cache, 1.0, batch_size=7, seed=1, **SMALL).arrays
    assert not np.array_equal(reseeded["quantile_rows"], got["quantile_rows"])


def test_equal_activations_and_bin_edges_follow_the_documented_conventions(tmp_path):
    """Latent 0 is x_0: activations 1, 2, 3, 4 and three 2s. Ties go to the lower row whatever the
    batching, and a bin holds its upper edge: (0, 1], (1, 2], (2, 3], (3, 4]."""
    cache = make_cache(tmp_path)
    cache.acts = np.zeros_like(cache.acts)
    cache.acts[cache.n_train_rows:cache.n_train_rows + 7, 0] = [1, 2, 3, 4, 2, 2, 0]
    sae = build_sae(SAEConfig(architecture="relu", d_in=D_IN, d_sae=D_IN, k=1))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.eye(D_IN))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    for batch_size in (1, 2, 3, 1000):
        got = analyse_features(sae, cache, 1.0, top_n=4, window=1, n_quantile_bins=2, per_bin=4, hist_bins=4,
                               batch_size=batch_size).arrays
        np.testing.assert_array_equal(got["top_rows"][0], [3, 2, 1, 4])
        np.testing.assert_array_equal(got["hist_counts"][0], [1, 3, 1, 1])
        assert sorted(got["quantile_rows"][0, 0]) == [0, 1, 4, 5]
        assert sorted(got["quantile_rows"][0, 1]) == [-1, -1, 2, 3]
        assert (got["top_rows"][1:] == -1).all() and (got["n_fired"][1:] == 0).all()


def test_logit_effects_and_neighbours_equal_the_hand_products(cache):
    sae = make_sae()
    unembed = torch.randn(D_IN, 15, generator=torch.Generator().manual_seed(3))
    scale = 2.0
    got = analyse_features(sae, cache, scale, unembed=unembed, batch_size=7, **SMALL).arrays
    w_dec = sae.W_dec.detach().double().numpy() / scale
    effect = w_dec @ unembed.double().numpy()
    for i in range(D_SAE):
        order = np.argsort(-effect[i])
        np.testing.assert_array_equal(got["logit_top_ids"][i], order[:10])
        np.testing.assert_allclose(got["logit_top_values"][i], effect[i, order[:10]], rtol=1e-5)
        np.testing.assert_array_equal(got["logit_bottom_ids"][i], order[::-1][:10])
        np.testing.assert_allclose(got["logit_bottom_values"][i], effect[i, order[::-1][:10]], rtol=1e-5)
        cos = [w_dec[i] @ w_dec[j] / np.linalg.norm(w_dec[i]) / np.linalg.norm(w_dec[j]) if j != i else -np.inf
               for j in range(D_SAE)]
        np.testing.assert_array_equal(got["neighbours"][i], np.argsort(cos)[::-1][:5])
        np.testing.assert_allclose(got["neighbour_cos"][i], np.sort(cos)[::-1][:5], rtol=1e-5)


def test_concept_f1_equals_a_hand_count(cache):
    sae = make_sae()
    f = naive_acts(sae, cache)
    concepts = ConceptSet(names=["category:low", "word:seven", "category:none"], kinds=["category", "word", "category"],
                          token_ids=[[1, 2, 3, 4], [7], [99]])
    got = analyse_features(sae, cache, 1.0, concepts=concepts, batch_size=7, **SMALL)
    assert got.concept_names == concepts.names
    members = [set(ids) for ids in concepts.token_ids]
    for i in range(D_SAE):
        fired = [r for r in range(N_EVAL) if f[r, i] > 0]
        f1 = []
        for c in members:
            pos = [r for r in range(N_EVAL) if token_at(cache, r) in c]
            tp = len([r for r in fired if token_at(cache, r) in c])
            f1.append(2 * tp / (len(fired) + len(pos)) if fired or pos else 0.0)
        best = int(np.argmax(f1))
        assert got.arrays["concept_f1"][i] == pytest.approx(f1[best])
        assert got.arrays["concept_index"][i] == (best if f1[best] > 0 else -1)
    assert got.arrays["concept_index"][5] == -1  # the dead latent overlaps nothing


def test_an_sae_fresh_from_training_and_its_saved_folded_form_give_the_same_analysis(cache):
    sae = make_sae()
    folded = make_sae()
    folded.load_state_dict(sae.folded_state_dict(2.0))
    unembed = torch.randn(D_IN, 15, generator=torch.Generator().manual_seed(3))
    a = analyse_features(sae, cache, 2.0, unembed=unembed, batch_size=7, **SMALL).arrays
    b = analyse_features(folded, cache, 1.0, unembed=unembed, batch_size=7, **SMALL).arrays
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_save_load_round_trip(cache, tmp_path):
    sae = make_sae()
    concepts = ConceptSet(names=["category:low"], kinds=["category"], token_ids=[[1, 2, 3]])
    analysis = analyse_features(sae, cache, 1.0, unembed=torch.randn(D_IN, 15), decode=lambda t: f" tok{t}",
                                concepts=concepts, batch_size=7, **SMALL)
    folder = save_features(analysis, tmp_path / "arm")
    assert sorted(p.name for p in folder.iterdir()) == ["features.json", "features.safetensors"]
    back = load_features(tmp_path / "arm")
    assert back.arrays.keys() == analysis.arrays.keys()
    for name, value in analysis.arrays.items():
        assert back.arrays[name].dtype == value.dtype
        np.testing.assert_array_equal(back.arrays[name], value)
    assert (back.labels, back.concept_names, back.settings) == (analysis.labels, analysis.concept_names,
                                                                analysis.settings)
    assert back.token_text == analysis.token_text and all(isinstance(k, int) for k in back.token_text)
    ids = np.concatenate([analysis.arrays[k].ravel() for k in ("top_context_tokens", "quantile_context_tokens",
                                                               "logit_top_ids", "logit_bottom_ids")])
    assert list(analysis.token_text) == sorted(set(ids[ids >= 0].tolist()))  # every shown token, and no other
    meta = json.loads((folder / "features.json").read_text())
    assert set(meta["format"]) == set(analysis.arrays) and all(meta["format"][k] == FORMAT[k] for k in meta["format"])
    meta["version"] = 99
    (folder / "features.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 99"):
        load_features(tmp_path / "arm")


TEXT = {1: " the", 2: " a", 3: " an", 4: " once", 5: " upon", 6: " time", 7: " Cat", 8: " category", 9: " cat"}


def contexts(rows: list[list[int]]) -> np.ndarray:
    return np.array(rows, dtype=np.int32)


def test_token_shares_sum_each_rows_weight_by_token():
    tokens = np.array([[7, 3, 7, 5], [2, 2, 2, 2], [4, 9, 4, 1], [-1, 6, 6, 8]])
    weight = np.array([[1.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 0.0]])
    ids, shares = token_shares(tokens, weight)
    # row 0: 3 and 7 tie at 2 of 4 (lower id first), 5 has no weight; row 1: nothing fired; row 2: 4
    # holds 2 of 4, then 1 and 9 at 1 of 4 each; row 3: -1 is a token like any other (2 of 4)
    np.testing.assert_array_equal(ids, [[3, 7, -1, -1], [-1, -1, -1, -1], [4, 1, 9, -1], [-1, 6, -1, -1]])
    np.testing.assert_allclose(shares, [[0.5, 0.5, 0, 0], [0, 0, 0, 0], [0.5, 0.25, 0.25, 0], [0.5, 0.5, 0, 0]])
    empty_ids, empty_shares = token_shares(tokens, np.zeros_like(weight))
    assert (empty_ids == -1).all() and (empty_shares == 0).all()


def test_auto_label_is_a_function_of_the_top_contexts():
    def label(rows: list[list[int]], acts: list[float]) -> str:
        return auto_labels(contexts([rows]), np.array([acts]), TEXT.__getitem__)[0]

    # window 1: [previous, firing, next]; weights are the activations
    assert label([[4, 1, 5], [5, 1, 6]], [2.0, 1.0]) == "the"
    mixed = [[4, 1, 5], [4, 2, 5], [5, 3, 6], [5, 1, 6], [6, 6, 6]]
    assert label(mixed, [3.0, 2.0, 2.0, 1.0, 0.5]) == "the / a / an"  # time's share < 0.1
    after = [[4, 1, 5], [4, 2, 5], [4, 3, 6], [4, 5, 6], [-1, -1, -1]]
    assert label(after, [1.0, 1.0, 1.0, 1.0, 0.0]) == "after 'once'"
    assert label([[-1, -1, -1]], [0.0]) == ""  # never fired
    # A constant previous token does not override a dominant firing token.
    assert label([[4, 1, 5], [4, 1, 6], [4, 2, 6]], [1.0, 1.0, 1.0]) == "the / a"
    # Many latents at once give what each gives alone.
    batch = [[[4, 1, 5], [5, 1, 6], [6, 6, 6]], [[4, 1, 5], [4, 2, 5], [4, 3, 6]], [[-1, -1, -1]] * 3]
    acts = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert auto_labels(contexts(batch), np.array(acts), TEXT.__getitem__) == [label(b, a) for b, a in zip(batch, acts)]


def hand_analysis() -> FeatureAnalysis:
    """Five latents, window 1, three top contexts each (-1 / 0 pad)."""
    tokens = contexts([
        [[1, 9, 2], [1, 9, 3], [-1, -1, -1]],  # 0: labelled "cat"
        [[9, 1, 2], [1, 2, 3], [2, 3, 1]],  # 1: "cat" only as a neighbour, in one of three contexts
        [[1, 9, 2], [1, 5, 2], [-1, -1, -1]],  # 2: labelled "cat / upon"
        [[1, 7, 2], [1, 7, 3], [1, 2, 3]],  # 3: fires on "Cat" in two of three
        [[1, 8, 2], [1, 8, 3], [8, 1, 2]],  # 4: "category" only: no whole-word match
    ]).reshape(5, 3, 3)
    acts = np.array([[2, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=np.float32)
    arrays = {"top_context_tokens": tokens, "top_acts": acts, "density": np.array([0.3, 0.5, 0.1, 0.2, 0.4])}
    return FeatureAnalysis(arrays, {}, ["cat", "the", "cat / upon", "Cat", "category"], token_text=TEXT)


def test_search_ranks_labels_then_firing_tokens_then_contexts():
    hits = search_features(hand_analysis(), "CAT")
    assert [h[0] for h in hits] == [0, 3, 2, 1]  # labels by density (0.3, 0.2, 0.1), then latent 1
    assert hits[0][1] == pytest.approx(0.3) and "label" in hits[0][2]
    hand = hand_analysis()
    hand.labels = ["", "", "", "", ""]
    hits = search_features(hand, "cat")
    assert [h[0] for h in hits] == [0, 3, 2, 1]  # firing token: 2/2, 2/3, 1/2; then context 1/3
    assert [h[1] for h in hits] == pytest.approx([1.0, 2 / 3, 0.5, 1 / 3])
    assert search_features(hand, "category")[0][0] == 4 and search_features(hand, "dog") == []
    assert search_features(hand, "cat") == hits  # deterministic


def test_top_tokens_weigh_firing_tokens_by_activation():
    hand = hand_analysis()
    # latent 1 fires on " the", " a", " an" with weight 1 each: ties go to the lower id; latent 4 on
    # " category" twice and " the" once
    assert top_tokens(hand, np.array([0, 1, 4, 1]), n=2) == [["cat"], ["the", "a"], ["category", "the"], ["the", "a"]]
    assert top_tokens(hand, np.array([2]))[0] == ["upon", "cat"]  # a tie: " upon" (5) before " cat" (9)
    assert top_tokens(FeatureAnalysis({}, {}, [""]), np.array([0])) == [[]]  # a synthetic arm has no contexts


def test_render_context_marks_the_firing_token_and_escapes_markdown():
    decode = {1: " the", 2: " *cat*", 3: "\n", 4: " sat", 5: "<|bos|>"}.__getitem__
    out = render_context(np.array([-1, 1, 2, 3, 4, 5]), np.array([0, 0, 2.0, 0, 0.5, 0]), 2, decode)
    assert out == " the **⟦\\*cat\\*⟧**↵ ⟦sat⟧\\<|bos|\\>"  # a table escapes its own "|"


def test_synthetic_precision_recall_against_the_best_matching_true_feature(tmp_path):
    rng = np.random.default_rng(0)
    dictionary = np.eye(3, D_IN, dtype=np.float32)  # true features along axes 0, 1, 2
    sae = build_sae(SAEConfig(architecture="relu", d_in=D_IN, d_sae=4, k=1))
    with torch.no_grad():  # latent i fires where x_i > 0; decoders point near features 1, 0, 2 and off-axis
        sae.W_enc.copy_(torch.eye(D_IN))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.tensor([[0.1, 2.0, 0, 0], [-1.0, 0, 0.2, 0], [0, 0.3, 0.9, 0.1], [0, 0, 0, 1.0]]))
    n_eval, n_train = 30, 10
    acts = rng.standard_normal((n_train + n_eval, D_IN)).astype(np.float32)
    acts[n_train:, 2] = -1.0  # latent 2 never fires on the eval rows
    cache = ActivationCache(tmp_path, {"split": {"n_train_rows": n_train}, "normalization": {"scale": 1.0}},
                            acts, None)
    active = torch.from_numpy(rng.random((n_eval, 3)) < 0.5)
    active[:, 2] = False  # feature 2 never fires: latent 2's recall is undefined too
    truth = SyntheticTruth(dictionary, np.full(3, 0.5), ["independent"] * 3, active, threshold=0.9)
    got = analyse_synthetic_features(sae, cache, 1.0, truth, hist_bins=4, batch_size=7)
    a = got.arrays
    w = sae.W_dec.detach().double().numpy()
    cos = np.abs(w @ dictionary.T.astype(np.float64)) / np.linalg.norm(w, axis=1)[:, None]
    np.testing.assert_array_equal(a["true_feature"], cos.argmax(1))
    np.testing.assert_array_equal(a["true_feature"][:3], [1, 0, 2])
    np.testing.assert_allclose(a["true_cos"], cos.max(1), rtol=1e-6)
    fired = acts[n_train:] > 0
    for i in range(2):
        j = a["true_feature"][i]
        both = sum(1 for r in range(n_eval) if fired[r, i] and active[r, j])
        assert a["firing_precision"][i] == pytest.approx(both / fired[:, i].sum())
        assert a["firing_recall"][i] == pytest.approx(both / active[:, j].sum().item())
    assert np.isnan(a["firing_precision"][2]) and np.isnan(a["firing_recall"][2])
    np.testing.assert_allclose(a["density"], fired.mean(0))
    np.testing.assert_array_equal(a["hist_counts"].sum(1), fired.sum(0))
    assert got.labels[:2] == ["true feature 1", "true feature 0"] and got.labels[3] == ""  # latent 3: cos < 0.9
    assert [h[0] for h in search_features(got, "0")] == [1]  # labels only: a synthetic analysis has no contexts


def test_the_docs_describe_every_stored_array():
    from experiments.eval.features import FORMAT

    page = (Path(__file__).resolve().parents[1] / "docs" / "features.md").read_text()
    for name, description in FORMAT.items():
        assert f"| `{name}` | {description.replace('|', chr(92) + '|')} |" in page, name


def test_a_context_for_the_terminal_has_no_markdown_and_fits_its_width():
    from experiments.studies.features import terminal_context

    # escapes and bold undone; short enough to stay whole
    assert terminal_context(r"Once \<|bos|\> a **⟦cat⟧** ⟦sat⟧\_down", 60) == "Once <|bos|> a ⟦cat⟧ ⟦sat⟧_down"
    # cut around the centre token, a third of the width at least before it, marked where cut
    long = "a" * 50 + "**⟦cat⟧**" + "b" * 50
    assert terminal_context(long, 30) == "…" + "a" * 10 + "⟦cat⟧" + "b" * 15 + "…"
    # near the start: the width goes after it
    assert terminal_context("ab**⟦cat⟧**" + "c" * 40, 20) == "ab⟦cat⟧" + "c" * 13 + "…"
    assert terminal_context("", 10) == ""
