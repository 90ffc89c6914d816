"""The training step's fast paths (models/sae/kernels.py) against the plain expressions they replace."""
import pytest
import torch

from models.sae import SAEConfig, build_sae
from models.sae import kernels
from models.sae.kernels import (SparseActs, bag_offsets, batch_top_k, encoder_pre_acts, selected_pre_acts,
                               sparse_decode)


def params64(seed: int, d_in: int = 6, d_sae: int = 10):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
            for shape in ((5, d_in), (d_in, d_sae), (d_sae,), (d_in,))]


def test_encoder_pre_acts_equals_the_plain_expression_and_its_gradients():
    x, W_enc, b_enc, b_dec = params64(0)
    out = encoder_pre_acts(x, W_enc, b_enc, b_dec)
    assert torch.equal(out, (x - b_dec) @ W_enc + b_enc)  # the forward is the expression itself
    assert torch.autograd.gradcheck(encoder_pre_acts, (x, W_enc, b_enc, b_dec))
    # Without an input gradient (the training case) the parameters' gradients are unchanged.
    g = torch.randn_like(out)
    ours = torch.autograd.grad(encoder_pre_acts(x.detach(), W_enc, b_enc, b_dec), (W_enc, b_enc, b_dec), g)
    plain = torch.autograd.grad((x.detach() - b_dec) @ W_enc + b_enc, (W_enc, b_enc, b_dec), g)
    for a, b in zip(ours, plain):
        assert torch.allclose(a, b)


def test_sparse_acts_layouts_by_hand():
    acts = SparseActs.from_topk(torch.tensor([[2, 0], [1, 2]]))
    assert acts.cols.tolist() == [2, 0, 1, 2] and acts.offsets.tolist() == [0, 2] and acts.rows.tolist() == [0, 0, 1, 1]
    # Flat indices into a [3, 4] matrix: (0, 1), (2, 0), (2, 3), (0, 3); row 1 has none.
    acts = SparseActs.from_flat(torch.tensor([1, 8, 11, 3]), n_rows=3, width=4)
    assert acts.cols.tolist() == [1, 3, 0, 3] and acts.rows.tolist() == [0, 0, 2, 2] and acts.offsets.tolist() == [0, 2, 2]
    values = torch.tensor([1.0, 0.0, 2.0, 3.0])
    dense = torch.zeros(3, 4)
    dense[acts.rows, acts.cols] = values
    assert dense.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [2, 0, 0, 3]]
    assert acts.firing_counts(values, 4).tolist() == [1, 1, 0, 1]  # the 0.0 value is kept but did not fire
    W = torch.arange(8.0).reshape(4, 2)  # decoder rows [0,1], [2,3], [4,5], [6,7]
    assert sparse_decode(acts, values, W).tolist() == [[2, 3], [0, 0], [18, 23]]


