"""The check behind every "resumed equals uninterrupted" test: two study folders hold the same
outcome, bit for bit."""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file


def assert_same_outcome(a: Path, b: Path) -> None:
    """summary.json's arms, final metrics and analyses; every arm's weights, metrics.csv, probe files
    and feature analysis."""
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert [x["arm_id"] for x in sa["arms"]] == [x["arm_id"] for x in sb["arms"]]
    assert [x["final"] for x in sa["arms"]] == [x["final"] for x in sb["arms"]]
    assert sa["studies"] == sb["studies"]
    for arm in sa["arms"]:
        wa, wb = (load_file(str(d / arm["arm_id"] / "sae.safetensors")) for d in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), arm["arm_id"]
        assert (a / arm["arm_id"] / "metrics.csv").read_text() == (b / arm["arm_id"] / "metrics.csv").read_text()
        probes = [sorted((d / arm["arm_id"] / "probes").glob("eval-*.npz")) for d in (a, b)]
        assert [p.name for p in probes[0]] == [p.name for p in probes[1]], arm["arm_id"]
        for p, q in zip(*probes):  # concept scores, firing statistics, UMAP coordinates
            with np.load(p) as u, np.load(q) as v:
                assert u.files == v.files and all(same_array(u[k], v[k]) for k in u.files), p
        features = [d / arm["arm_id"] / "features" for d in (a, b)]
        assert all((f / "features.json").exists() for f in features), arm["arm_id"]
        assert (features[0] / "features.json").read_text() == (features[1] / "features.json").read_text()
        fa, fb = (load_np(str(f / "features.safetensors")) for f in features)
        assert fa.keys() == fb.keys() and all(same_array(fa[k], fb[k]) for k in fa), arm["arm_id"]


def same_array(x: np.ndarray, y: np.ndarray) -> bool:
    """Equal in shape and values, NaN where the other has NaN (a concept absent from the eval split)."""
    return np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")
