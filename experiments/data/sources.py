"""Transformer activation source: load the subject model, build token sequences, harvest a hook.

The subject model is a TransformerLens 4 `TransformerBridge`: `tinylm` (bundled, trained on first
use) via `boot_native`, anything else via `boot_transformers`.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from config.schema import DataConfig, UsageError

CHUNK_SEQUENCES = 256  # sequences per cache chunk: the most an interrupted harvest repeats


@dataclass
class SubjectModel:
    name: str
    bridge: object  # TransformerBridge
    tokenizer: object
    bos_token_id: int
    n_ctx: int
    n_layers: int
    fingerprint: str  # changes whenever the weights would give other activations

    def text(self, tokens) -> str:
        """Tokens' text for a reader: control characters other than newline and tab (tinylm's
        byte-level vocabulary holds them) as their Unicode pictures, e.g. NUL as ␀, so that no
        Markdown table or web page receives a raw control byte."""
        return self.tokenizer.decode([int(t) for t in tokens]).translate(CONTROL_PICTURES)

    def token_text(self, token: int) -> str:
        return self.text([token])


CONTROL_PICTURES = {**{c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"}, 0x7F: 0x2421}


def _hf_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _boot_hf(name: str, device: str) -> SubjectModel:
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401  (registers boot_transformers)

    if not Path(name).is_dir():
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError

        try:
            cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
        except HFValidationError:  # e.g. a mistyped local path: no folder here, and no possible Hub name
            raise UsageError(f"--model-name {name!r} is neither a local folder nor a Hugging Face model name") from None
        if cached:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # use the cache; no network round trips
        elif os.environ.get("HF_HUB_OFFLINE") == "1" or not _hf_reachable():
            raise UsageError(
                f"model {name!r} is not in the Hugging Face cache and the Hub cannot be reached; download it "
                f"on a connected machine into the cache (HF_HOME) and set HF_HUB_OFFLINE=1, pass a local "
                f"folder as --model-name, or use --model-name tinylm")
    try:
        bridge = TransformerBridge.boot_transformers(name, device=device)
    except (OSError, ValueError) as err:
        raise UsageError(f"could not load model {name!r}: {str(err).splitlines()[0]}") from None
    tok = bridge.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    cfg = bridge.cfg
    return SubjectModel(name, bridge, tok, int(bos), int(cfg.n_ctx), int(cfg.n_layers), f"hf:{name}")


def load_subject_model(data: DataConfig, models_dir: Path, device: str = "cpu", progress: bool = True,
                       before_step: Callable[[], None] = lambda: None) -> SubjectModel:
    """The subject model; tinylm is trained first where it is not cached (`before_step` before each of
    its steps: what it raises stops the training)."""
    if data.model_name != "tinylm":
        return _boot_hf(data.model_name, device)
    from models.tinylm import load_or_train_tinylm
    from models.tinylm.model import configured_spec

    try:
        spec = configured_spec()
    except ValueError as err:
        raise UsageError(str(err)) from None
    lm = load_or_train_tinylm(models_dir, spec, progress=progress, before_step=before_step)
    bridge = lm.bridge.to(device) if device != "cpu" else lm.bridge
    fingerprint = "tinylm:" + hashlib.sha256(
        json.dumps(lm.meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return SubjectModel("tinylm", bridge, lm.tokenizer, int(lm.tokenizer.bos_token_id),
                        lm.spec.n_ctx, lm.spec.n_layers, fingerprint)


def resolve_hooks(model: SubjectModel, data: DataConfig) -> list[str]:
    """The hook names to read, checked against the model's hooks and layers."""
    if data.hook_point is None:
        beyond = [layer for layer in data.layers(model.n_layers) if layer >= model.n_layers]
        if beyond:
            raise UsageError(f"--layer {beyond[0]} is beyond the model: {model.name} has layers "
                             f"0..{model.n_layers - 1}")
    names = data.hook_names(model.n_layers)
    valid = set(model.bridge.hook_dict)
    unknown = [name for name in names if name not in valid]
    if unknown:
        resid = sorted(h for h in valid if h.startswith("blocks.0.hook_") or not h.startswith("blocks."))
        raise UsageError(f"unknown hook point {unknown[0]!r} for {model.name}; valid names include: "
                         f"{', '.join(resid)} (and the same for blocks.1..{model.n_layers - 1})")
    if data.seq_len > model.n_ctx:
        raise UsageError(f"--seq-len {data.seq_len} exceeds the context length of {model.name} ({model.n_ctx})")
    return names


