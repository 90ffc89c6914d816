"""The activation sources a study can run on, each one object that knows how to open its data, how
to describe it in the report, and which analyses fit it, so that no other code asks which source
it has. `SOURCES` maps the name `--source` takes (and study.json records) to the source.
"""
from __future__ import annotations

import functools
import textwrap
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from config.records import StudyRecord
from config.schema import RunConfig, UsageError
from experiments.data.activation_cache import ActivationCache, build_or_open, build_or_open_all
from experiments.data.sources import (HarvestWriter, SharedForward, dataset_fingerprint, hook_harvester,
                                      load_subject_model, resolve_hooks, token_sequences)
from experiments.data.synthetic import SyntheticTruth, SyntheticWriter, ToyModel
from experiments.eval.concepts import tinylm_concepts, yaml_concepts
from experiments.eval.features import FeatureAnalysis, analyse_features, analyse_synthetic_features
from experiments.eval.probes import ConceptData
from experiments.studies import activations, emergence, frequency, resampling
from experiments.timing import phase
from experiments.train.trainer import EvalContext, StopFlag, StopRequested
from models.sae import SAE
from visualization.terminal import progress_bar, shortlist

DEFAULT_CONCEPTS = Path(__file__).resolve().parents[2] / "config" / "concepts" / "english.yaml"

# The analyses every source shares; each source adds its emergence analysis.
COMMON_ANALYSES = {"activations": activations.analyse, "frequency": frequency.analyse,
                   "resampling": resampling.analyse}


def bars(cfg: RunConfig):
    """The progress bars the data and training code draw: on the terminal unless --no-progress."""
    return partial(progress_bar, disable=not cfg.log.progress)


@dataclass
class OpenedSource:
    """An activation source, opened: what the rest of the study needs from it, whichever it is."""
    cache: ActivationCache
    ctx: EvalContext  # what evaluation needs besides the cache: the model and hook, or the true features
    data_spec: dict  # what identifies the cache
    concepts: Callable[[], ConceptData] | None  # the concepts to score latents against; None where the
    # source's own truth is the concept (a synthetic source's true features, in ctx.truth)
    features: Callable[[SAE], FeatureAnalysis]  # what each latent of a saved (folded) SAE means
    about: dict  # what the activations are, as a saved SAE's config.json records it ("trained_on")
    scale: float  # the factor the activations are normalised by (1.0 when they are not)

    @property
    def hook(self) -> str:
        return self.ctx.hook_name


class TransformerSource:
    """A subject model's activations at one hook, harvested from text."""

    analyses = {**COMMON_ANALYSES, "emergence": emergence.concept_emergence}

    def open(self, cfg: RunConfig, root: Path, stop: StopFlag) -> list[OpenedSource]:
        """Harvest (or reopen) the subject model's activations at each hook point, one forward pass
        per batch for all of them."""
        device = cfg.train.device
        with phase("model"):
            model = load_subject_model(cfg.data, root / "models", device=device, progress=cfg.log.progress,
                                       before_step=partial(_stop_tinylm_training, stop))
        hook_names = resolve_hooks(model, cfg.data)
        sequences = token_sequences(model, cfg.data, cfg.train.seed)
        forward = SharedForward(hook_harvester(model, hook_names, device))
        jobs = []
        for hook_name, probe in forward.run(sequences[:1]).items():
            if probe.ndim != 3:
                raise UsageError(f"hook {hook_name!r} gives activations of shape {tuple(probe.shape)}, "
                                 f"not [batch, position, features]; pick a residual, MLP or attention output hook")
            data_spec = {"source": cfg.data.source, "model": model.fingerprint, "hook_name": hook_name,
                         "n_samples": cfg.data.n_samples, "seq_len": cfg.data.seq_len,
                         "dataset": dataset_fingerprint(cfg.data), "seed": cfg.train.seed,
                         "eval_fraction": cfg.data.eval_fraction}
            jobs.append((data_spec, HarvestWriter(sequences, probe.shape[-1], forward.at(hook_name),
                                                  cfg.data.harvest_batch_size, cfg.data.eval_fraction)))
        with phase("harvest"):
            caches = build_or_open_all(root, jobs, bar=bars(cfg), stop=stop)
        # The concepts are scored on the eval tokens, which every hook point's cache shares: built once,
        # so what they leave out is said once.
        concepts = functools.cache(partial(_concept_data, cfg, model, caches[0]))
        return [self._opened(cfg, model, hook_name, cache, data_spec, concepts)
                for hook_name, cache, (data_spec, _) in zip(hook_names, caches, jobs)]

    @staticmethod
    def _opened(cfg: RunConfig, model, hook_name: str, cache: ActivationCache, data_spec: dict,
                concepts: Callable[[], ConceptData]) -> OpenedSource:
        # The direct logit effect W_dec · W_U needs decoder rows in the residual stream's width (not,
        # e.g., an MLP's hidden layer): elsewhere the feature analysis leaves it out.
        unembed = model.bridge.W_U if model.bridge.W_U.shape[0] == cache.d_in else None
        features = partial(_token_features, cache=cache, unembed=unembed,
                           decode=model.token_text, concepts=concepts, bar=bars(cfg))
        about = {"source": "transformer", "model_name": model.name, "model_fingerprint": model.fingerprint,
                 "hook_name": hook_name, "d_in": cache.d_in, "context_size": cfg.data.seq_len, "prepend_bos": True,
                 "dataset": cfg.data.dataset or "tinylm corpus (generated stories)", "n_samples": cfg.data.n_samples}
        return OpenedSource(cache, EvalContext(model.bridge, hook_name, cfg.train.ce_eval_sequences), data_spec,
                            concepts, features, about, cache.norm_scale(cfg.data.normalize))

    @staticmethod
    def describe(record: StudyRecord) -> list[list[str]]:
        """The report's setup rows that say what the activations were."""
        data, hooks = record.spec["data"], record.hooks
        recorded = list(hooks) or [data.get("hook_point") or f"layer {data['layer']} {data['hook']}"]
        named = ", ".join(f"`{hook}`" for hook in recorded)
        d_in = sorted({info["d_in"] for info in hooks.values() if "d_in" in info})
        return [["subject model", f"{data['model_name']}, {'hook points ' if len(hooks) > 1 else ''}{named}"
                                  + (f" (d_in {', '.join(map(str, d_in))})" if d_in else "")],
                ["text", f"{data['dataset'] or 'the tinylm corpus (held-out stories)'}: {data['n_samples']:,} "
                         f"sequences of {data['seq_len']} tokens"]]


