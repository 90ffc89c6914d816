"""Anthropic-style resampling: dead latents revived toward badly reconstructed inputs, alive ones
untouched, Adam state of the revived rows reset."""
import pytest
import torch

from experiments.resampling import encoder_norm_fraction, resample_dead_latents_
from models.sae import ARCHITECTURES, SAEConfig, build_sae


def trained(architecture):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture=architecture, d_in=8, d_sae=16, k=3, sparsity_coef=0.01, seed=0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        sae.loss(torch.randn(32, 8), step=10)["loss"].backward()
        opt.step()
    return sae, opt


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_dead_latents_revived_alive_untouched_adam_reset(architecture):
    sae, opt = trained(architecture)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 5, 9]] = True
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    adam_before = {name: {key: opt.state[getattr(sae, name)][key].clone() for key in ("exp_avg", "exp_avg_sq")}
                   for name in sae.LATENT_DIMS}
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean().item()
    # three inputs far worse reconstructed than the rest: with p ~ loss^2 (drawn without
    # replacement) exactly these three become the new directions
    x = torch.randn(64, 8) * 0.01
    bad = [17, 30, 44]
    x[bad] = torch.tensor([[30.0, -20, 10, 0, 5, 0, 0, 1], [0, 0, 25, 25, 0, -9, 0, 0], [-40.0, 0, 0, 0, 0, 0, 30, 2]])
    n = resample_dead_latents_(sae, opt, dead, x, torch.Generator().manual_seed(0))
    assert n == 3
    wanted = (x[bad] - sae.b_dec) / (x[bad] - sae.b_dec).norm(dim=1, keepdim=True)
    got = sae.W_dec[[1, 5, 9]]
    match = (got @ wanted.T).detach()  # cosines: a permutation matrix of ones
    assert torch.allclose(match.sort(dim=1).values[:, -1], torch.ones(3), atol=1e-5)
    assert sorted(match.argmax(1).tolist()) == [0, 1, 2]
    for i in (1, 5, 9):
        fraction = 1.0 if architecture in ("topk", "batchtopk") else 0.2  # TopK latents must win a top-k slot
        assert encoder_norm_fraction(architecture) == fraction
        assert torch.allclose(sae.W_enc[:, i], sae.W_dec[i] * fraction * alive_norm, atol=1e-6)
        assert sae.b_enc[i] == 0
    for name, dim in sae.LATENT_DIMS.items():
        param, alive = getattr(sae, name), (~dead).nonzero().squeeze(1)
        assert torch.equal(param.index_select(dim, alive), before[name].index_select(dim, alive)), name
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[param][key]
            assert torch.count_nonzero(state.index_select(dim, dead.nonzero().squeeze(1))) == 0, (name, key)
            assert torch.equal(state.index_select(dim, alive), adam_before[name][key].index_select(dim, alive))
    assert torch.equal(sae.b_dec, before["b_dec"])


def test_nothing_dead_changes_nothing():
    sae, opt = trained("topk")
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    assert resample_dead_latents_(sae, opt, torch.zeros(16, dtype=torch.bool), torch.randn(8, 8),
                                  torch.Generator().manual_seed(0)) == 0
    assert all(torch.equal(v, before[k]) for k, v in sae.state_dict().items())
