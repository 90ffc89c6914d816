"""The activation cache: layout, split, normalisation, resumable chunks, corruption, spec changes."""
import json

import numpy as np
import pytest
import torch

from experiments.data import activation_cache as ac
from experiments.data.sources import HarvestWriter


def fake_harvest(calls):
    """Activations that encode (token, position) so every row can be checked by hand."""
    def run(tokens):
        calls.append(tokens.shape[0])
        b, t = tokens.shape
        pos = torch.arange(t).expand(b, t)
        return torch.stack([tokens.float(), pos.float(), torch.ones(b, t)], dim=-1)
    return run


def build(root, seqs, calls, spec=None, eval_fraction=0.25):
    return ac.build_or_open(root, spec or {"name": "toy"}, HarvestWriter(seqs, 3, fake_harvest(calls), 4, eval_fraction))


@pytest.fixture
def seqs():
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.zeros(600, 1, dtype=torch.long), torch.randint(1, 100, (600, 5), generator=g)], 1)


def test_layout_split_and_normalisation(tmp_path, seqs):
    calls = []
    cache = build(tmp_path, seqs, calls)
    assert cache.acts.shape == (600 * 5, 3) and cache.tokens_per_seq == 5
    # row r is sequence r // 5 at position r % 5 + 1: BOS is never stored
    r = 7 * 5 + 2
    assert cache.acts[r].tolist() == [float(seqs[7, 3]), 3.0, 1.0]
    assert cache.manifest["split"] == {"n_train_seq": 450, "n_eval_seq": 150, "n_train_rows": 2250,
                                      "n_eval_rows": 750}
    assert cache.n_train_rows == 450 * 5 and cache.n_eval_rows == 150 * 5
    train = np.asarray(cache.acts[: cache.n_train_rows], dtype=np.float64)
    msn = (train ** 2).sum(1).mean()
    assert cache.manifest["normalization"]["mean_sq_norm"] == pytest.approx(msn)
    scaled = train * cache.norm_scale(True)
    assert (scaled ** 2).sum(1).mean() == pytest.approx(3.0)  # mean squared norm = d_in
    assert cache.norm_scale(False) == 1.0
    ev = torch.cat(list(cache.eval_batches(100)))
    assert torch.equal(ev, torch.from_numpy(np.array(cache.acts[cache.n_train_rows:])))
    assert torch.equal(cache.eval_tokens(2), seqs[450:452])


def test_reused_when_spec_matches_and_rebuilt_when_not(tmp_path, seqs):
    calls = []
    first = build(tmp_path, seqs, calls)
    n = len(calls)
    again = build(tmp_path, seqs, calls)
    assert len(calls) == n and again.path == first.path  # no harvest the second time
    other = build(tmp_path, seqs, calls, spec={"name": "other"})
    assert other.path != first.path and len(calls) > n


def test_interrupted_harvest_resumes_from_last_chunk(tmp_path, seqs):
    calls = []
    # 256 sequences per chunk in batches of 4: chunk 0 (64 batches) completes, chunk 1 is interrupted
    budget = {"batches": 64 + 10}

    def failing(tokens):
        if budget["batches"] == 0:
            raise KeyboardInterrupt
        budget["batches"] -= 1
        return fake_harvest(calls)(tokens)

    with pytest.raises(KeyboardInterrupt):
        ac.build_or_open(tmp_path, {"name": "toy"}, HarvestWriter(seqs, 3, failing, 4, 0.25))
    path = ac.cache_dir(tmp_path, {"name": "toy"})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["chunks_done"] == 1 and not manifest["complete"]
    calls.clear()
    cache = build(tmp_path, seqs, calls)
    assert sum(calls) == 600 - 256  # only the missing chunks are harvested
    reference = build(tmp_path / "ref", seqs, [])
    assert np.array_equal(np.asarray(cache.acts), np.asarray(reference.acts))


