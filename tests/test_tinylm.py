import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import models.tinylm.model as tinylm_model
from models.tinylm import (
    CONCEPTS,
    TinyLM,
    TinyLMSpec,
    concept_token_ids,
    generate_stories,
    harvest_texts,
    load_or_train_tinylm,
    word_concepts,
)
from models.tinylm.corpus import validation_stories
from models.tinylm.model import SPEC_ENV, cache_name, configured_spec, pack_rows

# Small enough to train in about a second; for determinism and caching behaviour.
TINY = TinyLMSpec(
    d_model=32, n_layers=1, n_heads=2, d_mlp=64, n_ctx=64, vocab_size=512,
    n_train_stories=300, n_val_stories=20, train_steps=20, batch_size=8,
)


@pytest.fixture
def count_trainings(monkeypatch: pytest.MonkeyPatch) -> list[TinyLMSpec]:
    """Record every call of the training function."""
    calls: list[TinyLMSpec] = []
    real_train = tinylm_model._train

    def spy(spec, *args, **kwargs):
        calls.append(spec)
        return real_train(spec, *args, **kwargs)

    monkeypatch.setattr(tinylm_model, "_train", spy)
    return calls


# ---- corpus ----

def test_stories_deterministic_per_seed_and_differ_across_seeds() -> None:
    a = generate_stories(200, seed=0)
    assert a == generate_stories(200, seed=0)
    assert generate_stories(50, seed=0) == a[:50]  # a prefix of the same stream
    assert set(a).isdisjoint(generate_stories(200, seed=1))


def test_story_shape() -> None:
    for story in generate_stories(300, seed=3):
        n_sentences = story.count(".")
        assert 4 <= n_sentences <= 8, story
        assert story[0].isupper() and story.endswith((".", '"'))


def test_harvest_and_validation_disjoint_from_training() -> None:
    train = set(generate_stories(20_000, seed=0))
    assert train.isdisjoint(harvest_texts(2_000, seed=0))
    assert train.isdisjoint(validation_stories(2_000, seed=0))
    assert harvest_texts(100, seed=0) == harvest_texts(100, seed=0)


def test_concept_vocabularies() -> None:
    words = [w for ws in CONCEPTS.values() for w in ws]
    assert len(words) == len(set(words)), "a word is in two categories"
    assert {"names", "animals", "colours", "places", "foods", "emotions", "numbers", "actions",
            "days", "weather", "tools"} <= set(CONCEPTS)
    for cat, ws in CONCEPTS.items():
        assert 7 <= len(ws) <= 20, cat
        for w in ws:
            assert w.isalpha()
            assert w[0].isupper() if cat in ("names", "days") else w.islower(), w
    assert word_concepts()["cat"] == "animals" and word_concepts()["Alice"] == "names"
    assert len(word_concepts()) == len(words)


def test_every_concept_word_is_used() -> None:
    text = " ".join(generate_stories(2_000, seed=0))
    for w in word_concepts():
        assert f" {w}" in text, w


# ---- tokenizer + model on the default spec (session fixture) ----

def test_tokenizer_conventions(tinylm: TinyLM) -> None:
    tok = tinylm.tokenizer
    assert tok.bos_token == tok.eos_token == tok.pad_token == "<|bos|>"
    assert tok.bos_token_id == 0
    ids = tok("Tom saw a cat.")["input_ids"]
    assert ids[0] != 0 and 0 not in ids  # never adds BOS itself
    assert tok.decode(ids) == "Tom saw a cat."


def test_every_concept_word_is_one_token(tinylm: TinyLM) -> None:
    ids = concept_token_ids(tinylm.tokenizer)
    assert set(ids) == set(CONCEPTS)
    flat = [i for v in ids.values() for i in v]
    assert len(flat) == len(set(flat)) == len(word_concepts())
    for cat, words in CONCEPTS.items():
        assert [tinylm.tokenizer.decode([i]) for i in ids[cat]] == [" " + w for w in words]


