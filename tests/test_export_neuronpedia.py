"""Neuronpedia feature batches from a hand-built feature analysis: content, order, and the schema of
the `neuronpedia` package (1.2.1), checked with the package itself where it is installed."""
import dataclasses
import json
import re
import types
import typing
from pathlib import Path

import numpy as np
import pytest

from experiments.eval.features import FeatureAnalysis, save_features
from experiments.export.neuronpedia import EXPLANATION_METHOD, export_neuronpedia

META = {"model_name": "tinylm", "hook_name": "blocks.0.hook_resid_post", "study_id": "default",
        "arm_id": "topk-0123abcd", "commit": "abc1234"}
TEXT = {0: "Once", 1: " upon", 2: " a", 3: " time", 4: " cat", 5: "\n", 6: " sat", 7: " é"}
D, K, W = 5, 3, 5  # latents, top contexts, context width (window 2)


def _analysis() -> FeatureAnalysis:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, len(TEXT), size=(D, K, W)).astype(np.int32)
    acts = rng.random((D, K, W)).astype(np.float32)
    rows = np.tile(np.arange(K, dtype=np.int64) * 7, (D, 1))
    tokens[1, 0, :2] = -1  # a context at the start of its sequence
    acts[1, 0, :2] = 0
    tokens[2, 1, 4] = -1  # and one at its end
    acts[2, 1, 4] = 0
    rows[3, 2] = -1  # latent 3 has two top contexts
    tokens[3, 2], acts[3, 2] = -1, 0
    rows[4], tokens[4], acts[4] = -1, -1, 0  # latent 4 never fired
    arrays = {
        "density": np.array([0.25, 0.5, 1 / 3, 0.125, 0.0]),
        "max_act": acts.max((1, 2)),
        "top_rows": rows, "top_acts": acts[:, :, W // 2].copy(),
        "top_context_tokens": tokens, "top_context_acts": acts,
        "logit_top_ids": rng.integers(0, len(TEXT), size=(D, 2)),
        "logit_top_values": rng.random((D, 2)).astype(np.float32),
        "logit_bottom_ids": rng.integers(0, len(TEXT), size=(D, 2)),
        "logit_bottom_values": -rng.random((D, 2)).astype(np.float32),
        "neighbours": np.array([[1, 2], [0, 2], [0, 1], [0, 1], [0, 1]]),
        "neighbour_cos": np.full((D, 2), 0.5, dtype=np.float32),
    }
    return FeatureAnalysis(arrays, {"kind": "transformer", "top_n": K, "window": W // 2, "d_sae": D},
                           ["cat", "after 'upon'", "a / time", "sat", ""], token_text=TEXT)


@pytest.fixture
def arm(tmp_path) -> Path:
    save_features(_analysis(), tmp_path / "arm")
    return tmp_path / "arm"


def _batches(out: Path) -> list[dict]:
    paths = sorted(out.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    assert [p.name for p in paths] == [f"batch-{n}.json" for n in range(len(paths))]
    return [json.loads(p.read_text()) for p in paths]


def test_batches_hold_every_latent_once_in_order_split_at_batch_size(arm, tmp_path):
    out = export_neuronpedia(arm, tmp_path / "np", META, batch_size=2)
    batches = _batches(out)
    assert [[f["index"] for f in b["features"]] for b in batches] == [[0, 1], [2, 3], [4]]
    assert {(b["modelId"], b["source"]) for b in batches} == {("tinylm", "0-topk-0123abcd")}
    meta = json.loads((out / "meta.json").read_text())
    assert {k: meta[k] for k in META} == META and meta["d_sae"] == D and meta["n_batches"] == 3
    assert meta["schema"]["package"] == "neuronpedia" and meta["schema"]["version"] == "1.2.1"
    readme = (out / "README.md").read_text()
    assert "upload-batch" in readme and "SourceSet.new" in readme and "0-topk-0123abcd" in readme
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arm", "np"]  # no temporary folder left
    assert [len(b["features"]) for b in _batches(export_neuronpedia(arm, tmp_path / "all", META))] == [D]


def test_a_feature_holds_its_contexts_logits_density_and_label(arm, tmp_path):
    a = _analysis()
    features = [f for b in _batches(export_neuronpedia(arm, tmp_path / "np", META)) for f in b["features"]]
    for i, f in enumerate(features):
        assert f["density"] == a.arrays["density"][i]
        kept = [j for j in range(K) if a.arrays["top_rows"][i, j] >= 0]
        assert len(f["activations"]) == len(kept)
        for act, j in zip(f["activations"], kept):
            tokens, values = a.arrays["top_context_tokens"][i, j], a.arrays["top_context_acts"][i, j]
            assert act["tokens"] == [TEXT[int(t)] for t in tokens if t >= 0]
            assert np.array_equal(np.float32(act["values"]), values[tokens >= 0])  # exact at float32
        for end in ("top", "bottom"):
            logits = f[f"{end}Logits"]
            assert [x["token"] for x in logits] == [TEXT[int(t)] for t in a.arrays[f"logit_{end}_ids"][i]]
            assert np.array_equal(np.float32([x["value"] for x in logits]), a.arrays[f"logit_{end}_values"][i])
        want = [{"text": a.labels[i], "methodName": EXPLANATION_METHOD, "modelName": None}] if a.labels[i] else []
        assert f["explanations"] == want
    assert len(features[1]["activations"][0]["tokens"]) == W - 2
    assert len(features[2]["activations"][1]["values"]) == W - 1
    assert features[4]["activations"] == [] and features[4]["explanations"] == []


# The upload body of neuronpedia 1.2.1 (requests/feature_request.py, FeatureRequest.upload_batch):
# checked here without the package; the test after it checks the batches with the package itself.
NEURONPEDIA_1_2_1 = {"body": {"modelId", "source", "features"},
                     "feature": {"index", "density", "activations", "explanations", "topLogits", "bottomLogits"},
                     "activation": {"tokens", "values", "quantileMax", "quantileMin", "quantileFraction"},
                     "explanation": {"text", "methodName", "modelName"}, "logit": {"token", "value"}}


def test_the_batches_have_the_fields_of_neuronpedia_1_2_1(arm, tmp_path):
    batches = _batches(export_neuronpedia(arm, tmp_path / "np", META, batch_size=2))
    s = NEURONPEDIA_1_2_1
    for b in batches:
        assert set(b) == s["body"] and 1 <= len(b["features"]) <= 128
        for f in b["features"]:
            assert set(f) == s["feature"]
            assert all(set(x) == s["activation"] and len(x["tokens"]) == len(x["values"]) for x in f["activations"])
            assert all(set(x) == s["explanation"] for x in f["explanations"])
            assert all(set(x) == s["logit"] for x in f["topLogits"] + f["bottomLogits"])


def _typed(value, hint) -> bool:
    """Whether a value read from JSON fits a dataclass field's annotation (str, int, float, None, lists, unions)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_typed(value, h) for h in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(_typed(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint) and _fields_typed(value)
    if hint is float:
        return isinstance(value, float)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _fields_typed(obj) -> bool:
    hints = typing.get_type_hints(type(obj))
    return all(_typed(getattr(obj, f.name), hints[f.name]) for f in dataclasses.fields(obj))


def test_the_batches_are_what_the_neuronpedia_package_uploads(arm, tmp_path, monkeypatch):
    """The README's upload code builds the package's Feature / Activation / Explanation / Logit
    objects from each batch (unknown or missing keys fail there), every field has its annotated
    type, and the package's upload_batch, its network call replaced, posts exactly the file."""
    pytest.importorskip("neuronpedia")
    from neuronpedia.requests.base_request import NPRequest

    out = export_neuronpedia(arm, tmp_path / "np", META, batch_size=2)
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    for batch in _batches(out):
        features = namespace["batch_features"](batch)
        assert all(_fields_typed(f) for f in features)
    posted = []
    monkeypatch.setattr(NPRequest, "send_request", lambda self, uri="", method="POST", **kw:
                        posted.append((self.endpoint, uri, method, kw["json"])))
    namespace["upload"](out, api_key="offline-test")
    assert posted == [("feature", "upload-batch", "POST", b) for b in _batches(out)]
    pydantic = pytest.importorskip("pydantic")  # the package's own pydantic activation model, strictly
    from neuronpedia.types.common.activation import NPActivation
    for batch in _batches(out):
        for f in batch["features"]:
            for act in f["activations"]:
                NPActivation.model_validate({"tokens": act["tokens"], "values": act["values"]}, strict=True)
    with pytest.raises(pydantic.ValidationError):
        NPActivation.model_validate({"tokens": [1], "values": [0.5]}, strict=True)


def test_refuses_an_existing_out_folder(arm, tmp_path):
    (tmp_path / "np").mkdir()
    (tmp_path / "np" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists"):
        export_neuronpedia(arm, tmp_path / "np", META)
    assert [p.name for p in (tmp_path / "np").iterdir()] == ["keep.txt"]


def test_refuses_a_synthetic_analysis_and_an_arm_without_one(tmp_path):
    d = 3
    synthetic = FeatureAnalysis({"density": np.full(d, 0.1), "max_act": np.ones(d, dtype=np.float32),
                                 "true_feature": np.arange(d), "true_cos": np.full(d, 0.9)},
                                {"kind": "synthetic", "d_sae": d}, ["true feature 0", "true feature 1", ""])
    save_features(synthetic, tmp_path / "synthetic")
    with pytest.raises(ValueError, match="synthetic"):
        export_neuronpedia(tmp_path / "synthetic", tmp_path / "np", META)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no feature analysis"):
        export_neuronpedia(tmp_path / "empty", tmp_path / "np", META)
    assert not (tmp_path / "np").exists()


def test_an_arm_id_becomes_a_source_set_neuronpedia_takes_and_a_given_one_is_checked(arm, tmp_path):
    # Neuronpedia's names are letters, digits and hyphens; arm ids hold dots (coefficients) and, at
    # several hook points, "@L1.resid_post"
    meta = {**META, "arm_id": "relu-coef0.0065@L1.resid_post-0123abcd", "hook_name": "blocks.1.hook_resid_post"}
    (batch, *_) = _batches(export_neuronpedia(arm, tmp_path / "np", meta))
    assert batch["source"] == "1-relu-coef0-0065-L1-resid-post-0123abcd"
    with pytest.raises(ValueError, match="letters, digits and hyphens"):
        export_neuronpedia(arm, tmp_path / "np2", {**META, "neuronpedia_source_set": "my.sae"})
    assert not (tmp_path / "np2").exists()
