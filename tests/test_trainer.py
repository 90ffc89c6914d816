"""The training step's rules, on an in-memory activation cache: gradient clipping in the
references' units, the dead-latent counters, and arms in lockstep taking their steps in threads."""
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from config.schema import ProbeConfig, SAEArmConfig, TrainConfig
from experiments.data.activation_cache import ActivationCache
from experiments.train.trainer import EvalContext, NonFiniteLoss, ReadAhead, StopFlag, Trainer, train_arms
from models.sae.catalog import ARCHITECTURE_DEFAULTS
from visualization.sinks import ArmSinks


def trainer(tmp_path: Path, arch: str = "topk", d_in: int = 16, rows: int = 4096, **train) -> Trainer:
    acts = np.random.default_rng(0).standard_normal((rows, d_in), dtype=np.float32)
    cache = ActivationCache(tmp_path, {"split": {"n_train_rows": rows}, "normalization": {"scale": 1.0}}, acts, None)
    cfg = TrainConfig(batch_size=64, steps=60, warmup_steps=1, **train)
    sae = SAEArmConfig.for_architecture(arch, hidden_dim=128, **({"k": 4} if arch == "topk" else {}))
    t = Trainer(tmp_path / "arm", sae, cfg, cache, 1.0, EvalContext(), sinks=None, stop=StopFlag())
    t.sae.train()
    return t


@pytest.mark.parametrize("d_in", [16, 64])
def test_gradient_clipped_at_grad_clip_over_d_in(tmp_path, d_in):
    """Our loss averages over d_in where SAELens's and dictionary_learning's sum: their clip at norm 1
    is ours at 1 / d_in. The gradient Adam is given has at most that norm, and is untouched below it."""
    t = trainer(tmp_path, "relu", d_in=d_in, grad_clip=1.0)
    seen = []
    t.opt.register_step_pre_hook(lambda opt, args, kw: seen.append(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.sae.parameters() if p.grad is not None]))))
    with torch.no_grad():
        t.sae.W_dec.mul_(30)  # a large reconstruction error: a gradient far above the clip
    raw = t.train_step()["train/grad_norm"]
    assert raw > 1 / d_in and seen[-1] == pytest.approx(1 / d_in, rel=1e-4)
    t.cfg.grad_clip = 1e6  # no clipping: Adam sees the raw gradient
    raw = t.train_step()["train/grad_norm"]
    assert seen[-1] == pytest.approx(float(raw), rel=1e-4)


def test_dead_means_no_firing_in_the_last_window_counted_every_step(tmp_path):
    t = trainer(tmp_path, dead_window=640)  # 10 steps of 64 tokens
    never = torch.zeros(128, dtype=torch.int64)
    for step in range(9):
        t._update_dead(never, 64)  # nothing fires...
        assert not t.dead_mask.any()  # ...but a window has not passed yet
    t._update_dead(never, 64)
    assert t.dead_mask.all()
    fired = never.clone()
    fired[:5] = 3
    t._update_dead(fired, 64)  # one firing revives a latent at once
    assert not t.dead_mask[:5].any() and t.dead_mask[5:].all()
    assert (t.tokens_since_fired[:5] == 0).all() and (t.tokens_since_fired[5:] == 11 * 64).all()


def test_a_non_finite_step_is_reported_at_the_next_check_with_its_own_step_and_values(tmp_path):
    """The loss check is not read after every step (the host would wait for each step on a GPU): a
    NaN/inf at step 3 lets steps go on until a log, eval or checkpoint reads it, and is then reported
    as step 3 with step 3's loss, not a later step's."""
    t = trainer(tmp_path, "relu")
    t.sae.init_b_dec_(t.batch(0))
    t.train_step(), t.train_step()
    t.check_finite()  # two good steps: nothing to report
    real = t.sae.loss

    def poisoned(x, step, dead_mask):  # step 3's loss is inf; its update makes later ones NaN
        out = real(x, step, dead_mask)
        return {**out, "loss": out["loss"] * float("inf")} if step == 2 else out

    t.sae.loss = poisoned
    for _ in range(4):
        t.train_step()  # no check here
    with pytest.raises(NonFiniteLoss, match=r"^loss inf, gradient norm (nan|inf) at step 3; no checkpoint had been "
                                            r"written$") as failed:
        t.check_finite()
    assert failed.value.good_steps == 2