def test_cache_layout(tinylm_models_dir: Path, tinylm: TinyLM) -> None:
    cache = tinylm_models_dir / cache_name(tinylm.spec)
    assert cache_name(tinylm.spec) in {p.name for p in tinylm_models_dir.iterdir()}
    assert not [p for p in tinylm_models_dir.iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert {p.name for p in cache.iterdir()} == {"config.json", "model.safetensors", "tokenizer", "meta.json"}
    config = json.loads((cache / "config.json").read_text())
    assert config["spec"] == json.loads((cache / "meta.json").read_text())["spec"]
    assert config["bridge"]["d_vocab"] == len(tinylm.tokenizer) <= tinylm.spec.vocab_size
    assert set(load_file(str(cache / "model.safetensors"))) == set(tinylm.bridge.state_dict())
    assert not tinylm.bridge.training


def test_val_loss_far_below_unigram_entropy(tinylm: TinyLM) -> None:
    val_loss, unigram = tinylm.meta["val_loss"], tinylm.meta["unigram_entropy"]
    print(f"val_loss={val_loss:.3f} unigram_entropy={unigram:.3f} train_seconds={tinylm.meta['train_seconds']:.0f}")
    assert val_loss < unigram / 3


def test_reloaded_model_reproduces_val_loss(tinylm: TinyLM) -> None:
    """Weights survive the safetensors round trip: the bridge gives the recorded val loss."""
    rows = pack_rows(validation_stories(tinylm.spec.n_val_stories, tinylm.spec.seed), tinylm.tokenizer,
                     tinylm.spec.n_ctx)
    total = 0.0
    with torch.no_grad():
        for chunk in rows.split(64):
            logits = tinylm.bridge(chunk)
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten()).item() * len(chunk)
    assert total / len(rows) == pytest.approx(tinylm.meta["val_loss"], abs=1e-4)


def test_bridge_tokenizer_prepends_bos(tinylm: TinyLM) -> None:
    ids = tinylm.tokenizer("Tom saw a cat.")["input_ids"]
    assert tinylm.bridge.to_tokens("Tom saw a cat.")[0].tolist() == [0, *ids]


def test_repeated_names_are_predicted_by_copying(tinylm: TinyLM) -> None:
    """On held-out stories, names already mentioned are far easier than first mentions."""
    tok = tinylm.tokenizer
    name_ids = set(concept_token_ids(tok)["names"])
    first, repeat = [], []
    with torch.no_grad():
        for story in harvest_texts(200, seed=0):
            ids = torch.tensor([[tok.bos_token_id, *tok.encode(story)]])
            losses = F.cross_entropy(tinylm.bridge(ids)[0, :-1], ids[0, 1:], reduction="none")
            seen: set[int] = set()
            for pos, t in enumerate(ids[0, 1:].tolist()):
                if t in name_ids:
                    (repeat if t in seen else first).append(losses[pos].item())
                    seen.add(t)
    first_loss, repeat_loss = sum(first) / len(first), sum(repeat) / len(repeat)
    chance = math.log(len(name_ids))
    print(f"name loss: first mention {first_loss:.3f}, repeated {repeat_loss:.3f}, chance {chance:.3f}")
    assert first_loss > chance - 0.5  # a new name really is unpredictable
    assert repeat_loss < first_loss - 1.0


# ---- training determinism and the cache (tiny spec) ----

def test_same_spec_gives_bit_identical_weights(tmp_path: Path) -> None:
    a = load_or_train_tinylm(tmp_path / "a", TINY, progress=False)
    b = load_or_train_tinylm(tmp_path / "b", TINY, progress=False)
    wa, wb = a.bridge.state_dict(), b.bridge.state_dict()
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.meta["val_loss"] == b.meta["val_loss"]
    c = load_or_train_tinylm(tmp_path / "c", replace(TINY, seed=1), progress=False)
    assert not torch.equal(wa["embed.weight"], c.bridge.state_dict()["embed.weight"])


