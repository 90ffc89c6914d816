"""Sparse autoencoders. Importing this package registers every architecture in ARCHITECTURES."""

from models.sae.base import ARCHITECTURES, SAE, SAEConfig, build_sae
from models.sae.topk import TopKSAE

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "TopKSAE", "build_sae"]
