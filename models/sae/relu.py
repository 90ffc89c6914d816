"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Towards Monosemanticity",
April 2024 training update)."""

from __future__ import annotations

import torch
from torch import Tensor

from models.sae.base import SAE, SAEConfig, register


@register("relu")
class ReLUSAE(SAE):
    """f = relu(pre); loss = mse + lambda * mean_batch sum_i f_i ||W_dec,i||.

    The decoder norm sits inside the penalty, so the L1 cannot be dodged by shrinking f and
    growing W_dec: the penalty is invariant to that rescaling and the decoder norm is left free.
    """

    unit_norm_decoder = False

    # Decoder row norm at init. The update used 0.1 on inputs normalised to E||x|| ~ sqrt(d_in),
    # which is our normalisation (E||x||^2 = d_in), so the value carries over: with tied
    # W_enc = W_dec^T, x . d_i ~ N(0, 1) for random unit d_i, so pre ~ 0.1 (half the latents on,
    # none dead) and x_hat - b_dec ~ 0.1^2 * d_sae / (2 d_in) * x stays small, so training
    # starts near x_hat = b_dec instead of from a large overshoot.
    init_dec_norm: float = 0.1

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        with torch.no_grad():
            # The base drew seeded unit-norm rows and tied W_enc to them; rescale both.
            self.W_dec.mul_(self.init_dec_norm)
            self.W_enc.mul_(self.init_dec_norm)

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def sparsity_loss(self, pre: Tensor, f: Tensor) -> Tensor:
        # Column sums first: the [B, d_sae] work is one reduction, and its gradient a broadcast.
        f = f.reshape(-1, f.shape[-1])
        return f.sum(0) @ self.W_dec.norm(dim=1) / f.shape[0]
