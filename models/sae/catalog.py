"""What the harness knows about each SAE architecture before any torch code runs: its default
settings, the options that apply to it, the dead-latent handling it takes. The command line, the
presets and the runner read these tables; `register` (base.py) refuses an architecture that is
not in them, so a new architecture is added here and in its own module, nowhere else.

This module imports nothing, so parsing the command line does not load torch.
"""
from __future__ import annotations

from typing import Any

# Defaults per architecture, chosen so each lands near L0 = 32 on tinylm's default activations
# (blocks.0.hook_resid_post, d_sae 1024, 2 epochs at lr 3e-3), for a fair comparison at matched
# sparsity.
ARCHITECTURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "topk": {"k": 32, "dead_handling": "auxk", "aux_coef": 1 / 32},
    "batchtopk": {"k": 32, "dead_handling": "auxk", "aux_coef": 1 / 32},
    "matryoshka": {"k": 32, "dead_handling": "auxk", "aux_coef": 1 / 32},
    "relu": {"sparsity_coef": 0.0065, "dead_handling": "none"},
    "jumprelu": {"sparsity_coef": 0.00055, "bandwidth": 0.05, "init_threshold": 0.01, "dead_handling": "none"},
    "gated": {"sparsity_coef": 0.0084, "aux_coef": 1.0, "dead_handling": "none"},
}
# Which architectures each tunable option applies to, and the dead-latent handling each allows
# (its own way of reviving latents first: what --dead-resample picks).
OPTION_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "k": ("topk", "batchtopk", "matryoshka"),
    "aux_k": ("topk", "batchtopk", "matryoshka"),
    "matryoshka_levels": ("matryoshka",),
    "l1_coefficient": ("relu", "gated"),
    "l0_coefficient": ("jumprelu",),
    "target_l0": ("jumprelu",),
}
DEAD_HANDLING: dict[str, tuple[str, ...]] = {
    "topk": ("auxk", "resample", "none"),
    "batchtopk": ("auxk", "resample", "none"),
    "matryoshka": ("auxk", "resample", "none"),
    "relu": ("resample", "none"),
    "jumprelu": ("resample", "none"),
    "gated": ("resample", "none"),
}
# Every dead-latent handling mode some architecture takes, in the order the tables name them.
DEAD_HANDLING_MODES = tuple(dict.fromkeys(m for modes in DEAD_HANDLING.values() for m in modes))
# Other spellings the command line and YAML files accept.
ALIASES = {"jump_relu": "jumprelu", "batch_topk": "batchtopk"}
