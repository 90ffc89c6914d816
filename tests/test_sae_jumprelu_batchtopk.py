import pytest
import torch

from tests.sae_gradcheck import loss_of_params

from models.sae import ARCHITECTURES, SAE, SAEConfig, TopKSAE, build_sae
from models.sae.batchtopk import BatchTopKSAE
from models.sae.jumprelu import JumpReLUSAE
from models.sae.topk import topk_scatter

PARAMS = ["W_enc", "b_enc", "W_dec", "b_dec"]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def randomise_(sae: SAE, seed: int = 1) -> None:
    """Untie encoder/decoder and give non-zero biases so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in PARAMS:
            p = getattr(sae, n)
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def make_jumprelu(d_in: int = 8, d_sae: int = 32, **kw) -> JumpReLUSAE:
    # k is unused by JumpReLU, but SAEConfig checks it against d_sae
    sae = build_sae(SAEConfig("jumprelu", d_in, d_sae, k=1, **kw))
    assert isinstance(sae, JumpReLUSAE)
    return sae


def make_batchtopk(d_in: int = 8, d_sae: int = 32, k: int = 4, **kw) -> BatchTopKSAE:
    sae = build_sae(SAEConfig("batchtopk", d_in, d_sae, k=k, **kw))
    assert isinstance(sae, BatchTopKSAE)
    return sae


def set_thresholds_(sae: JumpReLUSAE, theta: torch.Tensor) -> None:
    with torch.no_grad():
        sae.threshold.copy_(theta)


def synthetic(n: int, d_in: int = 32, n_feat: int = 64, seed: int = 0) -> torch.Tensor:
    """n_feat random unit directions, each active with probability 3/n_feat at magnitude U[0.5, 1.5];
    rescaled to mean squared norm d_in, as the trainer normalises."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_feat, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    codes = (torch.rand(n, n_feat, generator=g) < 3 / n_feat) * (torch.rand(n, n_feat, generator=g) + 0.5)
    x = codes @ dirs
    return x * (d_in / x.pow(2).sum(1).mean()).sqrt()


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return synthetic(4096)


def eval_l0(sae: SAE, x: torch.Tensor) -> float:
    sae.eval()
    with torch.no_grad():
        return (sae.encode(x) != 0).sum(1).float().mean().item()


