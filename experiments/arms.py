"""A trained arm, for notebooks and scripts: load it by study and name, then harvest a text's
activations at its hook, encode them, or run the subject model with the SAE spliced in, one line
each.

    from experiments.arms import TrainedArm
    arm = TrainedArm.load("default", "topk-k32-auxk")        # checkpoint_dir="checkpoints"
    acts = arm.activations("Once there was a cat.")          # [tokens, d_in] at the arm's hook, BOS left out
    codes = arm.encode(acts)                                 # [tokens, d_sae]
    logits = arm.spliced_logits("Once there was a cat.")     # [tokens + 1, vocab], the SAE at its hook
    arm.features.labels[int(codes[-1].argmax())]             # what the strongest latent of the last token means
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from config.records import StudyRecord
from config.schema import DataConfig, UsageError
from experiments.data.sources import SubjectModel, harvester, load_subject_model
from experiments.eval.features import FeatureAnalysis, features_done, load_features
from experiments.eval.metrics import splice_hook
from models.sae import SAE
from models.sae.base import trained_on


@dataclass
class TrainedArm:
    arm_dir: Path
    name: str
    sae: SAE  # reads raw activations (the normalisation is folded in)
    trained_on: dict[str, Any]  # config.json's description: model, hook, data, study, commit
    models_dir: Path  # where the subject model is cached

    @classmethod
    def load(cls, study: str, arm: str, checkpoint_dir: str | Path = "checkpoints") -> "TrainedArm":
        """The finished arm `arm` (its name or folder) of study `study`; UsageError naming the
        study's finished arms when it is not one."""
        root = Path(checkpoint_dir)
        study_json = root / study / "study.json"
        if not study_json.exists():
            raise UsageError(f"there is no study {study!r} in {root}")
        record = StudyRecord.read(study_json, "study.json")
        found = record.named(arm)
        if found is None or found.status != "complete":
            names = ", ".join(a.name for a in record.finished) or "none"
            raise UsageError(f"{arm!r} is not a finished arm of study {study} (finished: {names})")
        arm_dir = root / study / found.arm_id
        return cls(arm_dir, found.name, SAE.load(arm_dir), trained_on(arm_dir), root / "models")

    @functools.cached_property
    def model(self) -> SubjectModel:
        if self.trained_on.get("source") != "transformer":
            raise UsageError(f"arm {self.name} was not trained on a transformer's activations "
                             f"({self.trained_on.get('source', 'no trained_on record in its config.json')})")
        data = DataConfig(model_name=self.trained_on["model_name"])
        model = load_subject_model(data, self.models_dir, progress=False)
        if model.fingerprint != self.trained_on["model_fingerprint"]:
            raise UsageError(f"the subject model in {self.models_dir} is not the one arm {self.name} was trained on")
        return model

    @property
    def hook_name(self) -> str:
        return self.trained_on["hook_name"]

    def tokens(self, text: str) -> Tensor:
        """[1, T] token ids as the harvest makes them: BOS, then the text, cut to the model's context."""
        model = self.model
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][: model.n_ctx - 1]
        return torch.tensor([[model.bos_token_id, *ids]], dtype=torch.long)

    def activations(self, text_or_tokens: str | Tensor) -> Tensor:
        """[T - 1, d_in] activations at the arm's hook, BOS left out (the SAE never saw it)."""
        tokens = self.tokens(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens.view(1, -1)
        return harvester(self.model, self.hook_name, "cpu")(tokens)[0, 1:]

    @torch.no_grad()
    def encode(self, x: str | Tensor) -> Tensor:
        """[tokens, d_sae] latent activations of a text, or of activations [n, d_in]."""
        return self.sae.encode(self.activations(x) if isinstance(x, str) else x)

    @torch.no_grad()
    def spliced_logits(self, text: str) -> Tensor:
        """[T, vocab] the model's logits with the SAE's reconstruction replacing the activation at
        its hook (every position but BOS)."""
        tokens = self.tokens(text)
        hook = splice_hook(lambda act: self.sae(act))
        return self.model.bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(self.hook_name, hook)])[0]

    @property
    def features(self) -> FeatureAnalysis:
        """What each latent means (docs/features.md)."""
        if not features_done(self.arm_dir):
            raise UsageError(f"arm {self.name} has no feature analysis yet")
        return load_features(self.arm_dir)
