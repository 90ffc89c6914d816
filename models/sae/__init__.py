"""Sparse autoencoders: one module per architecture, each registering its class in ARCHITECTURES
with `@register(name)`.

The package loads its torch modules on first use, not on import, so that `models.sae.catalog`
(the architectures' defaults and options, which the command line reads) costs no torch import.
"""

_PUBLIC = {"ARCHITECTURES": "base", "SAE": "base", "SAEConfig": "base", "build_sae": "base", "TopKSAE": "topk"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    from models.sae.base import import_architectures

    import_architectures()
    return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
