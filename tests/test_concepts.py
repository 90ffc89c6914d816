"""Concept vocabularies and latent-vs-concept scores (experiments/eval/concepts.py): known answers,
a naive reference implementation, and every bad-YAML case."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from config.schema import UsageError
from experiments.eval.concepts import (
    ConceptSet,
    _column_counts,
    score_concepts,
    tinylm_concepts,
    yaml_concepts,
)
from models.tinylm.corpus import CONCEPTS

ENGLISH = Path(__file__).resolve().parents[1] / "config" / "concepts" / "english.yaml"


def _bool(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _fired_from_sets(n: int, d: int, fires: dict[int, list[int]]) -> torch.Tensor:
    """[n, d] bool with latent j firing on the tokens fires[j]."""
    out = torch.zeros(n, d, dtype=torch.bool)
    for j, toks in fires.items():
        out[toks, j] = True
    return out


def _twice(fired: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same tokens as fit and as held-out part, so held-out scores equal fit scores."""
    n = fired.shape[0]
    fit = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    return torch.cat([fired, fired]), torch.cat([labels, labels]), fit


# --- known answers -----------------------------------------------------------------------------


def test_concept_split_over_three_latents() -> None:
    # Concept = tokens 0..5 of 12. Latents 0, 1, 2 each fire on two of them (one latent per
    # word); latent 3 fires on 0, 1, 2 and on all six negatives.
    fired = _fired_from_sets(12, 5, {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: [0, 1, 2, 6, 7, 8, 9, 10, 11]})
    labels = torch.zeros(12, 1, dtype=torch.bool)
    labels[:6] = True
    r = score_concepts(*_twice(fired, labels), probe_k=4)
    # Single latent: TP 2, FP 0, FN 4 -> 4/8; latent 3: 6/15. Ties go to the lowest index.
    assert r["single_f1"][0] == pytest.approx(0.5)
    assert r["single_latent"][0] == 0
    # Union {0}: 0.5 -> {0,1}: 8/10 (adding 3 instead gives 6/15) -> {0,1,2}: 1.0, then TP = P.
    assert r["probe_f1"][0] == pytest.approx(1.0)
    assert r["probe_latents"][0].tolist() == [0, 1, 2, -1]
    assert r["single_latent"].dtype == np.int64 and r["probe_latents"].dtype == np.int64
    assert r["single_f1"].dtype == np.float64 and r["probe_f1"].dtype == np.float64


def test_noisy_latent_is_not_added_but_a_precise_one_is() -> None:
    # Concept = tokens 0..5. A fires on 0..4 (10/11). B covers the last positive but brings six
    # false positives (union 12/18 < 10/11); C covers it with one (union 12/13 > 10/11).
    A, B, C = 0, 1, 2
    fired = _fired_from_sets(12, 3, {A: [0, 1, 2, 3, 4], B: [5, 6, 7, 8, 9, 10, 11], C: [5, 6]})
    labels = torch.zeros(12, 1, dtype=torch.bool)
    labels[:6] = True
    r = score_concepts(*_twice(fired, labels), probe_k=3)
    assert r["single_latent"][0] == A and r["single_f1"][0] == pytest.approx(10 / 11)
    assert r["probe_latents"][0].tolist() == [A, C, -1]
    assert r["probe_f1"][0] == pytest.approx(12 / 13)
    # probe_k = 1 is the single latent.
    r1 = score_concepts(*_twice(fired, labels), probe_k=1)
    assert r1["probe_latents"][0].tolist() == [A] and r1["probe_f1"][0] == pytest.approx(10 / 11)


def test_latents_are_chosen_on_fit_tokens_and_scored_on_the_others() -> None:
    # Interleaved split: even tokens fit, odd tokens held out. Concept = tokens 0..7.
    # Fit (even): latent 0 fires on all four positives (F1 1), latent 1 on two of them (4/6).
    # Held (odd): latent 0 fires on one positive and three negatives; latent 1 on all positives.
    fired = _fired_from_sets(16, 2, {0: [0, 2, 4, 6, 1, 9, 11, 13], 1: [0, 2, 1, 3, 5, 7]})
    labels = torch.zeros(16, 1, dtype=torch.bool)
    labels[:8] = True
    fit = torch.arange(16) % 2 == 0
    r = score_concepts(fired, labels, fit, probe_k=2)
    assert r["single_latent"][0] == 0  # the fit choice, though latent 1 is better held out
    # Held-out latent 0: TP 1, FP 3, FN 3 -> 2/8.
    assert r["single_f1"][0] == pytest.approx(0.25)
    # The fit union is complete after latent 0 (TP = P), so the probe is {0} too.
    assert r["probe_latents"][0].tolist() == [0, -1]
    assert r["probe_f1"][0] == pytest.approx(0.25)


