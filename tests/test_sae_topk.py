import json

import numpy as np
import pytest
import torch

from tests.sae_gradcheck import loss_of_params

from models.sae import ARCHITECTURES, SAE, SAEConfig, TopKSAE, build_sae


def make_sae(d_in: int = 8, d_sae: int = 32, k: int = 4, **kw) -> TopKSAE:
    sae = build_sae(SAEConfig("topk", d_in, d_sae, k=k, **kw))
    assert isinstance(sae, TopKSAE)
    return sae


def randomise_(sae: SAE, seed: int = 1) -> None:
    """Untie encoder/decoder and give non-zero biases so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def numpy_topk_encode(sae: SAE, x: np.ndarray) -> np.ndarray:
    W_enc, b_enc, b_dec = (getattr(sae, n).detach().double().numpy() for n in ("W_enc", "b_enc", "b_dec"))
    pre = np.maximum((x - b_dec) @ W_enc + b_enc, 0)
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=1)[:, : sae.cfg.k]
    np.put_along_axis(out, idx, np.take_along_axis(pre, idx, axis=1), axis=1)
    return out


def test_registry_and_config_roundtrip():
    assert ARCHITECTURES["topk"] is TopKSAE
    cfg = SAEConfig("topk", 8, 32, k=3, aux_k=5, seed=7)
    assert SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        SAEConfig.from_dict({**cfg.to_dict(), "typo": 1})
    with pytest.raises(ValueError):
        SAEConfig("topk", 8, 4, k=5)
    with pytest.raises(ValueError):
        build_sae(SAEConfig("nope", 8, 32))


def test_init_seeded_tied_unit_norm_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = make_sae(seed=3), make_sae(seed=3), make_sae(seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.W_dec, c.W_dec)
    # tied, at norm 0.1 (a free decoder norm from Anthropic's small init, as SAELens starts TopK)
    assert torch.allclose(a.W_dec.norm(dim=1), torch.full((32,), 0.1))
    assert torch.equal(a.W_enc, a.W_dec.T)
    assert a.W_enc.is_contiguous()
    assert torch.count_nonzero(a.b_enc) == 0 and torch.count_nonzero(a.b_dec) == 0
    assert all(p.dtype == torch.float32 for p in a.parameters())


def test_topk_exactly_k_largest_positive():
    sae = make_sae(d_in=16, d_sae=64, k=5)
    randomise_(sae)
    x = torch.randn(200, 16)
    f = sae.encode(x)
    assert torch.all((f != 0).sum(1) == 5)
    np.testing.assert_allclose(f.detach().double().numpy(), numpy_topk_encode(sae, x.double().numpy()), atol=1e-5)
    # the kept values are the raw pre-activations, not rescaled
    pre = sae.pre_acts(x)
    assert torch.equal(f[f != 0], pre[f != 0])


def test_topk_fewer_positive_than_k():
    sae = make_sae(d_in=4, d_sae=8, k=5)
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([1.0, 2.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0]) * 100)
    f = sae.encode(torch.randn(10, 4) * 0.01)
    assert torch.all((f != 0).sum(1) == 2)
    assert torch.all(f >= 0)
    assert torch.all(f[:, :2] > 0)


def test_encode_accepts_leading_dims():
    sae = make_sae()
    x = torch.randn(2, 3, 8)
    assert torch.allclose(sae(x), sae(x.reshape(6, 8)).reshape(2, 3, 8))


def hand_sae() -> TopKSAE:
    """d_in=2, d_sae=3, k=1, aux_k=1 with decoder rows (1,0), (0,1), (0.6,0.8), tied encoder."""
    sae = make_sae(d_in=2, d_sae=3, k=1, aux_k=1)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


HAND_X = torch.tensor([[3.0, 1.0], [0.0, 2.0]])


def test_auxk_hand_computed():
    # pre = [[3, 1, 2.6], [0, 2, 1.6]] -> f = [[3,0,0],[0,2,0]], x_hat = [[3,0],[0,2]], e = [[0,1],[0,0]]
    # mse = 1/4. Latent 2 dead: z = [[0,0,2.6],[0,0,1.6]], e_hat = [[1.56,2.08],[0.96,1.28]]
    # num = 1.56^2 + 1.08^2 + 0.96^2 + 1.28^2 = 6.16; mean(e) = (0, .5), den = 0.5 -> aux = 12.32
    sae = hand_sae()
    out = sae.loss(HAND_X, dead_mask=torch.tensor([False, False, True]))
    assert out["mse"].item() == pytest.approx(0.25)
    assert out["aux"].item() == pytest.approx(12.32)
    assert out["loss"].item() == pytest.approx(0.25 + 12.32 / 32)
    # Latent 0 dead instead: z = [[3,0,0],[0,0,0]], e_hat = [[3,0],[0,0]], num = 10 -> aux = 20
    out0 = sae.loss(HAND_X, dead_mask=torch.tensor([True, False, False]))
    assert out0["aux"].item() == pytest.approx(20.0)
    assert out0["mse"].item() == pytest.approx(0.25)


def test_aux_zero_without_dead_latents_or_when_disabled():
    sae = make_sae()
    randomise_(sae)
    x = torch.randn(16, 8)
    for kw in ({}, {"dead_mask": torch.zeros(32, dtype=torch.bool)}):
        out = sae.loss(x, **kw)
        assert out["aux"].item() == 0.0
        assert torch.equal(out["loss"], out["mse"])
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in sae.parameters())
    off = make_sae(auxk=False)
    randomise_(off)
    assert off.loss(x, dead_mask=torch.ones(32, dtype=torch.bool))["aux"].item() == 0.0


def test_auxk_only_involves_dead_latents():
    sae = make_sae(d_in=8, d_sae=32, k=4, aux_k=3)
    randomise_(sae)
    x = torch.randn(64, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 5, 9, 20, 31]] = True
    pre = sae.pre_acts(x)
    x_hat = sae.decode(sae.activate(pre))
    aux = sae.aux_loss(x, x_hat, pre, dead)
    (g_dec,) = torch.autograd.grad(aux, [sae.W_dec])
    assert torch.count_nonzero(g_dec[~dead]) == 0
    assert torch.count_nonzero(g_dec[dead]) > 0
    # value: top-aux_k among dead latents only, at their pre-activations (negative ones too),
    # computed independently in numpy
    P = pre.detach().double().numpy().copy()
    P[:, ~dead.numpy()] = -np.inf
    idx = np.argsort(-P, axis=1)[:, :3]
    z = np.zeros_like(P)
    np.put_along_axis(z, idx, np.take_along_axis(P, idx, axis=1), axis=1)
    assert (z < 0).any()  # the case a ReLU would have silenced
    e = (x - x_hat).detach().double().numpy()
    e_hat = z @ sae.W_dec.detach().double().numpy()
    expected = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert aux.item() == pytest.approx(expected, rel=1e-5)
    # a different dead set gives a different loss
    dead2 = dead.clone()
    dead2[[1, 2]] = ~dead2[[1, 2]]
    assert sae.aux_loss(x, x_hat, pre, dead2).item() != pytest.approx(aux.item(), rel=1e-3)


def test_auxk_more_aux_k_than_dead():
    """Fewer dead latents than aux_k: all of them are used, none alive, and the loss is scaled by
    dead / aux_k (here 2 / 16)."""
    sae = make_sae(d_in=8, d_sae=32, k=4, aux_k=16)
    randomise_(sae)
    x = torch.randn(32, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 7]] = True
    out = sae.loss(x, dead_mask=dead)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters())
    with torch.no_grad():
        pre = sae.pre_acts(x)
        e = x - sae.decode(sae.activate(pre))
        e_hat = pre[:, [3, 7]] @ sae.W_dec[[3, 7]]
        expected = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum() * 2 / 16
    assert out["aux"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_auxk_trains_dead_latents_below_zero():
    """A dead latent's pre-activations are mostly negative; AuxK must still give it a gradient (a
    ReLU on the selected values would not: tinylm's dead latents had 2.4% of them positive)."""
    sae = hand_sae()
    with torch.no_grad():
        sae.W_enc[:, 2] = -sae.W_enc[:, 2]  # latent 2 now has pre-activations -2.6 and -1.6
    sae.loss(HAND_X, dead_mask=torch.tensor([False, False, True]))["loss"].backward()
    assert sae.W_enc.grad[:, 2].abs().sum() > 0 and sae.W_dec.grad[2].abs().sum() > 0


