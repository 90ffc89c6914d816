"""Train one SAE arm on a cached activation set, with evaluation probes and checkpoints.

Everything that decides the result is a function of (config, step): the batch at step s is
slice s of a permutation seeded by (seed, epoch), the learning rate is a function of s, and all
remaining state (SAE, Adam, dead-latent window) is in the checkpoint. So a resumed run
reproduces an uninterrupted one bit for bit on CPU.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from config.schema import ProbeConfig, SAEArmConfig, TrainConfig, UsageError
from models.sae.catalog import OPTION_ARCHITECTURES
from experiments.data.activation_cache import ActivationCache
from experiments import faults
from experiments.progress import BarFactory, silent_bar
from experiments.timing import phase
from experiments.train.checkpointing import list_checkpoints, load_latest, save_checkpoint
from experiments.train.resampling import resample_dead_latents_
from experiments.eval.metrics import (CleanRuns, EvalAccumulator, density_stats, feature_density,
                                      spliced_lm_metrics)
from experiments.eval.recovery import FiringMatch, Recovery, feature_recovery, recovery_breakdown, recovery_metrics
from experiments.data.synthetic import SyntheticTruth
from models.sae import SAE, SAEConfig, build_sae


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived; the arm was checkpointed at `step` (or the run stopped where `where` says)."""

    def __init__(self, step: int, where: str | None = None):
        self.where = where or f"at step {step} with a checkpoint saved"
        super().__init__(f"stopped {self.where}")
        self.step = step


class NonFiniteLoss(RuntimeError):
    """The loss or its gradient became NaN/inf at step `good_steps + 1`; raised at the next log, eval
    or checkpoint, before it, so every checkpoint and logged figure stays finite."""

    def __init__(self, message: str, good_steps: int):
        super().__init__(message)
        self.good_steps = good_steps


class StopFlag:
    """Set from a signal handler; the training loop checks it between steps, the cache build
    between chunks."""

    def __init__(self) -> None:
        self.requested = False


@dataclass
class EvalContext:
    """What evaluation needs beyond the SAE: the subject model for CE/KL with the SAE spliced in
    (transformer source), or the true features for recovery metrics (synthetic source)."""

    bridge: object | None = None
    hook_name: str = ""
    ce_sequences: int = 0
    truth: SyntheticTruth | None = None
    clean_runs: CleanRuns = field(default_factory=CleanRuns)  # the model without an SAE, shared by the arms


@dataclass
class ArmResult:
    steps: int
    tokens: int
    final: dict[str, float]
    wandb_run_id: str | None
    seconds: float


def steps_per_epoch(cache: ActivationCache, batch_size: int) -> int:
    n = cache.n_train_rows // batch_size
    if n < 1:
        raise UsageError(f"--batch-size {batch_size} exceeds the {cache.n_train_rows:,} training activations; "
                         f"lower it or raise --n-samples")
    return n


def eval_steps(cfg: TrainConfig, n_steps: int) -> list[int]:
    """Every eval_every steps and the final step; a regular eval closer than half an interval to
    the final one is skipped (two near-identical evals would say nothing about change)."""
    every = cfg.eval_every
    return sorted({*(s for s in range(every, n_steps + 1, every) if n_steps - s >= every / 2), n_steps})


def total_steps(cfg: TrainConfig, cache: ActivationCache) -> int:
    return cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch(cache, cfg.batch_size)


def decay_start(cfg: TrainConfig, n_steps: int) -> int:
    """First step of the final learning-rate decay (no resampling from here on)."""
    return int(n_steps * (1 - cfg.decay_fraction))


def lr_at(step: int, cfg: TrainConfig, n_steps: int) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last `decay_fraction`."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    start = decay_start(cfg, n_steps)
    decay = 1.0 if step < start else (n_steps - step) / max(1, n_steps - start)
    return cfg.lr * warm * decay


