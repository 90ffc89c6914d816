"""The explorer's Python API: a study's arms, their latents, and the subject model run with an arm's
SAE at its hook, as plain data (dicts, lists, numbers, strings) that a notebook prints and the web
app (experiments/explorer/app.py) renders.

    from experiments.explorer import Explorer
    ex = Explorer("checkpoints/default")
    ex.features_table("topk-k32-auxk", sort="density", q="cat")["rows"][:3]
    ex.feature("topk-k32-auxk", 17)["top_contexts"][0]
    ex.analyse("Once there was a cat.", "topk-k32-auxk")["tokens"][-1]["firing"][:3]
    ex.steer("Once there was a", "topk-k32-auxk", [17], alpha=8.0)["steered"]["text"]
    ex.search("cat")["rows"][:5]

Every bad input (an unknown arm, a latent out of range, a prompt longer than the context, alpha not
finite, too many latents, ...) raises ExplorerError with a one-line message and an HTTP status; it
is a UsageError, so a script that lets it escape from run_experiments.py gets one `error:` line.

Steering (docs/explorer.md): at the arm's hook, at every position but BOS -- the prompt's tokens
and each generated one, the whole prefix being recomputed at every step -- "add" adds
alpha * W_dec[i] for each chosen latent i; "clamp" adds (alpha - f_i(x)) * W_dec[i], where f_i(x) is
the SAE's activation of latent i on that position's activation, so the latent reads alpha; "ablate"
is clamp to 0. The saved SAE is folded, so W_dec is in raw activation units and alpha is in
latent-activation units (the scale of the feature pages' activations)."""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from config.records import ArmRecord, StudyRecord
from config.schema import UsageError
from experiments.eval.features import FeatureAnalysis, features_done, load_features, search_features, top_tokens
from experiments.studies.features import ranked, strongest_context

MAX_NEW_TOKENS = 40  # generated tokens per steering request
MAX_LATENTS = 8  # latents steered at once
ALPHA_MAX = 1000.0  # |alpha|, in latent-activation units
MAX_PROMPT_CHARS = 2000  # checked before tokenizing
MAX_QUERY_CHARS = 100  # search words and table filters
MAX_TEMPERATURE = 5.0
PER_PAGE_MAX = 500
HEATMAP_LATENTS = 20  # latents in the analyser's token x latent table
SORTS = ("id", "density", "mean_act", "max_act", "label", "match")  # match: concept F1, or |cos| on synthetic
MODES = ("add", "clamp", "ablate")
SHOWN_METRICS = ("l0", "explained_variance", "mse", "dead_frac", "dense_frac", "ce_loss_recovered", "kl", "mcc",
                 "frac_recovered")
APPLIES_TO = ("every position but BOS: the prompt's tokens and each generated token (the whole sequence is run "
              "again at every step)")


class ExplorerError(UsageError):
    """A bad request: a one-line message and the HTTP status the web app answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _finite(value: float | None) -> float | None:
    """A number for JSON: NaN and infinities become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def parse_int(value: Any, what: str, lo: int, hi: int, status: int = 400) -> int:
    """`value` (an int or its decimal text) as an int in [lo, hi], else ExplorerError naming `what`."""
    if isinstance(value, bool):
        raise ExplorerError(f"{what} must be an integer, got {value!r}", status)
    if isinstance(value, str):
        if not re.fullmatch(r"-?\d{1,12}", value.strip()):
            raise ExplorerError(f"{what} must be an integer, got {value[:40]!r}", status)
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ExplorerError(f"{what} must be an integer, got {str(value)[:40]!r}", status)
    if not lo <= value <= hi:
        raise ExplorerError(f"{what} must be in {lo}..{hi}, got {value}", status)
    return value


