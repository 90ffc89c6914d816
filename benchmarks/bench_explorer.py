"""Server-side time of the explorer's pages: how long a request takes from the app's point of view.

    python benchmarks/bench_explorer.py --study-dir checkpoints/default                 # a d_sae 2,048 arm
    python benchmarks/bench_explorer.py --study-dir checkpoints/default --arm topk-k32-auxk

Builds the app (experiments/explorer/app.py) in this process and requests each page through
FastAPI's TestClient, one thread for torch as `--serve` runs it: the first request of each page
warms it (it loads the arm's feature analysis, or the subject model), then the median of --repeat
requests is reported, with the size of the HTML. Times include rendering the page, not the network
or the browser. The steering page generates --new-tokens tokens twice (unsteered and steered),
running the whole sequence again at every step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.table import Table, add_docs_flag, check_docs, write_docs  # noqa: E402
from experiments.explorer import Explorer  # noqa: E402
from experiments.explorer.app import create_app  # noqa: E402

PROMPT = "Once there was a cat named Tom. Tom had three red apples in his bag. On Monday he went to the park."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study-dir", default="checkpoints/default", help="a finished tinylm study (default: %(default)s)")
    p.add_argument("--arm", default=None, help="the arm (default: the first finished arm with the largest d_sae)")
    p.add_argument("--repeat", type=int, default=5, help="timed requests per page (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=20, help="tokens the steering page generates (default: %(default)s)")
    p.add_argument("--word", default="cat", help="the table filter's and the search's word (default: %(default)s)")
    add_docs_flag(p, "bench_explorer")
    args = p.parse_args()
    check_docs(args, "bench_explorer")
    from fastapi.testclient import TestClient

    torch.set_num_threads(1)
    ex = Explorer(args.study_dir)
    done = [a for a in ex.arms() if a["status"] == "complete" and a["runs_model"]]
    arm = args.arm or max(done, key=lambda a: a["d_sae"] or 0)["name"]
    fa = ex.analysis(arm)
    f1 = fa.arrays.get("concept_f1")
    latent = int((f1 if f1 is not None else fa.arrays["n_fired"]).argmax())  # a typical page: a concept latent
    client = TestClient(create_app(ex))
    word = args.word
    pages = [
        ("study", "/", {}),
        ("feature table, by id", f"/arm/{arm}", {}),
        ("feature table, by density", f"/arm/{arm}", {"sort": "density"}),
        (f"feature table, filter '{word}'", f"/arm/{arm}", {"q": word}),
        ("feature detail", f"/arm/{arm}/latent/{latent}", {}),
        ("prompt analyser", f"/arm/{arm}/analyse", {"prompt": PROMPT}),
        (f"steering, {args.new_tokens} tokens", f"/arm/{arm}/steer",
         {"prompt": "Once there was a", "latents": str(latent), "alpha": "8", "max_new_tokens": args.new_tokens}),
        (f"search '{word}', every arm", "/search", {"q": word}),
    ]
    d_sae = len(fa.labels)
    intro = (f"Arm `{arm}` (d_sae {d_sae:,}) of study `{ex.record.study_id}`, latent {latent} (the best concept match); "
             f"median of "
             f"{args.repeat} requests after a warm-up, through FastAPI's TestClient in one process, torch on one thread.")
    print(intro)
    table = Table(["page", "first request", "median", "min", "max", "HTML"], widths=[32, 13, 8, 8, 8, 7])
    for name, url, params in pages:
        start = time.perf_counter()
        first = client.get(url, params=params)
        warm = time.perf_counter() - start
        if first.status_code != 200:
            raise SystemExit(f"error: {url} answered {first.status_code}: {first.text[:300]}")
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            client.get(url, params=params)
            times.append(time.perf_counter() - start)
        table.add(name, f"{warm * 1000:,.0f} ms", f"{statistics.median(times) * 1000:,.0f} ms",
                  f"{min(times) * 1000:,.0f} ms", f"{max(times) * 1000:,.0f} ms", f"{len(first.content) / 1024:,.0f} KiB")
    write_docs(args, "bench_explorer", [intro, table.markdown()])


if __name__ == "__main__":
    main()
