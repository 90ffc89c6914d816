"""On-disk activation cache: one folder per source spec, memmapped, written in resumable chunks.

Layout of `<root>/activations/<spec-hash>/`:
  acts.npy       float32 [n_rows, d_in], train rows first, then the held-out eval rows
  manifest.json  spec, shape, chunks done, completion flag, split, normalisation, checksums
plus the source's own files, checksummed with the activations:
  transformer    tokens.npy int32 [n_seq, seq_len], the token ids; row r is sequence r // (seq_len - 1),
                 position r % (seq_len - 1) + 1 (position 0, the BOS token, is not stored)
  synthetic      the true dictionary and per-row true codes (experiments/data/synthetic.py)
Every arm reads the same split. A source fills the cache through a `CacheWriter`, one chunk at a
time; the manifest records each finished chunk, so an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from config.schema import stable_hash
from experiments import faults
from experiments.progress import BarFactory, silent_bar
from experiments.integrity import sha256_file
from config.files import read_json, write_json_atomic

CACHE_VERSION = 2


@dataclass
class ActivationCache:
    """A complete cache, opened read-only."""

    path: Path
    manifest: dict
    acts: np.ndarray  # memmap [n_rows, d_in]
    tokens: np.ndarray | None  # memmap [n_seq, seq_len]; None for sources without tokens

    @property
    def d_in(self) -> int:
        return int(self.acts.shape[1])

    @property
    def tokens_per_seq(self) -> int:
        return int(self.tokens.shape[1]) - 1

    @property
    def n_train_rows(self) -> int:
        return self.manifest["split"]["n_train_rows"]

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


class BuildInterrupted(Exception):
    """A stop was requested between chunks; the chunks written so far are kept and recorded."""

    def __init__(self, done: int, total: int):
        super().__init__(f"activation cache build stopped after chunk {done} of {total}")
        self.done, self.total = done, total


def cache_dir(root: Path, spec: dict) -> Path:
    return root / "activations" / stable_hash({"version": CACHE_VERSION, **spec}, 16)


def open_cache(path: Path, spec: dict) -> ActivationCache:
    manifest = read_json(path / "manifest.json")
    if manifest.get("spec") != spec or manifest.get("version") != CACHE_VERSION:
        raise CacheCorrupt("manifest spec differs from the requested one")
    if not manifest.get("complete"):
        raise CacheCorrupt("build not complete")
    for name, digest in manifest["checksums"].items():
        if sha256_file(path / name) != digest:
            raise CacheCorrupt(f"checksum mismatch in {name}")
    acts = np.load(path / "acts.npy", mmap_mode="r")
    tokens = np.load(path / "tokens.npy", mmap_mode="r") if (path / "tokens.npy").exists() else None
    return ActivationCache(path, manifest, acts, tokens)


class CacheWriter(Protocol):
    """How a source fills a cache. Chunks are independent: `fill(i)` writes the same rows whenever
    it runs, so a resumed build equals an uninterrupted one."""

    n_rows: int
    d_in: int
    n_chunks: int
    unit: str  # what the progress bar counts

    def split(self) -> dict:
        """{"n_train_rows", "n_eval_rows", ...}: the train rows come first."""

    def begin(self, path: Path) -> None:
        """Write the source's fixed files (once, before chunk 0)."""

    def fill(self, chunk: int, acts: np.ndarray, path: Path) -> Iterator[None]:
        """Write chunk `chunk`'s rows into `acts` (and any per-chunk files of the source), yielding
        after each batch written: caches filled side by side advance batch by batch, so writers that
        share a forward pass see the same batch one after the other."""

    def finish(self, path: Path) -> list[str]:
        """Assemble the source's files after the last chunk; returns their names (checksummed)."""


