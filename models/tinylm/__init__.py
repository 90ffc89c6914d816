"""tinylm: the bundled subject LM, trained on first use on a generated story corpus."""

from models.tinylm.corpus import CONCEPTS, generate_stories, harvest_texts, word_concepts
from models.tinylm.model import TinyLM, TinyLMSpec, load_or_train_tinylm
from models.tinylm.tokenizer import concept_token_ids

__all__ = [
    "CONCEPTS",
    "TinyLM",
    "TinyLMSpec",
    "concept_token_ids",
    "generate_stories",
    "harvest_texts",
    "load_or_train_tinylm",
    "word_concepts",
]
