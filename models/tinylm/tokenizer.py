"""Byte-level BPE tokenizer for tinylm, trained on its own corpus."""

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from models.tinylm.corpus import CONCEPTS

BOS = "<|bos|>"  # id 0; doubles as eos and pad


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Train, save to `out_dir` and return the tokenizer reloaded from there.

    No post-processor: the tokenizer never adds BOS itself, callers prepend it.
    The reload matters: TransformerBridge.boot_native rejects tokenizers that
    were only built in memory.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(BOS) == 0
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS)
    out_dir = Path(out_dir)
    wrapped.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def concept_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, list[int]]:
    """Category -> ids of its " word" tokens (leading space, as mid-sentence).

    Raises if a word does not encode to exactly one token: the concept study
    relies on one token per word.
    """
    out: dict[str, list[int]] = {}
    for cat, words in CONCEPTS.items():
        ids = []
        for w in words:
            enc = tokenizer.encode(" " + w, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"concept word {w!r} encodes to {len(enc)} tokens: {enc}")
            ids.append(enc[0])
        out[cat] = ids
    return out
