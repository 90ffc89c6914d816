"""Our SAE training step against SAELens's and EleutherAI sparsify's, same machine, same run.

    make bench-peers                                  # builds .venv-peers/ on first use, then runs this
    .venv-peers/bin/python benchmarks/bench_peers.py --steps 3
    .venv-peers/bin/python benchmarks/bench_peers.py --device cuda --steps 10   # all of them on one GPU

Shape: d_in 768, d_sae 6144, batch 4096 rows, k 32; float32 rows drawn from a standard normal; CPU,
torch's default thread count, or with --device cuda every library on that GPU, float32 matmuls in
TF32 for all of them (as run_experiments.py --device cuda sets it) and sparsify with its Triton
decoder kernels, which it uses where Triton is installed (on the CPU its eager embedding_bag path).
Six rows are one library's training step each, as that library's own trainer does it, with the
defaults of that trainer; four "floor" rows are parts of a TopK step (below). All are set up side
by side, each gets one warm-up
step (allocator, thread pool, first optimizer state), then --steps rounds in which every row takes
one timed step in turn (round-robin, so a change in machine load hits all rows alike, not just
whichever ran during it); each row's median is reported. "ours ÷ theirs" is our tokens/s over theirs
(= their step time over ours). SAELens needs transformer-lens < 4 and our main .venv pins 4.x, so
this runs in its own venv (benchmarks/requirements-peers.txt); our training step never imports
transformer-lens, so it runs unchanged there.

What is timed, per row:

ours topk / ours relu: `Trainer.train_step` (experiments/train/trainer.py), set up by
    bench_train.trainer_step exactly as benchmarks/bench_train.py's time_step sets it up: the batch
    gathered from an in-memory activation cache, forward, loss (MSE + AuxK for TopK, weight 1/32,
    k_aux d_in/2; MSE + decoder-norm-weighted L1 for ReLU, coefficient 0.015), backward, for TopK
    the removal of the decoder-parallel gradient component and, after Adam, decoder
    renormalisation (both no-ops for ReLU, whose decoder norm is free), gradient-norm clipping at
    1.0 (the finiteness check noted on the device, read at log steps), the LR schedule, Adam, the
    dead-latent window update. The timed steps come before a dead window has passed, so AuxK does
    no work and ReLU's resampling does not fire.

SAELens TopK (`TopKTrainingSAE`, its defaults: rescale_acts_by_decoder_norm=True,
    use_sparse_activations=False, i.e. dense decode, aux_loss_coefficient 1.0) and SAELens Standard
    (`StandardTrainingSAE`, ReLU, L1 on |f|·||W_dec||, l1_coefficient 1.0): its own
    `SAETrainer.step(batch)` (sae_lens/training/sae_trainer.py), the trainer built from
    `LanguageModelSAERunnerConfig(...).to_sae_trainer_config()` defaults (Adam 3e-4, constant LR, no
    autocast, wandb logging off), plus the `n_training_steps += 1` its `fit()` loop does. That step
    is: activation scaler (identity, none fitted), `training_forward_pass` (encode of x - b_dec
    (apply_b_dec_to_input=True, so autograd also computes the input gradient, a sixth B·d_in·d_sae
    matmul), decode, MSE summed over d_in and averaged over rows, the architecture's aux loss:
    TopK's AuxK on dead latents, skipped while none are dead (dead_feature_window 1000 steps);
    Standard's L1), the firing statistics, backward, clip_grad_norm_(1.0), Adam, zero_grad, LR and
    coefficient scheduler steps. SAELens (v6) neither projects out the decoder-parallel gradient nor
    renormalises the decoder in its trainer: TopK instead rescales by decoder norms inside the
    forward, Standard weights the L1 by them.

sparsify TopK (`SparseCoder`, its SparseCoderConfig defaults with num_latents=6144, k=32:
    normalize_decoder=True, no multi-TopK, no skip connection): sparsify's `Trainer.fit` needs a
    Hugging Face model and dataset, so this script calls, in the order that loop does for
    loss_fn="fvu" (its default), the same public methods: `set_decoder_norm_to_unit_norm()`, the
    batch variance, `SparseCoder.forward` (its fused encoder: linear + ReLU + topk with an
    index_add backward; decode by embedding_bag, the eager path as Triton is absent on CPU, forced
    with SPARSIFY_DISABLE_TRITON=1), the did-fire mask update and float(fvu) it logs, backward of
    fvu + auxk_alpha·auxk + multi_topk_fvu/8, `remove_gradient_parallel_to_decoder_directions()`,
    optimizer step + zero_grad, LR scheduler step, the tokens-since-fired update. sparsify's
    default auxk_alpha is 0.0, so no dead mask is computed and no AuxK is run. No gradient
    clipping (sparsify has none). Two rows: with optimizer="adam" (torch.optim.Adam since
    bitsandbytes is absent, linear warm-up schedule from transformers), the comparison the targets
    refer to, and with sparsify's default optimizer="signum" (ScheduleFreeWrapper(SignSGD),
    momentum 0.95, no scheduler), for reference.

floor rows: four parts of a TopK step that no exact TopK trainer with Adam skips, each alone on
    made-up tensors of these shapes: the dense encoder product x @ W_enc (every latent is a
    candidate), torch's top-k over its result, the sparse decode with its backward, an Adam update
    of W_enc and W_dec. Left out, so the floor is low: the encoder's gradient scatter, the loss,
    clipping, decoder renormalisation. After the table the script prints the rows' sum against
    the step time that 1.5x sparsify's would need.

Not timed anywhere: fetching activations from a language model, evaluation, logging, checkpoints.
Ours reads its batch from the in-memory cache inside the step (a 12.6 MB gather); the peers get a
ready tensor.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import duration, set_up_device, synchronize, trainer_step  # noqa: E402
from benchmarks.table import Table, add_docs_flag, check_docs, write_docs  # noqa: E402
from experiments.train.trainer import CUDA_TORCH_INDEX  # noqa: E402
from experiments.host_memory import retain_freed_memory  # noqa: E402

D_IN, D_SAE, BATCH, K = 768, 6144, 4096, 32
TARGETS = {("topk", "SAELens"): 2.0, ("topk", "sparsify"): 1.5, ("relu", "SAELens"): 1.2}


def batches(n: int, device: str, seed: int = 1) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.standard_normal((BATCH, D_IN), dtype=np.float32)).to(device) for _ in range(n)]


def on_batches(step: Callable[[torch.Tensor], object], steps: int, device: str) -> Callable[[], object]:
    """`step` as a no-argument call that takes its next batch (made beforehand, on the device) each time."""
    xs = iter(batches(steps + 1, device))
    return lambda: step(next(xs))


def floor_parts(device: str) -> dict[str, Callable[[], object]]:
    """Four parts of a TopK step at these shapes that every exact TopK trainer with Adam does, with
    torch's kernels: the dense encoder product x @ W_enc (every latent is a candidate for the top
    k), top-k over its [BATCH, D_SAE] result, the sparse decode (embedding_bag with per-sample
    weights, as ours and sparsify's eager path do) with its backward to W_dec and the activations,
    and an Adam update of W_enc and W_dec (torch.optim.Adam with its defaults, as our trainer and
    sparsify's adam row use)."""
    g = torch.Generator().manual_seed(2)  # drawn on the CPU, then moved: the same numbers on any device
    x, w_enc = torch.randn(BATCH, D_IN, generator=g), torch.randn(D_IN, D_SAE, generator=g)
    params = [torch.nn.Parameter(torch.randn(D_IN, D_SAE, generator=g).to(device)),
              torch.nn.Parameter(torch.randn(D_SAE, D_IN, generator=g).to(device))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    adam = torch.optim.Adam(params, lr=1e-4)
    idx = torch.randint(D_SAE, (BATCH * K,), generator=g)
    acts = torch.rand(BATCH * K, generator=g).to(device).requires_grad_()
    w_dec, grad_out = params[1], torch.randn(BATCH, D_IN, generator=g)
    x, w_enc, idx, grad_out = (t.to(device) for t in (x, w_enc, idx, grad_out))
    pre = torch.empty(BATCH, D_SAE, device=device)
    offsets = torch.arange(0, BATCH * K, K, device=device)

    def sparse_decode() -> object:
        out = F.embedding_bag(idx, w_dec, offsets, mode="sum", per_sample_weights=acts)
        return torch.autograd.grad(out, (w_dec, acts), grad_out)

    return {"x @ W_enc alone": lambda: torch.mm(x, w_enc, out=pre),
            "top-k of x @ W_enc alone": lambda: pre.topk(K, dim=-1, sorted=False),
            "sparse decode, fwd + bwd alone": sparse_decode,
            "Adam update alone": adam.step}


def timed(call: Callable[[], object], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def saelens_step(arch: str, device: str) -> Callable[[torch.Tensor], object]:
    from sae_lens import (LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAE,
                          StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig)
    from sae_lens.training.sae_trainer import SAETrainer

    if arch == "topk":
        sae_cfg, cls = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, device=device), TopKTrainingSAE
    else:
        sae_cfg, cls = StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, device=device), StandardTrainingSAE
    runner_cfg = LanguageModelSAERunnerConfig(sae=sae_cfg, train_batch_size_tokens=BATCH, device=device,
                                              logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None,
                                              output_path=None, verbose=False)
    trainer = SAETrainer(runner_cfg.to_sae_trainer_config(), cls(sae_cfg), data_provider=iter(()))

    def step(x: torch.Tensor) -> object:
        out = trainer.step(x)
        trainer.n_training_steps += 1  # what fit() does after step(); logging is off
        return out

    return step


def sparsify_step(optimizer: str, device: str) -> Callable[[torch.Tensor], object]:
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    auxk_alpha, dead_threshold = defaults["auxk_alpha"], defaults["dead_feature_threshold"]
    torch.manual_seed(0)
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K), device=device, dtype=torch.float32)
    schedulers = []
    if optimizer == "adam":  # sparsify's Trainer: torch Adam (no bitsandbytes) + linear warm-up/decay
        from transformers import get_linear_schedule_with_warmup

        opt = torch.optim.Adam([dict(params=sae.parameters(), lr=2e-4 / (D_SAE / 2**14) ** 0.5)])
        schedulers.append(get_linear_schedule_with_warmup(opt, defaults["lr_warmup_steps"], 100_000))
    else:  # "signum", sparsify's default
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (D_SAE / 2**14) ** 0.5)]),
                                  momentum=0.95)
        opt.train()
    tokens_since_fired = torch.zeros(D_SAE, dtype=torch.long, device=device)
    did_fire = torch.zeros(D_SAE, dtype=torch.bool, device=device)

    def step(x: torch.Tensor) -> object:
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = tokens_since_fired > dead_threshold if auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # the trainer accumulates it for logging
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        for scheduler in schedulers:
            scheduler.step()
        with torch.no_grad():
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[did_fire] = 0
            did_fire.zero_()
        return out

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="What each row times is in this script's docstring.")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row after one warm-up (default: 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where every library trains (default: cpu)")
    add_docs_flag(p, "bench_peers")
    a = p.parse_args()
    check_docs(a, "bench_peers")
    if a.device == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # read when sparsify is imported: its eager decoder
    where = set_up_device(a.device, f"rm -rf .venv-peers, then make bench-peers TORCH_INDEX={CUDA_TORCH_INDEX}")
    retain_freed_memory()  # as run_experiments.py does; in this one process it serves every library alike
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, sae-lens {version('sae-lens')}, eai-sparsify {version('eai-sparsify')}, "
          f"{where}; d_in {D_IN}, d_sae {D_SAE}, batch {BATCH}, k {K}, "
          f"median of {a.steps} steps after 1 warm-up; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs", flush=True)

    with contextlib.ExitStack() as stack:
        ours = {arch: stack.enter_context(trainer_step(arch, D_IN, D_SAE, BATCH, a.steps, K, device=a.device))
                for arch in ("topk", "relu")}

        def peer(step: Callable[[torch.Tensor], object]) -> Callable[[], object]:
            return on_batches(step, a.steps, a.device)

        rows = [("ours", "topk", "topk", ours["topk"]),
                ("SAELens", "TopKTrainingSAE", "topk", peer(saelens_step("topk", a.device))),
                ("sparsify", "SparseCoder, adam", "topk", peer(sparsify_step("adam", a.device))),
                ("sparsify", "SparseCoder, signum (default)", "topk", peer(sparsify_step("signum", a.device))),
                *[("floor", name, "topk", part) for name, part in floor_parts(a.device).items()],
                ("ours", "relu", "relu", ours["relu"]),
                ("SAELens", "StandardTrainingSAE", "relu", peer(saelens_step("relu", a.device)))]
        for *_, step in rows:
            step()  # warm-up: allocator, thread pool, first optimizer state
        times: list[list[float]] = [[] for _ in rows]
        for _ in range(a.steps):  # round-robin, so a change in machine load hits every row alike
            for i, (*_, step) in enumerate(rows):
                times[i].append(timed(step, a.device))
    medians = [statistics.median(t) for t in times]
    ours_s = {arch: m for (lib, _, arch, _), m in zip(rows, medians) if lib == "ours"}

    table = Table(["library", "implementation", "step", "tokens/s", "ours ÷ theirs", "target"], [9, 30, 9, 9], left=2)
    for (lib, name, arch, _), step_s in zip(rows, medians):
        ratio, verdict = step_s / ours_s[arch], ""
        target = TARGETS.get((arch, lib)) if "signum" not in name else None
        if target is not None:
            verdict = f"≥ {target:g}×: {'met' if ratio >= target else 'not met'}"
        table.add(lib, name, duration(step_s), "" if lib == "floor" else f"{BATCH / step_s:,.0f}",  # a part has no throughput
                  "" if lib in ("ours", "floor") else f"{ratio:.2f}×", verdict)
    floor_s = sum(m for (lib, *_), m in zip(rows, medians) if lib == "floor")
    needed_s = medians[[name for _, name, *_ in rows].index("SparseCoder, adam")] / TARGETS[("topk", "sparsify")]
    finding = (f"{TARGETS[('topk', 'sparsify')]:g}× sparsify's speed (Adam) means a whole TopK step in ≤ "
               f"{needed_s * 1e3:.0f} ms; the floor rows alone take {floor_s * 1e3:.0f} ms. Load average at the end "
               f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.")
    print(finding)
    write_docs(a, "bench_peers", [f"{where}, torch {torch.__version__}, sae-lens {version('sae-lens')}, "
                                  f"eai-sparsify {version('eai-sparsify')}; d_in {D_IN}, d_sae {D_SAE}, batch {BATCH}, k {K}; median "
                                  f"of {a.steps} round-robin steps after one warm-up.", table.markdown(), finding])


if __name__ == "__main__":
    main()
