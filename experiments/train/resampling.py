"""Dead-latent resampling (Anthropic, "Towards Monosemanticity", 2023), for any architecture.

Dead latents are pointed at inputs the SAE reconstructs badly: inputs are drawn with probability
proportional to their squared reconstruction loss, each dead latent's decoder row becomes the
(centred, unit) input direction and its encoder column the same direction scaled to 0.2 x the
mean encoder norm of the alive latents (Anthropic's and dictionary_learning's value, for every
architecture); its encoder bias and any per-latent parameters of the architecture are reset.

Their Adam state is reset too. Zeroing both moments, as the references do, is not enough on its
own: Adam's bias correction has long worn off, so a zeroed second moment makes the revived
weights' first steps about 3x the normal size (m / sqrt(v) = 0.1 g / sqrt(0.001 g^2)), and they
stay several times too large for the ~1/(1 - beta2) = 1,000 steps the second moment takes to
build up again (dictionary_learning re-warms the learning rate of every weight instead). Here
the first moment is zeroed (no stale direction) and the second set to the mean of the alive
latents' (ordinary step sizes from the first step on), which touches no other latent.
"""
from __future__ import annotations

import torch

from models.sae import SAE

ENCODER_NORM_FRACTION = 0.2


@torch.no_grad()
def reset_adam_state_(sae: SAE, opt: torch.optim.Optimizer, dead_mask: torch.Tensor) -> None:
    """Adam state of the latents in dead_mask: first moment 0, second moment the alive latents' mean."""
    idx = dead_mask.nonzero().squeeze(1)
    alive = (~dead_mask).nonzero().squeeze(1)
    for name, dim in sae.LATENT_DIMS.items():
        state = opt.state.get(getattr(sae, name))
        if not state or "exp_avg" not in state:
            continue  # no step taken yet: nothing stale
        state["exp_avg"].index_fill_(dim, idx, 0.0)
        second = state["exp_avg_sq"]
        if alive.numel() == 0:
            second.index_fill_(dim, idx, 0.0)
            continue
        typical = second.index_select(dim, alive).mean(dim, keepdim=True)
        second.index_copy_(dim, idx, typical.expand_as(second.index_select(dim, idx)).contiguous())


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
    # drawn on the CPU with the (CPU) generator, so a GPU run draws the inputs a CPU run draws
    chosen = torch.multinomial(weights.cpu(), idx.numel(), replacement=idx.numel() > x.shape[0], generator=generator)
    v = x[chosen.to(x.device)] - sae.b_dec
    directions = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead_mask
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean().item() if bool(alive.any()) else 1.0
    sae.reinit_latents_(idx, directions, ENCODER_NORM_FRACTION * enc_norm)
    reset_adam_state_(sae, opt, dead_mask)
    return int(idx.numel())