def train_(sae: SAE, x: torch.Tensor, steps: int, lr: float = 1e-2, batch: int = 256) -> float:
    """Adam loop mirroring the trainer's step; returns the eval L0 afterwards."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    # Matrices this small are dominated by thread-pool overhead, ~10x worse on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sae.train()
        for step in range(steps):
            out = sae.loss(x[torch.randint(len(x), (batch,), generator=g)], step)
            opt.zero_grad()
            out["loss"].backward()
            sae.remove_gradient_parallel_to_decoder_()
            opt.step()
            sae.apply_constraints_()
        return eval_l0(sae, x)
    finally:
        torch.set_num_threads(threads)


def loss_fn(sae: SAE):
    """loss(x) as a function of (x, *PARAMS), for gradcheck."""
    return loss_of_params(sae, PARAMS)


def params_of(sae: SAE) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(sae, n).detach().clone().requires_grad_() for n in PARAMS)


# --- JumpReLU ------------------------------------------------------------------------------


def test_jumprelu_registry_init_and_latent_dims():
    assert ARCHITECTURES["jumprelu"] is JumpReLUSAE
    sae = make_jumprelu(init_threshold=0.05)
    assert torch.allclose(sae.threshold, torch.full((32,), 0.05))
    assert dict(sae.named_parameters())["threshold"].shape == (32,)
    assert sae.LATENT_DIMS == {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}
    params = dict(sae.named_parameters())
    assert all(params[n].shape[d] == 32 for n, d in sae.LATENT_DIMS.items())
    # free decoder norm from Anthropic's small tied init, as SAELens trains it
    assert not sae.unit_norm_decoder
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((32,), 0.1))
    assert torch.allclose(sae.W_enc, sae.W_dec.T)
    with pytest.raises(ValueError):
        make_jumprelu(bandwidth=0.0)


def test_jumprelu_activation_is_pre_times_step():
    sae = make_jumprelu(d_in=16, d_sae=64)
    randomise_(sae)
    set_thresholds_(sae, rand(64, seed=2) + 0.1)
    x = randn(200, 16)
    pre = sae.pre_acts(x)
    f = sae.encode(x)
    assert torch.equal(f, pre * (pre > sae.threshold))
    assert 0 < (f != 0).float().mean() < 1  # both sides of the threshold occur
    # exactly at the threshold the latent is off (strict inequality)
    at = sae.threshold.detach().clone()[None]
    assert torch.count_nonzero(sae.activate(at)) == 0


def hand_case() -> tuple[JumpReLUSAE, torch.Tensor]:
    """theta = (0.5, 1, 2), eps = 0.1; pre entries inside the window |pre - theta| < 0.05 are marked *.
    row 0: 0.52*, 0.97*, 3.0    row 1: 0.1, 1.04*, 1.96*"""
    sae = make_jumprelu(d_in=2, d_sae=3, bandwidth=0.1).double()
    set_thresholds_(sae, torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    pre = torch.tensor([[0.52, 0.97, 3.0], [0.1, 1.04, 1.96]], dtype=torch.float64, requires_grad=True)
    return sae, pre


def test_jumprelu_ste_gradient_hand_computed():
    sae, pre = hand_case()
    f = sae.activate(pre)
    assert torch.equal(f, torch.tensor([[0.52, 0.0, 3.0], [0.0, 1.04, 0.0]], dtype=torch.float64))
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    (f * g).sum().backward()
    # d/dpre = g * H(pre - theta)
    assert torch.equal(pre.grad, torch.tensor([[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]], dtype=torch.float64))
    # d/dtheta = -(theta/eps) sum_b g K: (-5 * 1, -10 * (2 + 5), -20 * 6)
    d_theta = torch.tensor([-5.0, -70.0, -120.0], dtype=torch.float64)
    assert torch.allclose(sae.threshold.grad, d_theta)


def test_jumprelu_l0_gradient_hand_computed_and_none_to_pre():
    sae, pre = hand_case()
    l0 = sae.sparsity_loss(pre, sae.activate(pre))
    assert l0.item() == pytest.approx(1.5)  # (2 + 1) active / 2 rows
    l0.backward()
    assert pre.grad is None or torch.count_nonzero(pre.grad) == 0
    # d/dtheta = -(1/eps) sum_b K / B: (-10 * 1/2, -10 * 2/2, -10 * 1/2)
    d_theta = torch.tensor([-5.0, -10.0, -5.0], dtype=torch.float64)
    assert torch.allclose(sae.threshold.grad, d_theta)

    # target mode: (L0/t - 1)^2 with t = 3 -> 0.25, chain factor 2 (L0/t - 1) / t = -1/3
    sae.cfg.target_l0 = 3.0
    sae.threshold.grad = None
    pen = sae.sparsity_loss(pre, sae.activate(pre))
    assert pen.item() == pytest.approx(0.25)
    pen.backward()
    assert torch.allclose(sae.threshold.grad, d_theta * (-1 / 3))


def test_jumprelu_l0_penalty_gives_no_gradient_to_encoder():
    sae = make_jumprelu(d_in=8, d_sae=32, bandwidth=0.5)
    randomise_(sae)
    set_thresholds_(sae, torch.full((32,), 0.3))
    x = randn(64, 8)
    pre = sae.pre_acts(x)
    sae.sparsity_loss(pre, sae.activate(pre)).backward()
    assert torch.count_nonzero(sae.threshold.grad) > 0  # some pre-activations are in the window
    for n in ("W_enc", "b_enc", "b_dec", "W_dec"):
        grad = getattr(sae, n).grad
        assert grad is None or torch.count_nonzero(grad) == 0, n


def test_jumprelu_threshold_gradient_zero_outside_window():
    sae = make_jumprelu(d_in=8, d_sae=32, bandwidth=1e-3, sparsity_coef=0.1)
    randomise_(sae)
    set_thresholds_(sae, torch.full((32,), 0.5))
    x = randn(32, 8, seed=3)  # a seed with every pre-activation > 6e-3 from the threshold
    assert ((sae.pre_acts(x) - sae.threshold).abs() > 5e-4).all()  # nothing within eps/2
    out = sae.loss(x)
    assert out["sparsity"] > 0
    out["loss"].backward()
    assert torch.count_nonzero(sae.threshold.grad) == 0
    for n in PARAMS:
        assert torch.count_nonzero(getattr(sae, n).grad) > 0, n


def test_jumprelu_gradcheck_float64():
    sae = make_jumprelu(d_in=4, d_sae=12, bandwidth=1e-3, sparsity_coef=0.3).double()
    randomise_(sae, seed=5)
    set_thresholds_(sae, torch.full((12,), 0.4, dtype=torch.float64))
    x = randn(6, 4, dtype=torch.float64)
    params = params_of(sae)
    pre = sae.pre_acts(x).detach()
    # Away from the window and its finite-difference reach, so the STE plays no part, and the
    # (piecewise constant) L0 term is in the loss with a true derivative of zero.
    assert ((pre - 0.4).abs() > 1e-2).all() and 0 < (pre > 0.4).float().mean() < 1
    f = loss_fn(sae)
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(), *params))
    l0 = (pre > 0.4).sum(1).double().mean().item()
    mse = (sae(x) - x).pow(2).mean().item()
    assert f(x, *params).item() == pytest.approx(mse + 0.3 * l0, rel=1e-12)


def test_jumprelu_sparsity_warmup():
    sae = make_jumprelu(sparsity_coef=0.2, sparsity_warmup_steps=10)
    randomise_(sae)
    x = randn(16, 8)
    out0, out5 = sae.loss(x, step=0), sae.loss(x, step=5)
    assert torch.equal(out0["loss"], out0["mse"])
    assert out5["loss"].item() == pytest.approx((out5["mse"] + 0.1 * out5["sparsity"]).item())


def test_jumprelu_reinit_latents_resets_threshold():
    sae = make_jumprelu(d_in=4, d_sae=8, init_threshold=0.02)
    set_thresholds_(sae, torch.full((8,), 3.0))
    idx = torch.tensor([1, 6])
    dirs = torch.eye(4)[:2]
    sae.reinit_latents_(idx, dirs, enc_norm=0.5)
    assert torch.allclose(sae.threshold[idx], torch.full((2,), 0.02))  # init_threshold below 0.5 * enc_norm
    sae.reinit_latents_(idx, dirs, enc_norm=0.01)
    assert torch.allclose(sae.threshold[idx], torch.full((2,), 0.005))  # half the new pre-activation scale
    keep = torch.ones(8, dtype=torch.bool)
    keep[idx] = False
    assert torch.allclose(sae.threshold[keep], torch.full((6,), 3.0))
    assert torch.equal(sae.W_dec[idx], dirs)


def test_jumprelu_threshold_moves_by_lr_whatever_its_size():
    """theta is a plain parameter (as in SAELens): Adam's first step moves it by lr, so a small
    initial threshold can reach the O(1) pre-activation scale within a short run. Trained as
    log(theta), the step would be lr * theta: 1e-5 here, and on the toy the thresholds never left
    the neighbourhood of their start."""
    sae = make_jumprelu(d_in=8, d_sae=32, bandwidth=0.5, sparsity_coef=1.0, init_threshold=0.001)
    randomise_(sae)
    opt = torch.optim.Adam(sae.parameters(), lr=0.01)
    before = sae.threshold.detach().clone()
    sae.loss(randn(64, 8))["loss"].backward()
    moved = sae.threshold.grad != 0
    assert moved.sum() > 0
    opt.step()
    sae.apply_constraints_()
    step = (sae.threshold.detach() - before)[moved].abs()
    assert torch.allclose(step, torch.full_like(step, 0.01), rtol=1e-3)


def test_jumprelu_threshold_kept_non_negative():
    sae = make_jumprelu(init_threshold=0.01)
    with torch.no_grad():
        sae.threshold[:5] = -0.3
    sae.apply_constraints_()
    assert (sae.threshold[:5] == 0).all() and (sae.threshold[5:] == 0.01).all()


def test_jumprelu_larger_lambda_lowers_l0(data):
    l0 = {}
    for lam in (1e-3, 3e-2):
        sae = make_jumprelu(32, 64, sparsity_coef=lam, bandwidth=0.1, init_threshold=0.1)
        l0[lam] = train_(sae, data, steps=200)
    assert l0[3e-2] < 0.5 * l0[1e-3]
    assert l0[3e-2] < 8  # near the ~3 true features per sample


@pytest.mark.parametrize("init_threshold", [0.01, 0.5])
def test_jumprelu_target_l0_moves_toward_target_from_both_sides(data, init_threshold):
    # Pre-activations start at about 0.1 (init_norm), so these thresholds start L0 near 28 and 0.2.
    target = 4.0
    sae = make_jumprelu(32, 64, sparsity_coef=1.0, bandwidth=0.2, init_threshold=init_threshold, target_l0=target)
    start = eval_l0(sae, data)
    end = train_(sae, data, steps=300)
    assert abs(end - target) < 0.7 * abs(start - target)
    if start < target:
        # A plain L0 penalty this strong would collapse L0 from here; the target pulls it up.
        assert end > start + 1
    else:
        assert start > 2 * target and abs(end - target) < 3


def test_jumprelu_save_load_roundtrip(tmp_path):
    sae = make_jumprelu(init_threshold=0.05, bandwidth=0.01, target_l0=7.0, seed=3)
    randomise_(sae)
    set_thresholds_(sae, rand(32, seed=4) + 0.05)
    sae.save(tmp_path)
    loaded = SAE.load(tmp_path)
    assert isinstance(loaded, JumpReLUSAE) and loaded.cfg == sae.cfg
    assert torch.equal(loaded.threshold, sae.threshold)
    x = randn(20, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))


def test_jumprelu_fold_scale(tmp_path):
    sae = make_jumprelu()
    randomise_(sae)
    set_thresholds_(sae, rand(32, seed=4) + 0.1)
    s = 0.37
    assert torch.equal(sae.folded_state_dict(s)["threshold"], sae.threshold.detach())
    sae.save(tmp_path, scale=s)
    raw = SAE.load(tmp_path)
    x = randn(50, 8) * 10
    f_raw, f = raw.encode(x), sae.encode(x * s)
    assert torch.equal(f_raw != 0, f != 0)
    assert torch.allclose(f_raw, f, rtol=1e-5, atol=1e-5)
    assert torch.allclose(raw(x), sae(x * s) / s, rtol=1e-5, atol=1e-5)


# --- BatchTopK -----------------------------------------------------------------------------


def test_batchtopk_registry_and_buffers():
    assert ARCHITECTURES["batchtopk"] is BatchTopKSAE
    sae = make_batchtopk()
    assert isinstance(sae, TopKSAE)  # AuxK reused
    assert set(sae.state_dict()) == {*PARAMS, "threshold", "num_batches"}
    assert {n for n, _ in sae.named_parameters()} == set(PARAMS)  # theta is estimated, not trained
    assert sae.num_batches.item() == 0


def test_batchtopk_training_keeps_k_times_batch_across_rows():
    sae = make_batchtopk(d_in=16, d_sae=64, k=5).train()
    randomise_(sae)
    pre = sae.pre_acts(randn(40, 16))
    f = sae.activate(pre)
    assert torch.count_nonzero(f) == 5 * 40
    # exactly the 200 largest entries of the whole batch, with their raw values
    assert torch.equal(f[f != 0].sort().values, pre.flatten().topk(200).values.sort().values)
    assert len(set((f != 0).sum(1).tolist())) > 1

    # hand case, k = 2, B = 3: row 0 holds the 4 largest values of the batch
    pre = torch.tensor([[9.0, 8.0, 7.0, 6.0], [5.0, 0.5, -1.0, 0.2], [0.1, 4.0, -2.0, 0.3]])
    f = make_batchtopk(d_in=2, d_sae=4, k=2).train().activate(pre)
    assert (f != 0).sum(1).tolist() == [4, 1, 1]
    assert torch.equal(f, torch.tensor([[9.0, 8.0, 7.0, 6.0], [5.0, 0, 0, 0], [0, 4.0, 0, 0]]))


def test_batchtopk_fewer_positives_than_k_times_batch():
    sae = make_batchtopk(d_in=2, d_sae=4, k=2).train()
    pre = torch.tensor([[3.0, -1.0, -2.0, -3.0], [-1.0, -1.0, 0.5, -4.0]])
    f = sae.activate(pre)
    assert torch.equal(f, torch.tensor([[3.0, 0, 0, 0], [0, 0, 0.5, 0]]))
    assert sae.threshold.item() == pytest.approx(0.5)  # smallest *positive* kept value


def test_batchtopk_eval_uses_threshold():
    sae = make_batchtopk(d_in=2, d_sae=4, k=1)
    with torch.no_grad():
        sae.threshold.fill_(1.0)
        sae.num_batches.fill_(1)
    sae.eval()
    pre = torch.tensor([[1.001, 0.999, 5.0, 1.0], [0.999, 0.5, -3.0, 0.0], [1.2, 1.3, 1.4, 1.5]])
    f = sae.activate(pre)
    assert torch.equal(f, torch.tensor([[1.001, 0, 5.0, 0], [0, 0, 0, 0], [1.2, 1.3, 1.4, 1.5]]))
    assert sae.num_batches.item() == 1 and sae.threshold.item() == 1.0  # eval never updates theta


def test_batchtopk_eval_before_any_training_is_per_row_topk():
    sae = make_batchtopk(d_in=16, d_sae=64, k=5).eval()
    randomise_(sae)
    pre = sae.pre_acts(randn(30, 16))
    assert torch.equal(sae.activate(pre), topk_scatter(pre, 5))


def test_batchtopk_threshold_estimator_hand_computed():
    sae = make_batchtopk(d_in=2, d_sae=3, k=1).train()
    sae.threshold_decay = 0.75  # weight max(1/n, 0.25): running mean for 4 batches, then EMA
    expected = []
    theta = 0.0
    for n, m in enumerate([2.0, 4.0, 6.0, 2.0, 10.0, 6.0], start=1):
        theta += max(1 / n, 0.25) * (m - theta)
        expected.append(theta)
    assert expected[:5] == pytest.approx([2.0, 3.0, 4.0, 3.5, 5.125])
    got = []
    for m in [2.0, 4.0, 6.0, 2.0, 10.0, 6.0]:
        # k*B = 2 kept: m + 1 and m; the smallest kept is m
        sae.activate(torch.tensor([[m + 1, -1.0, -1.0], [m, m - 0.5, -1.0]]))
        got.append(sae.threshold.item())
        if len(got) == 3:  # batches with nothing positive carry no information: skipped
            sae.activate(-torch.ones(2, 3))
            assert sae.threshold.item() == got[-1] and sae.num_batches.item() == 3
            sae.eval().activate(torch.ones(2, 3) * 100)  # eval forwards do not count either
            sae.train()
    assert got == pytest.approx(expected)
    assert sae.num_batches.item() == 6


def test_batchtopk_eval_l0_close_to_k_after_training(data):
    sae = make_batchtopk(32, 64, k=4, aux_k=8)
    l0 = train_(sae, data, steps=600)
    assert sae.num_batches.item() == 600
    # 3.8 here. theta averages the batch minima of the last ~100 steps (decay 0.99), so it lags
    # while the activations' scale still moves from its 0.1 start: after 300 steps L0 was 3.3.
    assert abs(l0 - 4) < 0.6


def test_batchtopk_auxk_reused():
    assert BatchTopKSAE.aux_loss is TopKSAE.aux_loss
    sae = make_batchtopk(d_in=8, d_sae=32, k=2, aux_k=3).train()
    randomise_(sae)
    x = randn(16, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[0, 4, 9]] = True
    assert sae.loss(x, dead_mask=dead)["aux"] > 0
    pre = sae.pre_acts(x)
    aux = sae.aux_loss(x, sae.decode(sae.activate(pre)), pre, dead)
    (g_dec,) = torch.autograd.grad(aux, [sae.W_dec])
    assert torch.count_nonzero(g_dec[~dead]) == 0 and torch.count_nonzero(g_dec[dead]) > 0


def test_batchtopk_gradcheck_float64_training():
    sae = make_batchtopk(d_in=4, d_sae=12, k=3).double().train()
    randomise_(sae, seed=5)
    x = randn(6, 4, dtype=torch.float64)
    params = params_of(sae)
    # Away from ties: the (kB)-th and (kB+1)-th values of the batch are separated, kept ones positive.
    top = sae.pre_acts(x).detach().flatten().topk(19).values
    assert top[17] - top[18] > 1e-3 and top[17] > 1e-3
    f = loss_fn(sae)
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(), *params))
    assert f(x, *params).item() == pytest.approx((sae(x) - x).pow(2).mean().item(), rel=1e-12)


def test_batchtopk_save_load_roundtrip(tmp_path):
    sae = make_batchtopk(seed=9).train()
    randomise_(sae)
    for _ in range(3):
        sae.activate(sae.pre_acts(randn(16, 8)))
    sae.save(tmp_path)
    loaded = SAE.load(tmp_path)
    assert isinstance(loaded, BatchTopKSAE) and loaded.cfg == sae.cfg
    assert loaded.threshold.item() == sae.threshold.item() > 0
    assert loaded.num_batches.item() == 3 and loaded.num_batches.dtype == torch.long
    x = randn(20, 8)
    sae.eval()
    loaded.eval()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))


def test_batchtopk_fold_scale(tmp_path):
    sae = make_batchtopk(d_in=8, d_sae=32, k=4).train()
    randomise_(sae)
    sae.activate(sae.pre_acts(randn(64, 8)))
    s = 0.37
    assert sae.folded_state_dict(s)["threshold"].item() == sae.threshold.item()
    sae.save(tmp_path, scale=s)
    raw = SAE.load(tmp_path).eval()
    sae.eval()
    x = randn(50, 8) * 10
    assert raw.threshold.item() == sae.threshold.item()
    assert torch.allclose(raw.encode(x), sae.encode(x * s), rtol=1e-5, atol=1e-5)
    assert torch.allclose(raw(x), sae(x * s) / s, rtol=1e-5, atol=1e-5)


def test_leading_dims():
    x = randn(2, 3, 8, seed=1)
    jr = make_jumprelu()
    randomise_(jr)
    set_thresholds_(jr, torch.full((32,), 0.3))
    assert torch.equal(jr(x), jr(x.reshape(6, 8)).reshape(2, 3, 8))
    bt = make_batchtopk(k=4).train()
    randomise_(bt)
    f = bt.encode(x)
    assert torch.count_nonzero(f) == 4 * 6  # B counts every leading position
    assert torch.equal(f, bt.encode(x.reshape(6, 8)).reshape(2, 3, 32))


def test_jumprelu_b_dec_starts_at_zero():
    sae = make_jumprelu()
    sae.init_b_dec_(randn(64, 8) + 3.0)
    assert torch.count_nonzero(sae.b_dec) == 0
    topk = build_sae(SAEConfig("topk", 8, 32, k=4))
    topk.init_b_dec_(randn(64, 8) + 3.0)
    assert (topk.b_dec > 2).all()  # the others start at the geometric median


def test_defaults_of_the_estimators_are_pinned():
    # BatchTopK's inference threshold: a running mean of the batch minima for 100 batches, then an
    # EMA of weight 0.01 (decay 0.99): after 150 batches of minimum 1, one of minimum 101 moves it by 1
    sae = make_batchtopk(d_in=2, d_sae=3, k=1).train()
    assert sae.threshold_decay == 0.99
    for _ in range(150):
        sae.activate(torch.tensor([[2.0, -1.0, -1.0], [1.0, -1.0, -1.0]]))
    assert sae.threshold.item() == pytest.approx(1.0)
    sae.activate(torch.tensor([[102.0, -1.0, -1.0], [101.0, -1.0, -1.0]]))
    assert sae.threshold.item() == pytest.approx(2.0)
    # JumpReLU as the harness builds it: SAELens's kernel width 0.05 and initial threshold 0.01
    from config.cli import parse_args
    (arm,) = parse_args(["--study", "activations", "--activation", "jumprelu"]).arms
    assert (arm.sae.bandwidth, arm.sae.init_threshold) == (0.05, 0.01)
    jumprelu = make_jumprelu(bandwidth=arm.sae.bandwidth, init_threshold=arm.sae.init_threshold)
    assert torch.equal(jumprelu.threshold, torch.full_like(jumprelu.threshold, 0.01))
