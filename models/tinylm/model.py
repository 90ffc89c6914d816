"""tinylm: a small TransformerLens-native LM trained on first use on its own story corpus.

Cache layout under `models_dir / "tinylm"` (another spec: `models_dir / "tinylm-<spec hash>"`, so
a test or experimental spec never replaces the real model):
    config.json        bridge config fields + spec
    model.safetensors  bridge state_dict (TL-style keys)
    tokenizer/         PreTrainedTokenizerFast folder
    meta.json          spec, corpus_hash, corpus_probe_hash, val_loss, unigram_entropy, train_seconds, ...
The cache is reused only when the stored spec and the hash of the corpus's first stories
match; it is built in a temp dir and renamed into place, so it is never half-written.

The environment variable TINYLM_SPEC (a JSON object of TinyLMSpec fields, e.g.
'{"n_train_stories": 4000, "train_steps": 150}') replaces the default spec wherever tinylm is
loaded, child processes included: the test suite trains its subject model that way in seconds.
"""

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from models.tinylm.corpus import generate_stories, validation_stories
from models.tinylm.tokenizer import train_tokenizer

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

_FILES = ("config.json", "model.safetensors", "tokenizer", "meta.json")
_WARMUP_FRAC = 0.05
_MIN_LR_FRAC = 0.1
_WEIGHT_DECAY = 0.1
_GRAD_CLIP = 1.0
CORPUS_PROBE_STORIES = 500  # stories hashed to check that a cached model matches today's grammar


@dataclass(frozen=True)
class TinyLMSpec:
    """Everything that determines the trained model; the defaults are the real model."""

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    vocab_size: int = 2048  # BPE upper bound; the corpus saturates well below it
    n_train_stories: int = 20_000
    n_val_stories: int = 500
    train_steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


SPEC_ENV = "TINYLM_SPEC"


def configured_spec() -> TinyLMSpec:
    """The default spec with the fields in $TINYLM_SPEC (a JSON object) replaced."""
    text = os.environ.get(SPEC_ENV, "").strip()
    if not text:
        return TinyLMSpec()
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise TypeError("not a JSON object")
        return TinyLMSpec(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{SPEC_ENV}={text!r} is not a JSON object of TinyLMSpec fields ({e})") from None


def cache_name(spec: TinyLMSpec) -> str:
    if spec == TinyLMSpec():
        return "tinylm"
    return "tinylm-" + hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class TinyLM:
    bridge: "TransformerBridge"
    tokenizer: PreTrainedTokenizerFast  # does not prepend BOS; bridge.tokenizer does
    spec: TinyLMSpec
    meta: dict[str, Any]  # val_loss, unigram_entropy, corpus_hash, train_seconds, ...


def _bridge_config(spec: TinyLMSpec, d_vocab: int) -> dict[str, Any]:
    return dict(
        d_model=spec.d_model, n_layers=spec.n_layers, n_heads=spec.n_heads,
        d_head=spec.d_model // spec.n_heads, d_mlp=spec.d_mlp, n_ctx=spec.n_ctx,
        d_vocab=d_vocab, act_fn="gelu_new", normalization_type="LN", seed=spec.seed,
    )


def _boot(bridge_cfg: dict[str, Any], tokenizer: PreTrainedTokenizerFast) -> "TransformerBridge":
    # Imported lazily: the transformer_lens import is slow and only needed here.
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_native(TransformerBridgeConfig(**bridge_cfg), tokenizer)


def _corpus_hash(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def pack_rows(texts: list[str], tokenizer: PreTrainedTokenizerFast, n_ctx: int) -> torch.Tensor:
    """Concatenate stories with BOS separators and cut into [rows, n_ctx], each row starting with BOS."""
    bos = tokenizer.bos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.append(bos)
        stream.extend(ids)
    body = n_ctx - 1
    n_rows = len(stream) // body
    rows = torch.tensor(stream[: n_rows * body], dtype=torch.long).view(n_rows, body)
    return torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), rows], dim=1)


def _next_token_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    logits = model(rows)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten())


def _unigram_entropy(rows: torch.Tensor, d_vocab: int) -> float:
    """Entropy (nats) of the target-token distribution: the loss of the best context-free predictor."""
    p = torch.bincount(rows[:, 1:].flatten(), minlength=d_vocab).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def _lr_at(step: int, spec: TinyLMSpec) -> float:
    warmup = max(1, int(_WARMUP_FRAC * spec.train_steps))
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, spec.train_steps - warmup)
    return spec.lr * (_MIN_LR_FRAC + (1 - _MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * t)))


