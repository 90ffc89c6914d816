"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k*B largest activations of the whole batch rather than k per row, so the
number of active latents adapts to each token while the batch average stays k. At inference a
single threshold theta, estimated during training, replaces the batch dependence:
f = relu(pre) * 1[pre > theta].
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.sae.base import SAEConfig, register
from models.sae.kernels import SparseActs, batch_top_k
from models.sae.topk import TopKSAE, topk_scatter


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """AuxK is inherited from TopKSAE: it only needs pre, the residual x - x_hat and the dead
    mask, none of which depend on how the main activation chose its latents."""

    # theta is an exponential moving average of each training batch's smallest kept activation,
    # with weight max(1/n, 1 - decay) on the n-th batch: an exact running mean over the first
    # 1/(1 - decay) batches (no bias toward the initial value), then an EMA with a time constant
    # of 1/(1 - decay) steps, so theta follows the encoder as it trains and settles on the final
    # model's value once the learning rate has decayed.
    threshold_decay: float = 0.99

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        # Batches that contributed to theta. While 0, eval falls back to per-row TopK, so an
        # untrained model still has L0 = k (theta = 0 would make it a dense ReLU).
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def select(self, pre: Tensor) -> SparseActs:
        """Sparse training path: the k*B largest entries of the batch; theta is updated from them."""
        n_rows = pre.shape[0]
        vals, flat = batch_top_k(pre.reshape(-1), self.cfg.k * n_rows)
        self._update_threshold_(vals.relu())
        return SparseActs.from_flat(flat, n_rows, pre.shape[-1])

    def activate(self, pre: Tensor) -> Tensor:
        if self.training:
            n_rows = pre.numel() // pre.shape[-1]
            f = topk_scatter(pre.reshape(-1), self.cfg.k * n_rows).reshape(pre.shape)
            self._update_threshold_(f)
            return f
        if self.num_batches.item() == 0:
            return topk_scatter(pre, self.cfg.k)
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    @torch.no_grad()
    def _update_threshold_(self, f: Tensor) -> None:
        # Smallest positive kept value (f: the kept activations, dense or not); zeros kept only
        # because fewer than k*B pre-activations were positive say nothing about the threshold.
        # Tensor ops only: no host sync per step.
        batch_min = f.detach().masked_fill(f <= 0, float("inf")).min().to(self.threshold.dtype)
        seen = torch.isfinite(batch_min)
        self.num_batches += seen.long()
        weight = torch.clamp(1.0 / self.num_batches.clamp_min(1), min=1 - self.threshold_decay)
        updated = self.threshold + weight * (batch_min - self.threshold)
        self.threshold.copy_(torch.where(seen, updated, self.threshold))