class SyntheticSource:
    """A toy model of superposition whose true features are known."""

    analyses = {**COMMON_ANALYSES, "emergence": emergence.feature_emergence}

    def open(self, cfg: RunConfig, root: Path, stop: StopFlag) -> list[OpenedSource]:
        """Generate (or reopen) the toy model's activations, with the true features beside them."""
        model = ToyModel.build(cfg.synthetic, cfg.train.seed)
        data_spec = {"source": "synthetic", "synthetic": asdict(cfg.synthetic), "seed": cfg.train.seed,
                     "eval_fraction": cfg.data.eval_fraction}
        writer = SyntheticWriter(model, cfg.train.seed, cfg.data.eval_fraction)
        with phase("harvest"):
            cache = build_or_open(root, data_spec, writer, bar=bars(cfg), stop=stop)
        truth = SyntheticTruth.load(cache.path, cache.n_train_rows, cfg.probes.cos_threshold)
        features = partial(_synthetic_features, cache=cache, truth=truth, bar=bars(cfg))
        about = {"source": "synthetic", "d_in": cache.d_in, "synthetic": asdict(cfg.synthetic), "seed": cfg.train.seed,
                 "cache": str(cache.path)}
        return [OpenedSource(cache, EvalContext(hook_name="synthetic", truth=truth), data_spec, None, features, about,
                             cache.norm_scale(cfg.data.normalize))]

    @staticmethod
    def describe(record: StudyRecord) -> list[list[str]]:
        toy = record.spec["synthetic"]
        return [["activations", f"toy model of superposition: {toy['n_features']:,} true features in "
                                f"{toy['d_in']} dimensions, mean L0 {toy['mean_l0']:g}, {toy['frequency']} "
                                f"frequencies, noise {toy['noise_std']:g}"]]


SOURCES = {"transformer": TransformerSource(), "synthetic": SyntheticSource()}


def source_of(record: StudyRecord) -> TransformerSource | SyntheticSource:
    """The source a recorded study ran on."""
    return SOURCES[record.spec["data"]["source"]]


def _concept_data(cfg: RunConfig, model, cache) -> ConceptData:
    if cfg.probes.concepts is None and model.name == "tinylm":
        concepts = tinylm_concepts(model.tokenizer)
    else:
        concepts = yaml_concepts(cfg.probes.concepts or DEFAULT_CONCEPTS, model.tokenizer)
    listed = len(concepts) + len(concepts.skipped)
    if concepts.skipped:
        _say(f"concepts: {len(concepts.skipped)} words are not single tokens here and are left out: "
             f"{shortlist(concepts.skipped)}")
    data = ConceptData.build(concepts, cache.eval_row_tokens(), cache.eval_row_sequence())
    absent = data.concepts.absent
    if absent:
        _say(f"concepts: {len(absent)} concepts do not occur in both halves of the eval text and are left out: "
             f"{shortlist([n.split(':', 1)[1] for n in absent])}")
    scored = len(data.concepts)
    if scored < listed / 2:
        _say(f"warning: only {scored} of the {listed} concepts can be scored ({len(concepts.skipped)} not single "
             f"tokens for this tokenizer, {len(absent)} not in both halves of the {cache.n_eval_rows:,} eval tokens); "
             f"pass --concepts FILE with words your text and tokenizer use (a YAML of {{category: [words]}}), or "
             f"harvest more text (--n-samples)")
    return data


def _stop_tinylm_training(stop: StopFlag) -> None:
    if stop.requested:  # tinylm keeps no checkpoint: the next run trains it from the start (about 2 minutes)
        raise StopRequested(0, "while training tinylm, which the next run trains again from the start")


def _say(line: str) -> None:
    print(textwrap.fill(line, 100, subsequent_indent="  "))


def _token_features(sae: SAE, *, cache: ActivationCache, unembed, decode, concepts, bar) -> FeatureAnalysis:
    # A saved SAE is folded (it reads raw activations), hence scale 1.
    return analyse_features(sae, cache, 1.0, unembed=unembed, decode=decode, concepts=concepts().concepts, bar=bar)


def _synthetic_features(sae: SAE, *, cache: ActivationCache, truth: SyntheticTruth, bar) -> FeatureAnalysis:
    return analyse_synthetic_features(sae, cache, 1.0, truth, bar=bar)
