"""Atomic, checksummed training checkpoints; nothing is ever unpickled.

A checkpoint is a folder `step-000400/`:
  tensors.safetensors  SAE parameters and trainer tensors (RNG state, dead-latent counters)
  optim.pt             optimizer state_dict, loaded with torch.load(weights_only=True)
  state.json           step, tokens, data position, schedules, W&B run id, ...
  checksums.json       sha256 of the three files above, written last
It is written to a temporary folder, fsynced, then renamed: a crash leaves either the whole
checkpoint or none. Loading verifies the checksums and falls back to the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from experiments import faults
from experiments.integrity import sha256_file

KEEP = 2  # checkpoints kept per arm: the newest, and one to fall back to
FILES = ("tensors.safetensors", "optim.pt", "state.json")


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    optim: dict
    state: dict


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir: Path, step: int, tensors: dict[str, torch.Tensor], optim: dict, state: dict) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:08d}"
    for leftover in ckpt_dir.glob(".tmp-step-*"):  # from a write that was killed or ran out of space
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = ckpt_dir / f".tmp-step-{step:08d}"
    tmp.mkdir()
    # Serialised in memory and written by Python, so a full disk raises OSError(ENOSPC).
    tensor_bytes = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    _fsync_write(tmp / "tensors.safetensors", lambda f: f.write(tensor_bytes))
    # CPU tensors, as above: a checkpoint written on a GPU loads anywhere and holds no CUDA storage
    optim = {**optim, "state": {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in per.items()}
                                for i, per in optim["state"].items()}}
    _fsync_write(tmp / "optim.pt", lambda f: torch.save(optim, f))
    faults.reached("checkpoint-write")
    _fsync_write(tmp / "state.json", lambda f: f.write(json.dumps(state, sort_keys=True).encode()))
    sums = {name: sha256_file(tmp / name) for name in FILES}
    _fsync_write(tmp / "checksums.json", lambda f: f.write(json.dumps(sums).encode()))
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    for old in list_checkpoints(ckpt_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _load(path: Path) -> Checkpoint:
    sums = json.loads((path / "checksums.json").read_text())
    for name in FILES:
        if sha256_file(path / name) != sums[name]:
            raise ValueError(f"checksum mismatch in {name}")
    tensors = load_file(str(path / "tensors.safetensors"))
    try:
        optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError("optim.pt holds pickled objects other than tensors (possibly code); refused to load it") from None
    state = json.loads((path / "state.json").read_text())
    return Checkpoint(path, tensors, optim, state)


def load_latest(ckpt_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return _load(path)
        except Exception as err:  # any damage (truncation, bad JSON, bit flips) means: use an older one
            print(f"checkpoint {path} is unusable ({type(err).__name__}: {err}); trying the previous one",
                  file=sys.stderr)
    return None
