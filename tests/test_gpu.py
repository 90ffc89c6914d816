"""The GPU path (`--device cuda`): the SAEs train on the GPU, what they write loads on a CPU, a
study killed mid-arm resumes on the GPU, the results stay near the CPU's (TF32 matmuls and
other kernels: not bit for bit), and a training step never waits for the GPU. Skipped without
CUDA; benchmarks/gpu_check.sh runs them on a GPU machine with the GPU benchmarks."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from config.schema import SAEArmConfig, TrainConfig
from experiments.data.activation_cache import ActivationCache
from experiments.train.trainer import EvalContext, StopFlag, Trainer
from models.sae import SAE
from models.sae.catalog import ARCHITECTURE_DEFAULTS
from run_experiments import main
from tests.forked import run_forked
from tests.test_flags import ckpt  # noqa: F401  (fixture: tinylm, W&B off)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# All six architectures on tinylm at a small size, every eval metric (CE with the SAE spliced into
# the subject model on the GPU too), AuxK and resampling under a short dead window.
STUDY = ["--study", "activations,resampling", "--n-samples", "128", "--seq-len", "33", "--batch-size", "128",
         "--expansion-factor", "2", "--k", "8", "--steps", "40", "--dead-window", "1280", "--no-progress"]


def finals(study_dir) -> dict[str, dict]:
    return {a["name"]: a["final"] for a in json.loads((study_dir / "summary.json").read_text())["arms"]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_study_on_the_gpu_is_near_the_cpu_and_its_files_load_on_a_cpu(ckpt, dtype):  # noqa: F811
    assert main([*STUDY, "--checkpoint-dir", str(ckpt), "--study-id", "cpu"]) == 0
    assert main([*STUDY, "--checkpoint-dir", str(ckpt), "--study-id", "gpu", "--device", "cuda", "--dtype", dtype]) == 0
    cpu, gpu = finals(ckpt / "cpu"), finals(ckpt / "gpu")
    assert cpu.keys() == gpu.keys() and len(gpu) == 9
    for name in gpu:
        for metric in ("explained_variance", "ce_loss_recovered"):
            assert gpu[name][metric] == pytest.approx(cpu[name][metric], abs=0.02), (name, metric)
        assert gpu[name]["l0"] == pytest.approx(cpu[name]["l0"], rel=0.1, abs=1), name
    for arm_dir in (ckpt / "gpu").glob("*/sae.safetensors"):
        sae = SAE.load(arm_dir.parent)  # on the CPU
        assert sae.W_dec.device.type == "cpu"
        (latest,) = sorted((arm_dir.parent / "checkpoints").glob("step-*"))[-1:]
        assert all(t.device.type == "cpu" for t in load_file(str(latest / "tensors.safetensors")).values())


def test_a_gpu_study_killed_mid_arm_resumes_on_the_gpu(ckpt):  # noqa: F811
    args = [*STUDY, "--checkpoint-dir", str(ckpt), "--device", "cuda", "--config", str(ckpt / "c.yaml")]
    (ckpt / "c.yaml").write_text("train: {checkpoint_every: 10}\n")
    assert main([*args, "--study-id", "whole"]) == 0
    killed = run_forked([*args, "--study-id", "cut"], env={**os.environ, "SAE_FAULT": "step:25"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_forked([*args, "--study-id", "cut", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 20 of 40" in resumed.stdout
    whole, cut = finals(ckpt / "whole"), finals(ckpt / "cut")
    for name in whole:
        assert cut[name]["explained_variance"] == pytest.approx(whole[name]["explained_variance"], abs=0.01), name


@pytest.mark.parametrize("arch", sorted(ARCHITECTURE_DEFAULTS))
def test_a_training_step_never_makes_the_host_wait_for_the_gpu(tmp_path, arch):
    """A step queues its work and returns: no op that reads a GPU value on the host (a count, a size,
    the loss check), with dead latents for AuxK. torch raises on such an op in sync-debug mode."""
    acts = np.random.default_rng(0).standard_normal((4096, 64), dtype=np.float32)
    cache = ActivationCache(tmp_path, {"split": {"n_train_rows": 4096}, "normalization": {"scale": 1.0}}, acts, None)
    k = {"k": 8} if "k" in ARCHITECTURE_DEFAULTS[arch] else {}
    sae = SAEArmConfig.for_architecture(arch, hidden_dim=512, **k)
    cfg = TrainConfig(batch_size=256, steps=20, warmup_steps=1, dead_window=512, device="cuda")
    t = Trainer(tmp_path / "arm", sae, cfg, cache, 1.0, EvalContext(), sinks=None, stop=StopFlag())
    t.sae.train()
    for _ in range(3):  # Adam's state and the dead-latent window set up; dead latents from here on
        t.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            t.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    t.check_finite()
