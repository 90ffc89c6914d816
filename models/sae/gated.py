"""Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse
autoencoders")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.sae.base import SAE, SAEConfig, register


@register("gated")
class GatedSAE(SAE):
    """f = 1[pi_gate > 0] * relu(pi_mag), with the gate and magnitude paths sharing directions:

        pi_gate = pre = (x - b_dec) W_enc + b_enc              (W_gate = W_enc, b_gate = b_enc)
        pi_mag  = (x - b_dec) (W_enc * exp(r_mag)) + b_mag = (pre - b_enc) exp(r_mag) + b_mag

    loss = mse + lambda * mean_batch sum_i relu(pi_gate)_i
           + aux_coef * mean((x - relu(pi_gate) @ sg(W_dec) - sg(b_dec))^2)

    The L1 sits on the gate only, so magnitudes are free of shrinkage. The Heaviside passes no
    gradient, so the gate is trained by the L1 and the aux term; the aux term decodes through a
    frozen (detached) decoder so that it trains the encoder only. Build with aux_coef = 1.0 (the
    paper's weight; SAEConfig's default 1/32 is the TopK AuxK weight).

    Decoder rows are kept at unit norm as in the paper. That is what makes the gate's L1
    meaningful: without it, shrinking W_enc (compensated in pi_mag by r_mag) and growing W_dec
    would drive the L1 to zero at no cost. With the constraint the Anthropic-style factor
    ||W_dec,i|| is identically 1 and its gradient is radial (projected out before every step),
    so it is left out of the penalty.
    """

    LATENT_DIMS = {**SAE.LATENT_DIMS, "r_mag": 0, "b_mag": 0}
    unit_norm_decoder = True  # see the class docstring; encoder columns start at SAE.init_norm

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # exp(0) = 1 and b_mag = b_enc = 0: pi_mag starts equal to pi_gate.
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def activate(self, pre: Tensor) -> Tensor:
        pi_mag = torch.addcmul(self.b_mag, pre - self.b_enc, self.r_mag.exp())
        return pi_mag.relu_() * (pre > 0)

    def sparsity_loss(self, pre: Tensor, f: Tensor) -> Tensor:
        return pre.relu().sum() / (pre.numel() // pre.shape[-1])

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None) -> Tensor:
        """Reconstruction from the gate's relu through the frozen decoder (pre is pi_gate)."""
        x_gate = pre.relu() @ self.W_dec.detach() + self.b_dec.detach()
        return (x - x_gate).pow(2).mean()

    @torch.no_grad()
    def reinit_latents_(self, idx: Tensor, directions: Tensor, enc_norm: float) -> None:
        super().reinit_latents_(idx, directions, enc_norm)
        self.r_mag[idx] = 0.0
        self.b_mag[idx] = 0.0

    # folded_state_dict needs no override: pi_gate and pi_mag are both in pre-activation space
    # (pre and b_enc are unchanged by the fold), so r_mag and b_mag stay as they are.
