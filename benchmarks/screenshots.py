"""Screenshots of the explorer's pages for docs/explorer.md, taken with headless Chromium.

    python benchmarks/screenshots.py --study-dir checkpoints/default          # make screenshots
    python benchmarks/screenshots.py --study-dir checkpoints/default --arm relu-coef0.0065 --out /tmp/shots

Starts `run_experiments.py --serve` on a free port for the study, then saves, 1280 x 900 each:
study.png (the study), table.png (the arm's latents by density), latent.png (the latent that
matches a concept category best), analyse.png (a prompt analysed) and steer.png (a continuation
steered with the latent whose logit effects promote that category most, at alpha 2 times its
largest eval activation). Needs `chromium` (Debian:
apt-get install chromium).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.explorer import Explorer  # noqa: E402
from models.tinylm.corpus import CONCEPTS  # noqa: E402

PROMPT = "Once there was a cat named Tom. Tom had three red apples in his bag. On Monday he went to the park."
STEER_PROMPT = "Once there was a"


def choose(ex: Explorer, arm: str) -> tuple[int, int, str]:
    """(latent for the detail page, latent to steer with, the category): the category some latent
    matches best, the latent with the best F1 for it, and the alive latent with the most of the
    category's words among the tokens it promotes most (ties: the larger top logit effect)."""
    fa = ex.analysis(arm)
    a = fa.arrays
    cats = np.flatnonzero([fa.concept_names[c].startswith("category:") if c >= 0 else False
                           for c in a["concept_index"]])
    detail = int(cats[np.argmax(a["concept_f1"][cats])])
    concept = fa.concept_names[int(a["concept_index"][detail])]
    words = set(CONCEPTS[concept.split(":", 1)[1]])
    in_concept = np.array([[fa.token_text.get(int(t), "").strip() in words for t in row] for row in a["logit_top_ids"]])
    score = in_concept.sum(1) + 1e-3 * a["logit_top_values"][:, 0] / max(float(a["logit_top_values"][:, 0].max()), 1e-9)
    score[a["n_fired"] == 0] = -1
    return detail, int(np.argmax(score)), concept


def start_server(study_dir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_experiments.py"), "--serve", study_dir.name,
                             "--checkpoint-dir", str(study_dir.parent), "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(f"  server: {line.rstrip()}")
        found = re.search(r"explorer for study \S+: (http://\S+/)", line)
        if found:
            return proc, found.group(1)
    raise SystemExit(f"error: the server exited ({proc.wait()}) without printing its URL")


def shoot(chromium: str, url: str, path: Path, size: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           "--force-device-scale-factor=1", f"--window-size={size}", f"--screenshot={path}", url],
                          capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not path.exists():
        raise SystemExit(f"error: chromium failed on {url}: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study-dir", default="checkpoints/default", help="a finished tinylm study (default: %(default)s)")
    p.add_argument("--arm", default="topk-k32-auxk", help="the arm shown (default: %(default)s)")
    p.add_argument("--out", default="docs/explorer", help="folder for the PNGs (default: %(default)s)")
    p.add_argument("--size", default="1280,900", help="window size (default: %(default)s)")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("error: no chromium on PATH (Debian: apt-get install chromium)")
    study_dir = Path(args.study_dir).resolve()
    ex = Explorer(study_dir)
    detail, steer, concept = choose(ex, args.arm)
    max_act = float(ex.analysis(args.arm).arrays["max_act"][steer])
    arm = quote(args.arm, safe="")
    pages = {
        "study": "",
        "table": f"arm/{arm}?{urlencode({'sort': 'density', 'per_page': 100})}",
        "latent": f"arm/{arm}/latent/{detail}",
        "analyse": f"arm/{arm}/analyse?{urlencode({'prompt': PROMPT})}",
        "steer": f"arm/{arm}/steer?" + urlencode({"prompt": STEER_PROMPT, "latents": steer, "alpha": f"{2 * max_act:.3g}",
                                                  "max_new_tokens": 24}),
    }
    print(f"{args.arm}: latent {detail} matches {concept} best; steering with latent {steer}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(study_dir)
    try:
        for name, page in pages.items():
            took = shoot(chromium, url + page, out / f"{name}.png", args.size)
            print(f"{out / f'{name}.png'}  {url + page}  ({took:.1f} s)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