def lockstep_group(tmp_path: Path, name: str) -> dict[str, Trainer]:
    """Every architecture, and a TopK arm that resamples, over one cache: arms train_arms steps together."""
    rows, d_in = 4096, 16
    acts = np.random.default_rng(0).standard_normal((rows, d_in), dtype=np.float32)
    cache = ActivationCache(tmp_path, {"split": {"n_train_rows": rows - 512}, "normalization": {"scale": 1.0}},
                            acts, None)
    arms = {arch: SAEArmConfig.for_architecture(arch, hidden_dim=64, **({"k": 4} if "k" in ARCHITECTURE_DEFAULTS[arch]
                                                                          else {}))
            for arch in ARCHITECTURE_DEFAULTS}
    arms["resample"] = SAEArmConfig.for_architecture("topk", hidden_dim=64, k=1, dead_handling="resample")
    cfg = TrainConfig(batch_size=64, steps=30, warmup_steps=1, eval_every=10, checkpoint_every=10, log_every=5,
                      dead_window=640)
    group = {}
    for key, sae in arms.items():
        arm_dir = tmp_path / name / key
        sinks = ArmSinks(arm_dir, None, key, group=name, job_type="test", config={})
        group[key] = Trainer(arm_dir, sae, cfg, cache, 1.0, EvalContext(), sinks, StopFlag())
    return group


def test_checkpoints_are_the_same_bytes_whatever_rng_state_the_process_started_with(tmp_path):
    """A checkpoint holds the process's torch RNG, which torch may seed at random at start-up; an
    arm that starts afresh seeds it, so two runs write the same checkpoint files."""
    written = []
    for run in ("a", "b"):
        torch.seed()  # a process's random start
        group = lockstep_group(tmp_path, run)
        list(train_arms(group, False, StopFlag(), {key: key for key in group}))
        written.append({p.relative_to(tmp_path / run): p.read_bytes()
                        for p in sorted((tmp_path / run).glob("*/checkpoints/*/*.safetensors"))})
    assert len(written[0]) == 2 * len(ARCHITECTURE_DEFAULTS) + 2  # the last two checkpoints of every arm
    assert written[0] == written[1]


def test_arms_stepping_in_threads_end_where_arms_stepping_in_turn_do(tmp_path):
    """train_arms with two arms taking their step at once (threads) and with one at a time: the same
    weights bit for bit, and the same curves, for every architecture and for an arm that resamples;
    an arm that fails is reported failed, in plan order, and the others finish."""
    outcomes, threads = {}, {}
    for at_once in (1, 2):
        group = lockstep_group(tmp_path, f"at-once-{at_once}")
        threads[at_once] = set()
        for key, t in group.items():
            def step(x=None, t=t, key=key, seen=threads[at_once]):
                seen.add(threading.current_thread().name.split("_")[0])
                if key == "relu" and t.step == 12:
                    raise RuntimeError("this arm fails at step 13")
                return Trainer.train_step(t, x)
            t.train_step = step
        labels = {key: key for key in group}
        outcomes[at_once] = {o.arm_id: o for o in train_arms(group, False, StopFlag(), labels, at_once=at_once)}
    assert threads == {1: {"MainThread"}, 2: {"arm-step"}}
    assert list(outcomes[1]) == list(outcomes[2])
    for key, done in outcomes[1].items():
        other = outcomes[2][key]
        if key == "relu":
            assert str(done.error) == str(other.error) == "this arm fails at step 13"
            continue
        assert done.result.final == other.result.final
        assert all(torch.equal(a, b) for a, b in zip(done.trainer.sae.state_dict().values(),
                                                   other.trainer.sae.state_dict().values()))
        assert (done.trainer.arm_dir / "metrics.csv").read_text() == (other.trainer.arm_dir / "metrics.csv").read_text()
    resampled = (outcomes[2]["resample"].trainer.arm_dir / "metrics.csv").read_text()
    assert "train/resampled" in resampled


