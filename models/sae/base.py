"""Shared sparse-autoencoder machinery: config, parameters, init, decoder constraints, I/O.

Every architecture is a small subclass of `SAE` registered in `ARCHITECTURES`; it supplies
`activate` (pre-activations -> feature activations) and optionally `aux_loss`.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pkgutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from models.sae.catalog import ARCHITECTURE_DEFAULTS
from models.sae.kernels import encoder_pre_acts, firing_counts


@dataclass
class SAEConfig:
    architecture: str  # key into ARCHITECTURES
    d_in: int
    d_sae: int
    k: int = 32  # TopK family: active latents per token
    aux_k: int | None = None  # AuxK: dead latents selected per row; None -> d_in // 2, as in the paper
    aux_coef: float = 1 / 32  # weight of the auxiliary loss (AuxK; Gated's gate reconstruction)
    auxk: bool = True  # dead-latent handling by AuxK on/off
    sparsity_coef: float = 0.0  # lambda of the sparsity penalty (L1 for relu/gated, L0 for jumprelu)
    sparsity_warmup_steps: int = 0  # lambda ramps linearly from 0 over these steps
    bandwidth: float = 0.001  # JumpReLU: width of the rectangle kernel of the straight-through estimator
    init_threshold: float = 0.001  # JumpReLU: initial threshold
    target_l0: float | None = None  # JumpReLU: penalise (L0 / target - 1)^2 instead of L0
    matryoshka_levels: int = 5  # Matryoshka: nested prefixes d_sae / 2^(levels-1), ..., d_sae / 2, d_sae
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.aux_k is not None and self.aux_k < 1:
            raise ValueError(f"aux_k must be >= 1, got {self.aux_k}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        # Strict: an unknown key is more likely a typo than something safe to drop.
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown SAEConfig keys: {sorted(unknown)}")
        return cls(**d)


ARCHITECTURES: dict[str, type[SAE]] = {}


def register(name: str) -> Callable[[type[SAE]], type[SAE]]:
    if name not in ARCHITECTURE_DEFAULTS:  # the command line and presets would not know it
        raise TypeError(f"architecture {name!r} has no entry in models/sae/catalog.py")

    def deco(cls: type[SAE]) -> type[SAE]:
        ARCHITECTURES[name] = cls
        return cls

    return deco


@functools.cache
def import_architectures() -> None:
    """Import every architecture module of this package, so each has registered itself."""
    package = Path(__file__).parent
    for module in pkgutil.iter_modules([str(package)]):
        importlib.import_module(f"models.sae.{module.name}")


def build_sae(cfg: SAEConfig) -> SAE:
    import_architectures()
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[cfg.architecture](cfg)


class SAE(nn.Module):
    """x_hat = activate((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec."""

    # Decoder rows kept at norm 1 during training, or a free norm (every architecture but Gated,
    # as SAELens trains them; why for each: ReLUSAE, JumpReLUSAE, TopKSAE, GatedSAE).
    unit_norm_decoder = False
    # Encoder column norm at init: W_enc starts as init_norm * W_dec^T for random unit decoder rows
    # (decoder rows start at init_norm too where their norm is free). On inputs normalised to
    # E||x||^2 = d_in, x . d ~ N(0, 1) for a random unit direction d, so pre-activations start at
    # about init_norm. 0.1 for every architecture (Anthropic's April 2024 update): from 1, about
    # half of all latents fire on every input and the first steps are spent undoing an x_hat
    # several times too large, which on the toy cost Gated 0.2 of frac_recovered at equal L0
    # (tests/test_sae_relu_gated.py::test_small_encoder_init_recovers_more); for the TopK family
    # see TopKSAE.
    init_norm: float = 0.1
    median_b_dec = True  # start b_dec at the geometric median of the first batch (else at 0)

    # Which dimension of each parameter indexes latents: what resampling re-initialises and
    # whose Adam state it resets. Subclasses with per-latent parameters of their own add them.
    LATENT_DIMS: dict[str, int] = {"W_enc": 1, "b_enc": 0, "W_dec": 0}

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Local generator: seeded init without touching the global RNG.
        g = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter((w_dec.T * self.init_norm).contiguous())  # tied init (Gao et al. 2024)
        self.W_dec = nn.Parameter(w_dec if self.unit_norm_decoder else w_dec * self.init_norm)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    # --- forward -------------------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        return encoder_pre_acts(x, self.W_enc, self.b_enc, self.b_dec)

    def activate(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None) -> Tensor:
        """Unweighted auxiliary term; the total loss adds cfg.aux_coef times it."""
        return x.new_zeros(())

    def sparsity_loss(self, pre: Tensor, f: Tensor) -> Tensor:
        """Unweighted sparsity penalty (mean over the batch); the loss adds sparsity_coef_at(step) times it."""
        return pre.new_zeros(())

    def sparsity_coef_at(self, step: int) -> float:
        warm = self.cfg.sparsity_warmup_steps
        return self.cfg.sparsity_coef * (min(1.0, step / warm) if warm > 0 else 1.0)

    def loss(self, x: Tensor, step: int = 0, dead_mask: Tensor | None = None) -> dict[str, Tensor]:
        pre = self.pre_acts(x)
        f = self.activate(pre)
        x_hat = self.decode(f)
        return self._loss_terms(x, x_hat, self.sparsity_loss(pre, f), self.aux_loss(x, x_hat, pre, dead_mask), step,
                                firing_counts(f))

    def _loss_terms(self, x: Tensor, x_hat: Tensor, sparsity: Tensor, aux: Tensor, step: int,
                    firing: Tensor, reconstruction: Tensor | None = None) -> dict[str, Tensor]:
        """The loss and its logged parts; `firing` [d_sae] counts the rows each latent fired on.
        `reconstruction` is the loss's reconstruction term where it is not just the MSE of x_hat."""
        mse = F.mse_loss(x_hat, x)
        return {
            "loss": (mse if reconstruction is None else reconstruction) + self.sparsity_coef_at(step) * sparsity
                    + self.cfg.aux_coef * aux,
            "mse": mse.detach(),
            "sparsity": sparsity.detach(),
            "aux": aux.detach(),
            "firing_counts": firing,
            "l0": firing.sum() / (x.numel() // x.shape[-1]),
        }

    # --- training-time helpers -------------------------------------------------------------

    @torch.no_grad()
    def init_b_dec_(self, x_sample: Tensor, n_iter: int = 10, eps: float = 1e-8) -> None:
        """Set b_dec to the geometric median of x_sample [N, d_in] (Weiszfeld iterations), where the
        architecture starts it there (median_b_dec)."""
        if not self.median_b_dec:
            return
        x = x_sample.reshape(-1, self.cfg.d_in).to(torch.float64)
        m = x.mean(0)
        for _ in range(n_iter):
            # eps keeps a point that coincides with the estimate from getting infinite weight.
            w = 1 / (x - m).norm(dim=1).clamp_min(eps)
            m = (w[:, None] * x).sum(0) / w.sum()
        self.b_dec.copy_(m)

    @torch.no_grad()
    def apply_constraints_(self) -> None:
        """Called after every optimizer step: decoder rows back to unit norm (a no-op for
        architectures with a free decoder norm); subclasses add constraints of their own."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_(self) -> None:
        """Called before every optimizer step; a no-op for architectures with a free decoder norm."""
        # The unit-norm projection after the step would undo any radial update anyway;
        # removing it first keeps Adam's moment estimates clean.
        g, w = self.W_dec.grad, self.W_dec
        if g is None or not self.unit_norm_decoder:
            return
        coef = (g * w).sum(dim=1, keepdim=True) / (w * w).sum(dim=1, keepdim=True).clamp_min(1e-12)
        g -= coef * w

    @torch.no_grad()
    def reinit_latents_(self, idx: Tensor, directions: Tensor, enc_norm: float) -> None:
        """Point latents `idx` at unit `directions` [len(idx), d_in] (resampling, Anthropic 2023):
        decoder rows = directions, encoder columns = directions scaled to `enc_norm`, b_enc = 0.
        Subclasses also reset their own per-latent parameters."""
        self.W_dec[idx] = directions
        self.W_enc[:, idx] = directions.T * enc_norm
        self.b_enc[idx] = 0.0

    # --- I/O -------------------------------------------------------------------------------

    @torch.no_grad()
    def folded_state_dict(self, scale: float) -> dict[str, Tensor]:
        """Parameters of the equivalent SAE on raw x, for a model trained on x * scale.

        Pre-activations are unchanged: (x s - b_dec) W_enc = (x - b_dec / s)(s W_enc); the
        decoder output is divided by s. Parameters living in pre-activation space (b_enc,
        thresholds) therefore stay as they are.
        """
        sd = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
              for k, v in self.state_dict().items()}
        sd["W_enc"] *= scale
        sd["W_dec"] /= scale
        sd["b_dec"] /= scale
        return sd

    def save(self, out_dir: Path, scale: float = 1.0, trained_on: dict[str, Any] | None = None) -> None:
        """Write sae.safetensors + config.json; the saved SAE acts on raw (unnormalised) inputs.
        `trained_on` (what the activations were: model, hook, data, study, commit) goes into
        config.json beside the architecture, so the folder describes itself."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = save({k: v.detach().cpu().contiguous() for k, v in self.folded_state_dict(scale).items()})
        about = {"trained_on": trained_on} if trained_on is not None else {}
        config = json.dumps({**self.cfg.to_dict(), "folded_scale": scale, **about}, indent=2).encode()
        for name, data in (("sae.safetensors", weights), ("config.json", config)):
            tmp = out_dir / f".{name}.tmp"  # a killed write never leaves a truncated file under the real name
            tmp.write_bytes(data)
            os.replace(tmp, out_dir / name)

    @classmethod
    def load(cls, out_dir: Path) -> SAE:
        """Read a saved SAE. Weights are read only as safetensors (never unpickled): any other
        file, a pickle crafted to run code included, is refused with a ValueError."""
        out_dir = Path(out_dir)
        d = json.loads((out_dir / "config.json").read_text())
        d.pop("folded_scale", None)  # already folded into the weights
        d.pop("trained_on", None)  # a description, read with trained_on()
        sae = build_sae(SAEConfig.from_dict(d))
        path = out_dir / "sae.safetensors"
        try:
            state = load_file(path)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a valid safetensors file ({err}); SAE weights are only read as "
                             f"safetensors, never unpickled") from None
        sae.load_state_dict(state)
        return sae


def trained_on(out_dir: Path) -> dict[str, Any]:
    """What a saved SAE was trained on (config.json's "trained_on"; empty for an SAE saved without it)."""
    return json.loads((Path(out_dir) / "config.json").read_text()).get("trained_on", {})