def _dataset_texts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--dataset {path!r} is not a readable file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--dataset {path!r} cannot be read as UTF-8 text: {err}") from None
    if p.suffix == ".jsonl":
        try:
            texts = [json.loads(line)["text"] for line in lines if line.strip()]
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"--dataset {path!r}: every JSONL line needs a string field 'text'") from None
    else:
        texts = [line for line in lines if line.strip()]
    if not texts:
        raise UsageError(f"--dataset {path!r} contains no text")
    return texts


def dataset_fingerprint(data: DataConfig) -> str:
    if data.dataset is None:
        return "tinylm-corpus"
    return "sha256:" + hashlib.sha256(Path(data.dataset).read_bytes()).hexdigest()


def token_sequences(model: SubjectModel, data: DataConfig, seed: int) -> torch.Tensor:
    """[n_samples, seq_len] token ids: an explicit BOS, then a window of the document stream.

    Documents are concatenated with BOS separators (as tinylm was trained) and cut into
    consecutive windows, so every token of the text is used once.
    """
    n_tokens = data.n_samples * (data.seq_len - 1)
    if data.dataset is None:
        from models.tinylm import harvest_texts

        # Stories average well over 30 tokens; draw enough in one go and stop when full.
        texts = harvest_texts(n_tokens // 30 + 16, seed)
    else:
        texts = _dataset_texts(data.dataset)
    stream: list[int] = []
    for ids in model.tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(model.bos_token_id)
        if len(stream) >= n_tokens:
            break
    if len(stream) < n_tokens:
        if data.dataset is None:
            raise RuntimeError("bundled corpus produced too few tokens")  # would be a bug, not bad input
        raise UsageError(f"--dataset has {len(stream):,} tokens; --n-samples {data.n_samples} x "
                         f"(--seq-len {data.seq_len} - 1) needs {n_tokens:,}")
    body = torch.tensor(stream[:n_tokens], dtype=torch.long).view(data.n_samples, data.seq_len - 1)
    bos = torch.full((data.n_samples, 1), model.bos_token_id, dtype=torch.long)
    return torch.cat([bos, body], dim=1)


def harvester(model: SubjectModel, hook_name: str, device: str):
    """tokens [B, T] -> activations [B, T, d_in] at `hook_name`, on the CPU (see hook_harvester)."""
    run = hook_harvester(model, [hook_name], device)
    return lambda tokens: run(tokens)[hook_name]


def hook_harvester(model: SubjectModel, hook_names: list[str], device: str):
    """tokens [B, T] -> {hook name: activations [B, T, d_in]} at every one of `hook_names`, on the
    CPU, from one forward pass.

    Gives exactly what `bridge.run_with_cache(tokens, names_filter=hook_names, stop_at_layer=...)`
    gives (tests/test_harvest.py checks it is bit-identical), without run_with_cache's per-call
    bookkeeping (alias maps, filter sweeps over every hook point, signature inspection, the cache
    object): one plain forward with a hook on each hook point, which keeps the activation and,
    once the last of them has fired, ends the forward there, so nothing after it runs (the rest of
    the block, and for the last layer's hooks the final norm and unembedding). The forward's
    arguments are the ones run_with_cache passes (`output_attentions` where it would), so Hugging
    Face models compute the same activations too."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    bridge = model.bridge
    layers = [int(name.split(".")[1]) if name.startswith("blocks.") else None for name in hook_names]
    last = None if None in layers else max(layers)
    stop = last + 1 if last is not None and last + 1 < model.n_layers else None
    points = {name: bridge.hook_dict[name] for name in hook_names}
    for name, point in points.items():
        bridge._check_hook_fireable(name, point.name or name)
        gated = bridge._gated_hook_reason(point.name or name)
        if gated is not None:
            raise UsageError(f"hook point {name!r} is switched off in {model.name} (TransformerLens {gated})")
    kwargs = {"stop_at_layer": stop} if stop is not None else {}
    if bridge.adapter.supports_hf_output_attentions:  # as run_with_cache does: it decides the attention kernel
        underlying = getattr(bridge._driver, "underlying_model", None)
        params = inspect.signature(underlying.forward).parameters if underlying is not None else None
        if params is None or "output_attentions" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs["output_attentions"] = True
    captured: dict[str, torch.Tensor] = {}

    def capture_at(name: str):
        def capture(tensor, *, hook):
            captured[name] = (tensor[0] if isinstance(tensor, tuple) else tensor).detach()
            if len(captured) == len(points):
                raise StopAtLayerException(tensor)  # the bridge's own early exit: its forward returns here
        return capture

    def run(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        captured.clear()
        handles = {name: point.add_hook(capture_at(name)) for name, point in points.items()}
        try:
            bridge.forward(tokens.to(device), **kwargs)  # as run_with_cache calls it
        finally:
            for name, handle in handles.items():
                handle.hook.remove()
                points[name].fwd_hooks[:] = [h for h in points[name].fwd_hooks if h is not handle]
        missing = [name for name in hook_names if name not in captured]
        if missing:
            raise RuntimeError(f"hook point {missing[0]!r} did not fire in {model.name}'s forward")
        return {name: captured.pop(name).cpu() for name in hook_names}

    return run


class SharedForward:
    """One forward pass per batch for the caches of several hook points: each cache's writer asks
    for its hook's activations of a batch, and the first asking runs the model for all of them
    (the caches are filled batch by batch side by side, so the others ask for the same batch next)."""

    def __init__(self, run):
        self.run = run
        self.key: tuple | None = None
        self.out: dict[str, torch.Tensor] = {}

    def at(self, hook_name: str):
        def harvest(tokens: torch.Tensor) -> torch.Tensor:
            key = (tokens.data_ptr(), tuple(tokens.shape))  # a batch is a slice of the one token tensor
            if key != self.key:
                self.out, self.key = self.run(tokens), key
            return self.out[hook_name]
        return harvest


class HarvestWriter:
    """Fills an activation cache from a transformer: token sequences in, hook activations out
    (experiments.data.activation_cache.CacheWriter). The BOS position of each sequence is not stored."""

    unit = "chunk"

    def __init__(self, sequences: torch.Tensor, d_in: int, harvest, batch_size: int, eval_fraction: float):
        self.sequences, self.d_in, self.harvest, self.batch_size = sequences, d_in, harvest, batch_size
        self.n_seq, seq_len = sequences.shape
        self.per_seq = seq_len - 1
        self.n_rows = self.n_seq * self.per_seq
        self.n_chunks = -(-self.n_seq // CHUNK_SEQUENCES)
        self.n_eval_seq = max(1, int(self.n_seq * eval_fraction))

    def split(self) -> dict:
        n_train_seq = self.n_seq - self.n_eval_seq
        return {"n_train_seq": n_train_seq, "n_eval_seq": self.n_eval_seq, "n_train_rows": n_train_seq * self.per_seq,
                "n_eval_rows": self.n_eval_seq * self.per_seq}

    def begin(self, path: Path) -> None:
        np.save(path / "tokens.npy", self.sequences.numpy().astype(np.int32))

    def fill(self, chunk: int, acts: np.ndarray, path: Path) -> Iterator[None]:
        start = chunk * CHUNK_SEQUENCES
        stop = min(start + CHUNK_SEQUENCES, self.n_seq)
        per = self.per_seq
        for b in range(start, stop, self.batch_size):
            e = min(b + self.batch_size, stop)
            out = self.harvest(self.sequences[b:e])[:, 1:, :].float()  # drop the BOS position
            # One strided copy straight into the memmap's rows (a view of them as [B, T - 1, d_in]).
            np.copyto(acts[b * per:e * per].reshape(e - b, per, self.d_in), out.numpy())
            yield

    def finish(self, path: Path) -> list[str]:
        return ["tokens.npy"]
