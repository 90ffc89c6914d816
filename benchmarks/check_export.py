"""Every arm of a study exported for SAELens (experiments/export/saelens.py), loaded back with SAELens,
and checked to encode and decode as our SAE does.

    make check-export                                    # builds .venv-peers/ on first use, then runs this
    .venv-peers/bin/python benchmarks/check_export.py --study-dir checkpoints/default [--out DIR]

Runs in the peers venv (SAELens needs transformer-lens < 4); our side needs only torch, numpy,
safetensors and the harness's models/ and config/ packages, imported from the repository root.
For each complete arm: export to DIR/<arm_id> (a temporary folder without --out), load it with
`sae_lens.SAE.load_from_disk`, and encode the first ROWS eval rows of the study's activation cache
(raw activations: the saved weights are folded) with both. One row per arm:

    encode |diff|   max over the batch of |SAELens encode(x) - our encode(x)|
    decode |diff|   max of |SAELens decode(f) - our decode(f)| for our codes f = our encode(x)
    rel             the larger of the two, each divided by the largest |value| of our own output,
                    so a reader can see the error against the scale of the numbers
    verdict         PASS when both maxima are <= TOL

TOL is absolute, 1e-5, as required ("reproduces our encode/decode to 1e-5"): on these activations
(mean squared norm ~150, feature activations and reconstructions of order 1-10) float32 rounding is
~1e-6 at most, so an exact mapping passes with room to spare and a wrong one (a threshold off, a
selection different, a bias missing) misses by orders of magnitude. The rel column says how the
absolute error compares with the outputs' scale, should a study's activations be much larger.
Exits 1 when an arm fails (or none was checked), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config.files import read_json  # noqa: E402
from config.records import StudyRecord  # noqa: E402
from experiments.export.saelens import SPARSITY_FILENAME, export_saelens, saelens_metadata  # noqa: E402
from models.sae.base import trained_on  # noqa: E402
from models.sae.base import SAE as OurSAE  # noqa: E402

ROWS = 4096
TOL = 1e-5


def resolve_cache(study_dir: Path, cache: str | None) -> Path:
    """The study's activation cache: study.json records its path as the run gave it (relative to the
    folder the run started in, normally the one holding checkpoints/)."""
    if not cache:
        raise SystemExit(f"error: {study_dir}/study.json names no activation cache")
    path = Path(cache)
    for candidate in ([path] if path.is_absolute() else [path, study_dir.parent.parent / path, ROOT / path]):
        if (candidate / "acts.npy").exists() and (candidate / "manifest.json").exists():
            return candidate
    raise SystemExit(f"error: activation cache {cache} of {study_dir} not found (acts.npy + manifest.json)")


def eval_rows(cache: Path, n: int) -> torch.Tensor:
    manifest = read_json(cache / "manifest.json")
    acts = np.load(cache / "acts.npy", mmap_mode="r")
    start = int(manifest["split"]["n_train_rows"])  # the eval rows are the last ones
    x = torch.from_numpy(np.array(acts[start:start + n], dtype=np.float32))
    if len(x) == 0:
        raise SystemExit(f"error: {cache} has no eval rows")
    return x


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study-dir", type=Path, required=True, help="a study folder (holding study.json)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the exports to OUT/<arm_id> and keep them (default: a temporary folder, removed)")
    p.add_argument("--rows", type=int, default=ROWS, help=f"eval rows to compare on (default {ROWS})")
    a = p.parse_args()
    study_dir = a.study_dir
    if not (study_dir / "study.json").exists():
        print(f"error: --study-dir: {study_dir}/study.json not found", file=sys.stderr)
        return 2
    record = StudyRecord.from_dict(read_json(study_dir / "study.json"))
    arms = [arm for arm in record.arms if arm.status == "complete"]
    skipped = [arm for arm in record.arms if arm.status != "complete"]
    if a.out is not None:
        clash = [str(a.out / arm.arm_id) for arm in arms if (a.out / arm.arm_id).exists()]
        if clash:
            print(f"error: --out: {clash[0]} already exists (the export never overwrites)", file=sys.stderr)
            return 2

    rows_at = {hook: eval_rows(resolve_cache(study_dir, info.get("cache")), a.rows)
               for hook, info in record.hooks.items()}

    import sae_lens
    from sae_lens import SAE as SAELensSAE

    print(f"study {record.study_id}: {len(arms)} complete arms, {a.rows} eval rows of the activation cache of "
          f"{', '.join(rows_at)}; sae-lens {sae_lens.__version__}, torch {torch.__version__}; "
          f"PASS = max |diff| <= {TOL:g} on encode and decode", flush=True)
    header = ("arm", "architecture", "SAELens class", "encode |diff|", "decode |diff|", "rel", "sparsity", "verdict")
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="saelens-export-") as tmp:
        out_root = a.out if a.out is not None else Path(tmp)
        for arm in arms:
            arm_dir, x = study_dir / arm.arm_id, rows_at[record.hook_of(arm)]
            try:
                metadata = saelens_metadata(trained_on(arm_dir))
                path = export_saelens(arm_dir, out_root / arm.arm_id, metadata)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    theirs = SAELensSAE.load_from_disk(str(path), device="cpu")
                ours = OurSAE.load(arm_dir).eval()  # eval: BatchTopK encodes by its threshold
                with torch.no_grad():
                    f_ours = ours.encode(x)
                    f_theirs = theirs.encode(x)
                    enc = (f_theirs - f_ours).abs().max().item()
                    x_ours = ours.decode(f_ours)
                    dec = (theirs.decode(f_ours) - x_ours).abs().max().item()
                    rel = max(enc / max(f_ours.abs().max().item(), 1e-30), dec / max(x_ours.abs().max().item(), 1e-30))
                if theirs.cfg.metadata.hook_name != metadata["hook_name"]:
                    raise ValueError(f"hook_name read back as {theirs.cfg.metadata.hook_name!r}")
                ok = enc <= TOL and dec <= TOL
                rows.append((arm.arm_id, arm.architecture, type(theirs).__name__, f"{enc:.2e}", f"{dec:.2e}",
                             f"{rel:.2e}", "yes" if (path / SPARSITY_FILENAME).exists() else "-",
                             "PASS" if ok else "FAIL"))
            except Exception as err:  # noqa: BLE001 -- one arm's failure is a row, not the end of the check
                ok = False
                rows.append((arm.arm_id, arm.architecture, "-", "-", "-", "-", "-",
                             f"FAIL: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
            failed += not ok
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    for arm in skipped:
        print(f"skipped {arm.arm_id}: status {arm.status}")
    if a.out is not None:
        print(f"exports in {a.out}")
    if not arms:
        print("no complete arm to check")
        return 1
    print(f"{len(arms) - failed} of {len(arms)} arms PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