def test_selected_pre_acts_gradients_match_the_dense_gather():
    x, W_enc, b_enc, b_dec = params64(1)
    acts = SparseActs.from_flat(torch.tensor([0, 7, 9, 13, 22, 41, 49]), n_rows=5, width=10)
    with torch.no_grad():
        pre = encoder_pre_acts(x, W_enc, b_enc, b_dec)
    ours = selected_pre_acts(pre, acts, x.detach(), W_enc, b_enc, b_dec)
    plain = encoder_pre_acts(x.detach(), W_enc, b_enc, b_dec)[acts.rows, acts.cols]
    assert torch.equal(ours, plain)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (W_enc, b_enc, b_dec), g), torch.autograd.grad(plain, (W_enc, b_enc, b_dec), g)):
        assert torch.allclose(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_top_k_selects_what_torch_topk_selects(dtype):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for k in (1, 37, 4999):
        values, indices = batch_top_k(x, k)
        expected = x.topk(k, sorted=False)
        assert torch.equal(indices.sort().values, expected.indices.sort().values)
        assert torch.equal(values, x[indices])
        assert values.min() >= x.sort(descending=True).values[k - 1]


def test_batch_top_k_counts_nan_as_largest_and_falls_back_where_numpy_cannot_go():
    x = torch.tensor([0.5, float("nan"), -1.0, 2.0, float("-inf")])
    _, indices = batch_top_k(x, 2)
    assert sorted(indices.tolist()) == [1, 3]  # torch.topk's order too: NaN above everything
    half = torch.tensor([3.0, 1.0, 2.0], dtype=torch.bfloat16)
    assert sorted(batch_top_k(half, 2)[1].tolist()) == [0, 2]  # no bfloat16 in numpy: torch.topk
    assert batch_top_k(x[:3], 3)[1].numel() == 3  # k = n and k = 0: torch.topk
    assert batch_top_k(x, 0)[1].numel() == 0


def test_batch_top_k_passes_gradients_to_the_selected_entries():
    x = torch.tensor([0.1, 0.9, 0.5, 0.7], requires_grad=True)
    values, _ = batch_top_k(x, 2)
    values.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_training_with_batch_top_k_equals_torch_topk_bit_for_bit(arch, path, monkeypatch):
    """The selection's order never reaches a result: 20 Adam steps end at the same weights."""
    def train() -> list[torch.Tensor]:
        torch.manual_seed(0)
        sae = build_sae(SAEConfig(arch, d_in=16, d_sae=128, k=4, aux_k=12))
        sae.training_path = path
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        dead = torch.arange(128) % 5 == 0
        g = torch.Generator().manual_seed(1)
        for step in range(20):
            out = sae.loss(torch.randn(64, 16, generator=g), step, dead_mask=dead)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        return [t.detach().clone() for t in (*sae.parameters(), *sae.buffers())]

    calls = []
    argpartition = kernels.np.argpartition
    monkeypatch.setattr(kernels.np, "argpartition", lambda *a, **k: calls.append(1) or argpartition(*a, **k))
    fast = train()
    assert len(calls) >= 20  # the fast path ran
    with monkeypatch.context() as m:  # torch.topk everywhere
        m.setattr("models.sae.batchtopk.batch_top_k", lambda v, k: v.topk(k, sorted=False))
        m.setattr("models.sae.topk.batch_top_k", lambda v, k: v.topk(k, sorted=False))
        plain = train()
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))


def both_paths(arch: str, **kw):
    """The same SAE twice (same seed), one forced onto each training path."""
    saes = []
    for path in ("dense", "sparse"):
        sae = build_sae(SAEConfig(arch, d_in=16, d_sae=128, k=4, aux_k=12, **kw))
        with torch.no_grad():
            sae.b_dec.copy_(torch.randn(16, generator=torch.Generator().manual_seed(5)) * 0.1)
        sae.training_path = path
        saes.append(sae)
    return saes


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_step_equals_dense_step(arch, with_dead):
    dense, sparse = both_paths(arch)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    dead = (torch.arange(128) % 3 == 0) if with_dead else None
    outs = []
    for sae in (dense, sparse):
        out = sae.loss(x, dead_mask=dead)
        out["loss"].backward()
        outs.append(out)
    for key in ("loss", "mse", "aux", "l0"):
        assert torch.allclose(outs[0][key], outs[1][key], rtol=1e-5, atol=1e-7), key
    assert torch.equal(outs[0]["firing_counts"], outs[1]["firing_counts"])
    if with_dead:
        assert outs[1]["aux"] > 0
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    for (name, b), c in zip(dense.named_buffers(), sparse.buffers()):
        assert torch.allclose(b, c), name  # BatchTopK's threshold estimate


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_and_dense_training_stay_together(arch):
    """40 Adam steps on each path end at the same weights and loss, to float rounding."""
    g = torch.Generator().manual_seed(3)
    true_dirs = torch.randn(40, 16, generator=g)
    data = [(torch.rand(64, 40, generator=g) * (torch.rand(64, 40, generator=g) < 0.1)) @ true_dirs for _ in range(40)]
    final = []
    for sae in both_paths(arch):
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        dead = torch.zeros(128, dtype=torch.bool)
        for step, x in enumerate(data):
            out = sae.loss(x, step, dead_mask=dead)
            opt.zero_grad()
            out["loss"].backward()
            sae.remove_gradient_parallel_to_decoder_()
            opt.step()
            sae.apply_constraints_()
            dead = out["firing_counts"] == 0
        final.append((sae, out["loss"].item()))
    (dense, loss_d), (sparse, loss_s) = final
    assert loss_s == pytest.approx(loss_d, rel=1e-3)
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        assert torch.allclose(p, q, atol=1e-4), name