def test_default_aux_k():
    assert make_sae(d_in=8, d_sae=32).aux_k == 4
    assert make_sae(d_in=8, d_sae=32, aux_k=7).aux_k == 7
    assert make_sae(d_in=8, d_sae=32, aux_k=100).aux_k == 32


def test_mse_gradcheck_float64():
    sae = make_sae(d_in=4, d_sae=12, k=3).double()
    randomise_(sae, seed=5)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    params = tuple(getattr(sae, n).detach().clone().requires_grad_() for n in names)
    # Away from ties: the k-th and (k+1)-th pre-activations and the kept values are well separated.
    top = sae.pre_acts(x).detach().topk(4, dim=1).values
    assert (top[:, 2] - top[:, 3]).min() > 1e-3 and (top[:, :3].abs() > 1e-3).all()
    f = loss_of_params(sae, names)
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(), *params))
    # and the value is the plain per-element MSE
    assert f(x, *params).item() == pytest.approx((sae(x) - x).pow(2).mean().item(), rel=1e-12)


def test_decoder_norm_is_free():
    # the TopK family leaves the decoder norm free: the constraint helpers change nothing
    sae = make_sae()
    randomise_(sae)
    sae.loss(torch.randn(16, 8))["loss"].backward()
    w0, g0 = sae.W_dec.detach().clone(), sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder_()
    sae.apply_constraints_()
    assert not sae.unit_norm_decoder
    assert torch.equal(sae.W_dec.grad, g0) and torch.equal(sae.W_dec.detach(), w0)