def test_concepts_without_positives_get_nan_and_never_firing_ones_zero() -> None:
    n = 8
    fit = torch.arange(n) < 4
    labels = torch.zeros(n, 4, dtype=torch.bool)
    labels[[0, 1], 0] = True  # fit positives only
    labels[[5, 6], 1] = True  # held-out positives only
    # concept 2: no positive at all
    labels[[2, 7], 3] = True  # positives on both sides, but no latent fires on them
    fired = _fired_from_sets(n, 2, {0: [0, 1, 5, 6], 1: [3, 4]})
    r = score_concepts(fired, labels, fit, probe_k=3)
    for c in (0, 1, 2):
        assert math.isnan(r["single_f1"][c]) and math.isnan(r["probe_f1"][c])
        assert r["single_latent"][c] == -1 and (r["probe_latents"][c] == -1).all()
    assert r["single_f1"][3] == 0.0 and r["probe_f1"][3] == 0.0
    assert r["single_latent"][3] == -1 and (r["probe_latents"][3] == -1).all()


def test_bad_arguments_raise() -> None:
    fired, labels = torch.zeros(4, 2, dtype=torch.bool), torch.zeros(4, 1, dtype=torch.bool)
    fit = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError):
        score_concepts(fired, labels, fit, probe_k=0)
    with pytest.raises(ValueError):
        score_concepts(fired, labels[:3], fit, probe_k=1)


def test_column_counts_past_lane_capacity() -> None:
    # 8 latents share a uint64 word whose byte lanes hold 255: 1000 rows must not carry over.
    rng = np.random.default_rng(0)
    x = rng.random((1500, 24)) < 0.5
    x[:, 3] = True
    rows = np.sort(rng.choice(1500, 1000, replace=False))
    assert np.array_equal(_column_counts(x, rows), np.count_nonzero(x[rows], axis=0))
    assert _column_counts(x, rows)[3] == 1000
    assert _column_counts(x, rows[:0]).tolist() == [0] * 24
    odd = np.ascontiguousarray(x[:, :13])  # width not a multiple of 8: the plain path
    assert np.array_equal(_column_counts(odd, rows), np.count_nonzero(odd[rows], axis=0))


# --- a naive reference -------------------------------------------------------------------------


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _union_f1(fired: np.ndarray, lab: np.ndarray, rows: list[int], latents: list[int]) -> float:
    tp = fp = fn = 0
    for t in rows:
        pred = any(fired[t, j] for j in latents)
        tp += pred and lab[t]
        fp += pred and not lab[t]
        fn += (not pred) and lab[t]
    return _f1(tp, fp, fn)


def _reference(fired: np.ndarray, labels: np.ndarray, fit: np.ndarray, k: int) -> dict[str, list]:
    """Plain loops: best single latent and the greedy union, both chosen on fit rows."""
    n, d = fired.shape
    fit_rows = [t for t in range(n) if fit[t]]
    held_rows = [t for t in range(n) if not fit[t]]
    out: dict[str, list] = {"single_f1": [], "single_latent": [], "probe_f1": [], "probe_latents": []}
    for c in range(labels.shape[1]):
        lab = labels[:, c]
        if not any(lab[t] for t in fit_rows) or not any(lab[t] for t in held_rows):
            out["single_f1"].append(math.nan), out["probe_f1"].append(math.nan)
            out["single_latent"].append(-1), out["probe_latents"].append([-1] * k)
            continue
        best_j, best = -1, 0.0
        for j in range(d):
            f = _union_f1(fired, lab, fit_rows, [j])
            if f > best:
                best_j, best = j, f
        if best_j < 0:
            out["single_f1"].append(0.0), out["probe_f1"].append(0.0)
            out["single_latent"].append(-1), out["probe_latents"].append([-1] * k)
            continue
        chosen = [best_j]
        while len(chosen) < k:
            add, add_f = -1, best
            for j in range(d):
                if j not in chosen:
                    f = _union_f1(fired, lab, fit_rows, chosen + [j])
                    if f > add_f:
                        add, add_f = j, f
            if add < 0:
                break
            chosen.append(add)
            best = add_f
        out["single_latent"].append(best_j)
        out["single_f1"].append(_union_f1(fired, lab, held_rows, [best_j]))
        out["probe_latents"].append(chosen + [-1] * (k - len(chosen)))
        out["probe_f1"].append(_union_f1(fired, lab, held_rows, chosen))
    return out


