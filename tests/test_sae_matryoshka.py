"""Matryoshka BatchTopK: nested prefixes that each reconstruct, a loss that sums over them."""
import pytest
import torch
import torch.nn.functional as F

from models.sae import ARCHITECTURES, SAEConfig, build_sae
from models.sae.batchtopk import BatchTopKSAE
from models.sae.matryoshka import MatryoshkaSAE, prefix_widths


def make(d_in=8, d_sae=32, k=4, **kw) -> MatryoshkaSAE:
    sae = build_sae(SAEConfig("matryoshka", d_in, d_sae, k=k, **kw))
    assert isinstance(sae, MatryoshkaSAE)
    return sae


def test_registry_and_prefixes():
    assert ARCHITECTURES["matryoshka"] is MatryoshkaSAE
    assert issubclass(MatryoshkaSAE, BatchTopKSAE)  # selection, threshold and AuxK are BatchTopK's
    assert prefix_widths(512, 5) == [32, 64, 128, 256, 512]
    assert prefix_widths(100, 3) == [25, 50, 100]
    assert prefix_widths(64, 1) == [64]
    assert prefix_widths(4, 5) == [1, 2, 4]  # never an empty prefix
    assert make(matryoshka_levels=3).widths == [8, 16, 32]
    with pytest.raises(ValueError):
        make(matryoshka_levels=0)


def test_loss_sums_the_prefix_reconstructions_hand_computed():
    """d_in 2, d_sae 4, two levels (prefixes of 2 and 4 latents), k 1 (B*k = 2 kept in the batch)."""
    sae = make(d_in=2, d_sae=4, k=1, matryoshka_levels=2)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6]]))
        sae.W_enc.copy_(sae.W_dec.T)
    x = torch.tensor([[2.0, 0.0], [1.2, 1.6]])
    # pre = [[2, 0, 1.2, -1.6], [1.2, 1.6, 2, 0]]: the batch's two largest are 2 (row 0, latent 0)
    # and 2 (row 1, latent 2, outside the first prefix).
    out = sae.loss(x)
    inner = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # prefix of 2: row 1's latent is not in it
    full = torch.tensor([[2.0, 0.0], [1.2, 1.6]])
    expected = F.mse_loss(inner, x) + F.mse_loss(full, x)
    assert out["loss"].item() == pytest.approx(expected.item())
    assert out["mse"].item() == pytest.approx(0.0, abs=1e-12)  # the logged MSE is the full width's
    assert out["l0"].item() == 1.0


def test_one_level_is_batchtopk():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    m, b = make(matryoshka_levels=1, seed=3), build_sae(SAEConfig("batchtopk", 8, 32, k=4, seed=3))
    for path in ("dense", "sparse"):
        m.training_path = b.training_path = path
        assert torch.allclose(m.loss(x)["loss"], b.loss(x)["loss"])


@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_step_equals_dense_step(with_dead):
    saes = []
    for path in ("dense", "sparse"):
        sae = make(d_in=16, d_sae=128, k=4, aux_k=12, matryoshka_levels=4)
        sae.training_path = path
        saes.append(sae)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    dead = (torch.arange(128) % 3 == 0) if with_dead else None
    outs = [sae.loss(x, dead_mask=dead) for sae in saes]
    for out in outs:
        out["loss"].backward()
    for key in ("loss", "mse", "aux", "l0"):
        assert torch.allclose(outs[0][key], outs[1][key], rtol=1e-5, atol=1e-7), key
    for (name, p), q in zip(saes[0].named_parameters(), saes[1].parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def prefix_fvu(sae, x: torch.Tensor, width: int) -> float:
    """Fraction of variance left unexplained when only the first `width` latents decode."""
    sae.eval()
    with torch.no_grad():
        f = sae.encode(x)
        recon = f[:, :width] @ sae.W_dec[:width] + sae.b_dec
    return ((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def test_each_prefix_reconstructs_after_training():
    """Trained on a toy whose few frequent features carry most of the variance, Matryoshka's first
    prefix alone reconstructs far better than the same prefix of a BatchTopK SAE trained alike,
    whose frequent features land anywhere in the dictionary."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(48, 16, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    p = torch.cat([torch.full((6,), 0.3), torch.full((42,), 0.02)])  # 6 frequent features, 42 rare
    codes = (torch.rand(8192, 48, generator=g) < p) * (torch.rand(8192, 48, generator=g) + 0.5)
    x = codes @ dirs
    x *= (16 / x.pow(2).sum(1).mean()).sqrt()
    fvu = {}
    for arch in ("matryoshka", "batchtopk"):
        sae = build_sae(SAEConfig(arch, 16, 64, k=3, matryoshka_levels=4, seed=1))  # prefixes 8, 16, 32, 64
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        for step in range(300):
            batch = x[torch.randint(len(x), (256,), generator=g)]
            out = sae.loss(batch, step)
            opt.zero_grad()
            out["loss"].backward()
            sae.remove_gradient_parallel_to_decoder_()
            opt.step()
            sae.apply_constraints_()
        fvu[arch] = (prefix_fvu(sae, x, 8), prefix_fvu(sae, x, 64))
    assert fvu["matryoshka"][0] < 0.6 * fvu["batchtopk"][0], fvu
    assert fvu["matryoshka"][1] < 1.5 * fvu["batchtopk"][1], fvu  # the full width still reconstructs