def test_init_b_dec_geometric_median():
    sae = make_sae(d_in=2, d_sae=8, k=2)
    # With a far outlier the geometric median stays inside the unit square (the mean is at 20.4).
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    sae.init_b_dec_(pts, n_iter=200)
    p = pts.double().numpy()
    m = sae.b_dec.detach().double().numpy()

    def cost(c):
        return np.linalg.norm(p - c, axis=1).sum()

    assert np.all((m > 0) & (m < 1))
    # it minimises the sum of distances: no small step lowers it
    for d in ([1e-3, 0], [0, 1e-3], [-1e-3, 0], [0, -1e-3]):
        assert cost(m) <= cost(m + np.array(d)) + 1e-9
    assert sae.b_dec.dtype == torch.float32


def test_save_load_roundtrip(tmp_path):
    sae = make_sae(aux_k=5, seed=9)
    randomise_(sae)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["folded_scale"] == 1.0 and cfg["architecture"] == "topk" and cfg["aux_k"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "sae.safetensors"]
    loaded = SAE.load(tmp_path)
    assert isinstance(loaded, TopKSAE) and loaded.cfg == sae.cfg
    x = torch.randn(20, 8)
    assert torch.equal(loaded(x), sae(x))
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_save_folds_scale(tmp_path):
    sae = make_sae(d_in=8, d_sae=32, k=4)
    randomise_(sae)
    s = 0.37
    sae.save(tmp_path, scale=s)
    assert json.loads((tmp_path / "config.json").read_text())["folded_scale"] == s
    raw = SAE.load(tmp_path)
    x = torch.randn(50, 8) * 10
    assert torch.allclose(raw(x), sae(x * s) / s, rtol=1e-5, atol=1e-5)
    assert torch.allclose(raw.encode(x), sae.encode(x * s), rtol=1e-5, atol=1e-5)
    # the live model is untouched by saving
    assert torch.allclose(sae.W_dec.norm(dim=1), SAE.load(tmp_path).W_dec.norm(dim=1) * s)