def test_a_stop_request_ends_the_build_between_chunks_and_it_resumes(tmp_path, seqs):
    class Flag:  # set as chunk 0 finishes, as a signal handler would be
        requested = False

    calls = []

    def harvest(tokens):
        if sum(calls) + len(tokens) >= 256:
            Flag.requested = True
        return fake_harvest(calls)(tokens)

    with pytest.raises(ac.BuildInterrupted, match="after chunk 1 of 3"):
        ac.build_or_open(tmp_path, {"name": "toy"}, HarvestWriter(seqs, 3, harvest, 4, 0.25), stop=Flag)
    assert sum(calls) == 256  # it finished the chunk it was in, and started no other
    manifest = json.loads((ac.cache_dir(tmp_path, {"name": "toy"}) / "manifest.json").read_text())
    assert manifest["chunks_done"] == 1 and not manifest["complete"]
    cache = build(tmp_path, seqs, calls)
    assert np.array_equal(np.asarray(cache.acts), np.asarray(build(tmp_path / "ref", seqs, []).acts))


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, seqs, capsys):
    calls = []
    cache = build(tmp_path, seqs, calls)
    path = cache.path
    del cache
    with open(path / "acts.npy", "r+b") as f:
        f.seek(-5, 2)
        f.write(b"\xff\xff\xff\xff\xff")
    calls.clear()
    rebuilt = build(tmp_path, seqs, calls)
    assert "corrupt" in capsys.readouterr().out
    assert sum(calls) == 600
    assert np.array_equal(np.asarray(rebuilt.acts), np.asarray(build(tmp_path / "ref", seqs, []).acts))


def test_open_rejects_a_different_spec(tmp_path, seqs):
    cache = build(tmp_path, seqs, [])
    with pytest.raises(ac.CacheCorrupt):
        ac.open_cache(cache.path, {"name": "different"})


def test_caches_built_side_by_side_resume_each_from_its_own_last_chunk(tmp_path, seqs):
    """Two caches filled chunk by chunk together; one already has a chunk more than the other when
    the build stops (as after a kill between the two writes). The resumed build fills only what
    each lacks and gives what two separate builds give."""
    class Flag:
        requested = False

    first, second = [], []
    jobs = lambda: [({"name": "a"}, HarvestWriter(seqs, 3, fake_harvest(first), 4, 0.25)),  # noqa: E731
                    ({"name": "b"}, HarvestWriter(seqs * 2, 3, fake_harvest(second), 4, 0.25))]
    with pytest.raises(ac.BuildInterrupted):  # cache a: chunk 1 of 3 done
        ac.build_or_open(tmp_path, {"name": "a"}, HarvestWriter(seqs, 3, fake_harvest(first), 4, 0.25),
                         stop=type("Now", (), {"requested": True}))
    first.clear()

    def stop_after_chunk_1(tokens):
        Flag.requested = True
        return fake_harvest(second)(tokens)

    with pytest.raises(ac.BuildInterrupted, match="after chunk 1 of 3"):
        ac.build_or_open_all(tmp_path, [jobs()[0], ({"name": "b"}, HarvestWriter(seqs * 2, 3, stop_after_chunk_1, 4,
                                                                                 0.25))], stop=Flag)
    assert first == [] and sum(second) == 256  # a had chunk 1 already; b wrote its chunk 1 only
    Flag.requested = False
    a, b = ac.build_or_open_all(tmp_path, jobs())
    assert sum(first) == 600 - 256 and sum(second) == 256 + 600 - 256
    assert np.array_equal(np.asarray(a.acts), np.asarray(build(tmp_path / "ref", seqs, []).acts))
    b_alone = ac.build_or_open(tmp_path / "ref", {"name": "b"}, HarvestWriter(seqs * 2, 3, fake_harvest([]), 4, 0.25))
    assert np.array_equal(np.asarray(b.acts), np.asarray(b_alone.acts))