def test_auto_path_is_sparse_only_when_k_is_small():
    assert build_sae(SAEConfig("topk", 8, 256, k=32)).sparse_step
    assert not build_sae(SAEConfig("topk", 8, 128, k=32)).sparse_step


def test_eval_mode_loss_uses_the_inference_selection():
    """In eval mode BatchTopK selects by its threshold, so the sparse path (a batch top-k that also
    updates the threshold) must not be taken."""
    dense, sparse = both_paths("batchtopk")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    for sae in (dense, sparse):
        sae.loss(x)  # a training batch sets the threshold
        sae.eval()
    before = sparse.threshold.clone()
    a, b = dense.loss(x), sparse.loss(x)
    assert torch.equal(sparse.threshold, before)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["firing_counts"], b["firing_counts"])


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("n_dead", [0, 5, 40])  # none, fewer than aux_k (12), more
def test_auxk_with_its_dead_count_left_on_the_device_is_the_same_loss(arch, path, n_dead, monkeypatch):
    """On a GPU AuxK selects aux_k latents and zeroes the alive ones that fill the selection, so the
    host never reads how many are dead: the same loss and gradients as the CPU's exact count."""
    runs = []
    for on_host in (True, False):
        torch.manual_seed(0)
        sae = build_sae(SAEConfig(arch, d_in=16, d_sae=128, k=4, aux_k=12, **({"matryoshka_levels": 4}
                                                                              if arch == "matryoshka" else {})))
        sae.training_path = path
        monkeypatch.setattr("models.sae.topk.count_on_host", lambda t, on_host=on_host: on_host)
        dead = torch.zeros(128, dtype=torch.bool)
        dead[torch.randperm(128, generator=torch.Generator().manual_seed(3))[:n_dead]] = True
        out = sae.loss(torch.randn(64, 16, generator=torch.Generator().manual_seed(2)), 100, dead_mask=dead)
        out["loss"].backward()
        runs.append((out, [p.grad.clone() for p in sae.parameters()]))
    (host, host_grads), (device, device_grads) = runs
    assert float(device["aux"]) == pytest.approx(float(host["aux"]), rel=1e-5, abs=0)
    assert (float(device["aux"]) > 0) == (n_dead > 0)
    assert float(device["loss"].detach()) == pytest.approx(float(host["loss"].detach()), rel=1e-6)
    for a, b in zip(host_grads, device_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bag_offsets_are_the_exclusive_cumulative_counts_empty_bags_included():
    bags = torch.tensor([0, 0, 2, 2, 2, 3, 5])  # bags 1 and 4 are empty, 6 and 7 after the last entry
    assert bag_offsets(bags, 8).tolist() == [0, 2, 2, 5, 6, 6, 7, 7]
    rng = torch.Generator().manual_seed(0)
    for _ in range(5):
        bags = torch.randint(0, 50, (400,), generator=rng).sort().values
        counts = torch.bincount(bags, minlength=60)
        assert torch.equal(bag_offsets(bags, 60), torch.cumsum(counts, 0) - counts)


def test_firing_counts_count_the_rows_where_a_latent_is_positive():
    acts = SparseActs.from_topk(torch.tensor([[0, 3], [3, 1], [3, 0]]))
    values = torch.tensor([1.0, 0.5, 2.0, 0.0, -1.0, 0.25])  # row 1's latent 1 is zero, row 2's latent 3 negative
    assert acts.firing_counts(values, 5).tolist() == [2, 0, 0, 2, 0]
