"""Wall time of whole studies, split into phases: where does a run's time go?

    python benchmarks/bench_study.py                         # the default study and --quick, side by side
    python benchmarks/bench_study.py -- --quick --study activations
    python benchmarks/bench_study.py --repeats 3              # each study 3 times, the median run shown
    python benchmarks/bench_study.py --repeats 3 --baseline e3bd9b0 -- --quick   # against that commit, in turns

Runs `run_experiments.py` in a fresh process per study, into an empty temporary checkpoint folder
(so the activation cache is harvested anew), with the cached subject model reused from
checkpoints/models (or $TINYLM_MODELS_DIR) when it is there: without flags the default study (what
`make run` runs) and `--quick`, one after the other, each against its target; with flags, that
study alone. The split is the study's own phase clock (`experiments/timing.py`), written to
summary.json as "timing": each second is charged to the innermost phase running at the time, so
UMAP inside an eval counts as UMAP, and "other" is what no phase covers (imports, planning, the
terminal tables). The process wall time adds Python's start-up and the imports before the clock
starts.

The same code has taken 1.2 times as long on one day as on another, so a change is measured against
the code before it in the same minutes: `--baseline COMMIT` checks that commit out into a temporary
git worktree and runs each study there and here in turns, with this checkout's Python and cached
tinylm; the table then has a column for each, and the finding the ratio of their median times.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.table import Table, add_docs_flag, check_docs, refuse, write_docs  # noqa: E402

LABELS = {
    "model": "load the subject model",
    "harvest": "harvest activations",
    "baselines": "concept baselines (dense probe, raw neurons)",
    "training": "training steps",
    "eval": "evaluation (metrics, CE/KL, probes)",
    "umap": "UMAP embeddings",
    "features": "feature analysis (contexts, logit effects, labels)",
    "logging": "logging (metrics.csv, W&B)",
    "checkpoints": "checkpoints and weights",
    "report": "analysis and report figures",
    "other": "other (imports, planning, tables)",
}


# What a user waits for, once tinylm is cached, on 2 CPU cores (issue 23): the process's wall time.
TARGETS = {"default study": 240.0, "--quick": 20.0}


def machine_speed() -> str:
    """How fast this machine is at what a small study spends its time on, measured before the studies
    run: Python's interpreter, torch's per-op overhead and its matmuls. The same code has taken 1.6x
    as long on one day as on another on the "same" 2-core machine, nearly all of it in the first two
    (the matmul rate barely moved): compare timings between days through these figures."""
    import torch

    def best(work, repeat: int = 5) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        return min(times)

    def python_loop() -> None:
        total = 0
        for i in range(1_000_000):
            total += i

    small = torch.zeros(512, 128)
    a, b = torch.randn(4096, 768), torch.randn(768, 6144)
    a @ b  # warm-up
    ns_per_iteration = best(python_loop) * 1e3
    us_per_op = best(lambda: [small.add_(1.0) for _ in range(2000)]) / 2000 * 1e6
    gflops = 2 * 4096 * 768 * 6144 / best(lambda: a @ b) / 1e9
    return (f"This machine, before the runs: {ns_per_iteration:.0f} ns per Python loop iteration, {us_per_op:.1f} µs "
            f"per small torch op ([512, 128] add_), {gflops:.0f} GFLOP/s in a 4096 x 768 x 6144 float32 matmul.")


def run_study(flags: list[str], tmp: Path, code: Path = ROOT) -> tuple[dict[str, float], float]:
    """The study's phase clock (summary.json's "timing") and the process's wall time, with the
    harness's code from the checkout `code` (run from its folder, its own modules come first)."""
    tmp.mkdir()
    models = Path(os.environ.get("TINYLM_MODELS_DIR") or ROOT / "checkpoints" / "models")
    if models.is_dir():
        (tmp / "models").symlink_to(models)
    cmd = [sys.executable, str(code / "run_experiments.py"), *flags, "--checkpoint-dir", str(tmp),
           "--study-id", "bench", "--no-progress"]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, env=os.environ.copy(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the study failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((tmp / "bench" / "summary.json").read_text())["timing"], wall


def median_run(runs: list[tuple[dict[str, float], float]]) -> tuple[dict[str, float], float]:
    """Of a study's runs (phase clock, wall time), the one with the median wall time (of an even
    number, the slower of the middle two: a benchmark should not flatter)."""
    return sorted(runs, key=lambda run: run[1])[len(runs) // 2]


def commit_of(name: str) -> str:
    """The short hash of the commit `name` names in this repository."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "--verify", "--quiet",
                               f"{name}^{{commit}}"], capture_output=True, text=True)
    except FileNotFoundError:
        refuse("--baseline needs git, which is not installed")
    if done.returncode != 0:
        refuse(f"--baseline {name}: not a commit of this repository")
    return done.stdout.strip()


@contextlib.contextmanager
def worktree(commit: str, where: Path) -> Iterator[Path]:
    """The commit's files in a temporary git worktree at `where`, removed afterwards."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(where), commit],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("flags", nargs="*", help="flags for run_experiments.py, after `--` (default: none: the default "
                   "study, then --quick)")
    p.add_argument("--keep", action="store_true", help="keep the temporary checkpoint folders and print their path")
    p.add_argument("--repeats", type=int, default=1, help="runs of each study, taken in turns; the table shows "
                   "the run with the median wall time and the finding all of them (default: 1)")
    p.add_argument("--baseline", metavar="COMMIT", help="also run each study with the code of COMMIT, in turns with "
                   "this checkout's, and compare; --docs then writes the block of benchmark bench_study_baseline "
                   "(default: off)")
    add_docs_flag(p, "bench_study")
    a = p.parse_args()
    if a.repeats < 1:
        refuse(f"--repeats must be at least 1, got {a.repeats}")
    block = "bench_study" if a.baseline is None else "bench_study_baseline"
    check_docs(a, block)
    baseline = commit_of(a.baseline) if a.baseline is not None else None
    studies = {" ".join(a.flags): a.flags} if a.flags else {"default study": [], "--quick": ["--quick"]}
    speed = machine_speed()
    tmp = Path(tempfile.mkdtemp(prefix="bench-study-"))
    with contextlib.ExitStack() as stack:
        codes = {"": ROOT}
        if baseline is not None:  # the baseline first in each turn, this checkout second
            codes = {f" at {baseline}": stack.enter_context(worktree(baseline, tmp / "baseline")), " here": ROOT}
        # In turns, so that a machine that slows down or speeds up during the runs weighs on every study.
        columns = {name + at: (flags, code) for name, flags in studies.items() for at, code in codes.items()}
        repeated = {column: [] for column in columns}
        for r in range(a.repeats):
            for i, (column, (flags, code)) in enumerate(columns.items()):
                repeated[column].append(run_study(flags, tmp / f"run-{i}-{r}", code))
    runs = {column: median_run(done) for column, done in repeated.items()}
    print()
    table = Table(["phase", *runs], [50, *(max(14, len(n)) for n in runs)])
    for phase, label in LABELS.items():
        table.add(label, *(f"{t[phase]:.1f} ({t[phase] / t['total']:.0%})" for t, _ in runs.values()))
    table.add("the study's clock", *(f"{t['total']:.1f}" for t, _ in runs.values()))
    table.add("process wall time", *(f"{wall:.1f}" for _, wall in runs.values()))
    verdicts = []
    for name, (timing, wall) in runs.items():
        worst = max((n for n in LABELS if n != "training"), key=lambda n: timing[n])
        target = TARGETS.get(name.removesuffix(" here"))
        aim = f" against a target of {target:.0f} s: {'met' if wall <= target else 'not met'}" if target else ""
        walls = sorted(w for _, w in repeated[name])
        spread = (f" (the median of {len(walls)} runs: {', '.join(f'{w:.1f}' for w in walls)} s)"
                  if len(walls) > 1 else "")
        verdicts.append(f"{name}: {wall:.1f} s{spread}{aim}; the largest phase besides training is {LABELS[worst]} "
                        f"({timing[worst] / timing['total']:.0%}).")
    if baseline is not None:
        for name in studies:
            (_, before), (_, after) = runs[f"{name} at {baseline}"], runs[f"{name} here"]
            verdicts.append(f"{name} here, in turns with {baseline}: {after / before:.2f} times its wall time.")
    shown = "the run with the median wall time of each study: " if a.repeats > 1 else ""
    finding = (f"Seconds per phase ({shown}share of the study's clock); the process wall time adds Python's start-up "
               "and the imports before the clock starts. " + " ".join(verdicts) + " " + speed)
    print(f"\n{finding}")
    write_docs(a, block, [table.markdown(), finding])
    if a.keep:
        print(f"outputs kept in {tmp}")
    else:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