@pytest.mark.parametrize("density", [0.05, 0.3, 0.7])
@pytest.mark.parametrize("d", [16, 13])  # 13: the width the uint64 lane path cannot take
def test_agrees_with_naive_reference(density: float, d: int) -> None:
    rng = np.random.default_rng(int(density * 100) + d)
    for _ in range(3):
        n, n_concepts, k = 120, 5, 4
        fired = rng.random((n, d)) < density
        # Concepts of varied sizes, correlated with a few latents so the greedy has work to do.
        labels = np.zeros((n, n_concepts), bool)
        for c in range(n_concepts):
            labels[:, c] = rng.random(n) < (0.05 + 0.1 * c)
            fired[labels[:, c], c] |= rng.random(int(labels[:, c].sum())) < 0.6
            fired[labels[:, c], c + 5] |= rng.random(int(labels[:, c].sum())) < 0.4
        labels[:, 0] &= np.arange(n) < 60  # only fit positives (fit is the first half below)
        fit = np.arange(n) < 60
        ref = _reference(fired, labels, fit, k)
        got = score_concepts(torch.from_numpy(fired), torch.from_numpy(labels), torch.from_numpy(fit), k)
        assert got["single_latent"].tolist() == ref["single_latent"]
        assert got["probe_latents"].tolist() == ref["probe_latents"]
        np.testing.assert_array_equal(got["single_f1"], np.array(ref["single_f1"]))
        np.testing.assert_array_equal(got["probe_f1"], np.array(ref["probe_f1"]))


def test_greedy_sits_between_single_latent_and_best_subset() -> None:
    # On fit tokens (held-out copy = fit copy): single <= greedy <= best subset of size <= k.
    rng = np.random.default_rng(7)
    n, d, k = 60, 8, 3
    for _ in range(5):
        fired = rng.random((n, d)) < 0.25
        lab = rng.random(n) < 0.3
        fired[lab, :3] |= rng.random((int(lab.sum()), 3)) < 0.5
        r = score_concepts(*_twice(torch.from_numpy(fired), torch.from_numpy(lab[:, None])), probe_k=k)
        rows = list(range(n))
        best = max(_union_f1(fired, lab, rows, list(s))
                   for size in range(1, k + 1) for s in itertools.combinations(range(d), size))
        assert r["single_f1"][0] <= r["probe_f1"][0] + 1e-12
        assert r["probe_f1"][0] <= best + 1e-12


# --- ConceptSet.labels ---------------------------------------------------------------------------


def test_labels_match_a_loop() -> None:
    cs = ConceptSet(names=["category:a", "word:x", "word:y", "category:b"],
                    kinds=["category", "word", "word", "category"], token_ids=[[3, 5, 9], [3], [5], [9, 12]])
    tokens = torch.tensor([0, 3, 5, 9, 12, 13, 40, -1, 3, 7])
    got = cs.labels(tokens)
    assert got.shape == (10, 4) and got.dtype == torch.bool
    for i, t in enumerate(tokens.tolist()):
        for c, ids in enumerate(cs.token_ids):
            assert bool(got[i, c]) == (t in ids)
    assert cs.labels(tokens.int()).equal(got)  # int32 ids work too


# --- vocabularies --------------------------------------------------------------------------------


def test_tinylm_concepts(tinylm) -> None:
    tok = tinylm.tokenizer
    cs = tinylm_concepts(tok)
    n_cat = len(CONCEPTS)
    assert n_cat == 12
    assert cs.names[:n_cat] == [f"category:{c}" for c in CONCEPTS]
    assert cs.kinds == ["category"] * n_cat + ["word"] * (len(cs.names) - n_cat)
    words = list(dict.fromkeys(w for ws in CONCEPTS.values() for w in ws))
    assert cs.names[n_cat:] == [f"word:{w}" for w in words]
    assert cs.skipped == []
    word_id = {}
    for name, ids in zip(cs.names[n_cat:], cs.token_ids[n_cat:]):
        w = name.removeprefix("word:")
        assert len(ids) == 1 and tok.encode(" " + w, add_special_tokens=False) == ids
        assert tok.decode(ids) == " " + w
        word_id[w] = ids[0]
    for cat, ids in zip(CONCEPTS, cs.token_ids[:n_cat]):
        assert ids == list(dict.fromkeys(word_id[w] for w in CONCEPTS[cat]))


