"""Faults inside a run (in-process, on tiny tinylm studies): a non-finite loss, a full disk, a
second process on the same study. Kills at every phase are in tests/test_studies.py."""
import errno
import json
import subprocess
import sys

import torch

from experiments.train import checkpointing
from experiments.train.checkpointing import list_checkpoints, load_latest
from models.sae import TopKSAE
from run_experiments import main
from tests.outcomes import assert_same_outcome
from tests.test_flags import BASE, ckpt, go  # noqa: F401  (ckpt: fixture)
from tests.test_study_lock import HOLDER

TWO_ARMS = [*BASE, "--activation", "topk,relu"]


def _every_5(tmp_path):
    config = tmp_path / "every5.yaml"
    config.write_text("train: {checkpoint_every: 5}\n")
    return ["--config", str(config)]


def test_non_finite_loss_fails_that_arm_only_and_keeps_its_last_good_checkpoint(ckpt, tmp_path, monkeypatch, capsys):
    real, calls = TopKSAE.loss, []

    def poisoned(self, *args, **kw):  # the topk arm's loss at step 8 is inf; relu's is untouched
        calls.append(1)
        out = real(self, *args, **kw)
        return {**out, "loss": out["loss"] * float("inf")} if len(calls) == 8 else out

    monkeypatch.setattr(TopKSAE, "loss", poisoned)
    args = [*TWO_ARMS, *_every_5(tmp_path), "--checkpoint-dir", str(ckpt), "--study-id", "nan"]
    assert main(args) == 1  # the exit code says something failed
    err = capsys.readouterr().err
    assert "arm topk-k8 failed: NonFiniteLoss: loss " in err and "at step 8; the last good checkpoint is step-00000005" in err
    study = json.loads((ckpt / "nan" / "study.json").read_text())
    topk, relu = study["arms"]
    assert topk["status"] == "failed" and topk["reason"].startswith("NonFiniteLoss") and topk["steps"] == 7
    assert relu["status"] == "complete" and study["status"] == "failed"
    topk_ckpts = ckpt / "nan" / topk["arm_id"] / "checkpoints"
    assert [p.name for p in list_checkpoints(topk_ckpts)] == ["step-00000005"]
    kept = load_latest(topk_ckpts)
    assert all(torch.isfinite(t).all() for t in kept.tensors.values() if t.is_floating_point())

    # with the cause gone, --resume retrains the failed arm from that checkpoint, as if nothing happened
    monkeypatch.setattr(TopKSAE, "loss", real)
    assert main([*args, "--resume"]) == 0
    assert main([*args[:-1], "ref"]) == 0
    assert_same_outcome(ckpt / "nan", ckpt / "ref")


def test_full_disk_stops_in_one_line_and_resume_loses_nothing(ckpt, tmp_path, monkeypatch, capsys):
    real, writes = checkpointing._fsync_write, []

    def full(path, write):  # a checkpoint is 4 writes, the arms (in lockstep) write theirs in turn:
        writes.append(path)  # step 5 topk, step 5 relu, then the 2nd write of topk's step 10 finds the disk full
        if len(writes) == 10:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(checkpointing, "_fsync_write", full)
    args = [*TWO_ARMS, *_every_5(tmp_path), "--checkpoint-dir", str(ckpt), "--study-id", "full"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("error: no space left on device writing ") and "step-00000010" in err
    assert err.endswith("--study-id full --resume")
    study = json.loads((ckpt / "full" / "study.json").read_text())
    assert [a["status"] for a in study["arms"]] == ["running", "running"]  # both stopped where they were
    assert not (ckpt / "full" / ".lock").exists()

    monkeypatch.setattr(checkpointing, "_fsync_write", real)  # space freed
    assert main([*args, "--resume"]) == 0
    assert not list((ckpt / "full").rglob(".tmp-*"))
    assert main([*args[:-1], "ref"]) == 0
    assert_same_outcome(ckpt / "full", ckpt / "ref")


def test_second_process_on_a_study_exits_2_naming_the_holder_then_runs_once_it_is_killed(ckpt, capsys):
    go(ckpt, "busy")
    args = [*BASE, "--checkpoint-dir", str(ckpt), "--study-id", "busy", "--resume"]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ckpt / "busy" / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"error: study busy is being run by process {holder.pid}; wait for it or stop it first"
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # its holder was killed: the lock is free again
    assert "already complete; skipped" in capsys.readouterr().out
    assert not (ckpt / "busy" / ".lock").exists()