def test_training_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_or_train_tinylm(tmp_path, TINY, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_cache_is_reused(tmp_path: Path, count_trainings: list[TinyLMSpec]) -> None:
    first = load_or_train_tinylm(tmp_path, TINY, progress=False)
    second = load_or_train_tinylm(tmp_path, TINY, progress=False)
    assert count_trainings == [TINY]
    assert second.meta == first.meta
    w1, w2 = first.bridge.state_dict(), second.bridge.state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_retrains_when_spec_or_corpus_changes(tmp_path: Path, count_trainings: list[TinyLMSpec]) -> None:
    load_or_train_tinylm(tmp_path, TINY, progress=False)
    other = replace(TINY, train_steps=21)
    assert load_or_train_tinylm(tmp_path, other, progress=False).spec == other
    assert count_trainings == [TINY, other]
    assert json.loads((tmp_path / cache_name(other) / "meta.json").read_text())["spec"]["train_steps"] == 21

    # A grammar change shows up as a different hash of the first stories.
    meta_path = tmp_path / cache_name(other) / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "corpus_probe_hash": "stale"}))
    load_or_train_tinylm(tmp_path, other, progress=False)
    assert count_trainings == [TINY, other, other]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache_name(TINY), cache_name(other)])


@pytest.mark.parametrize("missing", ["meta.json", "model.safetensors", "tokenizer"])
def test_partial_cache_is_not_used(tmp_path: Path, count_trainings: list[TinyLMSpec], missing: str) -> None:
    load_or_train_tinylm(tmp_path, TINY, progress=False)
    target = tmp_path / cache_name(TINY) / missing
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    lm = load_or_train_tinylm(tmp_path, TINY, progress=False)
    assert len(count_trainings) == 2
    assert (tmp_path / cache_name(TINY) / missing).exists() and lm.meta["val_loss"] > 0


def test_interrupted_training_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_or_train_tinylm(tmp_path, TINY, progress=False)
    before = json.loads((tmp_path / cache_name(TINY) / "meta.json").read_text())

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tinylm_model, "save_file", interrupt)  # dies mid-way through writing
    meta_path = tmp_path / cache_name(TINY) / "meta.json"
    meta_path.write_text(json.dumps({**before, "corpus_probe_hash": "stale"}))  # so that it retrains over it
    with pytest.raises(KeyboardInterrupt):
        load_or_train_tinylm(tmp_path, TINY, progress=False)
    # The old cache is untouched, and no temp dir is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache_name(TINY)]
    meta_path.write_text(json.dumps(before))
    monkeypatch.undo()
    assert load_or_train_tinylm(tmp_path, TINY, progress=False).meta == before


def test_spec_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SPEC_ENV, raising=False)
    assert configured_spec() == TinyLMSpec() and cache_name(TinyLMSpec()) == "tinylm"
    monkeypatch.setenv(SPEC_ENV, '{"n_train_stories": 4000, "train_steps": 150}')
    spec = configured_spec()
    assert spec == replace(TinyLMSpec(), n_train_stories=4000, train_steps=150)
    # another spec has a folder of its own, so it never replaces the real model's cache
    assert cache_name(spec).startswith("tinylm-") and cache_name(spec) != cache_name(replace(spec, seed=1))
    for bad in ("[1]", "{", '{"layers": 3}'):
        monkeypatch.setenv(SPEC_ENV, bad)
        with pytest.raises(ValueError, match=f"{SPEC_ENV}=.* is not a JSON object of TinyLMSpec fields"):
            configured_spec()


def test_what_before_step_raises_stops_training_and_leaves_nothing(tmp_path: Path) -> None:
    calls = []

    def stop_at_the_third_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("asked to stop")

    with pytest.raises(RuntimeError, match="asked to stop"):
        load_or_train_tinylm(tmp_path, TINY, progress=False, before_step=stop_at_the_third_step)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_a_signal_while_a_study_trains_tinylm_stops_the_study(tmp_path: Path) -> None:
    """Ctrl-C on first use stops at the next step (it was ignored until the ~2 minutes of training ended)."""
    from config.cli import parse_args
    from experiments.studies.sources import TransformerSource
    from experiments.train.trainer import StopFlag, StopRequested

    cfg = parse_args(["--study", "activations", "--checkpoint-dir", str(tmp_path), "--no-progress"])
    stop = StopFlag()
    stop.requested = True  # as the SIGINT handler sets it
    with pytest.raises(StopRequested, match="while training tinylm"):
        TransformerSource().open(cfg, tmp_path, stop)
    assert list((tmp_path / "models").iterdir()) == []
