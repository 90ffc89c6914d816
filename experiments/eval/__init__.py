"""Scoring an arm: metrics, true-feature recovery, concepts and probes, UMAP embeddings."""
