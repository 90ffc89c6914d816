"""On-disk activation cache: one folder per source spec, memmapped, written in resumable chunks.

Layout of `<root>/activations/<spec-hash>/`:
  acts.npy       float32 [n_seq * (seq_len - 1), d_in]; row r is sequence r // (seq_len - 1),
                 position r % (seq_len - 1) + 1 (position 0, the BOS token, is not stored)
  tokens.npy     int32 [n_seq, seq_len], the token ids the activations came from
  manifest.json  spec, shapes, chunks done, completion flag, split, normalisation, checksums
The last `n_eval_seq` sequences are the held-out eval split; every arm reads the same split.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from config.schema import stable_hash
from experiments.integrity import sha256_file
from visualization.local_sink import read_json, write_json_atomic

CACHE_VERSION = 1
CHUNK_SEQUENCES = 256


@dataclass
class ActivationCache:
    """A complete cache, opened read-only."""

    path: Path
    manifest: dict
    acts: np.ndarray  # memmap [n_rows, d_in]
    tokens: np.ndarray  # memmap [n_seq, seq_len]

    @property
    def d_in(self) -> int:
        return int(self.acts.shape[1])

    @property
    def tokens_per_seq(self) -> int:
        return int(self.tokens.shape[1]) - 1

    @property
    def n_train_rows(self) -> int:
        return self.manifest["split"]["n_train_seq"] * self.tokens_per_seq

    @property
    def n_eval_rows(self) -> int:
        return self.acts.shape[0] - self.n_train_rows

    def norm_scale(self, normalize: bool) -> float:
        """Factor that brings the train split's mean squared norm to d_in (1.0 when not normalising)."""
        return float(self.manifest["normalization"]["scale"]) if normalize else 1.0

    def train_rows(self, indices: np.ndarray) -> torch.Tensor:
        """Rows of the train split; one vectorised memmap read, sorted for locality."""
        return torch.from_numpy(np.ascontiguousarray(self.acts[np.sort(indices)]))

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(self.n_train_rows, self.acts.shape[0], batch_size):
            stop = min(start + batch_size, self.acts.shape[0])
            yield torch.from_numpy(np.array(self.acts[start:stop]))  # a copy: memmaps are read-only

    def eval_row_tokens(self) -> torch.Tensor:
        """[n_eval_rows] int64: the token id at each eval row (rows follow eval_batches' order)."""
        start = self.manifest["split"]["n_train_seq"]
        return torch.from_numpy(np.asarray(self.tokens[start:, 1:], dtype=np.int64).reshape(-1))

    def eval_row_sequence(self) -> torch.Tensor:
        """[n_eval_rows] int64: which eval sequence each eval row belongs to (0, 1, ...)."""
        return torch.arange(self.n_eval_rows) // self.tokens_per_seq

    def eval_tokens(self, n_seq: int) -> torch.Tensor:
        start = self.manifest["split"]["n_train_seq"]
        return torch.from_numpy(np.asarray(self.tokens[start:start + n_seq], dtype=np.int64))


class CacheCorrupt(Exception):
    pass


def cache_dir(root: Path, spec: dict) -> Path:
    return root / "activations" / stable_hash({"version": CACHE_VERSION, **spec}, 16)


def open_cache(path: Path, spec: dict) -> ActivationCache:
    manifest = read_json(path / "manifest.json")
    if manifest.get("spec") != spec or manifest.get("version") != CACHE_VERSION:
        raise CacheCorrupt("manifest spec differs from the requested one")
    if not manifest.get("complete"):
        raise CacheCorrupt("harvest not complete")
    for name, digest in manifest["checksums"].items():
        if sha256_file(path / name) != digest:
            raise CacheCorrupt(f"checksum mismatch in {name}")
    acts = np.load(path / "acts.npy", mmap_mode="r")
    tokens = np.load(path / "tokens.npy", mmap_mode="r")
    return ActivationCache(path, manifest, acts, tokens)


def build_or_open(
    root: Path,
    spec: dict,
    sequences: torch.Tensor,
    d_in: int,
    harvest: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    eval_fraction: float,
    progress: bool = True,
) -> ActivationCache:
    """Open the cache for `spec`, harvesting what is missing.

    `sequences` [n_seq, seq_len] are the token ids (BOS first); `harvest(tokens) -> [B, seq_len, d_in]`
    runs the model. An interrupted harvest resumes at its last complete chunk; a cache whose
    files fail their checksums is reported and rebuilt.
    """
    path = cache_dir(root, spec)
    manifest_path = path / "manifest.json"
    if manifest_path.exists():
        try:
            manifest = read_json(manifest_path)
        except (ValueError, OSError):
            manifest = {}
        if manifest.get("complete"):
            try:
                return open_cache(path, spec)
            except (CacheCorrupt, ValueError, OSError) as err:
                print(f"activation cache {path.name} is corrupt ({err}); rebuilding it", flush=True)
                shutil.rmtree(path)
        elif manifest.get("spec") != spec or manifest.get("version") != CACHE_VERSION:
            shutil.rmtree(path)
    elif path.exists():
        shutil.rmtree(path)  # files without a manifest: an interrupted start
    path.mkdir(parents=True, exist_ok=True)

    n_seq, seq_len = sequences.shape
    per_seq = seq_len - 1
    acts_path, tokens_path = path / "acts.npy", path / "tokens.npy"
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        acts = np.load(acts_path, mmap_mode="r+")
    else:
        np.save(tokens_path, sequences.numpy().astype(np.int32))
        acts = np.lib.format.open_memmap(acts_path, mode="w+", dtype=np.float32, shape=(n_seq * per_seq, d_in))
        manifest = {"version": CACHE_VERSION, "spec": spec, "shape": [n_seq * per_seq, d_in], "dtype": "float32",
                    "n_seq": n_seq, "seq_len": seq_len, "chunks_done": 0, "complete": False}
        write_json_atomic(manifest_path, manifest)

    chunks = range(0, n_seq, CHUNK_SEQUENCES)
    from visualization.terminal import progress_bar  # the bar is the only terminal output here

    bar = progress_bar(total=len(chunks), initial=manifest["chunks_done"], desc="harvest", unit="chunk",
                       disable=not progress)
    with torch.inference_mode():
        for chunk_index, start in enumerate(chunks):
            if chunk_index < manifest["chunks_done"]:
                continue
            stop = min(start + CHUNK_SEQUENCES, n_seq)
            for b in range(start, stop, batch_size):
                e = min(b + batch_size, stop)
                out = harvest(sequences[b:e])[:, 1:, :]  # drop the BOS position
                acts[b * per_seq:e * per_seq] = out.reshape(-1, d_in).float().numpy()
            acts.flush()
            manifest["chunks_done"] = chunk_index + 1
            write_json_atomic(manifest_path, manifest)
            bar.update(1)
    bar.close()

    n_eval_seq = max(1, int(n_seq * eval_fraction))
    n_train_seq = n_seq - n_eval_seq
    train = acts[: n_train_seq * per_seq]
    mean_sq_norm = float(sum(np.square(train[i:i + 65536], dtype=np.float64).sum()
                             for i in range(0, train.shape[0], 65536)) / train.shape[0])
    del acts, train
    manifest.update(
        split={"n_train_seq": n_train_seq, "n_eval_seq": n_eval_seq},
        normalization={"mean_sq_norm": mean_sq_norm, "scale": float(np.sqrt(d_in / mean_sq_norm))},
        checksums={name: sha256_file(path / name) for name in ("acts.npy", "tokens.npy")},
        complete=True,
    )
    write_json_atomic(manifest_path, manifest)
    return open_cache(path, spec)