def test_batches_read_ahead_in_a_thread_train_what_a_plain_loop_trains(tmp_path, monkeypatch):
    """train_arms reads each step's batch once, a step ahead, in its read-ahead thread; every arm ends
    at the weights of a plain loop that reads each batch itself when it needs it."""
    reads = []
    real_batch = Trainer.batch

    def batch(t, step):
        reads.append((step, threading.current_thread().name.split("_")[0]))
        return real_batch(t, step)

    monkeypatch.setattr(Trainer, "batch", batch)
    group = lockstep_group(tmp_path, "read-ahead")
    outcomes = {o.arm_id: o for o in train_arms(group, False, StopFlag(), {key: key for key in group}, at_once=2)}
    # each arm's b_dec starts at batch 0's median, then step 0 is read where nothing is ahead yet
    assert reads == [(0, "MainThread")] * (len(group) + 1) + [(step, "read-ahead") for step in range(1, 30)]

    monkeypatch.setattr(Trainer, "batch", real_batch)
    plain = lockstep_group(tmp_path, "plain")
    for key, t in plain.items():
        t.sae.init_b_dec_(t.batch(0))
        while not t.done:
            t.train_step()
        ahead = outcomes[key].trainer
        assert all(torch.equal(a, b) for a, b in zip(t.sae.state_dict().values(), ahead.sae.state_dict().values())), key


def test_a_read_ahead_that_guessed_wrong_is_waited_for_and_reads_never_overlap():
    running, overlaps, reads = [0], [], []

    def read(step):
        running[0] += 1
        overlaps.append(running[0] > 1)
        time.sleep(0.01)
        reads.append(step)
        running[0] -= 1
        return torch.full((2,), float(step))

    reader = ReadAhead(read)
    assert reader.batch(0, 1).tolist() == [0, 0]
    assert reader.batch(5, 6).tolist() == [5, 5]  # arms at another step than guessed (a resume)
    assert reader.batch(6, None).tolist() == [6, 6]
    reader.close()
    assert reads == [0, 1, 5, 6] and not any(overlaps)


def test_a_read_ahead_runs_torch_on_one_thread_and_leaves_the_callers_count():
    """Its ops would otherwise start an OpenMP team of their own, spinning on the step's cores."""
    before = torch.get_num_threads()
    reader = ReadAhead(lambda step: torch.full((1,), float(torch.get_num_threads())))
    reader.batch(0, 1)
    assert reader.batch(1, None).tolist() == [1.0]  # read in the thread
    reader.close()
    assert torch.get_num_threads() == before


def test_adam_over_all_of_an_arms_tensors_at_once_gives_the_per_tensor_loops_numbers(tmp_path):
    """The trainer's Adam runs foreach (one op for all tensors); the per-tensor loop, the CPU's default,
    is what the results in docs/ were trained with: every architecture and a resampling arm end at
    the same weights bit for bit."""
    runs = []
    for foreach in (True, False):
        group = lockstep_group(tmp_path, f"foreach-{foreach}")
        for t in group.values():
            assert t.opt.defaults["foreach"] is True
            if not foreach:
                t.opt = torch.optim.Adam(t.sae.parameters(), lr=t.cfg.lr, foreach=False)
        for t in group.values():
            t.sae.init_b_dec_(t.batch(0))
            while not t.done:
                t.train_step()
        runs.append(group)
    for key, t in runs[0].items():
        other = runs[1][key]
        assert all(torch.equal(a, b) for a, b in zip(t.sae.state_dict().values(), other.sae.state_dict().values()))


class RecordingProbes:
    """Probes that only record when an eval's work is started elsewhere and when the eval runs."""
    cfg, needs_firing = ProbeConfig(), False

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def resume_at(self, step: int) -> None:
        pass

    def prefetch(self, step: int, sae) -> None:
        self.log.append(("prefetch", self.name, step))

    def run(self, step: int, tokens: int, sae, out):
        self.log.append(("eval", self.name, step))
        return {}, None


def test_every_arms_umap_fit_starts_before_the_first_arm_is_evaluated_at_that_step(tmp_path):
    """The fits run in a helper process while the arms are evaluated one after another."""
    log = []
    group = lockstep_group(tmp_path, "prefetch")
    group = {key: group[key] for key in ("topk", "relu")}
    for key, t in group.items():
        t.probes = RecordingProbes(key, log)
    list(train_arms(group, False, StopFlag(), {key: key for key in group}, at_once=2))
    assert log == [(kind, key, step) for step in (10, 20, 30) for kind in ("prefetch", "eval")
                   for key in ("topk", "relu")]