def use_fast_matmuls(device: str) -> None:
    """On a GPU, float32 matmuls in TF32 (10-bit mantissa products, float32 sums): several times the
    float32 rate on Ampere and later, at a precision SAE training does not notice. Set once the
    activations are harvested (the cache, shared by devices, is full float32); the CE/KL evals
    during training use it too. The CPU is left as it is, where results are reproducible bit for bit."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def precision(device: torch.device, dtype: str) -> torch.autocast:
    """The context of a training step's forward and of an eval: with bfloat16, torch.autocast runs
    matmuls (and the ops it lists) in bfloat16 on float32 weights; the backward pass, Adam, the
    weights and the activation cache stay float32. With float32 it does nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


CUDA_TORCH_INDEX = "https://download.pytorch.org/whl/cu128"


def check_device(device: str, reinstall: str | None = None) -> None:
    """--device cuda[:N] where it cannot work: one line saying whether torch or the machine lacks it
    (`reinstall`: how the venv in use gets torch's CUDA build; default: the harness's .venv)."""
    if not device.startswith("cuda"):
        return
    if torch.version.cuda is None:
        reinstall = reinstall or f"make clean-venv, then make run TORCH_INDEX={CUDA_TORCH_INDEX}"
        raise UsageError(f"--device {device}: this torch ({torch.__version__}) is built without CUDA; reinstall it "
                         f"from PyTorch's CUDA index ({reinstall}) or use --device cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch has CUDA {torch.version.cuda} but sees no GPU here (driver, "
                         f"CUDA_VISIBLE_DEVICES); use --device cpu")
    index = device.partition(":")[2]  # the form cuda[:N] is checked while parsing
    if index and int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def build_arm_sae(arm: SAEArmConfig, train_cfg: TrainConfig, d_in: int, n_steps: int) -> SAE:
    d_sae = arm.d_sae(d_in)
    arm.check_sizes(d_sae, f"the number of latents d_sae = {d_sae}")
    uses_k = arm.architecture in OPTION_ARCHITECTURES["k"]
    return build_sae(SAEConfig(
        architecture=arm.architecture, d_in=d_in, d_sae=d_sae, k=arm.k if uses_k else 1,
        aux_coef=arm.aux_coef, aux_k=arm.aux_k, auxk=arm.dead_handling == "auxk", sparsity_coef=arm.sparsity_coef,
        sparsity_warmup_steps=int(train_cfg.sparsity_warmup_fraction * n_steps), bandwidth=arm.bandwidth,
        init_threshold=arm.init_threshold, target_l0=arm.target_l0, matryoshka_levels=arm.matryoshka_levels,
        seed=train_cfg.seed))


@dataclass
class EvalOutput:
    metrics: dict[str, float]
    density: np.ndarray  # [d_sae] firing frequency on the eval split
    mean_act: np.ndarray  # [d_sae] mean activation when firing
    fired: torch.Tensor | None  # [n_eval_rows, d_sae] bool, when asked for
    recovery: Recovery | None  # synthetic source: how well the decoder recovers the true features


EVAL_BATCH = 4096


@torch.no_grad()
def evaluate(sae: SAE, cache: ActivationCache, scale: float, ctx: EvalContext, keep_firing: bool = False,
             dense_threshold: float = ProbeConfig.dense_threshold) -> EvalOutput:
    """Metrics on the held-out split, in the original activation scale, plus per-latent density.

    The SAE is evaluated in eval mode (BatchTopK then uses its inference threshold)."""
    was_training = sae.training
    sae.eval()
    device = sae.W_dec.device  # the SAE's; the cache's rows, the subject model's tokens are moved there
    acc = EvalAccumulator(sae.cfg.d_sae)
    fired = []
    recovery = firing = None
    if ctx.truth is not None:
        recovery = feature_recovery(sae.W_dec.cpu(), ctx.truth.dictionary, ctx.truth.threshold)
        firing = FiringMatch(recovery.matched_latent)
    row = 0
    for x in cache.eval_batches(EVAL_BATCH):
        x = x.to(device)
        f = sae.encode(x * scale).float()  # bfloat16 under --dtype bfloat16: the metrics sum in float32
        acc.update(x, sae.decode(f).float() / scale, f)
        if keep_firing or firing is not None:
            on = (f > 0).cpu()  # copied from a GPU once for both
            if keep_firing:
                fired.append(on)  # [n_eval, d_sae] in all: host memory, not the GPU's
            if firing is not None:
                firing.update(on, ctx.truth.eval_active[row:row + len(x)])
        row += len(x)
    metrics = acc.result()
    if recovery is not None:
        metrics.update(recovery_metrics(recovery, firing))
        metrics.update(recovery_breakdown(recovery, ctx.truth.probability, ctx.truth.roles))
    counts = acc.firing_counts()
    metrics.update(density_stats(counts, cache.n_eval_rows, dense_threshold))
    if ctx.bridge is not None:
        tokens = cache.eval_tokens(ctx.ce_sequences).to(device)
        clean = ctx.clean_runs.get(ctx.bridge, tokens, ctx.hook_name, skip_bos=True)
        metrics.update(spliced_lm_metrics(ctx.bridge, tokens, ctx.hook_name, lambda a: sae(a * scale) / scale,
                                          clean=clean))
    sae.train(was_training)
    return EvalOutput(metrics, feature_density(counts, cache.n_eval_rows), acc.mean_activation().numpy(),
                      torch.cat(fired) if keep_firing else None, recovery)


