"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""

from __future__ import annotations

import torch
from torch import Tensor

from models.sae.base import SAE, register
from models.sae.kernels import SparseActs, batch_top_k, selected_pre_acts, sparse_decode


def topk_scatter(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest entries of relu(pre) along the last dim, zero the rest."""
    vals, idx = batch_top_k(pre, k) if pre.dim() == 1 else pre.topk(k, dim=-1, sorted=False)
    # relu after selection is the same as before it (relu is monotone) and touches only k entries.
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def count_on_host(t: Tensor) -> bool:
    """Whether a count over `t` may be read on the host during a step: on the CPU it costs nothing;
    on a GPU it waits for every op queued before it."""
    return t.device.type == "cpu"


@register("topk")
class TopKSAE(SAE):
    # Training step: "sparse" (only the selected latents are decoded and receive gradients, see
    # models/sae/kernels.py), "dense" (the plain expression), or "auto": sparse when
    # k <= d_sae / SPARSE_MIN_RATIO. Both give the same results up to float rounding, so this is a
    # runtime choice, not part of the config. Evaluation always decodes densely.
    training_path: str = "auto"
    SPARSE_MIN_RATIO = 8
    # A free decoder norm (SAE.unit_norm_decoder) from Anthropic's small init (SAE.init_norm), as
    # SAELens trains TopK: selection keeps k latents whatever their scale, so nothing is lost by
    # leaving the norm free.
    # On the toys (bench_parity.py, seeds 0 and 1) the unit-norm decoder from a unit tied init of
    # Gao et al. and sparsify recovered 0.91 / 0.45 (standard / hierarchy) of the true features
    # with TopK, 0.45 / 0.34 with BatchTopK and 0.36 / 0.30 with Matryoshka; a free norm from 0.1
    # 0.97 / 0.47, 0.69 / 0.56 and 0.62 / 0.58. Encoder columns at 0.1 with unit decoder rows
    # recovered 0.87 / 0.45: it is the free norm from a small start that helps.

    @property
    def sparse_step(self) -> bool:
        if self.training_path == "auto":
            return self.cfg.k * self.SPARSE_MIN_RATIO <= self.cfg.d_sae
        return self.training_path == "sparse"

    @property
    def aux_k(self) -> int:
        return min(self.cfg.aux_k or max(1, self.cfg.d_in // 2), self.cfg.d_sae)

    def activate(self, pre: Tensor) -> Tensor:
        return topk_scatter(pre, self.cfg.k)

    def select(self, pre: Tensor) -> SparseActs:
        """The latents kept for each row of pre [B, d_sae] (their values may still be <= 0)."""
        return SparseActs.from_topk(pre.topk(self.cfg.k, dim=-1, sorted=False).indices)

    def loss(self, x: Tensor, step: int = 0, dead_mask: Tensor | None = None) -> dict[str, Tensor]:
        if not (self.sparse_step and self.training):  # in eval mode BatchTopK selects by its threshold
            return super().loss(x, step, dead_mask)
        x = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            pre = self.pre_acts(x)
            acts = self.select(pre)
        vals = selected_pre_acts(pre, acts, x, self.W_enc, self.b_enc, self.b_dec).relu()
        x_hat = sparse_decode(acts, vals, self.W_dec) + self.b_dec
        return self._loss_terms(x, x_hat, x.new_zeros(()), self._sparse_aux_loss(x, x_hat, pre, dead_mask), step,
                                acts.firing_counts(vals.detach(), self.cfg.d_sae))

    def _aux_selection(self, pre: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, int, Tensor | float] | None:
        """(pre with alive latents at -inf, k_aux, scale), or None when AuxK has nothing to do.

        The loss is scaled by min(dead / aux_k, 1): a handful of dead latents should not pull as hard
        as many (SAELens and sparsify do the same). Only dead latents may contribute. On the CPU k_aux
        is min(aux_k, number dead), read from the mask. Elsewhere that read would make the host wait
        for every step, so k_aux is aux_k and any alive latents that fill the selection come out at
        -inf, which the callers zero: the same loss, with the count left on the device."""
        if not self.cfg.auxk or dead_mask is None:
            return None
        if not count_on_host(dead_mask):
            return (pre.masked_fill(~dead_mask, float("-inf")), min(self.aux_k, pre.shape[-1]),
                    (dead_mask.sum() / self.aux_k).clamp(max=1.0))
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return None
        return pre.masked_fill(~dead_mask, float("-inf")), min(self.aux_k, n_dead), min(n_dead / self.aux_k, 1.0)

    @staticmethod
    def _normalised_residual_mse(e: Tensor, e_hat: Tensor) -> Tensor:
        e = e.reshape(-1, e.shape[-1])
        e_hat = e_hat.reshape(-1, e.shape[-1])
        return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()

    def _sparse_aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None) -> Tensor:
        """aux_loss on the sparse path: the same selection, decoded with embedding_bag."""
        selection = self._aux_selection(pre, dead_mask)
        if selection is None:
            return x.new_zeros(())
        dead_pre, k_aux, scale = selection
        acts = SparseActs.from_topk(dead_pre.topk(k_aux, dim=-1, sorted=False).indices)
        vals = selected_pre_acts(dead_pre, acts, x, self.W_enc, self.b_enc, self.b_dec)
        vals = vals.masked_fill(vals.isneginf(), 0.0)  # alive latents that filled the selection
        return scale * self._normalised_residual_mse((x - x_hat).detach(), sparse_decode(acts, vals, self.W_dec))

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK: reconstruct the residual from the top-k_aux dead latents, as a normalised MSE.

        ||e - e_hat||^2 / ||e - mean(e)||^2 summed over the batch, with e = x - x_hat (detached, so
        only the dead latents' path is trained) and e_hat decoded without b_dec (e has no offset).
        The selected pre-activations are used as they are, negative ones included: a dead latent
        is dead because its pre-activations are below those of the alive ones, mostly below 0, and
        a ReLU here would give almost all of them no gradient (measured on tinylm: 2.4% of the
        selected values were positive; with the ReLU AuxK left 22% of latents dead, without it 4%).
        """
        selection = self._aux_selection(pre, dead_mask)
        if selection is None:
            return x.new_zeros(())
        dead_pre, k_aux, scale = selection
        vals, idx = dead_pre.topk(k_aux, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.masked_fill(vals.isneginf(), 0.0))
        return scale * self._normalised_residual_mse((x - x_hat).detach(), z @ self.W_dec)
