"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders").

A BatchTopK SAE whose latents are ordered into nested prefixes W_dec[:m_1] within W_dec[:m_2]
within ... W_dec[:d_sae], each of which must reconstruct the input on its own: the loss sums the
MSE of every prefix's reconstruction (BatchTopK selects over the whole dictionary once; a prefix
decodes the selected latents that fall inside it). The first latents are thus trained to carry
the most general, frequent directions, and a parent feature keeps a latent of its own instead of
being absorbed into its children's latents, since the small prefixes have no room for the
children. Inference is BatchTopK's (one learned threshold); AuxK is inherited.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.sae.base import SAEConfig, register
from models.sae.batchtopk import BatchTopKSAE
from models.sae.kernels import firing_counts, selected_pre_acts, sparse_decode


def prefix_widths(d_sae: int, levels: int) -> list[int]:
    """Nested prefix sizes, each twice the one before, ending at d_sae: d_sae / 2^(levels-1), ..., d_sae."""
    return sorted({max(1, d_sae >> (levels - 1 - i)) for i in range(levels)})


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        if cfg.matryoshka_levels < 1:
            raise ValueError(f"matryoshka_levels must be >= 1, got {cfg.matryoshka_levels}")
        self.widths = prefix_widths(cfg.d_sae, cfg.matryoshka_levels)

    def loss(self, x: Tensor, step: int = 0, dead_mask: Tensor | None = None) -> dict[str, Tensor]:
        x = x.reshape(-1, x.shape[-1])
        sparse = self.sparse_step and self.training  # in eval mode latents are selected by the threshold
        if sparse:
            with torch.no_grad():
                pre = self.pre_acts(x)
                acts = self.select(pre)
            vals = selected_pre_acts(pre, acts, x, self.W_enc, self.b_enc, self.b_dec).relu()
            level = torch.bucketize(acts.cols, torch.tensor(self.widths, device=x.device), right=True)
            parts = [sparse_decode(acts, vals * (level == i), self.W_dec) for i in range(len(self.widths))]
            firing = acts.firing_counts(vals.detach(), self.cfg.d_sae)
        else:
            pre = self.pre_acts(x)
            f = self.activate(pre)
            parts = [f[:, a:b] @ self.W_dec[a:b] for a, b in zip([0, *self.widths[:-1]], self.widths)]
            firing = firing_counts(f)
        # Each prefix's reconstruction: b_dec plus the parts of every level up to it.
        recon, prefix_mse = self.b_dec, []
        for part in parts:
            recon = recon + part
            prefix_mse.append(F.mse_loss(recon, x))
        aux = (self._sparse_aux_loss if sparse else self.aux_loss)(x, recon, pre, dead_mask)
        return self._loss_terms(x, recon, x.new_zeros(()), aux, step, firing,
                                reconstruction=torch.stack(prefix_mse).sum())
