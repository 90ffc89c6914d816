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
from models.sae.kernels import bag_offsets, firing_counts, selected_pre_acts


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
        n_rows, levels = x.shape[0], len(self.widths)
        sparse = self.sparse_step and self.training  # in eval mode latents are selected by the threshold
        if sparse:
            with torch.no_grad():
                pre = self.pre_acts(x)
                acts = self.select(pre)
            vals = selected_pre_acts(pre, acts, x, self.W_enc, self.b_enc, self.b_dec).relu()
            # One embedding_bag with a bag per (row, level): parts[r, l] sums row r's latents of level l.
            level = torch.bucketize(acts.cols, torch.tensor(self.widths, device=x.device), right=True)
            bag = acts.rows * levels + level
            order = torch.argsort(bag, stable=True)  # bags in order (from_flat's row-major order has them so)
            parts = F.embedding_bag(acts.cols[order], self.W_dec, bag_offsets(bag[order], n_rows * levels), mode="sum",
                                    per_sample_weights=vals[order]).view(n_rows, levels, -1)
            firing = acts.firing_counts(vals.detach(), self.cfg.d_sae)
        else:
            pre = self.pre_acts(x)
            f = self.activate(pre)
            parts = torch.stack([f[:, a:b] @ self.W_dec[a:b] for a, b in zip([0, *self.widths[:-1]], self.widths)], 1)
            firing = firing_counts(f)
        # Each prefix's reconstruction: b_dec plus the parts of every level up to it; the loss sums their MSEs.
        recon = parts.cumsum(1) + self.b_dec
        prefix_mse = (recon - x[:, None]).pow(2).mean(dim=(0, 2))
        x_hat = recon[:, -1]
        aux = (self._sparse_aux_loss if sparse else self.aux_loss)(x, x_hat, pre, dead_mask)
        return self._loss_terms(x, x_hat, x.new_zeros(()), aux, step, firing, reconstruction=prefix_mse.sum())
