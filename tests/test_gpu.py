"""The GPU path (`--device cuda`): the SAEs train on the GPU, what they write loads on a CPU, a
study killed mid-arm resumes on the GPU, and the results stay near the CPU's (TF32 matmuls and
other kernels: not bit for bit). Skipped without CUDA; benchmarks/gpu_check.sh runs them on a GPU
machine with the GPU benchmarks."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from models.sae import SAE
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


def test_a_study_on_the_gpu_is_near_the_cpu_and_its_files_load_on_a_cpu(ckpt):  # noqa: F811
    assert main([*STUDY, "--checkpoint-dir", str(ckpt), "--study-id", "cpu"]) == 0
    assert main([*STUDY, "--checkpoint-dir", str(ckpt), "--study-id", "gpu", "--device", "cuda"]) == 0
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
