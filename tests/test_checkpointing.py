"""Checkpoints and SAE files: atomic round trip, rotation, corruption fallback, no code run on load."""
import pickle

import pytest
import torch

from experiments.train.checkpointing import KEEP, list_checkpoints, load_latest, save_checkpoint
from models.sae import SAE, SAEConfig, build_sae


def make(step):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    return {"w": torch.full((2, 2), float(step))}, opt.state_dict(), {"step": step, "wandb_run_id": "abc"}


def test_round_trip_and_rotation(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, *make(step))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"][-KEEP:]
    ckpt = load_latest(tmp_path)
    assert ckpt.state == {"step": 30, "wandb_run_id": "abc"}
    assert torch.equal(ckpt.tensors["w"], torch.full((2, 2), 30.0))
    assert ckpt.optim["state"][0]["step"].item() == 1
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "missing"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, capsys, damage):
    save_checkpoint(tmp_path, 10, *make(10))
    latest = save_checkpoint(tmp_path, 20, *make(20))
    target = latest / "tensors.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        data[-3] ^= 0x10
        target.write_bytes(bytes(data))
    else:
        (latest / "checksums.json").unlink()
    ckpt = load_latest(tmp_path)
    assert ckpt.state["step"] == 10
    assert "step-00000020" in capsys.readouterr().err


def test_malicious_pickle_in_optimizer_state_is_not_executed(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    latest = save_checkpoint(tmp_path, 10, *make(10))
    (latest / "optim.pt").write_bytes(pickle.dumps(Evil()))
    # even with matching checksums, weights_only loading refuses to run code
    import hashlib, json
    sums = json.loads((latest / "checksums.json").read_text())
    sums["optim.pt"] = hashlib.sha256((latest / "optim.pt").read_bytes()).hexdigest()
    (latest / "checksums.json").write_text(json.dumps(sums))
    assert load_latest(tmp_path) is None
    assert not (tmp_path / "pwned").exists()
    assert "optim.pt holds pickled objects other than tensors (possibly code); refused to load it" in capsys.readouterr().err


def test_malicious_pickle_as_sae_weights_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    build_sae(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2)).save(tmp_path)
    (tmp_path / "sae.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="is not a valid safetensors file .*never unpickled"):
        SAE.load(tmp_path)
    assert not (tmp_path / "pwned").exists()