def _train(spec: TinyLMSpec, texts: list[str], out_dir: Path, progress: bool,
           before_step: Callable[[], None]) -> dict[str, Any]:
    """Train tokenizer + model into `out_dir` (config, weights, tokenizer); return the metrics."""
    t0 = time.time()
    tokenizer = train_tokenizer(texts, spec.vocab_size, out_dir / "tokenizer")
    train_rows = pack_rows(texts, tokenizer, spec.n_ctx)
    val_rows = pack_rows(validation_stories(spec.n_val_stories, spec.seed), tokenizer, spec.n_ctx)
    bridge_cfg = _bridge_config(spec, len(tokenizer))
    bridge = _boot(bridge_cfg, tokenizer)
    # The raw NativeModel returns logits directly and trains ~1.5x faster than the bridge.
    model = bridge.original_model
    model.train()

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": _WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(spec.seed)
    # Fork so seeding does not disturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        order = torch.randperm(len(train_rows), generator=gen)
        cursor = 0
        bar = tqdm(range(spec.train_steps), desc="training tinylm", disable=not progress)
        for step in bar:
            before_step()
            if cursor + spec.batch_size > len(order):  # new epoch
                order, cursor = torch.randperm(len(train_rows), generator=gen), 0
            batch = train_rows[order[cursor : cursor + spec.batch_size]]
            cursor += spec.batch_size
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, spec)
            loss = _next_token_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), _GRAD_CLIP)
            opt.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        val_loss = sum(
            _next_token_loss(model, chunk).item() * len(chunk) for chunk in val_rows.split(64)
        ) / len(val_rows)
    save_file(bridge.state_dict(), str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"bridge": bridge_cfg, "spec": asdict(spec)}, indent=2))
    return {
        "val_loss": val_loss,
        "unigram_entropy": _unigram_entropy(val_rows, len(tokenizer)),
        "train_seconds": time.time() - t0,
        "n_train_tokens": train_rows.numel(),
        "d_vocab": len(tokenizer),
    }


def _read_meta(cache_dir: Path) -> dict[str, Any] | None:
    if not all((cache_dir / f).exists() for f in _FILES):
        return None
    try:
        return json.loads((cache_dir / "meta.json").read_text())
    except json.JSONDecodeError:
        return None


def _load(cache_dir: Path, spec: TinyLMSpec, meta: dict[str, Any]) -> TinyLM:
    config = json.loads((cache_dir / "config.json").read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cache_dir / "tokenizer")
    bridge = _boot(config["bridge"], tokenizer)
    bridge.load_state_dict(load_file(str(cache_dir / "model.safetensors")), strict=True)
    bridge.eval()
    return TinyLM(bridge=bridge, tokenizer=tokenizer, spec=spec, meta=meta)


def load_or_train_tinylm(models_dir: Path, spec: TinyLMSpec | None = None, progress: bool = True,
                         before_step: Callable[[], None] = lambda: None) -> TinyLM:
    """Load tinylm (`spec`, default: configured_spec()) from `models_dir`, training (and caching) it
    first if needed. `before_step` is called before each training step: what it raises stops the
    training, which leaves nothing behind (a stop asked for by a signal, say)."""
    spec = configured_spec() if spec is None else spec
    models_dir = Path(models_dir)
    cache_dir = models_dir / cache_name(spec)
    # A grammar change alters the first stories too; hashing only those keeps every load fast
    # (generating the whole corpus costs about a second).
    probe_hash = _corpus_hash(generate_stories(min(CORPUS_PROBE_STORIES, spec.n_train_stories), spec.seed))
    meta = _read_meta(cache_dir)
    if meta is not None and meta.get("spec") == asdict(spec) and meta.get("corpus_probe_hash") == probe_hash:
        return _load(cache_dir, spec, meta)

    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tinylm-building-", dir=models_dir))
    try:
        texts = generate_stories(spec.n_train_stories, spec.seed)
        meta = {"spec": asdict(spec), "corpus_hash": _corpus_hash(texts), "corpus_probe_hash": probe_hash,
                **_train(spec, texts, tmp, progress, before_step)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if cache_dir.exists():  # a directory cannot be renamed over a non-empty one
            old = Path(tempfile.mkdtemp(prefix=".tinylm-old-", dir=models_dir))
            os.replace(cache_dir, old)
            os.replace(tmp, cache_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, cache_dir)
    except BaseException:  # includes KeyboardInterrupt: never leave the temp dir behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load(cache_dir, spec, meta)
