"""Where in tinylm, and after how much training, do concepts get latents of their own?

    python benchmarks/bench_emergence.py --part layers   # every hook point, the default budget
    python benchmarks/bench_emergence.py --part budget   # one hook point, 1x, 2x, 4x the default epochs

Each row is one `run_experiments.py --study emergence --activation topk` run (a TopK SAE with the
default settings) into a temporary checkpoint folder that shares tinylm from checkpoints/models.
The figures come from the run's summary.json: per kind of concept (the 12 categories, the words),
the median held-out F1 of the dense probe on the raw activations (the ceiling), of the best raw
neuron (the floor), and of the SAE's best single latent and k-sparse probe at the end of training;
then how many categories emerged (held-out F1 >= 0.8 to the end), and the explained variance.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.table import Table, add_docs_flag, check_docs, write_docs  # noqa: E402

# Every distinct hook of tinylm's two blocks (blocks.1.hook_resid_pre is blocks.0.hook_resid_post).
HOOKS = [f"blocks.0.hook_{h}" for h in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")] + \
        [f"blocks.1.hook_{h}" for h in ("attn_out", "resid_mid", "mlp_out", "resid_post")]
DEFAULT_HOOK = "blocks.0.hook_resid_post"
DEFAULT_EPOCHS = 2


def run_study(tmp: Path, study_id: str, flags: list[str]) -> tuple[dict, float]:
    cmd = [sys.executable, str(ROOT / "run_experiments.py"), "--study", "emergence", "--activation", "topk", *flags,
           "--checkpoint-dir", str(tmp), "--study-id", study_id, "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{study_id} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((tmp / study_id / "summary.json").read_text()), time.perf_counter() - start


def medians(summary: dict) -> dict[str, dict[str, float]]:
    """kind -> the median dense probe, best neuron, single-latent and probe F1 (final), and the
    number of concepts emerged with one latent and with the probe."""
    em = summary["studies"]["emergence"]
    base = {b["concept"]: b for b in em["baselines"]}
    (arm,) = em["arms"]
    out = {}
    for kind in ("category", "word"):
        rows = [c for c in arm["concepts"] if c["concept"].startswith(kind + ":")]
        out[kind] = {
            "n": len(rows),
            "dense": float(np.median([base[c["concept"]]["dense_probe_f1"] for c in rows])),
            "neuron": float(np.median([base[c["concept"]]["best_neuron_f1"] for c in rows])),
            "single": float(np.median([c["final_single_f1"] for c in rows])),
            "probe": float(np.median([c["final_probe_f1"] for c in rows])),
            "emerged": sum(c["emerged_single_tokens"] is not None for c in rows),
            "emerged_probe": sum(c["emerged_probe_tokens"] is not None for c in rows),
            "near": sum(c.get("near_ceiling_single_tokens") is not None for c in rows),
        }
    return out


def pair(m: dict, key: str) -> str:
    return f"{m['category'][key]:.3f} / {m['word'][key]:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("layers", "budget"), required=True,
                   help="layers: every hook point of tinylm at the default budget; budget: one hook point at 1x, "
                        "2x and 4x the default epochs")
    p.add_argument("--hook-point", default=DEFAULT_HOOK, help=f"--part budget: the hook point (default: {DEFAULT_HOOK})")
    add_docs_flag(p, "bench_emergence_<part>")
    a = p.parse_args()
    block = f"bench_emergence_{a.part}"
    check_docs(a, block)
    tmp = Path(tempfile.mkdtemp(prefix="bench-emergence-"))
    models = ROOT / "checkpoints" / "models"
    if models.is_dir():
        (tmp / "models").symlink_to(models)
    f1 = "median F1 categories / words"
    if a.part == "layers":
        table = Table(["hook point", f"dense probe ({f1})", "best raw neuron", "TopK best latent", "TopK 8-probe",
                       "categories emerged (latent / probe)", "at 80% of dense", "explained variance", "s"])
        runs = [(hook, ["--hook-point", hook]) for hook in HOOKS]
    else:
        table = Table(["epochs", "training tokens", f"TopK best latent ({f1})", "TopK 8-probe",
                       "categories emerged (latent / probe)", "words emerged (latent / probe)", "at 80% of dense",
                       "explained variance", "s"])
        runs = [(str(e), ["--hook-point", a.hook_point, "--epochs", str(e)])
                for e in (DEFAULT_EPOCHS, 2 * DEFAULT_EPOCHS, 4 * DEFAULT_EPOCHS)]
    results = {}
    for name, flags in runs:
        summary, seconds = run_study(tmp, name.replace(".", "-"), flags)
        m, (arm,) = medians(summary), summary["arms"]
        results[name] = m
        cat, word = m["category"], m["word"]
        emerged = f"{cat['emerged']} / {cat['emerged_probe']} of {cat['n']}"
        near = f"{cat['near']} of {cat['n']}"
        ev = f"{arm['final']['explained_variance']:.4f}"
        if a.part == "layers":
            table.add(name, pair(m, "dense"), pair(m, "neuron"), pair(m, "single"), pair(m, "probe"), emerged, near,
                      ev, f"{seconds:.0f}")
        else:
            table.add(name, f"{arm['tokens']:,}", pair(m, "single"), pair(m, "probe"), emerged,
                      f"{word['emerged']} / {word['emerged_probe']} of {word['n']}", near, ev, f"{seconds:.0f}")
    parts = [table.markdown()]
    if a.part == "layers":
        ranked = sorted(results, key=lambda h: -results[h]["category"]["single"])
        parts.append("Median best-latent F1 on the categories, highest first: " + ", ".join(
            f"`{h}` {results[h]['category']['single']:.3f} (words {results[h]['word']['single']:.3f})"
            for h in ranked[:3]) + ".")
    else:
        first, last = results[runs[0][0]], results[runs[-1][0]]
        parts.append(f"From {runs[0][0]} to {runs[-1][0]} epochs at `{a.hook_point}` the median best-latent F1 moves "
                     f"from {first['category']['single']:.3f} to {last['category']['single']:.3f} on the categories "
                     f"and from {first['word']['single']:.3f} to {last['word']['single']:.3f} on the words.")
    print("\n" + parts[-1])
    write_docs(a, block, parts)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
