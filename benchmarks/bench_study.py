"""Wall time of a whole study, split into phases: where does a run's time go?

    python benchmarks/bench_study.py                         # the default study (what `make run` runs)
    python benchmarks/bench_study.py -- --quick --study activations

Runs `run_experiments.py` with the given flags in a fresh process, into an empty temporary
checkpoint folder (so the activation cache is harvested anew), with the cached subject model
reused from checkpoints/models when it is there. The split is the study's own phase clock
(`experiments/timing.py`), written to summary.json as "timing": each second is charged to the
innermost phase running at the time, so UMAP inside an eval counts as UMAP, and "other" is what
no phase covers (imports, planning, the terminal tables).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = {
    "model": "load the subject model",
    "harvest": "harvest activations",
    "training": "training steps",
    "eval": "evaluation (metrics, CE/KL, probes)",
    "umap": "UMAP embeddings",
    "logging": "logging (metrics.csv, W&B)",
    "checkpoints": "checkpoints and weights",
    "report": "analysis and report figures",
    "other": "other (imports, planning, tables)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("flags", nargs="*", help="flags for run_experiments.py, after `--` (default: none, the default study)")
    p.add_argument("--keep", action="store_true", help="keep the temporary checkpoint folder and print its path")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-study-"))
    models = ROOT / "checkpoints" / "models"
    if models.is_dir():
        (tmp / "models").symlink_to(models)
    cmd = [sys.executable, str(ROOT / "run_experiments.py"), *a.flags, "--checkpoint-dir", str(tmp),
           "--study-id", "bench", "--no-progress"]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the study failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    timing = json.loads((tmp / "bench" / "summary.json").read_text())["timing"]
    total = timing["total"]
    print(f"\nprocess wall time {wall:.1f} s; the study's clock {total:.1f} s (the rest: Python start-up and imports "
          f"before the clock starts)\n")
    print(f"{'phase':<40} {'seconds':>8} {'share':>7}")
    for name, label in LABELS.items():
        print(f"{label:<40} {timing[name]:>8.1f} {timing[name] / total:>7.1%}")
    worst = max((n for n in LABELS if n != "training"), key=lambda n: timing[n])
    share = timing[worst] / total
    print(f"\nlargest non-training phase: {LABELS[worst]}, {share:.1%} of the total "
          f"({'within' if share <= 0.25 else 'above'} a quarter)")
    if a.keep:
        print(f"outputs kept in {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
