"""Sparse autoencoders. Importing this package imports every module in it, and each module
registers its architecture in ARCHITECTURES with `@register(name)`."""

import importlib
import pkgutil

from models.sae.base import ARCHITECTURES, SAE, SAEConfig, build_sae

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from models.sae.topk import TopKSAE  # noqa: E402  (re-exported)

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "TopKSAE", "build_sae"]
