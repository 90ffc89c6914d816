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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.table import Table, add_docs_flag, check_docs, write_docs  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("flags", nargs="*", help="flags for run_experiments.py, after `--` (default: none, the default study)")
    p.add_argument("--keep", action="store_true", help="keep the temporary checkpoint folder and print its path")
    add_docs_flag(p, "bench_study")
    a = p.parse_args()
    check_docs(a, "bench_study")
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
    print()
    table = Table(["phase", "seconds", "share"], [50, 8, 7])
    for name, label in LABELS.items():
        table.add(label, f"{timing[name]:.1f}", f"{timing[name] / total:.1%}")
    table.add("total", f"{total:.1f}", "")
    worst = max((n for n in LABELS if n != "training"), key=lambda n: timing[n])
    finding = (f"Process wall time {wall:.0f} s (the study's clock {total:.0f} s, the rest Python start-up and "
               f"imports). The largest phase besides training: {LABELS[worst]}, {timing[worst] / total:.1%} of the total.")
    print(f"\n{finding}")
    write_docs(a, "bench_study", [table.markdown(), finding])
    if a.keep:
        print(f"outputs kept in {tmp}")
    else:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
