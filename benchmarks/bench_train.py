"""SAE training throughput per architecture, against the machine's matmul peak for the same shapes.

    python benchmarks/bench_train.py                      # all architectures, both shape sets
    python benchmarks/bench_train.py --shapes tinylm --architectures topk,relu
    python benchmarks/bench_train.py --device cuda --shapes gpu    # 768x24576 and 2304x65536 on a GPU

Each row times the harness's real training step (`Trainer.train_step`: the batch read from an
in-memory activation cache, loss, backward, gradient projection, clipping, Adam, decoder
renormalisation, the dead-latent window), in a process set up as `run_experiments.py` sets it up
(experiments/host_memory.py), and, in the same run, the matmuls a dense step cannot avoid for those
shapes. A dense encode/decode step does 5 of them: the encoder and decoder forward products, and in
the backward the decoder-input gradient, the decoder weight gradient and the encoder weight gradient
(the input needs no gradient): 10·B·d_in·d_sae FLOPs. Gated adds its auxiliary decoder product and
that product's input gradient: 7 products, 14·B·d_in·d_sae. "of matmul peak" is the time of the
architecture's own products over the step's, i.e. the fraction of the step spent in work a perfect
dense implementation would still do; "GFLOP/s" counts those products' FLOPs over the step time.

The TopK family runs twice: on its sparse path (only the k selected latents per row are decoded
and receive gradients; models/sae/kernels.py) and forced onto the dense path; "sparse ÷ dense" is
the speed-up. A sparse step does far fewer FLOPs than a dense one, so its GFLOP/s column counts the
dense-equivalent work (how fast a dense step would have to run to keep up).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.schema import DTYPES, SAEArmConfig, TrainConfig, UsageError  # noqa: E402
from models.sae.catalog import ARCHITECTURE_DEFAULTS, OPTION_ARCHITECTURES  # noqa: E402
from experiments.host_memory import retain_freed_memory  # noqa: E402
from experiments.data.activation_cache import ActivationCache  # noqa: E402
from experiments.train.trainer import EvalContext, StopFlag, Trainer, check_device, use_fast_matmuls  # noqa: E402
from benchmarks.table import Table, add_docs_flag, check_docs, refuse, write_docs  # noqa: E402

SHAPES = {  # name: [(d_in, d_sae, batch)]
    "paper": [(768, 6144, 4096), (768, 24576, 4096)],
    "tinylm": [(128, 1024, 1024)],
    "gpu": [(768, 24576, 4096), (2304, 65536, 4096)],  # GPT-2 small and Gemma-2-2B widths
}


def in_memory_cache(d_in: int, rows: int, seed: int = 0) -> ActivationCache:
    acts = np.random.default_rng(seed).standard_normal((rows, d_in), dtype=np.float32)
    manifest = {"split": {"n_train_rows": rows}, "normalization": {"scale": 1.0}}
    return ActivationCache(Path("."), manifest, acts, None)


@contextmanager
def trainer_step(arch: str, d_in: int, d_sae: int, batch: int, steps: int, k: int, training_path: str | None = None,
                 device: str = "cpu", dtype: str = "float32") -> Iterator[Callable[[], object]]:
    """`Trainer.train_step` for these shapes on an in-memory cache, to be called steps + 1 times.
    `training_path` forces the TopK family's sparse or dense path (default: its own choice)."""
    cache = in_memory_cache(d_in, batch * (steps + 1))
    sae_cfg = SAEArmConfig.for_architecture(arch, hidden_dim=d_sae, **({"k": k} if "k" in ARCHITECTURE_DEFAULTS[arch] else {}))
    cfg = TrainConfig(batch_size=batch, steps=steps + 1, warmup_steps=1, device=device, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(Path(tmp), sae_cfg, cfg, cache, 1.0, EvalContext(), sinks=None, stop=StopFlag())
        trainer.sae.train()
        if training_path is not None:
            trainer.sae.training_path = training_path
        yield trainer.train_step


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so a wall-clock interval holds all of it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_step(arch: str, d_in: int, d_sae: int, batch: int, steps: int, k: int, training_path: str | None = None,
              device: str = "cpu", dtype: str = "float32") -> list[float]:
    with trainer_step(arch, d_in, d_sae, batch, steps, k, training_path, device, dtype) as step:
        step()  # warm-up: allocator, thread pool, first Adam state
        times = []
        for _ in range(steps):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return times


def time_matmuls(d_in: int, d_sae: int, batch: int, repeats: int, device: str = "cpu",
                 dtype: str = "float32") -> dict[str, float]:
    """Median times of the products of a dense step, in the layouts autograd uses: "dense" (the
    5 every architecture does) and "gated" (those plus Gated's auxiliary decoder product and its
    input gradient); in bfloat16 for --dtype bfloat16 (the operands already converted: the peak)."""
    g = torch.Generator().manual_seed(0)
    x, grad_out = torch.randn(batch, d_in, generator=g), torch.randn(batch, d_in, generator=g)
    w_enc, w_dec = torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g)
    f = torch.randn(batch, d_sae, generator=g)
    x, grad_out, w_enc, w_dec, f = (t.to(device, getattr(torch, dtype)) for t in (x, grad_out, w_enc, w_dec, f))

    def dense():
        x @ w_enc  # encoder forward
        f @ w_dec  # decoder forward
        grad_f = grad_out @ w_dec.t()  # decoder: gradient of its input
        f.t() @ grad_out  # decoder weight gradient
        x.t() @ grad_f  # encoder weight gradient

    def gated():
        dense()
        f @ w_dec  # auxiliary decoder product
        grad_out @ w_dec.t()  # its input gradient

    out = {}
    for name, products in (("dense", dense), ("gated", gated)):
        products()
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            products()
            synchronize(device)
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def set_up_device(device: str, reinstall: str | None = None) -> str:
    """A benchmark's --device as run_experiments.py sets it up (a device that cannot work: one line,
    exit 2, with `reinstall` saying how its venv gets torch's CUDA build; on a GPU, TF32 matmuls);
    returns the device as the output names it."""
    if device == "cpu":
        return f"{torch.get_num_threads()} threads"
    try:
        check_device(device, reinstall)
    except UsageError as err:
        refuse(str(err))
    use_fast_matmuls(device)
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


def duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="paper,tinylm", help="shape sets: paper, tinylm (default: both)")
    p.add_argument("--architectures", default=",".join(ARCHITECTURE_DEFAULTS), help="default: all five")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row after one warm-up (default: 3)")
    p.add_argument("--k", type=int, default=32, help="k of the TopK family (default: 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on a GPU float32 matmuls use TF32, as "
                   "run_experiments.py --device cuda does, in the steps and the peak alike (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the steps' precision, as run_experiments.py "
                   "--dtype sets it; the peak is measured in the same precision (default: float32)")
    add_docs_flag(p, "bench_train")
    a = p.parse_args()
    check_docs(a, "bench_train")
    where = set_up_device(a.device)
    retain_freed_memory()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {where}, k {a.k}, {a.dtype}")
    table = Table(["architecture", "d_in", "d_sae", "batch", "step", "tokens/s", "GFLOP/s", "matmul GFLOP/s",
                   "of matmul peak", "sparse ÷ dense"], [18, 5, 6, 5, 9, 9, 8])
    for shape_set in a.shapes.split(","):
        for d_in, d_sae, batch in SHAPES[shape_set]:
            matmul_s = time_matmuls(d_in, d_sae, batch, repeats=max(3, a.steps), device=a.device, dtype=a.dtype)
            for arch in a.architectures.split(","):
                paths = ["sparse", "dense"] if arch in OPTION_ARCHITECTURES["k"] else [None]
                dense_s = None
                for path in reversed(paths):  # dense first, so the sparse row can show its speed-up
                    step_s = statistics.median(time_step(arch, d_in, d_sae, batch, a.steps, a.k, path, a.device,
                                                         a.dtype))
                    products = "gated" if arch == "gated" else "dense"
                    flops = (14 if arch == "gated" else 10) * batch * d_in * d_sae
                    table.add(arch if path is None else f"{arch} ({path})", d_in, d_sae, batch, duration(step_s),
                              f"{batch / step_s:,.0f}",
                              f"{flops / step_s / 1e9:.1f}" + ("*" if path == "sparse" else ""),
                              f"{flops / matmul_s[products] / 1e9:.1f}",
                              "" if path == "sparse" else f"{matmul_s[products] / step_s:.0%}",
                              f"{dense_s / step_s:.2f}×" if path == "sparse" else "")
                    dense_s = step_s
    write_docs(a, "bench_train", [table.markdown(), f"Median of {a.steps} steps after a warm-up, k {a.k}, "
                                  f"{a.dtype}. \\* dense-equivalent: the FLOPs a dense step would need, over the "
                                  "sparse step's time."])


if __name__ == "__main__":
    main()