def parse_float(value: Any, what: str, bound: float) -> float:
    """`value` as a finite float with |value| <= bound, else ExplorerError."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ExplorerError(f"{what} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(x):
        raise ExplorerError(f"{what} must be a finite number, got {x}")
    if abs(x) > bound:
        raise ExplorerError(f"{what} must be between -{bound:g} and {bound:g}, got {x:g}")
    return x


def parse_latents(value: Any, d_sae: int) -> list[int]:
    """Latent ids from a list, or from text such as "17, 42": 1 to MAX_LATENTS distinct, in range."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        parts = [p for p in re.split(r"[\s,]+", str(value).strip()) if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ExplorerError("latents must be a list of latent ids, e.g. [17, 42]")
    if not parts:
        raise ExplorerError("name at least one latent to steer")
    if len(parts) > MAX_LATENTS:
        raise ExplorerError(f"at most {MAX_LATENTS} latents at once, got {len(parts)}")
    latents = [parse_int(p, "a latent id", 0, d_sae - 1) for p in parts]
    if len(set(latents)) != len(latents):
        raise ExplorerError("each latent may be named once")
    return latents


@dataclass
class _ArmState:
    """What the explorer has loaded for one arm (filled on first use)."""

    features: FeatureAnalysis | None = None
    top_tokens: list[list[str]] | None = None
    trained: Any = None  # experiments.arms.TrainedArm
    history: dict[str, np.ndarray] | None = None  # probes' density over training


