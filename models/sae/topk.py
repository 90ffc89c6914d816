"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""

from __future__ import annotations

import torch
from torch import Tensor

from models.sae.base import SAE, register


def topk_scatter(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest entries of relu(pre) along the last dim, zero the rest."""
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    # relu after selection is the same as before it (relu is monotone) and touches only k entries.
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


@register("topk")
class TopKSAE(SAE):
    @property
    def aux_k(self) -> int:
        return min(self.cfg.aux_k or self.cfg.d_in // 2, self.cfg.d_sae)

    def activate(self, pre: Tensor) -> Tensor:
        return topk_scatter(pre, self.cfg.k)

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK: reconstruct the residual from the top-aux_k dead latents, as a normalised MSE.

        ||e - e_hat||^2 / ||e - mean(e)||^2 summed over the batch, with e = x - x_hat (detached, so
        only the dead latents' path is trained) and e_hat decoded without b_dec (e has no offset).
        """
        if not self.cfg.auxk or dead_mask is None or not bool(dead_mask.any()):
            return x.new_zeros(())
        e = (x - x_hat).detach()
        # Alive latents get -inf, so they are never selected (or, when fewer than aux_k latents
        # are dead, are selected with value relu(-inf) = 0 and no gradient).
        z = topk_scatter(pre.masked_fill(~dead_mask, float("-inf")), self.aux_k)
        e_hat = z @ self.W_dec
        e = e.reshape(-1, e.shape[-1])
        e_hat = e_hat.reshape(-1, e.shape[-1])
        return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
