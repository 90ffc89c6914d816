"""Dead-latent resampling (Anthropic, "Towards Monosemanticity", 2023), for any architecture.

Dead latents are pointed at inputs the SAE reconstructs badly: inputs are drawn with probability
proportional to their squared reconstruction loss, each dead latent's decoder row becomes the
(centred, unit) input direction and its encoder column the same direction scaled to 0.2 x the
mean encoder norm of the alive latents; its encoder bias and any per-latent parameters of the
architecture are reset, and so is their Adam state, so stale moments do not push them back.

The 0.2 suits penalised SAEs, where a small positive pre-activation already fires. A TopK-family
latent fires only if it beats the k-th largest pre-activation, which a latent at 0.2 x the alive
norm almost never does: it stays dead (measured on tinylm: 12.8% dead after resampling against
0.6% without any handling). There the revived encoder column gets the full alive norm.
"""
from __future__ import annotations

import torch

from models.sae import SAE

ENCODER_NORM_FRACTION = 0.2
# Architectures whose latents compete for k slots: revived latents need the alive latents' scale.
COMPETITIVE_ENCODER_NORM_FRACTION = {"topk": 1.0, "batchtopk": 1.0}


def encoder_norm_fraction(architecture: str) -> float:
    return COMPETITIVE_ENCODER_NORM_FRACTION.get(architecture, ENCODER_NORM_FRACTION)


@torch.no_grad()
def resample_dead_latents_(sae: SAE, opt: torch.optim.Optimizer, dead_mask: torch.Tensor, x: torch.Tensor,
                           generator: torch.Generator) -> int:
    """Re-initialise the latents in `dead_mask` from inputs `x` [N, d_in]; returns how many."""
    idx = dead_mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0
    was_training = sae.training
    sae.eval()  # score inputs as the model infers (and leave training-time estimators alone)
    loss = (sae(x) - x).pow(2).sum(1)
    sae.train(was_training)
    weights = loss.pow(2)
    if not bool(weights.sum() > 0):  # a perfect reconstruction everywhere: any input will do
        weights = torch.ones_like(weights)
    chosen = torch.multinomial(weights, idx.numel(), replacement=idx.numel() > x.shape[0], generator=generator)
    v = x[chosen] - sae.b_dec
    directions = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead_mask
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean().item() if bool(alive.any()) else 1.0
    sae.reinit_latents_(idx, directions, encoder_norm_fraction(sae.cfg.architecture) * enc_norm)
    for name, dim in sae.LATENT_DIMS.items():
        state = opt.state.get(getattr(sae, name))
        for key in ("exp_avg", "exp_avg_sq"):
            if state and key in state:
                state[key].index_fill_(dim, idx, 0.0)
    return int(idx.numel())
