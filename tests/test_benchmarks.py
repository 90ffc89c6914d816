"""The benchmarks' own arithmetic: what they write into the docs is what they measured; and what
they say to bad input."""
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


def test_bench_study_refuses_fewer_than_one_repeat():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_study.py"), "--repeats", "0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr == "error: --repeats must be at least 1, got 0\n"
