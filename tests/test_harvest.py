"""The harvest path: `harvester` gives exactly what `run_with_cache` gives, and fills the cache with it."""
import numpy as np
import pytest
import torch

from config.schema import DataConfig, UsageError
from experiments.data import activation_cache as ac
from experiments.data.sources import (HarvestWriter, SharedForward, SubjectModel, harvester, hook_harvester,
                                      load_subject_model, token_sequences)


@pytest.fixture(scope="module")
def model(tinylm) -> SubjectModel:
    return SubjectModel("tinylm", tinylm.bridge, tinylm.tokenizer, int(tinylm.tokenizer.bos_token_id),
                        tinylm.spec.n_ctx, tinylm.spec.n_layers, "tinylm:test")


@pytest.fixture(scope="module")
def sequences(model) -> torch.Tensor:
    return token_sequences(model, DataConfig(n_samples=24, seq_len=64), seed=0)


def run_with_cache(model: SubjectModel, hook: str, tokens: torch.Tensor) -> torch.Tensor:
    """The harvest as it was: run_with_cache, stopping after the hook's block unless that is the last."""
    layer = int(hook.split(".")[1]) if hook.startswith("blocks.") else None
    stop = layer + 1 if layer is not None and layer + 1 < model.n_layers else None
    return model.bridge.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop)[1][hook]


def n_hooks(model: SubjectModel) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.bridge.hook_dict.values())


# stop_at_layer=1 (layer 0) and no stop (layer 1, the last); residual, MLP, attention and 4-d hooks
@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.hook_resid_mid",
                                  "blocks.1.hook_mlp_out", "blocks.0.hook_attn_out", "blocks.0.attn.hook_z",
                                  "hook_embed"])
def test_harvester_is_bit_identical_to_run_with_cache(model, sequences, hook):
    harvest = harvester(model, hook, "cpu")
    before = n_hooks(model)
    with torch.inference_mode():  # as build_or_open runs it
        got, want = harvest(sequences), run_with_cache(model, hook, sequences)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(harvest(sequences[:1]), want[:1])  # outside inference mode too (the study's shape probe)
    assert n_hooks(model) == before  # its hook is gone after each call


@pytest.mark.parametrize("hooks", [["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"],
                                   ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_pre"]])
def test_one_forward_gives_every_hook_point_what_run_with_cache_gives(model, sequences, hooks):
    """Several hook points, listed in any order, from one forward pass: each bit-identical to the
    one-hook harvest, and the forward ends once the last of them has fired."""
    harvest = hook_harvester(model, hooks, "cpu")
    before = n_hooks(model)
    with torch.inference_mode():
        got = harvest(sequences)
        assert list(got) == hooks
        for hook in hooks:
            assert torch.equal(got[hook], run_with_cache(model, hook, sequences)), hook
    assert n_hooks(model) == before


def test_the_caches_of_several_hook_points_share_one_forward_per_batch(model, sequences, tmp_path):
    """Two caches built side by side from a SharedForward: the model runs once per batch, and each
    cache holds what a cache of its hook point alone holds."""
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    run = hook_harvester(model, hooks, "cpu")
    calls = []
    forward = SharedForward(lambda tokens: calls.append(len(tokens)) or run(tokens))
    jobs = [({"name": hook}, HarvestWriter(sequences, 128, forward.at(hook), 10, 0.25)) for hook in hooks]
    caches = ac.build_or_open_all(tmp_path, jobs)
    assert calls == [10, 10, 4]  # 24 sequences in batches of 10, each run once for both caches
    for hook, cache in zip(hooks, caches):
        alone = ac.build_or_open(tmp_path / "alone", {"name": hook},
                                 HarvestWriter(sequences, 128, harvester(model, hook, "cpu"), 10, 0.25))
        assert np.array_equal(np.asarray(cache.acts), np.asarray(alone.acts)), hook
        assert cache.manifest["normalization"] == alone.manifest["normalization"]


def test_harvester_removes_its_hook_when_the_forward_fails(model):
    harvest = harvester(model, "blocks.0.hook_resid_post", "cpu")
    before = n_hooks(model)
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        harvest(torch.zeros(1, model.n_ctx + 1, dtype=torch.long))
    assert n_hooks(model) == before


def test_a_switched_off_hook_point_is_a_usage_error(model):
    with pytest.raises(UsageError, match="blocks.0.hook_mlp_in"):
        harvester(model, "blocks.0.hook_mlp_in", "cpu")


def test_fill_writes_run_with_cache_rows_without_bos(model, sequences, tmp_path):
    """Batches of 10 over 24 sequences: a short last batch, rows copied straight into the memmap."""
    writer = HarvestWriter(sequences, 128, harvester(model, "blocks.0.hook_resid_post", "cpu"), 10, 0.25)
    cache = ac.build_or_open(tmp_path, {"name": "tinylm-fill"}, writer)
    with torch.inference_mode():
        want = run_with_cache(model, "blocks.0.hook_resid_post", sequences)[:, 1:].reshape(-1, 128)
    assert cache.acts.dtype == np.float32 and cache.acts.shape == (24 * 63, 128)
    assert np.array_equal(np.asarray(cache.acts), want.numpy())


def test_hugging_face_models_take_the_same_path(tmp_path):
    """A tiny random GPT-2 in a local folder, booted with boot_transformers like --model-name gpt2."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<bos>": 0, **{chr(c): i + 1 for i, c in enumerate(range(ord("a"), ord("z") + 1))}, " ": 27}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<bos>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<bos>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2-tiny")
    tok.save_pretrained(tmp_path / "gpt2-tiny")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat\nthe dog ate a big bone\n" * 20)
    data = DataConfig(model_name=str(tmp_path / "gpt2-tiny"), n_samples=6, seq_len=16, dataset=str(text))
    hf = load_subject_model(data, tmp_path / "models", progress=False)
    sequences = token_sequences(hf, data, seed=0)
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"):
        with torch.inference_mode():
            assert torch.equal(harvester(hf, hook, "cpu")(sequences), run_with_cache(hf, hook, sequences)), hook


def test_a_tokens_text_shows_control_characters_as_pictures():
    """tinylm's byte-level vocabulary holds tokens such as NUL; a report or web page must not get
    the raw byte (newline and tab stay: the renderers show them as ↵ and ⇥)."""
    class Tokenizer:
        def decode(self, ids):
            return {0: "\x00", 1: " a\nb\t", 2: "\x1b[1m", 3: "\x7f"}[ids[0]]

    model = SubjectModel("stub", None, Tokenizer(), 0, 8, 1, "stub")
    assert [model.token_text(t) for t in range(4)] == ["␀", " a\nb\t", "␛[1m", "␡"]