class Trainer:
    def __init__(self, arm_dir: Path, sae_cfg: SAEArmConfig, cfg: TrainConfig, cache: ActivationCache,
                 scale: float, ctx: EvalContext, sinks, stop: StopFlag, probes=None, trained_on: dict | None = None):
        self.arm_dir, self.cfg, self.cache, self.scale, self.ctx = arm_dir, cfg, cache, scale, ctx
        self.trained_on = trained_on  # written into the final config.json: what the activations were
        self.sinks, self.stop, self.probes = sinks, stop, probes
        self.arm = sae_cfg
        self.n_steps = total_steps(cfg, cache)
        self.spe = steps_per_epoch(cache, cfg.batch_size)
        # Built (and seeded) on the CPU, then moved: an arm starts from the same weights on any device.
        self.device = torch.device(cfg.device)
        self.sae = build_arm_sae(sae_cfg, cfg, cache.d_in, self.n_steps).to(self.device)
        # foreach: each update op once for all of the arm's tensors, not once per tensor (a few % of a
        # step at tinylm's shapes); the same numbers as the per-tensor loop, which is the CPU's default.
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, foreach=True)
        d_sae = self.sae.cfg.d_sae
        # Tokens since each latent last fired: dead = none in the last dead_window tokens (the rule
        # of Gao et al. 2024, SAELens and sparsify), updated every step.
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=self.device)
        # The first step whose loss or gradient was not finite (0: none) and those two values, kept on
        # the device and read only where the host reads anyway (logs, evals, checkpoints): a check
        # after every step would make the host wait for each step, which a GPU feels.
        self._bad_step = torch.zeros((), dtype=torch.int64, device=self.device)
        self._bad_values = torch.zeros(2, device=self.device)
        self.step = 0
        self.wandb_run_id: str | None = None
        self.last_eval: dict[str, float] = {}
        self.seconds = 0.0  # spent on this arm (begin, steps, after_step, finish): arms in lockstep interleave
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    @property
    def tokens(self) -> int:
        """Training tokens seen: the x-axis of every curve."""
        return self.step * self.cfg.batch_size

    # -- data ---------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.spe)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.cache.n_train_rows, generator=gen)
            self._perm_epoch = epoch
        b = self.cfg.batch_size
        return self._perm[i * b:(i + 1) * b].numpy()

    # -- checkpoint state ---------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors.update({"tokens_since_fired": self.tokens_since_fired, "rng_torch": torch.get_rng_state()})
        state = {"step": self.step, "tokens": self.tokens,
                 "data_position": dict(zip(("epoch", "batch"), divmod(self.step, self.spe))),
                 "n_steps": self.n_steps,
                 "lr": lr_at(self.step, self.cfg, self.n_steps), "wandb_run_id": self.wandb_run_id,
                 "last_eval": self.last_eval}
        return tensors, state

    def save(self) -> None:
        tensors, state = self._state()
        path = save_checkpoint(self.arm_dir / "checkpoints", self.step, tensors, self.opt.state_dict(), state)
        self.sinks.log_checkpoint(path, self.step, self.tokens)

    def restore(self) -> bool:
        ckpt = load_latest(self.arm_dir / "checkpoints")
        if ckpt is None:
            return False
        self.sae.load_state_dict({k[4:]: v for k, v in ckpt.tensors.items() if k.startswith("sae.")})
        self.opt.load_state_dict(ckpt.optim)
        self.tokens_since_fired = ckpt.tensors["tokens_since_fired"].to(self.device, copy=True)
        torch.set_rng_state(ckpt.tensors["rng_torch"])
        self.step = ckpt.state["step"]
        self.wandb_run_id = ckpt.state["wandb_run_id"]
        self.last_eval = ckpt.state["last_eval"]
        return True

    # -- training -----------------------------------------------------------------------------
    @property
    def dead_mask(self) -> torch.Tensor:
        """[d_sae] bool: latents that have not fired in the last dead_window training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_window

    def _update_dead(self, firing_counts: torch.Tensor, n_rows: int) -> int | None:
        """Count tokens since each latent fired; with resampling, each time another dead_window
        tokens have passed (not once the learning rate decays), revive the dead latents. Returns
        how many were resampled, or None where no resampling was due."""
        self.tokens_since_fired += n_rows
        self.tokens_since_fired.masked_fill_(firing_counts > 0, 0)
        window = self.cfg.dead_window
        if (self.arm.dead_handling != "resample" or self.tokens // window == (self.tokens - n_rows) // window
                or self.step >= decay_start(self.cfg, self.n_steps)):
            return None
        self.check_finite()  # resampling scores inputs by their loss: not with non-finite weights
        # Seeded by the step, so a resumed run draws the same inputs.
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 7_919 * self.step + 1)
        rows = torch.randperm(self.cache.n_train_rows, generator=gen)[:self.cfg.resample_inputs].numpy()
        dead = self.dead_mask
        n = resample_dead_latents_(self.sae, self.opt, dead, self.to_device(self.cache.train_rows(rows) * self.scale),
                                   gen)
        self.tokens_since_fired.masked_fill_(dead, 0)  # revived: a full window to prove themselves
        return n

    def batch(self, step: int) -> torch.Tensor:
        """The (normalised) training batch of `step`, on the training device."""
        return self.to_device(self.cache.train_rows(self.batch_indices(step)) * self.scale)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """x (read from the cache) on the training device: on a GPU through pinned memory, so the copy
        does not wait for the host; on the CPU, x itself."""
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def train_step(self, x: torch.Tensor | None = None) -> dict[str, torch.Tensor | float]:
        """One optimizer step on x (default: this step's batch). Returns the step's training
        statistics as tensors, so nothing waits on them unless they are logged."""
        x = self.batch(self.step) if x is None else x
        # Until a dead window has passed no latent can be dead: AuxK is told so without a look at the
        # mask (on a GPU it would otherwise run its selection, see TopKSAE._aux_selection).
        dead = self.dead_mask if self.tokens >= self.cfg.dead_window else None
        with precision(self.device, self.cfg.dtype):
            out = self.sae.loss(x, self.step, dead)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.sae.remove_gradient_parallel_to_decoder_()
        # Our loss averages the squared error over d_in; SAELens and dictionary_learning sum it and
        # clip at norm 1. Clipping at grad_clip / d_in is exactly their clip (Adam ignores the common
        # scale): it engages in the first steps and shapes what is learnt (on the toy it took
        # JumpReLU from L0 6 to 5 at the same coefficient, as in SAELens). At grad_clip itself it
        # never engaged.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip / self.cache.d_in)
        loss = out["loss"].detach()
        first_bad = ~torch.isfinite(loss + grad_norm) & (self._bad_step == 0)  # the sum: NaN/inf if either is
        self._bad_step = torch.where(first_bad, self.step + 1, self._bad_step)
        self._bad_values = torch.where(first_bad, torch.stack([loss, grad_norm]), self._bad_values)
        lr = lr_at(self.step, self.cfg, self.n_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.sae.apply_constraints_()
        self.step += 1
        resampled = self._update_dead(out["firing_counts"], len(x))
        stats = {} if resampled is None else {"train/resampled": resampled}
        return {**stats, "train/loss": loss, "train/mse": out["mse"], "train/sparsity": out["sparsity"],
                "train/aux": out["aux"], "train/l0": out["l0"], "train/lr": lr,
                "train/grad_norm": grad_norm, "train/dead_frac": self.dead_mask.float().mean()}

    def check_finite(self) -> None:
        """Raise NonFiniteLoss if a step so far had a NaN/inf loss or gradient (the host waits for
        the steps taken)."""
        bad_step = int(self._bad_step)
        if bad_step:
            loss, grad_norm = self._bad_values.tolist()
            saved = list_checkpoints(self.arm_dir / "checkpoints")  # each written after a check: all good
            kept = f"the last good checkpoint is {saved[-1].name}" if saved else "no checkpoint had been written"
            raise NonFiniteLoss(f"loss {loss:g}, gradient norm {grad_norm:g} at step {bad_step}; {kept}", bad_step - 1)

    @property
    def eval_steps(self) -> list[int]:
        return eval_steps(self.cfg, self.n_steps)

    def run_eval(self) -> None:
        probes = self.probes
        dense_threshold = probes.cfg.dense_threshold if probes is not None else ProbeConfig.dense_threshold
        with precision(self.device, self.cfg.dtype):
            out = evaluate(self.sae, self.cache, self.scale, self.ctx,
                           keep_firing=probes is not None and probes.needs_firing, dense_threshold=dense_threshold)
        self.last_eval = out.metrics
        logs = {f"eval/{k}": v for k, v in out.metrics.items()}
        embedding = None
        if probes is not None:
            probe_metrics, embedding = probes.run(self.step, self.tokens, self.sae, out)
            logs.update(probe_metrics)
        with phase("logging"):
            self.sinks.log(self.step, self.tokens, logs)
            self.sinks.log_density(self.step, self.tokens, out.density, self.cache.n_eval_rows, dense_threshold)
            if embedding is not None:
                self.sinks.log_embedding(self.step, self.tokens, embedding, self.cache.n_eval_rows)

    # -- one arm's run, in pieces a driver can interleave with other arms' (see train_arms) ------
    def begin(self, resume: bool) -> None:
        """Restore the latest checkpoint (with `resume`) or initialise, and open the logs."""
        start = time.perf_counter()
        self.sae.train()
        restored = resume and self.restore()
        if not restored:
            # Checkpoints save the process's torch RNG (restore() puts it back). Nothing of ours draws
            # from it, but torch seeds it at random at start-up: seeded, checkpoints are the same
            # bytes run after run.
            torch.manual_seed(self.cfg.seed)
            self.sae.init_b_dec_(self.batch(0))
        else:
            print(f"resuming {self.arm_dir.name} at step {self.step:,} of {self.n_steps:,}", flush=True)
        if self.probes is not None:
            self.probes.resume_at(self.step)
        with phase("logging"):
            self.wandb_run_id = self.sinks.start(self.wandb_run_id, resumed_at=self.step if restored else None)
        self._eval_at = set(self.eval_steps)
        self.seconds += time.perf_counter() - start

    @property
    def done(self) -> bool:
        return self.step >= self.n_steps

    def prefetch_eval(self) -> None:
        """Start the work of this step's eval that can run elsewhere (UMAP fits, in helper
        processes), so that it overlaps the evals of the arms ahead of this one."""
        if self.probes is not None and self.step in self._eval_at:
            self.probes.prefetch(self.step, self.sae)

    def after_step(self, stats: dict[str, torch.Tensor | float]) -> dict[str, float] | None:
        """What follows a training step (`stats`, from train_step): logs, eval, checkpoint. Returns
        the logged training statistics, when this step logs them."""
        start = time.perf_counter()
        faults.reached(f"step:{self.step}")
        logs = None
        log = self.step % self.cfg.log_every == 0 or self.step == self.n_steps or "train/resampled" in stats
        save = self.step % self.cfg.checkpoint_every == 0 or self.step == self.n_steps
        if log or save or self.step in self._eval_at:
            self.check_finite()
        if log:
            with phase("logging"):
                logs = {k: float(v) for k, v in stats.items()}
                self.sinks.log(self.step, self.tokens, logs)
        if self.step in self._eval_at:
            with phase("eval"):
                self.run_eval()
        if save:
            with phase("checkpoints"):
                self.save()
        self.seconds += time.perf_counter() - start
        return logs

    def interrupt(self) -> None:
        """Stop here: checkpoint the current step and close the logs."""
        self.check_finite()
        self.save()
        self.sinks.finish({})

    def finish(self) -> ArmResult:
        """Write the final weights and close the logs (after the last step)."""
        start = time.perf_counter()
        with phase("checkpoints"):
            self.sae.save(self.arm_dir, scale=self.scale, trained_on=self.trained_on)
        with phase("logging"):
            self.sinks.log_model(self.arm_dir, self.step, self.tokens, dict(self.last_eval))
            self.sinks.finish({f"final/{k}": v for k, v in self.last_eval.items()})
        self.seconds += time.perf_counter() - start
        return ArmResult(self.step, self.tokens, dict(self.last_eval), self.wandb_run_id, self.seconds)


def lockstep_key(trainer: Trainer) -> tuple:
    """Arms with equal keys read the same batch at every step (see Trainer.batch_indices)."""
    return id(trainer.cache), trainer.cfg.batch_size, trainer.cfg.seed, trainer.scale


class ReadAhead:
    """Training batches read one step ahead in a background thread, while the current step trains:
    the gather from the activation cache (from disk, for a cache larger than memory) and, on a GPU,
    the pinned copy are off the training thread's path. A batch depends only on (seed, step), so
    reading it early changes nothing. Reads never overlap (a guess that missed is waited for before
    the step asked for is read), since `read` keeps the epoch's permutation between calls.

    The thread runs torch on one thread of its own. With torch's default it would start an OpenMP
    team for its few elementwise ops, whose threads spin after each on the cores the step needs:
    --quick's arms stepped one by one took 110 ms per round of 9 steps that way, 81 ms without."""

    def __init__(self, read: Callable[[int], torch.Tensor]):
        self._read = read
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead", initializer=torch.set_num_threads,
                                        initargs=(1,))
        self._ahead: tuple[int, Future] | None = None

    def batch(self, step: int, next_step: int | None) -> torch.Tensor:
        """The batch of `step`; the read of `next_step`'s starts at once."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == step:
            x = ahead[1].result()
        else:
            if ahead is not None:
                wait([ahead[1]])
            x = self._read(step)
        if next_step is not None:
            self._ahead = next_step, self._pool.submit(self._read, next_step)
        return x

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class ArmOutcome:
    """How an arm's training ended, as train_arms reports it: finished (`result`), failed (`error`),
    or interrupted by a stop request (checkpointed at `trainer.step`)."""
    arm_id: str
    trainer: Trainer
    result: ArmResult | None = None
    error: Exception | None = None  # neither result nor error: interrupted


def train_arms(trainers: dict[str, Trainer], resume: bool, stop: StopFlag, labels: dict[str, str],
               bar: BarFactory = silent_bar, at_once: int = 1) -> Iterator[ArmOutcome]:
    """Train arms that read the same batches (equal lockstep_key) together, step by step: each
    step's batch is read once for all of them. The result equals training them one after another:
    a batch depends only on (seed, step) and the arms share no other state. Arms at different steps
    (resumed from checkpoints written at different steps) each go on alone until level.

    On the CPU, `at_once` arms take their training step at the same time, each in a thread (torch
    releases the GIL in its ops): at small shapes one arm's step leaves a core idle in its Python
    and in kernels too small to split. The results are the same, since each arm's ops are the ones
    it would run alone, with as many torch threads. What follows a step (logs, evals, which
    splice the SAE into the shared subject model, checkpoints) runs afterwards, arm by arm in order.

    Yields each arm's outcome as it happens, so the caller can record it at once: an arm that
    raises is reported failed and the others carry on (unless the caller raises). On a stop
    request every unfinished arm is checkpointed and reported interrupted, then StopRequested is
    raised. Each arm has a progress bar of its own (made by `bar`), labelled by `labels`."""
    assert len({lockstep_key(t) for t in trainers.values()}) <= 1, "arms that read different batches"
    active: dict[str, Trainer] = {}
    bars: dict[str, object] = {}
    on_cpu = all(t.device.type == "cpu" for t in trainers.values())
    # A new thread starts with torch's default thread count, which the last set_num_threads anywhere
    # (the read-ahead thread's: 1) sets: give it this one's.
    pool = (ThreadPoolExecutor(min(at_once, len(trainers)), thread_name_prefix="arm-step",
                               initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
            if on_cpu and at_once > 1 and len(trainers) > 1 else None)
    # Arms in lockstep read the same batches: any one of them reads for all.
    reader = ReadAhead(next(iter(trainers.values())).batch) if trainers else None

    def take_step(key: str, x: torch.Tensor) -> tuple[dict | Exception, float]:
        start = time.perf_counter()
        try:
            return active[key].train_step(x), time.perf_counter() - start
        except Exception as err:  # the arm's failure, reported in order below
            return err, time.perf_counter() - start

    def take_steps(keys: list[str], x: torch.Tensor) -> list[dict | Exception]:
        start = time.perf_counter()
        with phase("training"):
            if pool is None or len(keys) < 2:
                taken = [take_step(key, x) for key in keys]
            else:
                taken = list(pool.map(take_step, keys, [x] * len(keys)))
        # Each arm is charged its share of the wall time, so that arms' seconds still add up to it.
        wall, own = time.perf_counter() - start, sum(seconds for _, seconds in taken)
        for key, (_, seconds) in zip(keys, taken):
            active[key].seconds += wall * seconds / own if own > 0 else wall / len(keys)
        return [stats for stats, _ in taken]

    def finish_done() -> Iterator[ArmOutcome]:  # finished arms: write their weights, close their logs
        for key, trainer in list(active.items()):
            if trainer.done:
                del active[key]
                try:
                    result = trainer.finish()
                except Exception as err:
                    yield ArmOutcome(key, trainer, error=err)
                    continue
                yield ArmOutcome(key, trainer, result=result)

    try:
        for key, trainer in trainers.items():
            try:
                trainer.begin(resume)
                active[key] = trainer
            except Exception as err:
                yield ArmOutcome(key, trainer, error=err)
        pad = max(map(len, labels.values()))
        bars.update({key: bar(total=t.n_steps, initial=t.step, desc=labels[key].ljust(pad), position=i)
                     for i, (key, t) in enumerate(trainers.items())})  # after begin: a resumed bar starts at its step
        yield from finish_done()
        while active:
            step = min(t.step for t in active.values())
            level = [key for key, t in active.items() if t.step == step]
            x = reader.batch(step, step + 1 if any(t.n_steps > step + 1 for t in active.values()) else None)
            taken = take_steps(level, x)
            for key, stats in zip(level, taken):
                if not isinstance(stats, Exception):
                    active[key].prefetch_eval()
            for key, stats in zip(level, taken):
                trainer = active[key]
                try:
                    if isinstance(stats, Exception):
                        raise stats
                    logs = trainer.after_step(stats)
                except Exception as err:
                    del active[key]
                    yield ArmOutcome(key, trainer, error=err)
                    continue
                if logs is not None:
                    bars[key].set_postfix(mse=f"{logs['train/mse']:.4f}", l0=f"{logs['train/l0']:.1f}", refresh=False)
                bars[key].update()
            yield from finish_done()
            if stop.requested and active:
                for arm_bar in bars.values():
                    arm_bar.close()  # before the messages the interruption prints
                steps = sorted({t.step for t in active.values()})
                for key, trainer in active.items():
                    try:
                        trainer.interrupt()
                    except Exception as err:
                        yield ArmOutcome(key, trainer, error=err)
                        continue
                    yield ArmOutcome(key, trainer)
                where = (f"at step {steps[0]} with a checkpoint saved" if len(active) == 1 else
                         f"at step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))} with checkpoints saved")
                raise StopRequested(steps[0], where=where)
    finally:
        for arm_bar in bars.values():
            arm_bar.close()
        if pool is not None:
            pool.shutdown()
        if reader is not None:
            reader.close()
