"""The explorer (`--serve`, experiments/explorer/): every page and JSON endpoint through FastAPI's
TestClient on studies trained in this session (tinylm and the synthetic toy), the prompt analyser
against the SAE applied to the normally harvested activations, the direction of steering, bad
inputs (each a readable 4xx, the server still serving after it), path traversal, and the flags."""
import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.arms import TrainedArm
from experiments.eval.features import load_features
from run_experiments import main
from tests.test_bad_inputs import TINY, TOY

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from experiments.explorer import Explorer  # noqa: E402
from experiments.explorer.app import create_app  # noqa: E402
from experiments.explorer.core import MAX_NEW_TOKENS  # noqa: E402

# Every test reads the module's studies: one xdist worker (`--dist loadgroup`) trains them once.
pytestmark = pytest.mark.xdist_group("explorer-studies")
ROOT = Path(__file__).resolve().parents[1]
ARM = "topk-k8"  # TINY's one arm
TOY_ARM = "topk-k5"
TEXT = "Once there was a cat named Tom. Tom was happy."


def test_this_module_runs_on_one_worker(request):
    """`--dist loadgroup` sends the module's tests to one worker, which is what xdist's group suffix on
    the node id does (with pytest 9.2 the suffix silently stopped taking effect: pytest-xdist#1386)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by `pytest -n N --dist loadgroup`")
    assert request.node.nodeid.endswith("@explorer-studies")


@pytest.fixture(scope="module")
def ckpt(tinylm_models_dir, tmp_path_factory):
    """A checkpoint dir with three studies: `t` (TINY on tinylm), `s` (the synthetic toy) and `m`
    (t with its arm failed, plus an interrupted one)."""
    root = tmp_path_factory.mktemp("explorer") / "ckpt"
    shutil.copytree(tinylm_models_dir, root / "models")
    assert main([*TINY, "--checkpoint-dir", str(root), "--study-id", "t"]) == 0
    assert main([*TOY, "--checkpoint-dir", str(root), "--study-id", "s"]) == 0
    shutil.copytree(root / "t", root / "m")
    record = json.loads((root / "m" / "study.json").read_text())
    failed = record["arms"][0]
    failed.update(status="failed", reason="loss became NaN at step 7")
    record["arms"].append({**failed, "arm_id": "relu-half-0000", "name": "relu-half", "status": "interrupted",
                           "reason": None, "steps": 5})
    record.update(study_id="m", status="interrupted")
    (root / "m" / "study.json").write_text(json.dumps(record))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as --serve runs: one short sequence per request
    yield root
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def explorer(ckpt):
    return Explorer(ckpt / "t")


@pytest.fixture(scope="module")
def client(explorer):
    return TestClient(create_app(explorer))


@pytest.fixture(scope="module")
def toy(ckpt):
    return TestClient(create_app(Explorer(ckpt / "s")))


def readable(response, status: int, fragment: str) -> None:
    """A 4xx with a one-line message containing `fragment`, no traceback."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert "Traceback" not in response.text and 'File "' not in response.text
    if response.headers["content-type"].startswith("application/json"):
        message = response.json()["error"]
    else:
        message = html.unescape(re.search(r'<p class="error">(.*?)</p>', response.text, re.S).group(1))
    assert fragment in message and "\n" not in message.strip(), message