class Explorer:
    """A study's arms and latents, and the subject model run with an arm's SAE (see the module
    docstring). Thread-safe: the subject model runs one request at a time."""

    def __init__(self, study_dir: str | Path, models_dir: str | Path | None = None) -> None:
        self.study_dir = Path(study_dir).resolve()
        path = self.study_dir / "study.json"
        if not path.is_file():
            root = self.study_dir.parent
            known = sorted(p.parent.name for p in root.glob("*/study.json")) if root.is_dir() else []
            there = f"; the studies there: {', '.join(known)}" if known else "; it holds no study"
            raise ExplorerError(f"there is no study {self.study_dir.name!r} in {root}{there}", 404)
        self.models_dir = Path(models_dir) if models_dir is not None else self.study_dir.parent / "models"
        self.report_dir = self.study_dir / "report"
        self._record_cache: tuple[float, StudyRecord] | None = None
        self._states: dict[str, _ArmState] = {}
        self._sources: dict[str, str] = {}
        self._searches: dict[tuple[str, str], list] = {}
        self._load_lock = threading.RLock()  # loading files into the caches
        self._model_lock = threading.Lock()  # the subject model's hooks are shared state
        self._model = None
        self.record  # read it now: a broken study.json is refused at once

    # --- the study and its arms ------------------------------------------------------------

    @property
    def record(self) -> StudyRecord:
        """study.json, read again whenever it changes (a study may still be training)."""
        path = self.study_dir / "study.json"
        with self._load_lock:
            mtime = path.stat().st_mtime
            if self._record_cache is None or self._record_cache[0] != mtime:
                self._record_cache = (mtime, StudyRecord.read(path, "--serve"))
            return self._record_cache[1]

    def source(self, arm: ArmRecord) -> str:
        """"transformer" or "synthetic" (from the arm's config.json; "" before it is written)."""
        if arm.arm_id not in self._sources:
            from models.sae.base import trained_on

            try:
                about = trained_on(self.study_dir / arm.arm_id)
            except (OSError, ValueError):
                return ""
            self._sources[arm.arm_id] = about.get("source", "")
        return self._sources[arm.arm_id]

    def _arm_summary(self, a: ArmRecord) -> dict[str, Any]:
        done = a.status == "complete"
        source = self.source(a) if done else ""
        return {"arm_id": a.arm_id, "name": a.name, "architecture": a.architecture, "dead_handling": a.dead_handling,
                "status": a.status, "d_sae": a.d_sae, "sparsity": a.sparsity, "steps": a.steps,
                "steps_total": a.steps_total, "reason": a.reason, "source": source,
                "final": {k: _finite(a.final[k]) for k in SHOWN_METRICS if k in a.final},
                "has_features": done and features_done(self.study_dir / a.arm_id),
                "runs_model": done and source == "transformer"}

    def arms(self) -> list[dict[str, Any]]:
        """Every arm of the study with its status and final metrics."""
        return [self._arm_summary(a) for a in self.record.arms]

    def study(self) -> dict[str, Any]:
        """The study: its id, status and setup, its arms, and the report's figures (paths relative to
        the report folder)."""
        r = self.record
        figures = sorted(str(p.relative_to(self.report_dir)) for p in self.report_dir.rglob("*.png")) \
            if self.report_dir.is_dir() else []
        arms = self.arms()
        metrics = [k for k in SHOWN_METRICS if any(k in a["final"] for a in arms)]
        return {"study_id": r.study_id, "status": r.status, "studies": r.studies, "hooks": r.hooks, "arms": arms,
                "metrics": metrics, "frontier": next((f for f in figures if f.endswith("frontier.png")), None),
                "figures": figures, "unfinished": [a["name"] for a in arms if a["status"] != "complete"]}

    def arm(self, name: str) -> ArmRecord:
        """The finished arm named `name` (its name or folder, exactly); ExplorerError otherwise."""
        if not isinstance(name, str):
            raise ExplorerError("an arm is named by its name or folder, a string", 400)
        found = self.record.named(name)
        if found is None:
            names = ", ".join(a.name for a in self.record.arms) or "none"
            raise ExplorerError(f"study {self.record.study_id} has no arm {name[:80]!r} (its arms: {names})", 404)
        if found.status == "failed":
            raise ExplorerError(f"arm {found.name} failed: {found.reason or 'no reason recorded'} (its traceback is "
                                f"in {found.arm_id}/error.txt)", 409)
        if found.status != "complete":
            then = "reload then" if found.status == "running" else "--resume the study to finish it"
            raise ExplorerError(f"arm {found.name} is {found.status}, not finished: its pages appear once it "
                                f"completes ({then})", 409)
        return found

    def _state(self, arm: ArmRecord) -> _ArmState:
        with self._load_lock:
            return self._states.setdefault(arm.arm_id, _ArmState())

    def _features(self, arm: ArmRecord) -> FeatureAnalysis:
        state = self._state(arm)
        with self._load_lock:
            if state.features is None:
                if not features_done(self.study_dir / arm.arm_id):
                    raise ExplorerError(f"arm {arm.name} has no feature analysis yet (it is made when an arm "
                                        f"finishes; --resume the study to make it)", 409)
                state.features = load_features(self.study_dir / arm.arm_id)
            return state.features

    def analysis(self, arm: str) -> FeatureAnalysis:
        """The arm's feature analysis as experiments.eval.features loads it (arrays, labels, ...)."""
        return self._features(self.arm(arm))

    def _top_tokens(self, arm: ArmRecord) -> list[list[str]]:
        state, fa = self._state(arm), self._features(arm)
        with self._load_lock:
            if state.top_tokens is None:
                state.top_tokens = top_tokens(fa, np.arange(len(fa.labels)), 3)
            return state.top_tokens

    def _latent(self, arm: ArmRecord, latent: Any) -> int:
        d = len(self._features(arm).labels)
        text = str(latent).strip()
        if isinstance(latent, bool) or not re.fullmatch(r"\d{1,12}", text) or int(text) >= d:
            raise ExplorerError(f"arm {arm.name} has latents 0..{d - 1}, not {text[:40]!r}", 404)
        return int(text)

    # --- feature table and detail -----------------------------------------------------------

    def _row(self, fa: FeatureAnalysis, tokens: list[list[str]], i: int) -> dict[str, Any]:
        a = fa.arrays
        row = {"latent": i, "label": fa.labels[i], "density": float(a["density"][i]),
               "mean_act": float(a["mean_firing_act"][i]), "max_act": float(a["max_act"][i]),
               "top_tokens": tokens[i]}
        if "true_feature" in a:
            row.update(true_feature=int(a["true_feature"][i]), cos=float(a["true_cos"][i]),
                       precision=_finite(a["firing_precision"][i]), recall=_finite(a["firing_recall"][i]))
        elif "concept_index" in a:
            c = int(a["concept_index"][i])
            row.update(concept=fa.concept_names[c] if c >= 0 else "", f1=float(a["concept_f1"][i]) if c >= 0 else None)
        return row

    def features_table(self, arm: str, sort: str | None = None, order: str | None = None, page: Any = 1,
                       per_page: Any = 100, q: str = "") -> dict[str, Any]:
        """One page of the arm's latents: sorted by `sort` (id, density, mean_act -- the mean activation
        where it fires --, max_act, label, match -- concept F1 or |cos|; default id, or relevance with a
        filter), `order` asc|desc, filtered by `q` (the --search ranking: label, then firing token, then
        anywhere in a top context; then latents whose label or top tokens contain q as a substring)."""
        rec = self.arm(arm)
        fa, tokens = self._features(rec), self._top_tokens(rec)
        q = (q or "").strip()
        if len(q) > MAX_QUERY_CHARS:
            raise ExplorerError(f"the filter is {len(q)} characters; at most {MAX_QUERY_CHARS}")
        sorts = SORTS + (("relevance",) if q else ())
        sort = sort or ("relevance" if q else "id")
        if sort not in sorts:
            raise ExplorerError(f"sort must be one of {', '.join(sorts)}, got {str(sort)[:40]!r}")
        if order not in (None, "", "asc", "desc"):
            raise ExplorerError(f"order must be asc or desc, got {str(order)[:40]!r}")
        order = order or ("asc" if sort in ("id", "label", "relevance") else "desc")
        per_page = parse_int(per_page, "per_page", 1, PER_PAGE_MAX)
        page = parse_int(page, "page", 1, 10**9)
        d, a = len(fa.labels), fa.arrays
        why: dict[int, str] = {}
        if q:
            for m in self._matches(rec, fa, q):
                why[m.latent] = m.why
            low = q.lower()
            for i in range(d):
                if i not in why:
                    text = fa.labels[i].lower()
                    hit = next((t for t in tokens[i] if low in t.lower()), None)
                    if low in text:
                        why[i] = f"label contains {q!r}"
                    elif hit is not None:
                        why[i] = f"top token {hit!r} contains {q!r}"
            ids = np.array(list(why), dtype=np.int64)
        else:
            ids = np.arange(d)
        if sort == "label":  # unlabelled latents last either way; ties by id
            named = sorted((i for i in ids if fa.labels[i]), key=lambda i: fa.labels[i].lower(),
                           reverse=order == "desc")
            ids = np.array(named + [i for i in ids if not fa.labels[i]], dtype=np.int64)
        elif sort == "relevance":
            ids = ids[::-1] if order == "desc" else ids
        else:
            if sort == "id":
                key = ids.astype(np.float64)
            elif sort == "match":
                col = a.get("true_cos", a.get("concept_f1"))
                key = col[ids].astype(np.float64) if col is not None else np.zeros(len(ids))
            else:
                key = a["mean_firing_act" if sort == "mean_act" else sort][ids].astype(np.float64)
            ids = ids[np.lexsort((ids, -key if order == "desc" else key))]
        total = len(ids)
        pages = max(1, -(-total // per_page))
        if page > pages:
            raise ExplorerError(f"page {page} is beyond the last, {pages}", 404)
        shown = ids[(page - 1) * per_page: page * per_page]
        rows = [self._row(fa, tokens, int(i)) | ({"why": why[int(i)]} if q else {}) for i in shown]
        kind = "synthetic" if "true_feature" in a else "transformer"
        return {"arm": rec.name, "arm_id": rec.arm_id, "kind": kind, "d_sae": d, "total": total, "page": page,
                "pages": pages, "per_page": per_page, "sort": sort, "order": order, "q": q, "sorts": list(sorts),
                "rows": rows}

    def _contexts(self, fa: FeatureAnalysis, tokens: np.ndarray, acts: np.ndarray, rows_acts: np.ndarray
                  ) -> list[dict[str, Any]]:
        """Contexts [n, W] with their activation [n] as {act, centre, tokens: [{text, act}]}; padding dropped."""
        out = []
        centre = tokens.shape[-1] // 2
        for ctx, ctx_acts, act in zip(tokens, acts, rows_acts):
            if act <= 0:
                continue
            shown = [{"text": fa.token_text.get(int(t), "?"), "act": float(v), "centre": j == centre}
                     for j, (t, v) in enumerate(zip(ctx, ctx_acts)) if t >= 0]
            out.append({"act": float(act), "tokens": shown})
        return out

    def _history(self, arm: ArmRecord) -> dict[str, np.ndarray]:
        """The probes' density per eval: {"step" [E], "tokens" [E], "density" [E, d]} (E may be 0)."""
        state = self._state(arm)
        with self._load_lock:
            if state.history is None:
                steps, tokens, density = [], [], []
                for path in sorted((self.study_dir / arm.arm_id / "probes").glob("eval-*.npz")):
                    try:
                        with np.load(path, allow_pickle=False) as data:
                            steps.append(int(data["step"]))
                            tokens.append(int(data["tokens"]))
                            density.append(np.asarray(data["density"], dtype=np.float64))
                    except (OSError, ValueError, KeyError):
                        continue  # a torn file of an interrupted eval: leave that eval out
                d = len(self._features(arm).labels)
                keep = [j for j, row in enumerate(density) if row.shape == (d,)]
                state.history = {"step": np.array([steps[j] for j in keep], dtype=np.int64),
                                 "tokens": np.array([tokens[j] for j in keep], dtype=np.int64),
                                 "density": np.stack([density[j] for j in keep]) if keep else np.zeros((0, d))}
            return state.history

    def feature(self, arm: str, latent: Any) -> dict[str, Any]:
        """Everything known about one latent: statistics, histogram, top contexts (each token with the
        latent's activation), quantile samples, logit effects, nearest latents, concept or true
        feature, and its density at each eval during training."""
        rec = self.arm(arm)
        fa = self._features(rec)
        i = self._latent(rec, latent)
        a = fa.arrays
        out: dict[str, Any] = {"arm": rec.name, "arm_id": rec.arm_id, "latent": i, "d_sae": len(fa.labels),
                               "label": fa.labels[i], "kind": "synthetic" if "true_feature" in a else "transformer",
                               "top_tokens": self._top_tokens(rec)[i],
                               "stats": {k: float(a[k][i]) for k in ("density", "mean_act", "mean_firing_act",
                                                                      "max_act")} | {"n_fired": int(a["n_fired"][i])},
                               "histogram": {"counts": a["hist_counts"][i].tolist(),
                                             "edges": a["hist_edges"][i].astype(float).tolist()}}
        if "top_context_tokens" in a:
            out["top_contexts"] = self._contexts(fa, a["top_context_tokens"][i], a["top_context_acts"][i],
                                                 a["top_acts"][i])
            edges = np.linspace(0, float(a["max_act"][i]), a["quantile_rows"].shape[1] + 1)
            out["quantiles"] = [{"bin": b, "lo": float(edges[b]), "hi": float(edges[b + 1]),
                                 "contexts": self._contexts(fa, a["quantile_context_tokens"][i, b],
                                                            a["quantile_context_acts"][i, b], a["quantile_acts"][i, b])}
                                for b in reversed(range(a["quantile_rows"].shape[1]))]
            out["quantiles"] = [q for q in out["quantiles"] if q["contexts"]]
        if "logit_top_ids" in a:
            out["logits"] = {end: [{"token": fa.token_text.get(int(t), "?"), "value": float(v)}
                                   for t, v in zip(a[f"logit_{key}_ids"][i], a[f"logit_{key}_values"][i])]
                             for end, key in (("promoted", "top"), ("suppressed", "bottom"))}
        out["neighbours"] = [{"latent": int(j), "cos": float(c), "label": fa.labels[int(j)]}
                             for j, c in zip(a["neighbours"][i], a["neighbour_cos"][i])]
        if "true_feature" in a:
            out["true_feature"] = {"feature": int(a["true_feature"][i]), "cos": float(a["true_cos"][i]),
                                   "precision": _finite(a["firing_precision"][i]),
                                   "recall": _finite(a["firing_recall"][i]),
                                   "threshold": fa.settings.get("threshold")}
        elif "concept_index" in a and a["concept_index"][i] >= 0:
            out["concept"] = {"name": fa.concept_names[int(a["concept_index"][i])], "f1": float(a["concept_f1"][i])}
        h = self._history(rec)
        out["density_over_training"] = [{"step": int(s), "tokens": int(t), "density": float(v)}
                                        for s, t, v in zip(h["step"], h["tokens"], h["density"][:, i])]
        return out

    def search(self, word: str, arm: str | None = None, limit: int = 30) -> dict[str, Any]:
        """The latents of the finished arms (or of `arm`) matching `word`, ranked as --search ranks
        them (experiments/studies/features.py: labels first, by density; then firing token; then
        anywhere in a top context; arms in study order within a tie), the first `limit`."""
        word = (word or "").strip()
        if not word:
            raise ExplorerError("type a word to search for")
        if len(word) > MAX_QUERY_CHARS:
            raise ExplorerError(f"the search word is {len(word)} characters; at most {MAX_QUERY_CHARS}")
        arms = [self.arm(arm)] if arm else self.record.finished
        loaded = [(a, self._features(a)) for a in arms if features_done(self.study_dir / a.arm_id)]
        if not loaded:
            raise ExplorerError(f"no arm of study {self.record.study_id} has a feature analysis yet", 409)
        hits = ranked([(a, fa, m) for a, fa in loaded for m in self._matches(a, fa, word)])
        rows = []
        for a, fa, m in hits[:limit]:
            context = strongest_context(fa, m.latent).replace("**", "")
            rows.append({"arm": a.name, "latent": m.latent, "label": fa.labels[m.latent],
                         "density": float(fa.arrays["density"][m.latent]), "why": m.why, "context": context})
        return {"word": word, "total": len(hits), "rows": rows,
                "title": f"latents matching {word!r} ({len(hits):,}; the first {len(rows)})"}

    def _matches(self, arm: ArmRecord, fa: FeatureAnalysis, word: str) -> list:
        """search_features of one arm, remembered for the last few words."""
        key = (arm.arm_id, word)
        with self._load_lock:
            found = self._searches.get(key)
        if found is None:
            found = search_features(fa, word)
            with self._load_lock:
                self._searches[key] = found
                while len(self._searches) > 64:
                    self._searches.pop(next(iter(self._searches)))
        return found

    # --- the subject model with the SAE -------------------------------------------------------

    def trained(self, arm: str | ArmRecord):
        """The arm as an experiments.arms.TrainedArm (SAE in eval mode, the subject model shared
        between arms); ExplorerError for a synthetic arm."""
        from experiments.arms import TrainedArm
        from models.sae import SAE
        from models.sae.base import trained_on

        rec = arm if isinstance(arm, ArmRecord) else self.arm(arm)
        if self.source(rec) != "transformer":
            raise ExplorerError(f"arm {rec.name} was trained on a synthetic source's activations: there is no model "
                                f"to run a prompt through, so it has no prompt analyser and no steering", 404)
        state = self._state(rec)
        with self._load_lock:
            if state.trained is None:
                arm_dir = self.study_dir / rec.arm_id
                ta = TrainedArm(arm_dir, rec.name, SAE.load(arm_dir).eval(), trained_on(arm_dir), self.models_dir)
                if self._model is not None and self._model.fingerprint == ta.trained_on.get("model_fingerprint"):
                    ta.__dict__["model"] = self._model  # TrainedArm.model is a cached_property: share one model
                else:
                    try:
                        self._model = ta.model
                    except UsageError as err:
                        raise ExplorerError(str(err), 409) from None
                state.trained = ta
            return state.trained

    def _labels(self, rec: ArmRecord) -> list[str]:
        try:
            return self._features(rec).labels
        except ExplorerError:
            return []

    def prompt_tokens(self, ta, prompt: Any, reserve: int = 0) -> torch.Tensor:
        """[1, T] BOS and the prompt's tokens; ExplorerError when the prompt is empty or, with
        `reserve` tokens still to generate, longer than the model's context."""
        if not isinstance(prompt, str):
            raise ExplorerError("the prompt must be text")
        if not prompt.strip():
            raise ExplorerError("the prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ExplorerError(f"the prompt is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,}")
        model = ta.model
        ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        room = model.n_ctx - 1 - reserve
        if len(ids) > room:
            more = f" and {reserve} new tokens" if reserve else ""
            raise ExplorerError(f"the prompt is {len(ids)} tokens; {model.name}'s context holds {model.n_ctx} tokens "
                                f"with BOS{more}, so at most {room}")
        if not ids:
            raise ExplorerError("the prompt has no tokens")
        return torch.tensor([[model.bos_token_id, *ids]], dtype=torch.long)

    def _decode(self, ta, ids: Sequence[int]) -> list[str]:
        return [ta.model.token_text(t) for t in ids]

    @torch.no_grad()
    def analyse(self, prompt: str, arm: str, top: int = HEATMAP_LATENTS) -> dict[str, Any]:
        """The prompt through the subject model with the arm's SAE at its hook: per token the latents
        that fire (strongest first; all of them), the `top` latents with the largest activation
        over the prompt and their activation at every token (the heatmap), the SAE's reconstruction
        error on these activations, and the next-token CE with and without the SAE spliced in."""
        from experiments.eval.metrics import spliced_lm_metrics

        rec = self.arm(arm)
        ta = self.trained(rec)
        top = parse_int(top, "top", 1, 100)
        tokens = self.prompt_tokens(ta, prompt)
        with self._model_lock:
            x = ta.activations(tokens)  # [T-1, d_in], BOS left out: what the SAE was trained on
            f = ta.sae.encode(x)
            x_hat = ta.sae.decode(f)
            lm = spliced_lm_metrics(ta.model.bridge, tokens, ta.hook_name, ta.sae)
        labels = self._labels(rec)
        text = self._decode(ta, tokens[0, 1:].tolist())
        rows = []
        for t, (word, acts) in enumerate(zip(text, f)):
            firing = torch.nonzero(acts > 0).flatten()
            order = firing[torch.argsort(acts[firing], descending=True, stable=True)]
            rows.append({"index": t, "text": word, "firing": [
                {"latent": int(j), "act": float(acts[j]), "label": labels[int(j)] if labels else ""} for j in order]})
        peak = f.max(0).values
        chosen = [int(j) for j in torch.argsort(peak, descending=True, stable=True)[:top] if peak[j] > 0]
        err = (x - x_hat).double().pow(2).sum(-1)
        centred = (x - x.mean(0)).double().pow(2).sum()
        reconstruction = {"mse": float(err.mean() / x.shape[1]),
                          "relative_mse": float(err.sum() / x.double().pow(2).sum()),
                          "fvu": float(err.sum() / centred) if len(x) > 1 and centred > 0 else None,
                          "l0": float((f > 0).sum(-1).double().mean())}
        return {"arm": rec.name, "arm_id": rec.arm_id, "prompt": prompt, "hook": ta.hook_name,
                "n_tokens": len(text), "tokens": rows,
                "heatmap": {"latents": [{"latent": j, "label": labels[j] if labels else "", "max": float(peak[j])}
                                        for j in chosen],
                            "acts": f[:, chosen].tolist() if chosen else [[] for _ in text]},
                "reconstruction": reconstruction,
                "lm": {k: _finite(v) for k, v in lm.items()}}

    def steering_hook(self, ta, latents: list[int], alpha: float, mode: str) -> Callable:
        """The TransformerLens hook that steers (see the module docstring), built on splice_hook: it
        changes every position but BOS."""
        from experiments.eval.metrics import splice_hook

        w = ta.sae.W_dec.detach()[latents]  # [n, d_in], raw activation units
        if mode == "add":
            direction = alpha * w.sum(0)
            return splice_hook(lambda act: act + direction.to(act.dtype))
        target = 0.0 if mode == "ablate" else alpha
        idx = torch.tensor(latents)

        def clamp(act: torch.Tensor) -> torch.Tensor:
            current = ta.sae.encode(act.float())[..., idx]  # [B, T, n]
            return act + ((target - current) @ w).to(act.dtype)

        return splice_hook(clamp)

    def _check_steer(self, rec: ArmRecord, ta, latents: Any, alpha: Any, mode: Any) -> tuple[list[int], float, str]:
        if mode not in MODES:
            raise ExplorerError(f"mode must be one of {', '.join(MODES)}, got {str(mode)[:40]!r}")
        latents = parse_latents(latents, ta.sae.cfg.d_sae)
        alpha = 0.0 if mode == "ablate" else parse_float(alpha, "alpha", ALPHA_MAX)
        return latents, alpha, mode

    def _run(self, ta, tokens: torch.Tensor, hooks: list) -> torch.Tensor:
        """Logits [T, vocab] of one sequence, with the hooks."""
        return ta.model.bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks)[0].float()

    def _generate(self, ta, tokens: torch.Tensor, n: int, seed: int, temperature: float, hooks: list
                  ) -> tuple[list[int], torch.Tensor]:
        """Up to n new token ids (stopping at BOS, tinylm's end of story) and the first step's next-token
        probabilities. Greedy at temperature 0, else sampled with a generator seeded by `seed`."""
        gen = torch.Generator().manual_seed(seed)
        seq, new, first = tokens, [], None
        for _ in range(n):
            logits = self._run(ta, seq, hooks)[-1]
            probs = torch.softmax(logits, -1)
            if first is None:
                first = probs
            if temperature == 0:
                nxt = int(torch.argmax(logits))
            else:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            if nxt == ta.model.bos_token_id:
                break
            new.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        return new, first

    @torch.no_grad()
    def steer(self, prompt: str, arm: str, latents: Any, alpha: Any = 0.0, mode: str = "add",
              max_new_tokens: Any = 20, seed: Any = 0, temperature: Any = 0.0) -> dict[str, Any]:
        """A continuation of `prompt` with the latents steered (see the module docstring), beside the
        unsteered continuation from the same seed, and the next-token probabilities after the prompt
        with and without steering (the tokens most likely under either)."""
        rec = self.arm(arm)
        ta = self.trained(rec)
        latents, alpha, mode = self._check_steer(rec, ta, latents, alpha, mode)
        n = parse_int(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
        seed = parse_int(seed, "seed", 0, 2**31 - 1)
        temperature = parse_float(temperature, "temperature", MAX_TEMPERATURE)
        if temperature < 0:
            raise ExplorerError(f"temperature must be >= 0 (0: greedy), got {temperature:g}")
        tokens = self.prompt_tokens(ta, prompt, reserve=n)
        hooks = [(ta.hook_name, self.steering_hook(ta, latents, alpha, mode))]
        with self._model_lock:
            x_norm = float(ta.activations(tokens).norm(dim=-1).mean())
            plain, p_plain = self._generate(ta, tokens, n, seed, temperature, [])
            steered, p_steered = self._generate(ta, tokens, n, seed, temperature, hooks)
        labels = self._labels(rec)
        shown = torch.unique(torch.cat([p_plain.topk(5).indices, p_steered.topk(5).indices]))
        shown = shown[torch.argsort(p_steered[shown], descending=True, stable=True)]
        return {"arm": rec.name, "arm_id": rec.arm_id, "prompt": prompt, "hook": ta.hook_name,
                "latents": [{"latent": j, "label": labels[j] if labels else "",
                             "direction_norm": float(ta.sae.W_dec[j].norm())} for j in latents],
                "activation_norm": x_norm,
                "alpha": alpha, "mode": mode, "max_new_tokens": n, "seed": seed, "temperature": temperature,
                "applies_to": APPLIES_TO,
                "steered": {"text": ta.model.text(steered), "tokens": self._decode(ta, steered)},
                "unsteered": {"text": ta.model.text(plain), "tokens": self._decode(ta, plain)},
                "next_token": [{"token": ta.model.token_text(t), "p_steered": float(p_steered[t]),
                                "p_unsteered": float(p_plain[t])} for t in shown]}

    @torch.no_grad()
    def next_token_probs(self, prompt: str, arm: str, latents: Any, alpha: Any = 0.0, mode: str = "add"
                         ) -> np.ndarray:
        """[vocab] next-token probabilities after `prompt` with the latents steered as in steer()."""
        rec = self.arm(arm)
        ta = self.trained(rec)
        latents, alpha, mode = self._check_steer(rec, ta, latents, alpha, mode)
        tokens = self.prompt_tokens(ta, prompt)
        with self._model_lock:
            logits = self._run(ta, tokens, [(ta.hook_name, self.steering_hook(ta, latents, alpha, mode))])[-1]
        return torch.softmax(logits, -1).numpy()

    # --- files ---------------------------------------------------------------------------------

    REPORT_SUFFIXES = {".png": "image/png", ".svg": "image/svg+xml", ".csv": "text/csv; charset=utf-8",
                       ".md": "text/plain; charset=utf-8"}

    def report_file(self, relative: str) -> tuple[Path, str]:
        """(path, media type) of a file of the study's report folder; ExplorerError (404) for
        anything outside it (after resolving links and '..'), a folder, or another kind of file."""
        missing = ExplorerError(f"the report has no file {str(relative)[:80]!r}", 404)
        if not isinstance(relative, str) or "\x00" in relative or not relative:
            raise missing
        root = self.report_dir.resolve()
        try:
            path = (root / relative).resolve()
        except (OSError, RuntimeError, ValueError):
            raise missing from None
        if not path.is_relative_to(root) or not path.is_file() or path.suffix.lower() not in self.REPORT_SUFFIXES:
            raise missing
        return path, self.REPORT_SUFFIXES[path.suffix.lower()]
