"""The benchmarks' own arithmetic: what they write into the docs is what they measured; and what
they say to bad input."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config.schema import UsageError
from experiments.train.trainer import check_device
from benchmarks.bench_parity import parity_table

ROOT = Path(__file__).resolve().parents[1]


def test_parity_table_pivots_rows_per_reference_and_counts_parity():
    def row(library, name, l0, recovered):
        return {"library": library, "name": name, "l0": l0, "frac_recovered": recovered}

    results = {
        ("standard", "topk", 0): [row("ours", "topk", 5.0, 0.97), row("SAELens", "TopKTrainingSAE", 5.0, 0.74),
                                  row("sparsify", "SparseCoder", 4.99, 0.90)],
        ("standard", "topk", 1): [row("ours", "topk", 5.0, 0.90), row("SAELens", "TopKTrainingSAE", 5.0, 0.95),
                                  row("sparsify", "SparseCoder", 7.0, 0.80)],
    }
    lines = parity_table(results).splitlines()
    assert lines[0] == "| ours | reference | standard, seed 0 | standard, seed 1 | at parity |"
    # seed 1: 0.05 fewer recovered than SAELens (margin 0.02); sparsify's L0 40% above ours (tolerance 20%)
    assert lines[2] == "| topk | SAELens TopKTrainingSAE | 5.00 / 5.00, 0.970 / 0.740 | 5.00 / 5.00, 0.900 / 0.950 | 1 of 2 |"
    assert lines[3] == "| topk | sparsify SparseCoder | 5.00 / 4.99, 0.970 / 0.900 | 5.00 / 7.00, 0.900 / 0.800 | 1 of 2 |"
    assert len(lines) == 4


def test_a_torch_without_cuda_is_told_how_its_own_venv_gets_the_cuda_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UsageError, match=r"^--device cuda: this torch \(.*\) is built without CUDA; reinstall "
                                         r"it from PyTorch's CUDA index \(make clean-venv, then make run "
                                         r"TORCH_INDEX="):
        check_device("cuda")
    with pytest.raises(UsageError, match=r"CUDA index \(rebuild the peers' venv\) or use --device cpu$"):
        check_device("cuda", "rebuild the peers' venv")


@pytest.mark.skipif(torch.cuda.is_available(), reason="here --device cuda would run the benchmark")
def test_bench_train_without_cuda_says_so_in_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--device", "cuda",
                           "--shapes", "tinylm"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: --device cuda: this torch (") and len(done.stderr.splitlines()) == 1


def test_bench_study_reports_the_run_with_the_median_wall_time():
    from benchmarks.bench_study import median_run

    runs = [({"total": 30.0}, 31.0), ({"total": 20.0}, 21.5), ({"total": 25.0}, 26.0)]
    assert median_run(runs) == ({"total": 25.0}, 26.0)
    assert median_run(runs[:2]) == ({"total": 30.0}, 31.0)  # of two, the slower
    assert median_run(runs[1:2]) == ({"total": 20.0}, 21.5)


def test_bench_study_refuses_a_baseline_that_is_no_commit():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_study.py"), "--baseline", "no-such-commit",
                           "--", "--quick"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr == "error: --baseline no-such-commit: not a commit of this repository\n"


@pytest.mark.slow
def test_bench_study_runs_a_baseline_commit_from_its_own_worktree_in_turns(tinylm_models_dir):
    """--baseline HEAD: each turn runs the study from a worktree of HEAD, then from this checkout;
    the table has a column for each, the finding their ratio, and the worktree is gone after."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                          check=True).stdout.strip()
    tiny = ["--study", "activations", "--activation", "topk", "--n-samples", "48", "--seq-len", "33", "--batch-size",
            "128", "--expansion-factor", "2", "--k", "8"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_study.py"), "--repeats", "2",
                           "--baseline", "HEAD", "--", *tiny], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TINYLM_MODELS_DIR": str(tinylm_models_dir)})
    assert done.returncode == 0, done.stderr[-2000:]
    ran = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("$ ")]
    here = str(ROOT / "run_experiments.py")
    assert len(ran) == 4 and ran[1] == ran[3] == here  # in turns: the baseline, then this checkout
    baseline = Path(ran[0]).parent
    assert ran[2] == ran[0] != here and baseline.name == "baseline"
    name = " ".join(tiny)
    header = next(line for line in done.stdout.splitlines() if line.startswith("phase"))
    assert f"{name} at {head}" in header and f"{name} here" in header
    assert f"{name} here, in turns with {head}: " in done.stdout and " times its wall time." in done.stdout
    assert not baseline.exists()
    listed = subprocess.run(["git", "worktree", "list"], capture_output=True, text=True, cwd=ROOT).stdout
    assert str(baseline) not in listed


def test_bench_study_refuses_fewer_than_one_repeat():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_study.py"), "--repeats", "0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr == "error: --repeats must be at least 1, got 0\n"