def test_study_page_lists_the_arms_with_metrics_links_and_the_frontier(client, ckpt):
    page = client.get("/")
    assert page.status_code == 200
    assert f'href="/arm/{ARM}"' in page.text and f"/arm/{ARM}/analyse" in page.text
    assert "explained_variance" in page.text
    study = client.get("/api/study").json()
    arm = study["arms"][0]
    assert arm["name"] == ARM and arm["status"] == "complete" and arm["runs_model"] and arm["has_features"]
    ev = json.loads((ckpt / "t" / "summary.json").read_text())["arms"][0]["final"]["explained_variance"]
    assert arm["final"]["explained_variance"] == pytest.approx(ev)
    assert study["frontier"] == "activations/frontier.png" and 'src="/report/activations/frontier.png"' in page.text
    png = client.get("/report/activations/frontier.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    css, js = client.get("/static/explorer.css"), client.get("/static/explorer.js")
    assert css.status_code == js.status_code == 200
    assert "http" not in css.text + js.text  # nothing fetched from elsewhere


def test_feature_table_sorts_pages_and_filters(client, explorer, ckpt):
    fa = load_features(ckpt / "t" / explorer.arm(ARM).arm_id)
    d = len(fa.labels)
    first = client.get(f"/api/arm/{ARM}/features", params={"sort": "density", "per_page": 10}).json()
    assert first["total"] == d and first["pages"] == -(-d // 10) and first["order"] == "desc"
    second = client.get(f"/api/arm/{ARM}/features", params={"sort": "density", "per_page": 10, "page": 2}).json()
    density = [r["density"] for r in first["rows"] + second["rows"]]
    assert density == sorted(density, reverse=True) and density[0] == fa.arrays["density"].max()
    by_id = client.get(f"/api/arm/{ARM}/features", params={"per_page": 500}).json()["rows"]
    assert [r["latent"] for r in by_id] == list(range(min(d, 500)))
    row = by_id[3]
    assert row["label"] == fa.labels[3] and row["mean_act"] == pytest.approx(fa.arrays["mean_firing_act"][3])
    assert {"concept", "f1", "top_tokens"} <= row.keys()
    labels = client.get(f"/api/arm/{ARM}/features", params={"sort": "label", "order": "asc"}).json()["rows"]
    named = [r["label"].lower() for r in labels if r["label"]]
    assert named == sorted(named)
    # the filter: the --search ranking first, then substrings of labels and top tokens
    word = next(t for r in by_id for t in r["top_tokens"] if t.isalpha() and len(t) > 2)
    hits = client.get(f"/api/arm/{ARM}/features", params={"q": word, "per_page": 500}).json()
    assert hits["sort"] == "relevance" and 0 < hits["total"] < d and all(r["why"] for r in hits["rows"])
    assert all(word.lower() in r["why"].lower() for r in hits["rows"])
    page = client.get(f"/arm/{ARM}", params={"sort": "mean_act", "q": word})
    assert page.status_code == 200 and "page 1 of" in page.text and f"/arm/{ARM}/latent/" in page.text
    readable(client.get(f"/api/arm/{ARM}/features", params={"page": 10**6}), 404, "beyond the last")
    readable(client.get(f"/arm/{ARM}", params={"sort": "evil"}), 400, "sort must be one of")
    readable(client.get(f"/arm/{ARM}", params={"per_page": "abc"}), 400, "per_page must be an integer")


def test_feature_detail_shows_contexts_histogram_logits_neighbours_and_density_over_training(client, explorer, ckpt):
    arm_dir = ckpt / "t" / explorer.arm(ARM).arm_id
    fa = load_features(arm_dir)
    i = int(fa.arrays["n_fired"].argmax())
    f = client.get(f"/api/arm/{ARM}/latent/{i}").json()
    assert f["latent"] == i and f["label"] == fa.labels[i] and f["stats"]["max_act"] == pytest.approx(fa.arrays["max_act"][i])
    assert f["top_contexts"][0]["act"] == pytest.approx(fa.arrays["top_acts"][i, 0])
    centre = [t for t in f["top_contexts"][0]["tokens"] if t["centre"]]
    assert len(centre) == 1 and centre[0]["act"] == pytest.approx(fa.arrays["top_acts"][i, 0])
    assert f["quantiles"] and sum(f["histogram"]["counts"]) == fa.arrays["n_fired"][i]
    assert [l["value"] for l in f["logits"]["promoted"]] == pytest.approx(fa.arrays["logit_top_values"][i].tolist())
    assert [n["latent"] for n in f["neighbours"]] == fa.arrays["neighbours"][i].tolist()
    evals = sorted((arm_dir / "probes").glob("eval-*.npz"))
    assert len(f["density_over_training"]) == len(evals) >= 1
    with np.load(evals[-1]) as last:
        assert f["density_over_training"][-1]["density"] == pytest.approx(float(last["density"][i]))
    page = client.get(f"/arm/{ARM}/latent/{i}")
    assert page.status_code == 200 and page.text.count("<svg") == 2
    assert f'href="/arm/{ARM}/latent/{f["neighbours"][0]["latent"]}"' in page.text
    assert "background-color: rgba(255, 140, 0, 1.00)" in page.text  # the top activation, fully shaded


def test_the_analyser_gives_the_sae_encoding_of_the_normally_harvested_activations(client, explorer, ckpt):
    arm = TrainedArm.load("t", ARM, ckpt)
    with torch.no_grad():
        x = arm.activations(TEXT)
        expected = arm.encode(x)
        x_hat = arm.sae(x)
        ce_sae = torch.nn.functional.cross_entropy(arm.spliced_logits(TEXT)[:-1], arm.tokens(TEXT)[0, 1:]).item()
    result = client.post(f"/api/arm/{ARM}/analyse", json={"prompt": TEXT}).json()
    got = torch.zeros_like(expected)
    for t, row in enumerate(result["tokens"]):
        acts = [l["act"] for l in row["firing"]]
        assert acts == sorted(acts, reverse=True)  # strongest first
        for l in row["firing"]:
            got[t, l["latent"]] = l["act"]
    assert result["n_tokens"] == len(expected) == arm.tokens(TEXT).shape[1] - 1
    assert torch.equal(got, expected)
    heat = result["heatmap"]
    peak = expected.max(0).values
    assert [l["latent"] for l in heat["latents"]] == [
        j for j in torch.argsort(peak, descending=True, stable=True)[:20].tolist() if peak[j] > 0]
    assert torch.equal(torch.tensor(heat["acts"]), expected[:, [l["latent"] for l in heat["latents"]]])
    rel = ((x - x_hat) ** 2).sum() / (x ** 2).sum()
    assert result["reconstruction"]["relative_mse"] == pytest.approx(rel.item(), rel=1e-5)
    assert result["lm"]["ce_sae"] == pytest.approx(ce_sae, rel=1e-5) and result["lm"]["ce_clean"] > 0
    page = client.get(f"/arm/{ARM}/analyse", params={"prompt": TEXT})
    assert page.status_code == 200 and 'id="heat"' in page.text and "with the SAE spliced in" in page.text
    assert client.get(f"/arm/{ARM}/analyse").status_code == 200  # the empty form


def test_steering_moves_the_next_token_towards_what_the_latent_promotes(client, explorer, ckpt):
    fa = load_features(ckpt / "t" / explorer.arm(ARM).arm_id)
    alive = np.flatnonzero(fa.arrays["n_fired"] > 0)
    latent = int(alive[np.argmax(fa.arrays["logit_top_values"][alive, 0])])
    token = int(fa.arrays["logit_top_ids"][latent, 0])
    ta = explorer.trained(ARM)
    # a push of a fifth of the activation's norm along the latent's decoder direction
    alpha = 0.2 * ta.activations(TEXT).norm(dim=1).mean().item() / ta.sae.W_dec[latent].norm().item()
    prompts = ["Once there was a", "The dog ran to the", "Tom had three", "She was very"]
    p = {a: np.mean([explorer.next_token_probs(q, ARM, [latent], a)[token] for q in prompts])
         for a in (-alpha, 0.0, alpha)}
    assert p[alpha] > 2 * p[0.0] and p[-alpha] < p[0.0], (fa.token_text[token], p)
    plain = explorer.next_token_probs(prompts[0], ARM, [latent], 0.0)
    same = explorer.steer(prompts[0], ARM, [latent], alpha=0.0, max_new_tokens=5)
    assert same["steered"] == same["unsteered"] and len(same["steered"]["tokens"]) <= 5
    assert not np.array_equal(plain, explorer.next_token_probs(prompts[0], ARM, [latent], 3.0, mode="clamp"))
    body = {"prompt": prompts[0], "latents": [latent], "alpha": alpha, "max_new_tokens": 6, "seed": 3,
            "temperature": 1.0}
    a, b = (client.post(f"/api/arm/{ARM}/steer", json=body).json() for _ in range(2))
    assert a == b and a["applies_to"].startswith("every position but BOS")  # seeded sampling repeats
    assert a["next_token"] and all(0 <= n["p_steered"] <= 1 for n in a["next_token"])
    for mode in ("clamp", "ablate"):
        r = client.post(f"/api/arm/{ARM}/steer", json={**body, "mode": mode, "latents": [latent, int(alive[0])]})
        assert r.status_code == 200 and r.json()["mode"] == mode
    page = client.get(f"/arm/{ARM}/steer", params={"prompt": prompts[0], "latents": str(latent), "alpha": alpha,
                                                   "max_new_tokens": 4})
    assert page.status_code == 200 and "Unsteered" in page.text and "Steered" in page.text
    assert client.get(f"/arm/{ARM}/steer").status_code == 200  # the empty form


def test_clamp_moves_the_activation_by_the_latents_change_along_its_decoder_row(explorer):
    """Clamp adds (alpha - f_i(x)) * W_dec[i] at every position but BOS (so the SAE's reconstruction
    moves as if the latent read alpha); ablate is clamp to 0."""
    ta = explorer.trained(ARM)
    x = ta.activations(TEXT)
    bos = torch.full_like(x[:1], 7.0)
    with torch.no_grad():
        f = ta.sae.encode(x)
        latents = torch.argsort(f[-1], descending=True)[:2].tolist()
        w = ta.sae.W_dec[latents]
        for mode, alpha, target in (("clamp", 2.5, 2.5), ("ablate", 0.0, 0.0)):
            out = explorer.steering_hook(ta, latents, alpha, mode)(torch.cat([bos, x])[None], None)[0]
            assert torch.equal(out[0], bos[0])
            assert torch.allclose(out[1:] - x, (target - f[:, latents]) @ w, atol=1e-5), mode
        added = explorer.steering_hook(ta, latents, 3.0, "add")(torch.cat([bos, x])[None], None)[0]
        assert torch.allclose(added[1:] - x, 3.0 * w.sum(0).expand_as(x), atol=1e-5)


def test_search_gives_the_ranking_of_search(client, explorer, ckpt):
    from config.records import StudyRecord
    from experiments.studies.features import search

    word = client.get(f"/api/arm/{ARM}/features", params={"sort": "density"}).json()["rows"][0]["top_tokens"][0]
    got = client.get("/api/search", params={"q": word}).json()
    table = search(ckpt / "t", StudyRecord.read(ckpt / "t" / "study.json", "t").arms, word)
    assert got["title"] == table.title and [[r["arm"], r["latent"], r["why"]] for r in got["rows"]] == \
        [[r[0], r[1], r[4]] for r in table.rows]
    page = client.get("/search", params={"q": word})
    assert page.status_code == 200 and f"/arm/{ARM}/latent/{got['rows'][0]['latent']}" in page.text
    assert client.get("/search").status_code == 200
    readable(client.get("/api/search", params={"q": " "}), 400, "type a word")


def test_a_synthetic_arm_has_true_features_and_no_prompt_pages(toy, ckpt):
    study = toy.get("/").text
    assert f'href="/arm/{TOY_ARM}"' in study and "/analyse" not in study and "/steer" not in study
    table = toy.get(f"/api/arm/{TOY_ARM}/features", params={"sort": "match"}).json()
    assert table["kind"] == "synthetic" and {"true_feature", "cos", "precision", "recall"} <= table["rows"][0].keys()
    cos = [r["cos"] for r in table["rows"]]
    assert cos == sorted(cos, reverse=True)
    assert "true feature" in toy.get(f"/arm/{TOY_ARM}").text
    f = toy.get(f"/api/arm/{TOY_ARM}/latent/0").json()
    assert f["true_feature"]["cos"] == pytest.approx(load_features(
        ckpt / "s" / f["arm_id"]).arrays["true_cos"][0]) and "top_contexts" not in f
    page = toy.get(f"/arm/{TOY_ARM}/latent/0")
    assert page.status_code == 200 and "true feature" in page.text and "Steer with" not in page.text
    for url in (f"/arm/{TOY_ARM}/analyse?prompt=hi", f"/arm/{TOY_ARM}/steer"):
        readable(toy.get(url), 404, "synthetic source")
    readable(toy.post(f"/api/arm/{TOY_ARM}/analyse", json={"prompt": "hi"}), 404, "synthetic source")
    readable(toy.post(f"/api/arm/{TOY_ARM}/steer", json={"prompt": "hi", "latents": [0]}), 404, "no steering")


LONG = " cat" * 200


@pytest.mark.parametrize("path, body, status, fragment", [
    ("analyse", {"prompt": LONG}, 400, "context holds"),
    ("analyse", {"prompt": ""}, 400, "the prompt is empty"),
    ("analyse", {"prompt": "x" * 2001}, 400, "at most 2,000"),
    ("analyse", {"prompt": 5}, 400, "must be text"),
    ("analyse", {"text": "hi"}, 400, "unknown field(s) text"),
    ("steer", {"prompt": " cat" * 100, "latents": [1], "alpha": 1, "max_new_tokens": 40}, 400, "and 40 new tokens"),
    ("steer", {"prompt": "hi", "latents": [1], "alpha": "nan"}, 400, "alpha must be a finite number"),
    ("steer", {"prompt": "hi", "latents": [1], "alpha": "inf"}, 400, "alpha must be a finite number"),
    ("steer", {"prompt": "hi", "latents": [1], "alpha": 1e6}, 400, "alpha must be between"),
    ("steer", {"prompt": "hi", "latents": [1], "alpha": "much"}, 400, "alpha must be a number"),
    ("steer", {"prompt": "hi", "latents": list(range(9)), "alpha": 1}, 400, "at most 8 latents"),
    ("steer", {"prompt": "hi", "latents": [1, 1], "alpha": 1}, 400, "named once"),
    ("steer", {"prompt": "hi", "latents": [10**6], "alpha": 1}, 400, "a latent id must be in"),
    ("steer", {"prompt": "hi", "latents": ["../1"], "alpha": 1}, 400, "must be an integer"),
    ("steer", {"prompt": "hi", "latents": [], "alpha": 1}, 400, "at least one latent"),
    ("steer", {"prompt": "hi", "latents": [1], "mode": "eval"}, 400, "mode must be one of add, clamp, ablate"),
    ("steer", {"prompt": "hi", "latents": [1], "max_new_tokens": MAX_NEW_TOKENS + 1}, 400, "max_new_tokens must be in"),
    ("steer", {"prompt": "hi", "latents": [1], "temperature": -1}, 400, "temperature must be >= 0"),
])
def test_bad_requests_get_a_readable_4xx_and_the_server_keeps_serving(client, path, body, status, fragment):
    readable(client.post(f"/api/arm/{ARM}/{path}", json=body), status, fragment)
    assert client.get("/").status_code == 200


def test_bad_pages_and_bodies_get_a_readable_4xx(client, ckpt):
    readable(client.get(f"/arm/{ARM}/analyse", params={"prompt": LONG}), 400, "context holds")
    readable(client.get(f"/arm/{ARM}/steer", params={"prompt": "hi", "latents": "1", "alpha": "nan"}), 400,
             "finite number")
    readable(client.get(f"/arm/{ARM}/steer", params={"prompt": "hi", "latents": "1", "alpha": "1e999"}), 400,
             "finite number")
    readable(client.get("/arm/nope"), 404, "has no arm 'nope'")
    readable(client.get(f"/arm/{ARM}/latent/99999"), 404, "has latents 0..")
    readable(client.get(f"/api/arm/{ARM}/latent/-1"), 404, "has latents 0..")
    readable(client.get("/no/such/page"), 404, "there is no page")
    readable(client.post(f"/api/arm/{ARM}/analyse", content=b"{not json", headers={"content-type": "application/json"}),
             400, "not valid JSON")
    readable(client.post(f"/api/arm/{ARM}/analyse", content=b"[1, 2]", headers={"content-type": "application/json"}),
             400, "must be a JSON object")
    readable(client.post(f"/api/arm/{ARM}/analyse", data={"prompt": "hi"}), 415, "application/json")
    big = client.post(f"/api/arm/{ARM}/analyse", json={"prompt": "a" * 100_000})
    assert big.status_code == 413 and "larger than 64 KiB" in big.json()["error"]
    readable(client.get(f"/api/arm/{ARM}/analyse"), 405, "not allowed")
    m = TestClient(create_app(Explorer(ckpt / "m")))
    study = m.get("/")
    assert study.status_code == 200 and "failed" in study.text and "loss became NaN at step 7" in study.text
    assert "interrupted" in study.text and 'href="/arm/relu-half"' not in study.text
    readable(m.get(f"/arm/{ARM}"), 409, "failed: loss became NaN at step 7")
    readable(m.get("/arm/relu-half/latent/0"), 409, "is interrupted, not finished")
    readable(m.post("/api/arm/relu-half/steer", json={"prompt": "hi", "latents": [0]}), 409, "not finished")


def test_an_internal_error_is_one_line_and_the_server_keeps_serving(ckpt, monkeypatch):
    ex = Explorer(ckpt / "t")
    c = TestClient(create_app(ex), raise_server_exceptions=False)
    monkeypatch.setattr(ex, "feature", lambda *a: 1 / 0)
    r = c.get(f"/arm/{ARM}/latent/0")
    assert r.status_code == 500 and "internal error (ZeroDivisionError)" in r.text and "Traceback" not in r.text
    assert c.get("/").status_code == 200


@pytest.mark.parametrize("url", [
    "/arm/..%2F..%2Fetc/latent/0", "/arm/..%2F..%2Fetc%2Fpasswd", "/arm/%2E%2E/latent/0", "/arm/../study.json",
    "/report/../../study.json", "/report/..%2F..%2Fstudy.json", "/report/%2e%2e/study.json",
    "/report/..%2Fsummary.json", "/report//etc/passwd", "/report/%2Fetc%2Fpasswd", "/report/", "/report/activations",
    "/report/report.md%00.png", "/report/link.png", "/static/..%2Fcore.py", "/static/%2E%2E/app.py",
    "/static/../templates/base.html", f"/arm/{ARM}/latent/..%2F1", f"/arm/{ARM}/latent/1e3", f"/arm/{ARM}/latent/0x1",
])
def test_paths_outside_the_served_folders_are_not_found(client, ckpt, url):
    link = ckpt / "t" / "report" / "link.png"
    if not link.is_symlink():
        link.symlink_to(ckpt / "t" / "study.json")  # a link out of the report folder
    r = client.get(url)
    assert r.status_code in (404, 405), (url, r.status_code)
    assert '"study_id"' not in r.text and "root:" not in r.text and "import" not in r.text


def test_dns_rebinding_is_refused_on_a_loopback_server(explorer):
    app = create_app(explorer, allowed_hosts=["127.0.0.1", "localhost"])
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/").status_code == 200
    assert TestClient(app, base_url="http://evil.example").get("/").status_code == 400


def test_serve_flags_and_their_bad_values(ckpt, capsys):
    from config.cli import parse_args

    cfg = parse_args(["--serve", "t", "--port", "0", "--host", "0.0.0.0"])
    assert (cfg.study.serve, cfg.study.port, cfg.study.host) == ("t", 0, "0.0.0.0")
    assert (parse_args(["--serve", "t"]).study.port, parse_args(["--serve", "t"]).study.host) == (8000, "127.0.0.1")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    cases = [(["--serve", "nope"], "there is no study 'nope'"),
             (["--serve", "t", "--port", str(port)], f"127.0.0.1:{port} is in use"),
             (["--port", "9000"], "--port works with --serve"),
             (["--serve", "t", "--port", "70000"], "must be in [0, 65535]"),
             (["--serve", "t", "--host", "no.such.host.invalid"], "--host no.such.host.invalid")]
    try:
        for argv, fragment in cases:
            capsys.readouterr()
            try:
                code = main([*argv, "--checkpoint-dir", str(ckpt)])
            except SystemExit as stop:  # argparse's own checks exit from parse_args
                code = stop.code
            assert code == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.strip().count("\n") == 0 and fragment in err, err
    finally:
        busy.close()


def test_serve_prints_its_url_warns_off_loopback_and_answers(ckpt):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "run_experiments.py", "--serve", "t", "--checkpoint-dir", str(ckpt),
                             "--port", "0", "--host", "0.0.0.0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stdout:
            found = re.search(r"explorer for study t: (http://\S+/)", line)
            if found:
                url = found.group(1)
                break
        assert url is not None, proc.stderr.read() if proc.poll() is not None else "no URL"
        import httpx

        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and ARM in page.text
        steer = httpx.post(f"{url}api/arm/{ARM}/steer", json={"prompt": "Once there was a", "latents": [0],
                                                              "alpha": "nan"}, timeout=30)
        assert steer.status_code == 400 and httpx.get(url, timeout=30).status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "warning: --host 0.0.0.0: anyone who can reach port" in err and "Traceback" not in err
    assert proc.returncode == 0  # SIGTERM stops it as Ctrl-C does
