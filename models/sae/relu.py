"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Towards Monosemanticity",
April 2024 training update)."""

from __future__ import annotations

from torch import Tensor

from models.sae.base import SAE, register


@register("relu")
class ReLUSAE(SAE):
    """f = relu(pre); loss = mse + lambda * mean_batch sum_i f_i ||W_dec,i||.

    The decoder norm sits inside the penalty, so the L1 cannot be dodged by shrinking f and
    growing W_dec: the penalty is invariant to that rescaling and the decoder norm is left free.
    """

    # The init (SAE.init_norm 0.1) is Anthropic's April 2024 value on inputs normalised to
    # E||x|| ~ sqrt(d_in), which is our normalisation, so it carries over: half the latents start on
    # (none dead) and x_hat - b_dec ~ 0.1^2 * d_sae / (2 d_in) * x stays small, so training starts
    # near x_hat = b_dec.

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def sparsity_loss(self, pre: Tensor, f: Tensor) -> Tensor:
        # Column sums first: the [B, d_sae] work is one reduction, and its gradient a broadcast.
        f = f.reshape(-1, f.shape[-1])
        return f.sum(0) @ self.W_dec.norm(dim=1) / f.shape[0]
