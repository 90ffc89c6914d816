"""The bad-input catalogue: every way of getting the flags, a --config file, the data or the
checkpoint folder wrong that we know of. Each case runs through `run_experiments.main` and must
give exit code 2 and exactly one stderr line `error: ...`, no traceback, and leave nothing in the
checkpoint dir that a later run would trip over. docs/bad-inputs.md lists the same cases; a test
below keeps the two in step."""
import errno
import os
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from experiments.studies.runner import StudyLock
from run_experiments import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
# A run of seconds on tinylm: 40 sequences of 17 tokens, 36 for training = 576 activations of
# d_in 128, TopK with d_sae 256.
TINY = ("--study", "activations", "--activation", "topk", "--n-samples", "40", "--seq-len", "17", "--batch-size",
        "64", "--expansion-factor", "2", "--k", "8", "--steps", "12", "--no-progress")
TOY = ("--source", "synthetic", "--study", "activations", "--activation", "topk", "--n-tokens", "4096", "--steps",
       "12", "--no-progress")
# Left alone by the snapshot: tinylm, and the activation caches, which repair or rebuild themselves.
SELF_HEALING = ("models", "activations")


def half_done(ctx: "Ctx") -> None:
    """Study `half`: the finished study `done`, its arm recorded as interrupted."""
    shutil.copytree(ctx.ckpt / "done", ctx.ckpt / "half")
    record = json.loads((ctx.ckpt / "half" / "study.json").read_text())
    record["arms"][0]["status"], record["study_id"] = "interrupted", "half"
    (ctx.ckpt / "half" / "study.json").write_text(json.dumps(record))


@dataclass
class Ctx:
    tmp: Path  # the case's own folder: files it passes live here
    ckpt: Path  # the checkpoint dir it runs against
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {tmp} and {ckpt} are filled in; --checkpoint-dir {ckpt} is added when absent
    fragment: str  # part of the one error line
    files: dict = field(default_factory=dict)  # name -> str or bytes, written to {tmp}/name first
    setup: Callable[[Ctx], None] | None = None
    runs: bool = False  # gets past parsing: needs tinylm and the finished study `done`
    resumable: bool = False  # may leave its study folder, which --resume must then complete


def cpu_torch(ctx: Ctx) -> None:
    import torch

    ctx.monkeypatch.setattr(torch.version, "cuda", None)


def no_gpu(ctx: Ctx) -> None:
    import torch

    ctx.monkeypatch.setattr(torch.version, "cuda", "12.8")
    ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def one_gpu(ctx: Ctx) -> None:
    import torch

    ctx.monkeypatch.setattr(torch.version, "cuda", "12.8")
    ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ctx.monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def offline_hub(ctx: Ctx) -> None:
    """An empty Hugging Face cache and no network."""
    import huggingface_hub.constants

    empty = ctx.tmp / "hf"
    empty.mkdir()
    ctx.monkeypatch.setenv("HF_HOME", str(empty))
    ctx.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HOME once, at import
    ctx.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty / "hub"))


def file_in_ckpt(ctx: Ctx) -> None:
    ctx.ckpt.mkdir(parents=True, exist_ok=True)
    (ctx.ckpt / "notes.txt").write_text("my notes\n")


def busy_study(ctx: Ctx) -> None:
    """Another run (this process, through a lock of its own) holds the study's lock."""
    (ctx.ckpt / "busy").mkdir()
    lock = StudyLock(ctx.ckpt / "busy").__enter__()
    ctx.request.addfinalizer(lambda: lock.__exit__(None, None, None))


def broken_record(ctx: Ctx) -> None:
    (ctx.ckpt / "broken").mkdir()
    (ctx.ckpt / "broken" / "study.json").write_text("{not json")