def _reserve(path: Path) -> None:
    """Allocate the memmapped file's blocks now: on a full disk a write into a sparse memmap
    kills the process with SIGBUS, where this raises ENOSPC before anything is harvested."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(path)) from None


def build_or_open(root: Path, spec: dict, writer: CacheWriter, bar: BarFactory = silent_bar,
                  stop=None) -> ActivationCache:
    """Open the cache for `spec`, writing what is missing with `writer` (build_or_open_all)."""
    return build_or_open_all(root, [(spec, writer)], bar, stop)[0]


def build_or_open_all(root: Path, jobs: list[tuple[dict, CacheWriter]], bar: BarFactory = silent_bar,
                      stop=None) -> list[ActivationCache]:
    """Open the cache for each (spec, writer) of `jobs`, writing what is missing with its writer.

    The caches are filled chunk by chunk side by side (chunk i of every cache, then chunk i + 1),
    so writers that share a forward pass (several hook points of one model and text) run it once
    per batch. An interrupted build resumes at each cache's last complete chunk; a cache whose
    files fail their checksums is reported and rebuilt; a cache of another spec is never reused.
    `stop` (anything with a `requested` flag) ends the build between chunks with BuildInterrupted."""
    builds = [_open_or_begin(root, spec, writer) for spec, writer in jobs]
    todo = [b for b in builds if isinstance(b, _Build)]
    if todo:
        n_chunks = max(b.writer.n_chunks for b in todo)
        first = min(b.manifest["chunks_done"] for b in todo)
        chunks = bar(total=n_chunks, initial=first, desc="activations" if len(jobs) == 1 else
                     f"activations ({len(todo)} hook points)", unit=todo[0].writer.unit)
        with torch.inference_mode():
            for chunk in range(first, n_chunks):
                due = [b.fill(chunk) for b in todo if chunk >= b.manifest["chunks_done"]]
                for _ in itertools.zip_longest(*due):
                    pass
                chunks.update(1)
                if stop is not None and stop.requested and chunk + 1 < n_chunks:
                    chunks.close()
                    raise BuildInterrupted(chunk + 1, n_chunks)
        chunks.close()
    return [b.finish() if isinstance(b, _Build) else b for b in builds]


@dataclass
class _Build:
    """A cache being written: its folder, manifest and memmapped activations."""
    path: Path
    spec: dict
    writer: CacheWriter
    manifest: dict
    acts: np.ndarray

    def fill(self, chunk: int) -> Iterator[None]:
        """Write the chunk, batch by batch, then record it in the manifest."""
        yield from self.writer.fill(chunk, self.acts, self.path)
        faults.reached(f"cache-chunk:{chunk + 1}")
        self.acts.flush()
        self.manifest["chunks_done"] = chunk + 1
        write_json_atomic(self.path / "manifest.json", self.manifest)

    def finish(self) -> ActivationCache:
        split = self.writer.split()
        train = self.acts[: split["n_train_rows"]]
        mean_sq_norm = float(sum(np.square(train[i:i + 65536], dtype=np.float64).sum()
                                 for i in range(0, train.shape[0], 65536)) / train.shape[0])
        del train
        self.acts = None  # closes the memmap before the checksums read the file
        files = ["acts.npy", *self.writer.finish(self.path)]
        self.manifest.update(
            split=split,
            normalization={"mean_sq_norm": mean_sq_norm, "scale": float(np.sqrt(self.writer.d_in / mean_sq_norm))},
            checksums={name: sha256_file(self.path / name) for name in files},
            complete=True,
        )
        write_json_atomic(self.path / "manifest.json", self.manifest)
        return open_cache(self.path, self.spec)


def _open_or_begin(root: Path, spec: dict, writer: CacheWriter) -> ActivationCache | _Build:
    """The complete cache for `spec`, or its build: resumed where one stopped, begun otherwise."""
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

    acts_path = path / "acts.npy"
    if manifest_path.exists():
        return _Build(path, spec, writer, read_json(manifest_path), np.load(acts_path, mmap_mode="r+"))
    writer.begin(path)
    acts = np.lib.format.open_memmap(acts_path, mode="w+", dtype=np.float32, shape=(writer.n_rows, writer.d_in))
    _reserve(acts_path)
    manifest = {"version": CACHE_VERSION, "spec": spec, "shape": [writer.n_rows, writer.d_in], "dtype": "float32",
                "chunks": writer.n_chunks, "chunks_done": 0, "complete": False}
    write_json_atomic(manifest_path, manifest)
    return _Build(path, spec, writer, manifest, acts)
