"""Anthropic-style resampling: dead latents revived toward badly reconstructed inputs, alive ones
untouched, Adam state of the revived rows reset to a fresh direction with ordinary step sizes."""
import pytest
import torch

from experiments.train.resampling import ENCODER_NORM_FRACTION, resample_dead_latents_
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
        # 0.2 of the alive norm for every architecture, TopK family included (Anthropic, dictionary_learning)
        assert torch.allclose(sae.W_enc[:, i], sae.W_dec[i] * 0.2 * alive_norm, atol=1e-6)
        assert sae.b_enc[i] == 0
    dead_idx, alive = dead.nonzero().squeeze(1), (~dead).nonzero().squeeze(1)
    for name, dim in sae.LATENT_DIMS.items():
        param = getattr(sae, name)
        assert torch.equal(param.index_select(dim, alive), before[name].index_select(dim, alive)), name
        first, second = opt.state[param]["exp_avg"], opt.state[param]["exp_avg_sq"]
        assert torch.count_nonzero(first.index_select(dim, dead_idx)) == 0, name
        # the second moment of each revived latent: the alive latents' mean, entry by entry
        typical = adam_before[name]["exp_avg_sq"].index_select(dim, alive).mean(dim, keepdim=True)
        revived = second.index_select(dim, dead_idx)
        assert torch.allclose(revived, typical.expand_as(revived)), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[param][key].index_select(dim, alive),
                               adam_before[name][key].index_select(dim, alive))
    assert torch.equal(sae.b_dec, before["b_dec"])


def test_nothing_dead_changes_nothing():
    sae, opt = trained("topk")
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    assert resample_dead_latents_(sae, opt, torch.zeros(16, dtype=torch.bool), torch.randn(8, 8),
                                  torch.Generator().manual_seed(0)) == 0
    assert all(torch.equal(v, before[k]) for k, v in sae.state_dict().items())


def test_revived_latents_take_ordinary_adam_steps():
    """The first update of a revived weight is about lr in size, as for the alive ones. With both
    moments zeroed (the references' reset) it is sqrt(1 / (1 - beta2)) * (1 - beta1) ~ 3.2 lr,
    because Adam's bias correction has long worn off."""
    assert ENCODER_NORM_FRACTION == 0.2
    sae, opt = trained("relu")
    for _ in range(300):  # let the bias correction wear off
        opt.zero_grad()
        sae.loss(torch.randn(32, 8), step=10)["loss"].backward()
        opt.step()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 7]] = True
    resample_dead_latents_(sae, opt, dead, torch.randn(64, 8), torch.Generator().manual_seed(1))
    before = sae.W_dec.detach().clone()
    opt.zero_grad()
    sae.loss(torch.randn(32, 8), step=10)["loss"].backward()
    opt.step()
    lr = opt.param_groups[0]["lr"]
    step = (sae.W_dec.detach() - before).abs()
    revived, alive = step[dead].median(), step[~dead].median()
    assert revived < 2 * lr, (revived, lr)
    assert revived < 3 * alive
