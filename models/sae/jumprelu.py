"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity
with JumpReLU Sparse Autoencoders").

f = pre * H(pre - theta) with a learned per-latent threshold theta and an L0 sparsity penalty.
Both the jump and the L0 count are piecewise constant in theta, so theta is trained only through
straight-through estimators (STEs) with a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth
eps = cfg.bandwidth.

theta is a plain parameter, kept >= 0 after each step, as SAELens trains it: Adam moves it by about
the learning rate per step whatever its size, so it can travel from a small start (0.01) to the
O(1) scale of the pre-activations in a short run. Trained as log(theta) its steps are lr * theta,
and on the toy the thresholds stayed near their start.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from models.sae.base import SAE, SAEConfig, register
from models.sae.kernels import firing_counts


class JumpReLUWithL0(torch.autograd.Function):
    """f = pre * H(pre - theta), the mean L0 = sum_i H(pre_i - theta_i) over rows, and the per-latent
    firing counts, from one comparison. Gradients:

        d f / d pre = H(pre - theta)
        d f / d theta = -(theta / eps) K((pre - theta) / eps)
        d L0 / d theta = -(1 / eps) K((pre - theta) / eps) / n_rows; none to pre: the L0 penalty moves
        thresholds only, never the encoder (as in the paper).

    Both threshold gradients share one window computation.
    """

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor, Tensor]:
        active = pre > threshold
        f = pre * active
        counts = firing_counts(f)  # f > 0 exactly where active, since theta > 0
        n_rows = pre.numel() // pre.shape[-1]
        ctx.save_for_backward(pre, threshold, active)
        ctx.bandwidth, ctx.n_rows = bandwidth, n_rows
        ctx.mark_non_differentiable(counts)
        return f, counts.sum() / n_rows, counts

    @staticmethod
    def backward(ctx: Any, grad_f: Tensor, grad_l0: Tensor, _: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold, active = ctx.saved_tensors
        eps = ctx.bandwidth
        window = (pre - threshold).abs_() < eps / 2  # K((pre - theta) / eps) = 1
        per_entry = (grad_f * threshold).add_(grad_l0 / ctx.n_rows) * window
        grad_threshold = per_entry.reshape(-1, pre.shape[-1]).sum(0) / -eps
        return grad_f * active, grad_threshold, None


@register("jumprelu")
class JumpReLUSAE(SAE):
    LATENT_DIMS = {**SAE.LATENT_DIMS, "threshold": 0}
    # As SAELens trains it, a free decoder norm (SAE.unit_norm_decoder; the L0 penalty does not
    # depend on magnitudes, so nothing gains from trading f against ||W_dec||) from Anthropic's
    # small init (SAE.init_norm). Measured on the toy at L0 4 with everything else equal: unit-norm
    # decoder rows from a unit init (dictionary_learning's choice) recovered 0.52 of the true
    # features, a free norm from that init 0.65, a free norm from 0.1 0.79.
    # b_dec starts at 0, as in SAELens: from the geometric median the toys recovered 0.01-0.02 fewer
    # features in each of four runs (two toys, two seeds), at the same L0.
    median_b_dec = False

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        if cfg.bandwidth <= 0 or cfg.init_threshold <= 0:
            raise ValueError(f"bandwidth and init_threshold must be > 0, got {cfg.bandwidth}, {cfg.init_threshold}")
        if cfg.target_l0 is not None and cfg.target_l0 <= 0:
            raise ValueError(f"target_l0 must be positive, got {cfg.target_l0}")
        self.threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), cfg.init_threshold))

    def activate(self, pre: Tensor) -> Tensor:
        return JumpReLUWithL0.apply(pre, self.threshold, self.cfg.bandwidth)[0]

    def _l0_penalty(self, l0: Tensor) -> Tensor:
        """L0 itself; with cfg.target_l0 = t set, (L0/t - 1)^2 instead, which pushes L0 toward t from
        either side rather than always down."""
        return l0 if self.cfg.target_l0 is None else (l0 / self.cfg.target_l0 - 1) ** 2

    def sparsity_loss(self, pre: Tensor, f: Tensor) -> Tensor:
        """The penalty on the batch's mean L0 (see _l0_penalty)."""
        return self._l0_penalty(JumpReLUWithL0.apply(pre, self.threshold, self.cfg.bandwidth)[1])

    def loss(self, x: Tensor, step: int = 0, dead_mask: Tensor | None = None) -> dict[str, Tensor]:
        # One pass gives f, L0 and the firing counts that the generic loss would compute separately.
        pre = self.pre_acts(x)
        f, l0, counts = JumpReLUWithL0.apply(pre, self.threshold, self.cfg.bandwidth)
        return self._loss_terms(x, self.decode(f), self._l0_penalty(l0), x.new_zeros(()), step, counts)

    @torch.no_grad()
    def apply_constraints_(self) -> None:
        super().apply_constraints_()
        self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def reinit_latents_(self, idx: Tensor, directions: Tensor, enc_norm: float) -> None:
        super().reinit_latents_(idx, directions, enc_norm)
        # A revived latent must be able to fire, or it gets no gradient and dies again: its
        # pre-activations are about enc_norm * (x . direction), and x . direction is O(1) on
        # inputs normalised to mean squared norm d_in, so the threshold starts at half that scale
        # (never above init_threshold).
        self.threshold[idx] = min(self.cfg.init_threshold, 0.5 * enc_norm)
