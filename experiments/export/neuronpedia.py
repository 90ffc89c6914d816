"""An arm's feature analysis as Neuronpedia feature batches, written offline (nothing is sent).

Schema. The batches follow the upload route of the `neuronpedia` Python package, version 1.2.1
(PyPI, Apache-2.0): `neuronpedia.requests.feature_request.FeatureRequest.upload_batch(model_id,
source, features)` POSTs {"modelId", "source", "features": [...]} to
https://neuronpedia.org/api/feature/upload-batch, at most MAX_FEATURES_PER_BATCH = 128 features,
each built from the package's dataclasses `np_feature.Feature` (index, density, top_logits /
bottom_logits as `np_feature.Logit` {token, value}), `np_explanation.Explanation` (text, method,
explainer_model) and `np_activation.Activation` (tokens, values, quantileMax, quantileMin,
quantileFraction). A batch file here is that request body exactly:

  {"modelId": str, "source": str, "features": [
     {"index": int, "density": float,
      "activations": [{"tokens": [str], "values": [float], "quantileMax": null, "quantileMin": null,
                       "quantileFraction": null}],
      "explanations": [{"text": str, "methodName": str, "modelName": null}],
      "topLogits": [{"token": str, "value": float}] | null, "bottomLogits": [...] | null}]}

What goes where. density = the analysis' density (fraction of eval tokens on which the latent
fires; Neuronpedia reads its stored frac_nonzero back as a Feature's density). activations = the
top contexts, largest first, one per stored top row (pads dropped): tokens = the context's token
texts (token_text) with the slots outside the sequence (token -1) dropped, values = the latent's
activation on each kept token. Logits = logit_top/bottom_ids as token texts with their effects
(null when the analysis has none). explanations = our auto label, with methodName EXPLANATION_METHOD
(none where the label is ""). The schema has no place for the maximum activation (it is the first
activation's largest value), the position of each context's maximum, the quantile samples (their
bins do not match the histogram's, so no quantileFraction could be given) or the decoder
neighbours: those are not exported. Values are the float32 activations written in their shortest
round-tripping form.

Neuronpedia names: modelId = meta["neuronpedia_model_id"] (default meta["model_name"]); source =
"<layer>-<source set>" (Neuronpedia's naming of a source: one SAE on one layer), the layer from
meta["layer"] or the hook name "blocks.<layer>.…", the source set from meta["neuronpedia_source_set"]
(default the arm id, each run of characters other than letters, digits and hyphens made a hyphen).
out/README.md says how to upload; out/meta.json records the provenance.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from config.files import write_new_folder
from experiments.eval.features import FeatureAnalysis, features_done, load_features

SCHEMA = {"package": "neuronpedia", "version": "1.2.1",
          "route": "FeatureRequest.upload_batch -> POST https://neuronpedia.org/api/feature/upload-batch",
          "classes": ["neuronpedia.np_feature.Feature", "neuronpedia.np_feature.Logit",
                      "neuronpedia.np_activation.Activation", "neuronpedia.np_explanation.Explanation"]}
MAX_BATCH = 128  # neuronpedia 1.2.1: feature_request.MAX_FEATURES_PER_BATCH
EXPLANATION_METHOD = "harness-token-statistics"
REQUIRED_META = ("model_name", "hook_name", "study_id", "arm_id", "commit")


def export_neuronpedia(arm_dir: Path, out: Path, meta: dict[str, Any], batch_size: int = MAX_BATCH, *,
                       explanation_method: str | None = EXPLANATION_METHOD) -> Path:
    """Write out/batch-0.json, batch-1.json, ... (the arm's latents in order, batch_size a file),
    out/README.md and out/meta.json; returns out. Written into a temporary sibling folder that is
    renamed to out at the end. `meta` needs REQUIRED_META; see the module docstring for the rest."""
    arm_dir = Path(arm_dir)
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size {batch_size}: Neuronpedia takes 1 to {MAX_BATCH} features a batch")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"meta lacks {', '.join(missing)}")
    if not features_done(arm_dir):
        raise ValueError(f"{arm_dir}: no feature analysis (features/features.json); run the feature analysis first")
    analysis = load_features(arm_dir)
    if analysis.settings.get("kind") == "synthetic" or "top_context_tokens" not in analysis.arrays:
        raise ValueError(f"{arm_dir}: a synthetic-source analysis has no token contexts, and Neuronpedia needs text")
    if not analysis.token_text:
        raise ValueError(f"{arm_dir}: the analysis stores no token texts (it was run without a decoder)")
    names = _names(meta)
    features = [_feature(analysis, i, explanation_method) for i in range(len(analysis.arrays["density"]))]
    batches = [features[lo:lo + batch_size] for lo in range(0, len(features), batch_size)]
    record = {**{k: meta[k] for k in REQUIRED_META}, **{k: v for k, v in meta.items() if k not in REQUIRED_META},
              "d_sae": len(features), "n_batches": len(batches), "batch_size": batch_size, "neuronpedia": names,
              "explanation_method": explanation_method, "schema": SCHEMA, "analysis_settings": analysis.settings}

    files = {f"batch-{n}.json": _json_bytes({"modelId": names["model_id"], "source": names["source"],
                                             "features": batch}) for n, batch in enumerate(batches)}
    files["meta.json"] = _json_bytes(record, indent=2)
    files["README.md"] = readme(record).encode()
    return write_new_folder(out, files)


def _names(meta: dict[str, Any]) -> dict[str, Any]:
    """Neuronpedia's model id, source set and source ("<layer>-<source set>") for this arm."""
    layer = meta.get("layer")
    if layer is None:
        found = re.match(r"blocks\.(\d+)\.", str(meta["hook_name"]))
        if found is None:
            raise ValueError(f"hook {meta['hook_name']!r} names no layer: give meta['layer']")
        layer = int(found.group(1))
    # An arm id holds dots and underscores (relu-coef0.0065-dfbdd155, @L1.resid_post) that Neuronpedia's
    # names do not: each run of them becomes a hyphen. A name given in meta is taken as it is, or refused.
    source_set = str(meta.get("neuronpedia_source_set") or re.sub(r"[^A-Za-z0-9-]+", "-", str(meta["arm_id"])))
    if not re.fullmatch(r"[A-Za-z0-9-]+", source_set):
        raise ValueError(f"source set {source_set!r}: Neuronpedia takes letters, digits and hyphens")
    return {"model_id": str(meta.get("neuronpedia_model_id") or meta["model_name"]), "source_set": source_set,
            "layer": int(layer), "source": f"{int(layer)}-{source_set}"}


def _floats(values: np.ndarray) -> list[float]:
    """float32 values as the shortest decimals that read back to the same float32."""
    return [float(str(v)) for v in np.asarray(values, dtype=np.float32).ravel()]


def _texts(analysis: FeatureAnalysis, ids: np.ndarray) -> list[str]:
    try:
        return [analysis.token_text[int(t)] for t in ids]
    except KeyError as e:
        raise ValueError(f"token id {e.args[0]} has no stored text in the analysis") from None


def _logits(analysis: FeatureAnalysis, i: int, end: str) -> list[dict[str, Any]] | None:
    a = analysis.arrays
    if f"logit_{end}_ids" not in a:
        return None
    return [{"token": t, "value": v}
            for t, v in zip(_texts(analysis, a[f"logit_{end}_ids"][i]), _floats(a[f"logit_{end}_values"][i]))]


def _feature(analysis: FeatureAnalysis, i: int, method: str | None) -> dict[str, Any]:
    """Latent i as one entry of the upload body (keys and order as FeatureRequest.upload_batch)."""
    a = analysis.arrays
    activations = []
    for row, tokens, acts in zip(a["top_rows"][i], a["top_context_tokens"][i], a["top_context_acts"][i]):
        if row < 0:
            continue
        inside = tokens >= 0
        activations.append({"tokens": _texts(analysis, tokens[inside]), "values": _floats(acts[inside]),
                            "quantileMax": None, "quantileMin": None, "quantileFraction": None})
    label = analysis.labels[i]
    explanations = [{"text": label, "methodName": method, "modelName": None}] if label else []
    return {"index": i, "density": float(a["density"][i]), "activations": activations,
            "explanations": explanations, "topLogits": _logits(analysis, i, "top"),
            "bottomLogits": _logits(analysis, i, "bottom")}


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _json_bytes(obj: Any, indent: int | None = None) -> bytes:
    """Strict JSON (a NaN raises): compact for the batches, indented for meta.json."""
    return (json.dumps(obj, allow_nan=False, ensure_ascii=False, indent=indent, default=_plain,
                       separators=None if indent else (",", ":")) + "\n").encode()


UPLOAD_CODE = '''\
import json
from pathlib import Path

from neuronpedia.np_activation import Activation
from neuronpedia.np_explanation import Explanation
from neuronpedia.np_feature import Feature, Logit
from neuronpedia.requests.feature_request import FeatureRequest


def batch_features(batch: dict) -> list[Feature]:
    """One batch file as the package's Feature objects."""
    m, s = batch["modelId"], batch["source"]

    def logits(rows):
        return None if rows is None else [Logit(**row) for row in rows]

    return [Feature(modelId=m, source=s, index=f["index"], density=f["density"],
                    top_logits=logits(f["topLogits"]), bottom_logits=logits(f["bottomLogits"]),
                    explanations=[Explanation(modelId=m, source=s, index=f["index"], text=e["text"],
                                              method=e["methodName"], explainer_model=e["modelName"])
                                  for e in f["explanations"]],
                    activations=[Activation(modelId=m, source=s, index=f["index"], **act)
                                 for act in f["activations"]])
            for f in batch["features"]]


def upload(folder: Path, api_key: str | None = None) -> None:
    """Upload every batch of the folder, in order (api_key: else NEURONPEDIA_API_KEY)."""
    request = FeatureRequest(api_key=api_key)
    for path in sorted(Path(folder).glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        batch = json.loads(path.read_text())
        request.upload_batch(batch["modelId"], batch["source"], batch_features(batch))
'''


def readme(record: dict[str, Any]) -> str:
    """out/README.md: what the files are, their schema and how to upload them."""
    np_ = record["neuronpedia"]
    layers = record.get("n_layers", "<number of layers>")  # meta["n_layers"] where the caller knows it
    return f"""# Neuronpedia feature batches: {record['study_id']} / {record['arm_id']}

The feature analysis of arm `{record['arm_id']}` (study `{record['study_id']}`, model `{record['model_name']}`,
hook `{record['hook_name']}`, {record['d_sae']} latents, code commit `{record['commit']}`), written for
Neuronpedia by `experiments/export/neuronpedia.py`. Nothing has been uploaded.

- `batch-0.json` ... `batch-{record['n_batches'] - 1}.json`: the latents in order, {record['batch_size']} a file.
  Each file is the request body that `FeatureRequest.upload_batch` of the `neuronpedia` Python
  package ({SCHEMA['version']}) sends: `{{"modelId", "source", "features": [{{"index", "density",
  "activations": [{{"tokens", "values", "quantileMax", "quantileMin", "quantileFraction"}}],
  "explanations": [{{"text", "methodName", "modelName"}}], "topLogits", "bottomLogits"}}]}}`.
  `density` is the fraction of eval tokens on which the latent fires; `activations` are its top
  contexts, largest first (token texts and the latent's activation on each token); `topLogits` /
  `bottomLogits` the tokens its decoder direction promotes / suppresses most; the one explanation
  is the harness's automatic label from the top contexts (method `{record['explanation_method']}`).
- `meta.json`: model, hook, study, arm, d_sae, commit, the Neuronpedia names used and the analysis settings.

## Uploading (from the neuronpedia package {SCHEMA['version']} and its example notebook `upload_features.ipynb`)

1. `pip install neuronpedia=={SCHEMA['version']}`; get an API key at neuronpedia.org/account and set
   `NEURONPEDIA_API_KEY` (or pass `api_key=`). Only the creator of a source set can upload to it.
2. The model must exist on Neuronpedia. If `{np_['model_id']}` does not, create it (it is created
   unlisted): `from neuronpedia.np_model import Model; Model.new(id="{np_['model_id']}", layers={layers})`.
3. Create the source set: `from neuronpedia.np_source_set import SourceSet;
   SourceSet.new(model_id="{np_['model_id']}", name="{np_['source_set']}")`. It creates one source per layer,
   named `<layer>-<source set>`; these batches are for source `{np_['source']}` (layer {np_['layer']}).
   If you pick other names, change `modelId` / `source` in the batch files to match.
4. Upload each batch (`FeatureRequest.upload_batch`, which POSTs to
   `https://neuronpedia.org/api/feature/upload-batch`, at most {MAX_BATCH} features a request), e.g.
   with the code below: `upload(Path("<this folder>"))`.

```python
{UPLOAD_CODE}```

The package's example notes that an explanation method must be supported by Neuronpedia; if the
upload refuses `{record['explanation_method']}`, set each explanation's `methodName` to `null` (the
package's default). Not exported, as the schema has no place for them: each latent's maximum
activation (the largest value of its first activation), quantile sections and decoder neighbours.
"""