def disk_full(ctx: Ctx) -> None:
    """Every checkpoint file write fails as on a full disk."""
    import experiments.train.checkpointing

    def no_space(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    ctx.monkeypatch.setattr(experiments.train.checkpointing, "_fsync_write", no_space)


def config(text: str | bytes) -> dict:
    return {"c.yaml": text}


C = ("--config", "{tmp}/c.yaml")

CASES = [
    # flags alone
    Case("unknown-activation", ("--activation", "nope"), "--activation: unknown architecture 'nope'"),
    Case("unknown-activation-in-list", ("--activation", "relu,nope"), "--activation: unknown architecture 'nope'"),
    Case("empty-activation", ("--activation", ""), "argument --activation: must not be empty"),
    Case("docs-without-report", ("--docs", "page.md"), "--docs works with --report STUDY_ID"),
    Case("k-for-relu", ("--activation", "relu", "--k", "16"),
         "--k applies to topk, batchtopk, matryoshka, not to relu"),
    Case("l1-coefficient-for-topk", ("--activation", "topk", "--l1-coefficient", "0.1"),
         "--l1-coefficient applies to relu, gated, not to topk"),
    Case("l0-coefficient-for-relu", ("--activation", "relu", "--l0-coefficient", "0.1"),
         "--l0-coefficient applies to jumprelu, not to relu"),
    Case("target-l0-for-gated", ("--activation", "gated", "--target-l0", "10"),
         "--target-l0 applies to jumprelu, not to gated"),
    Case("auxk-for-relu", ("--activation", "relu", "--dead-handling", "auxk"),
         "--dead-handling auxk does not apply to relu"),
    Case("auxk-for-all", ("--activation", "all", "--dead-handling", "auxk"),
         "--dead-handling auxk does not apply to relu"),
    Case("contradicting-dead-flags", ("--dead-handling", "auxk", "--no-dead-resample"),
         "--no-dead-resample contradicts --dead-handling auxk"),
    Case("negative-l1-coefficient", ("--activation", "relu", "--l1-coefficient", "-1"),
         "argument --l1-coefficient: must be >= 0, got -1.0"),
    Case("zero-k", ("--k", "0"), "argument --k: must be positive, got 0"),
    Case("k-above-hidden-dim", ("--k", "64", "--hidden-dim", "32"), "--k 64 exceeds --hidden-dim 32"),
    Case("aux-k-above-hidden-dim", ("--aux-k", "64", "--hidden-dim", "32"), "--aux-k 64 exceeds --hidden-dim 32"),
    Case("matryoshka-levels-beyond-hidden-dim", ("--activation", "matryoshka", "--matryoshka-levels", "7",
                                                 "--hidden-dim", "32"),
         "--matryoshka-levels 7 halves --hidden-dim 32 below one latent; it takes at most 6 levels"),
    Case("negative-hidden-dim", ("--hidden-dim", "-5"), "argument --hidden-dim: must be positive, got -5"),
    Case("zero-parallel-arms", ("--parallel-arms", "0"), "argument --parallel-arms: must be positive, got 0"),
    Case("parallel-arms-not-a-number", ("--parallel-arms", "two"), "argument --parallel-arms: must be an integer, got 'two'"),
    Case("zero-expansion-factor", ("--expansion-factor", "0"),
         "argument --expansion-factor: must be positive, got 0"),
    Case("zero-lr", ("--lr", "0"), "argument --lr: must be positive, got 0.0"),
    Case("nan-lr", ("--lr", "nan"), "argument --lr: must be finite, got nan"),
    Case("non-numeric-lr", ("--lr", "abc"), "argument --lr: must be a number, got 'abc'"),
    Case("fractional-batch-size", ("--batch-size", "1.5"), "argument --batch-size: must be an integer, got '1.5'"),
    Case("zero-steps", ("--steps", "0"), "argument --steps: must be positive, got 0"),
    Case("missing-value", ("--k",), "argument --k: expected one argument"),
    Case("seq-len-1", ("--seq-len", "1"), "argument --seq-len: must be >= 2, got 1"),
    Case("negative-layer", ("--layer", "-1"), "argument --layer: takes layers (integers >= 0, comma-separated) or all"),
    Case("empty-layer-entry", ("--layer", "0,,1"), "argument --layer: must not have an empty entry, got '0,,1'"),
    Case("too-few-samples", ("--n-samples", "5"), "--n-samples 5 is too small to split into train and eval"),
    Case("zero-aux-k", ("--aux-k", "0"), "argument --aux-k: must be positive, got 0"),
    Case("aux-k-for-relu", ("--activation", "relu", "--aux-k", "4"),
         "--aux-k applies to topk, batchtopk, matryoshka, not to relu"),
    Case("unknown-hook", ("--hook", "resid_sideways"), "argument --hook: must be one of resid_pre, resid_mid, "
         "resid_post, mlp_out, attn_out (or a comma-separated list), got 'resid_sideways'"),
    Case("unknown-wandb-mode", ("--wandb-mode", "loud"), "argument --wandb-mode: invalid choice: 'loud'"),
    Case("unknown-study", ("--study", "bogus"), "--study: unknown study 'bogus'"),
    Case("sweep-outside-activations", ("--study", "resampling", "--sparsity-sweep", "2"),
         "--sparsity-sweep applies to the activations study"),
    Case("zero-sweep-multiplier", ("--sparsity-sweep", "0,1"),
         "argument --sparsity-sweep: must be positive, got 0.0"),
    Case("zero-probe-k", ("--probe-k", "0"), "argument --probe-k: must be positive, got 0"),
    Case("f1-threshold-above-1", ("--f1-threshold", "1.5"), "argument --f1-threshold: must be in (0, 1]"),
    Case("missing-concepts-file", ("--concepts", "{tmp}/none.yaml"), "/none.yaml: no such file"),
    Case("unknown-device", ("--device", "tpu"), "unknown --device 'tpu'"),
    Case("malformed-gpu-index", ("--device", "cuda:"), "unknown --device 'cuda:'; use cpu, cuda or cuda:N"),
    Case("unknown-dtype", ("--dtype", "float16"), "argument --dtype: invalid choice: 'float16' (choose from 'float32', "
         "'bfloat16')"),
    Case("unknown-flag", ("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
    Case("study-id-escapes", ("--study-id", "../escape"), "--study-id '../escape' is not a usable folder name"),
    # a command naming it would read it as a flag: the run's own resume and search hints would fail
    Case("study-id-like-a-flag", ("--study-id=-x",), "--study-id '-x' is not a usable folder name"),
    Case("study-id-reserved", ("--study-id", "models"), "--study-id 'models' is not a usable folder name"),
    Case("study-id-is-a-file", ("--study-id", "notes.txt"), "--study-id 'notes.txt' names a file in",
         setup=file_in_ckpt),
    Case("empty-study-id", ("--study-id", ""), "argument --study-id: must not be empty"),
    Case("search-without-study-id", ("--search", "cat"), "--search needs --study-id"),
    Case("export-without-study-id", ("--export", "saelens"), "--export needs --study-id"),
    Case("unknown-export-format", ("--export", "csv", "--study-id", "done"), "argument --export: invalid choice: 'csv'"),
    Case("arm-without-search-or-export", ("--arm", "topk-k8"), "--arm works with --search WORD or --export FORMAT"),
    Case("out-without-export", ("--out", "x"), "--out works with --export FORMAT"),
    Case("resume-in-no-folder", ("--resume", "--checkpoint-dir", "{tmp}/none"),
         "nothing to resume: --checkpoint-dir", runs=True),
    Case("two-commands", ("--report", "done", "--search", "cat", "--study-id", "done"),
         "--report and --search do not combine"),
    Case("command-and-resume", ("--report", "done", "--resume"), "--report and --resume do not combine"),
    Case("export-out-under-a-file", ("--export", "saelens", "--study-id", "done", "--out", "{ckpt}/notes.txt/sae"),
         "notes.txt is a file, not a folder", setup=file_in_ckpt, runs=True),
    Case("empty-report", ("--report", ""), "argument --report: must not be empty"),
    Case("empty-checkpoint-dir", ("--checkpoint-dir", ""), "argument --checkpoint-dir: must not be empty"),
    # --config files
    Case("config-missing", ("--config", "{tmp}/none.yaml"), "cannot read --config file"),
    Case("config-is-a-directory", ("--config", "{tmp}"), ": Is a directory"),
    Case("config-not-utf8", C, "'utf-8' codec can't decode byte 0xff", config(b"\xff\xfe train: {}")),
    Case("config-invalid-yaml", C, "is not valid YAML at line 1", config("train: {lr: [unclosed")),
    Case("config-not-a-mapping", C, "must be a mapping of settings, got list", config("- just\n- a list\n")),
    Case("config-unknown-group", C, "unknown key 'bogus'; a config file takes", config("bogus: 1\n")),
    Case("config-unknown-key", C, "train.lrr: unknown setting; train takes", config("train: {lrr: 1}\n")),
    Case("config-wrong-type", C, "train.lr must be a number, got 'fast'", config("train: {lr: fast}\n")),
    Case("config-setting-foreign-to-architecture", C,
         "sae.relu.k: k applies to topk, batchtopk, matryoshka, not to relu", config("sae: {relu: {k: 3}}\n")),
    Case("config-handling-foreign-to-architecture", C, "sae.relu.dead_handling: auxk does not apply to relu",
         config("sae: {relu: {dead_handling: auxk}}\n")),
    Case("config-unknown-wandb-mode", C, "log.wandb_mode must be one of online, offline, disabled",
         config("log: {use_wandb: true, wandb_mode: loud}\n")),
    Case("config-empty-model-name", C, "data.model_name must not be empty", config("data: {model_name: ''}\n")),
    Case("config-unusable-study-id", C, "--study-id '../x' is not a usable folder name", config("study_id: ../x\n")),
    # synthetic source, caught while parsing
    Case("synthetic-with-layer", ("--source", "synthetic", "--layer", "1"),
         "--layer does not apply to --source synthetic"),
    Case("synthetic-flag-without-source", ("--n-features", "10"),
         "--n-features does not apply to --source transformer"),
    Case("negative-noise-std", ("--source", "synthetic", "--noise-std", "-1"),
         "argument --noise-std: must be >= 0, got -1.0"),
    # the machine, the model and the data
    Case("torch-without-cuda", (*TINY, "--device", "cuda", "--study-id", "bad"),
         "--device cuda: this torch (", setup=cpu_torch, runs=True),
    Case("no-gpu", (*TINY, "--device", "cuda", "--study-id", "bad"),
         "--device cuda: torch has CUDA 12.8 but sees no GPU here", setup=no_gpu, runs=True),
    Case("gpu-index-out-of-range", (*TINY, "--device", "cuda:1", "--study-id", "bad"),
         "--device cuda:1: this machine has cuda:0 to cuda:0", setup=one_gpu, runs=True),
    Case("checkpoint-dir-under-a-file", (*TINY, "--checkpoint-dir", "{tmp}/file/ckpt"),
         "/file/ckpt is not writable: Not a directory", {"file": "x"}, runs=True),
    Case("checkpoint-dir-is-a-file", (*TINY, "--checkpoint-dir", "{tmp}/file"), "/file is not writable: File exists",
         {"file": "x"}, runs=True),
    Case("model-offline", (*TINY, "--model-name", "gpt2", "--study-id", "bad"),
         "model 'gpt2' is not in the Hugging Face cache and the Hub cannot be reached", setup=offline_hub,
         runs=True),
    Case("model-path-missing", (*TINY, "--model-name", "{tmp}/my-model", "--study-id", "bad"),
         "is neither a local folder nor a Hugging Face model name", runs=True),
    Case("layer-beyond-model", (*TINY, "--layer", "2", "--study-id", "bad"),
         "--layer 2 is beyond the model: tinylm has layers 0..1", runs=True),
    Case("wandb-checkpoints-without-wandb", ("--wandb-checkpoints",), "--wandb-checkpoints works with --use-wandb"),
    Case("ray-flag-without-ray", ("--cpus-per-arm", "2"), "--cpus-per-arm works with --executor ray"),
    Case("ray-address-unreachable", (*TINY, "--executor", "ray", "--ray-address", "127.0.0.1:9", "--study-id", "bad"),
         "--ray-address 127.0.0.1:9: no Ray cluster answers there", runs=True),
    Case("ray-address-malformed", (*TINY, "--executor", "ray", "--ray-address", "headnode", "--study-id", "bad"),
         "--ray-address headnode: expected auto or HOST:PORT", runs=True),
    Case("gpus-per-arm-on-cpu", ("--executor", "ray", "--gpus-per-arm", "1"),
         "--gpus-per-arm reserves GPUs that --device cpu does not use; add --device cuda"),
    Case("cuda-on-ray-without-gpus", ("--executor", "ray", "--device", "cuda"),
         "--device cuda with --executor ray needs --gpus-per-arm"),
    Case("cuda-index-on-ray", ("--executor", "ray", "--device", "cuda:1", "--gpus-per-arm", "1"),
         "--device cuda:1 with --executor ray: Ray gives each task its GPUs; use --device cuda"),
    Case("cpus-per-arm-too-fine", ("--executor", "ray", "--cpus-per-arm", "0.00001"),
         "--cpus-per-arm 1e-05: Ray takes at most 4 decimal places"),
    Case("cpus-per-arm-beyond-every-node", (*TINY, "--executor", "ray", "--cpus-per-arm", "4096", "--study-id", "bad"),
         "--cpus-per-arm 4096: no node of the Ray cluster has that many CPUs", runs=True),
    Case("layer-list-beyond-model", (*TINY, "--layer", "0,1,3", "--study-id", "bad"),
         "--layer 3 is beyond the model: tinylm has layers 0..1", runs=True),
    Case("unknown-hook-point", (*TINY, "--hook-point", "blocks.0.hook_nothing", "--study-id", "bad"),
         "unknown hook point 'blocks.0.hook_nothing' for tinylm", runs=True),
    Case("hook-point-beyond-model", (*TINY, "--hook-point", "blocks.2.hook_resid_post", "--study-id", "bad"),
         "unknown hook point 'blocks.2.hook_resid_post' for tinylm", runs=True),
    Case("hook-not-per-position", (*TINY, "--hook-point", "blocks.0.attn.hook_pattern", "--study-id", "bad"),
         "not [batch, position, features]", runs=True),
    Case("seq-len-beyond-context", (*TINY, "--seq-len", "129", "--study-id", "bad"),
         "--seq-len 129 exceeds the context length of tinylm (128)", runs=True),
    Case("k-above-d-sae", (*TINY, "--k", "257", "--study-id", "bad"),
         "--k 257 exceeds the number of latents d_sae = 256", runs=True),
    Case("batch-above-harvest", (*TINY, "--batch-size", "577", "--study-id", "bad"),
         "--batch-size 577 exceeds the 576 training activations", runs=True),
    Case("dataset-missing", (*TINY, "--dataset", "{tmp}/none.txt", "--study-id", "bad"),
         "none.txt' is not a readable file", runs=True),
    Case("dataset-empty", (*TINY, "--dataset", "{tmp}/d.txt", "--study-id", "bad"), "d.txt' contains no text",
         {"d.txt": "\n\n"}, runs=True),
    Case("dataset-not-utf8", (*TINY, "--dataset", "{tmp}/d.txt", "--study-id", "bad"),
         "d.txt' cannot be read as UTF-8 text", {"d.txt": b"\xff\xfe\x00\x01"}, runs=True),
    Case("dataset-jsonl-without-text", (*TINY, "--dataset", "{tmp}/d.jsonl", "--study-id", "bad"),
         "every JSONL line needs a string field 'text'", {"d.jsonl": '{"body": "a cat"}\n'}, runs=True),
    Case("dataset-too-short", (*TINY, "--dataset", "{tmp}/d.txt", "--study-id", "bad"),
         "--n-samples 40 x (--seq-len 17 - 1) needs 640", {"d.txt": "A cat sat.\n"}, runs=True),
    Case("concepts-not-word-lists", (*TINY, "--study", "emergence", "--concepts", "{tmp}/w.yaml", "--study-id", "bad"),
         "expected a mapping of category -> list of words, got a list", {"w.yaml": "- cat\n- dog\n"}, runs=True),
    # the checkpoint folder's studies
    Case("resume-nothing", (*TINY, "--resume"), "nothing to resume: no unfinished study in", runs=True),
    Case("resume-unknown-id", (*TINY, "--resume", "--study-id", "ghost"),
         "nothing to resume: there is no study 'ghost'", runs=True),
    Case("resume-other-settings", (*TINY, "--resume", "--study-id", "done", "--lr", "0.5"),
         "cannot resume 'done' with different settings: plans.0.arms.0.train.lr was 0.003, now 0.5", runs=True),
    Case("resume-other-dtype", (*TINY, "--resume", "--study-id", "done", "--dtype", "bfloat16"),
         "cannot resume 'done' with different settings: plans.0.arms.0.train.dtype was 'float32' (the default), "
         "now 'bfloat16'", runs=True),
    Case("resume-broken-record", (*TINY, "--resume", "--study-id", "broken"), "study.json is not valid JSON",
         setup=broken_record, runs=True),
    Case("study-id-exists", (*TINY, "--study-id", "done"), "study 'done' already exists", runs=True),
    Case("study-locked", (*TINY, "--study-id", "busy"), f"study busy is being run by process {os.getpid()}",
         setup=busy_study, runs=True),
    Case("report-missing", ("--report", "ghost"), "--report: there is no study 'ghost'", runs=True),
    Case("search-missing-study", ("--search", "cat", "--study-id", "ghost"), "--search: there is no study 'ghost'",
         runs=True),
    Case("search-unknown-arm", ("--search", "cat", "--study-id", "done", "--arm", "nope"),
         "--arm 'nope' is not an arm of study done (finished: topk-k8)", runs=True),
    Case("export-unknown-arm", ("--export", "saelens", "--study-id", "done", "--arm", "nope"),
         "--arm 'nope' is not an arm of study done", runs=True),
    Case("export-arm-unfinished", ("--export", "saelens", "--study-id", "half", "--arm", "topk-k8"),
         "--arm 'topk-k8' of study half is interrupted, not finished", runs=True, setup=lambda ctx: half_done(ctx)),
    Case("export-out-exists", ("--export", "saelens", "--study-id", "done", "--out", "{tmp}/there"),
         "there exists; remove it, or write elsewhere with --out DIR", runs=True,
         setup=lambda ctx: (ctx.tmp / "there").mkdir()),
    Case("synthetic-unreachable-l0", (*TOY, "--n-features", "40", "--mean-l0", "50", "--study-id", "bad"),
         "synthetic source: mean_l0 = 50.0 is unreachable", runs=True),
    Case("synthetic-groups-beyond-features", (*C, "--n-tokens", "4096", "--study-id", "bad", "--no-progress"),
         "n_groups*group_size = 800 exceeds n_features = 512",
         config("data: {source: synthetic}\nsynthetic: {n_groups: 200, group_size: 4}\n"), runs=True),
    Case("disk-full", (*TINY, "--study-id", "full"), "no space left on device", setup=disk_full, runs=True,
         resumable=True),
]


def snapshot(root: Path) -> set:
    """Every path under the checkpoint dir with its size and mtime, but for SELF_HEALING."""
    if not root.exists():
        return set()
    return {(str(p.relative_to(root)), p.stat().st_size if p.is_file() else None, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.relative_to(root).parts[0] not in SELF_HEALING}


def run_main(argv: list[str]) -> int:
    """main's exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module", autouse=True)
def sandbox(tmp_path_factory):
    """W&B off, and a scratch working directory: an input wrongly accepted writes nothing into the repo."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tinylm_models_dir):
    """The checkpoint dir every running case shares: tinylm and a finished study `done`."""
    root = tmp_path_factory.mktemp("bad-inputs") / "ckpt"
    shutil.copytree(tinylm_models_dir, root / "models")
    assert main([*TINY, "--checkpoint-dir", str(root), "--study-id", "done"]) == 0
    return root


# Two tests, so that the cases refused while parsing need no model: the session orders tests by
# whether they request tinylm (conftest), which a fixture fetched inside the test would hide.
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if not c.runs])
def test_bad_input_refused_while_parsing(case, request, tmp_path, monkeypatch, capsys):
    check(case, tmp_path / "ckpt", request, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.runs])
def test_bad_input_refused_at_run_time(case, ckpt, request, tmp_path, monkeypatch, capsys):
    check(case, ckpt, request, tmp_path, monkeypatch, capsys)


def check(case, root, request, tmp_path, monkeypatch, capsys):
    """The case exits 2 with one line and leaves the checkpoint dir as it found it."""
    ctx = Ctx(tmp_path, root, monkeypatch, request)
    if not case.runs:  # must fail while parsing: a wrongly accepted input must not start a run
        import experiments.studies.runner

        def tripwire(*_):
            raise AssertionError(f"{case.id}: the input was accepted")

        monkeypatch.setattr(experiments.studies.runner, "run_study", tripwire)
        monkeypatch.setattr(experiments.studies.runner, "rebuild_report", tripwire)
    argv = [arg.format(tmp=tmp_path, ckpt=root) for arg in case.argv]
    if "--checkpoint-dir" not in argv:
        argv += ["--checkpoint-dir", str(root)]
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    before_setup = {p.name for p in root.iterdir()} if root.exists() else set()
    if case.setup:
        case.setup(ctx)
    before = snapshot(root)
    try:
        code = run_main(argv)
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and case.fragment in err, err
        if case.resumable:
            study = root / argv[argv.index("--study-id") + 1]
            left = {path for path, *_ in snapshot(root) - before}
            assert all(Path(path).parts[0] == study.name for path in left), left
            monkeypatch.undo()  # space is back
            assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
            shutil.rmtree(study)
        assert snapshot(root) == before, "left behind: " + ", ".join(sorted(p for p, *_ in snapshot(root) ^ before))
    finally:
        # what the setup (or a failing case) put there goes, for the next case's sake
        for name in ({p.name for p in root.iterdir()} if root.exists() else set()) - before_setup - set(SELF_HEALING):
            if (root / name).is_dir():
                shutil.rmtree(root / name)
            else:
                (root / name).unlink()


def test_report_of_an_unknown_study_names_the_studies_there(ckpt, tmp_path, capsys):
    assert run_main(["--report", "ghost", "--checkpoint-dir", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --report: there is no study 'ghost' in ") and "; the studies there: " in err
    assert "done" in err.split("; the studies there: ")[1].split(", ")
    assert run_main(["--report", "ghost", "--checkpoint-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("; it holds no study")


def test_a_good_run_in_the_same_checkpoint_dir_still_succeeds(ckpt, capsys):
    assert main([*TINY, "--checkpoint-dir", str(ckpt), "--study-id", "after"]) == 0, capsys.readouterr().err


def test_the_doc_lists_exactly_the_catalogue():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    table = DOC.read_text().split("## Catalogue", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.MULTILINE)
    assert sorted(documented) == sorted(ids)


def test_bad_input_found_after_training_began_keeps_the_study(tmp_path, monkeypatch):
    """A usage error raised once an arm has started (a task on a Ray node that cannot read a file,
    a disk that fills) leaves the new study's folder, resumable; one raised before any arm ran
    leaves nothing."""
    import experiments.studies.runner as runner
    from config.cli import parse_args
    from config.records import ArmRecord, StudyRecord
    from config.schema import UsageError

    def raising(status):
        def run_locked(cfg, study_dir, stop):
            arm = ArmRecord("a-1", "a", "topk", "auxk", ["activations"], status=status)
            StudyRecord(study_dir.name, ["activations"], 0.0, "running", {}, [arm]).write(study_dir / "study.json")
            raise UsageError("found late")
        return run_locked

    for status, kept in (("pending", False), ("running", True)):
        monkeypatch.setattr(runner, "_run_locked", raising(status))
        cfg = parse_args(["--checkpoint-dir", str(tmp_path), "--study-id", status])
        with pytest.raises(UsageError, match="found late"):
            runner.run_study(cfg, None)
        assert (tmp_path / status).exists() == kept, status