class FakeTokenizer:
    """Whole strings in `vocab` are one token; anything else is several (one per character, plus
    an end marker so that unknown single characters are not one token either)."""

    def __init__(self, vocab: list[str]) -> None:
        self.ids = {s: i for i, s in enumerate(vocab)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        if text in self.ids:
            return [self.ids[text]]
        return [1000 + ord(ch) for ch in text] + [999]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "concepts.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_concepts_forms_skips_and_drops(tmp_path: Path) -> None:
    tok = FakeTokenizer([" cat", "Cat", " Dog", " red", "red", "x", " blue"])
    path = _write(tmp_path, "animals: [cat, dog, zebra]\ncolours: [red, blue]\nrare: [zebra, okapi]\n"
                            "pets: [cat]\nletters: [x]\n")
    cs = yaml_concepts(path, tok)
    ids = tok.ids
    assert cs.names == ["category:animals", "category:colours", "category:pets", "category:letters",
                        "word:cat", "word:dog", "word:red", "word:blue", "word:x"]
    assert cs.kinds == ["category"] * 4 + ["word"] * 5
    assert cs.token_ids == [
        [ids[" cat"], ids["Cat"], ids[" Dog"]],  # every single-token form; zebra skipped
        [ids[" red"], ids["red"], ids[" blue"]],
        [ids[" cat"], ids["Cat"]],  # a word in two categories: one word concept
        [ids["x"]],  # "x" and "X" forms: only "x" is a token
        [ids[" cat"], ids["Cat"]], [ids[" Dog"]], [ids[" red"], ids["red"]], [ids[" blue"]], [ids["x"]],
    ]
    assert cs.skipped == ["zebra", "okapi"]  # "rare" had no usable word: dropped


@pytest.mark.parametrize("text", [
    "a: [b\n",  # not YAML
    "- cat\n- dog\n",  # a list, not a mapping
    "just words\n",  # a scalar
    "",  # empty
    "# only a comment\n",  # empty
    "{}\n",  # empty mapping
    "animals: cat\n",  # value not a list
    "animals: []\n",  # empty list
    "numbers: [1, 2]\n",  # entries YAML reads as ints
    "animals: [cat, null]\n",
    "animals: [cat, '  ']\n",
    "1: [cat]\n",  # category name not a string
    "animals: [zebra, okapi]\n",  # no word is a token
])
def test_bad_yaml_files_raise_one_line(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(UsageError) as err:
        yaml_concepts(path, FakeTokenizer([" cat"]))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg


def test_unreadable_files_raise_one_line(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.yaml", tmp_path):
        with pytest.raises(UsageError) as err:
            yaml_concepts(path, FakeTokenizer([" cat"]))
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00cat")
    with pytest.raises(UsageError, match="cannot read"):
        yaml_concepts(binary, FakeTokenizer([" cat"]))


def test_english_yaml(tinylm) -> None:
    data = yaml.safe_load(ENGLISH.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    for cat, words in data.items():
        assert isinstance(words, list) and words and all(isinstance(w, str) and w for w in words), cat
    for cat in ("colours", "numbers", "months", "days", "animals", "countries", "punctuation",
                "family", "body", "foods"):
        assert cat in data
    assert "twenty" in data["numbers"] and "ninety" in data["tens"]
    assert {".", ",", "!", "?", ";", ":", "(", ")", '"'} <= set(data["punctuation"])
    # A tokenizer that knows every word keeps every category and skips nothing.
    every = FakeTokenizer([" " + w for ws in data.values() for w in ws])
    full = yaml_concepts(ENGLISH, every)
    assert full.skipped == [] and full.names[:len(data)] == [f"category:{c}" for c in data]
    # tinylm's small vocabulary skips many words but still yields concepts.
    small = yaml_concepts(ENGLISH, tinylm.tokenizer)
    assert small.skipped and "category:animals" in small.names and "word:cat" in small.names
