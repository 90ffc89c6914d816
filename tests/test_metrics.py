import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from experiments.eval.metrics import (
    CleanRuns,
    EvalAccumulator,
    count_per_column,
    density_stats,
    feature_density,
    spliced_lm_metrics,
)
from visualization.plots import log10_density


def accumulate(x, x_hat, f, batch_size=None):
    acc = EvalAccumulator(f.shape[-1])
    for i in range(0, len(x), batch_size or len(x)):
        s = slice(i, i + (batch_size or len(x)))
        acc.update(x[s], x_hat[s], f[s])
    return acc


def test_fvu_limits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) + 2
    f = torch.zeros(50, 4)
    assert accumulate(x, x, f).result()["fvu"] == pytest.approx(0.0, abs=1e-12)
    r = accumulate(x, x.mean(0).expand_as(x), f).result()
    assert r["fvu"] == pytest.approx(1.0, rel=1e-9)
    assert r["explained_variance"] == pytest.approx(0.0, abs=1e-9)


def test_hand_computed_2x2():
    # x = [[1,0],[3,2]], x_hat = [[1,1],[2,2]]: sq err = 1 + 1 = 2; mse = 2/4
    # mean x = (2,1); sum ||x - mean||^2 = (1+1) + (1+1) = 4 -> fvu = 0.5
    # cos: row0 x.xh = 1, |x|=1, |xh|=sqrt2 -> 1/sqrt2; row1 6+4=10, |x|=sqrt13, |xh|=sqrt8
    # l2_ratio: sqrt2/1, sqrt8/sqrt13
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    f = torch.tensor([[0.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    r = accumulate(x, x_hat, f).result()
    assert r["mse"] == pytest.approx(0.5)
    assert r["fvu"] == pytest.approx(0.5)
    assert r["explained_variance"] == pytest.approx(0.5)
    assert r["cos"] == pytest.approx((1 / math.sqrt(2) + 10 / math.sqrt(13 * 8)) / 2)
    assert r["l2_ratio"] == pytest.approx((math.sqrt(2) + math.sqrt(8 / 13)) / 2)
    assert r["l0"] == pytest.approx(1.0)  # 2 active + 0 active over 2 tokens
    assert r["l1"] == pytest.approx(1.25)
    assert r["n_tokens"] == 2


def test_cos_and_l2_ratio_skip_zero_rows():
    """A zero input row has no direction and no norm to compare with: the row x = 0 (with any
    x_hat) is left out of cos and l2_ratio, so they equal the 2x2 case's, and the other metrics
    still count it (sq err 1 + 1 + 4 = 6 over 3 rows)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 2.0]])
    r = accumulate(x, x_hat, torch.zeros(3, 3)).result()
    assert r["cos"] == pytest.approx((1 / math.sqrt(2) + 10 / math.sqrt(13 * 8)) / 2)
    assert r["l2_ratio"] == pytest.approx((math.sqrt(2) + math.sqrt(8 / 13)) / 2)
    assert r["mse"] == pytest.approx(6 / 6) and r["n_tokens"] == 3
    only_zero = accumulate(torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 3)).result()
    assert math.isnan(only_zero["cos"]) and math.isnan(only_zero["l2_ratio"])


def test_against_numpy_and_streaming_equals_one_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(103, 7, generator=g) * 3 + 5
    x_hat = x + 0.5 * torch.randn(103, 7, generator=g)
    f = torch.relu(torch.randn(103, 11, generator=g))
    one = accumulate(x, x_hat, f).result()
    many = accumulate(x, x_hat, f, batch_size=10).result()
    for k in one:
        assert many[k] == pytest.approx(one[k], rel=1e-10), k

    X, Xh, Fn = (t.double().numpy() for t in (x, x_hat, f))
    nx, nxh = np.linalg.norm(X, axis=1), np.linalg.norm(Xh, axis=1)
    expected = {
        "mse": ((X - Xh) ** 2).mean(),
        "fvu": ((X - Xh) ** 2).sum() / ((X - X.mean(0)) ** 2).sum(),
        "l0": (Fn > 0).sum(1).mean(),
        "l1": np.abs(Fn).sum(1).mean(),
        "cos": ((X * Xh).sum(1) / (nx * nxh)).mean(),
        "l2_ratio": (nxh / nx).mean(),
        "n_tokens": 103,
    }
    for k, v in expected.items():
        assert one[k] == pytest.approx(v, rel=1e-6), k

    # leading dims are flattened
    r3 = accumulate(x[:100].reshape(10, 10, 7), x_hat[:100].reshape(10, 10, 7), f[:100].reshape(10, 10, 11))
    assert r3.result()["fvu"] == pytest.approx(accumulate(x[:100], x_hat[:100], f[:100]).result()["fvu"])


def test_firing_counts_and_density():
    f = torch.tensor(
        [
            [1.0, 0.0, 0.0, 2.0],
            [1.0, 0.0, 0.0, 0.0],
            [3.0, 0.0, 0.5, 0.0],
            [0.2, 0.0, 0.0, 0.0],
        ]
    )
    x = torch.randn(4, 3)
    acc = EvalAccumulator(4)
    acc.update(x[:2], x[:2], f[:2])
    acc.update(x[2:], x[2:], f[2:])
    counts = acc.firing_counts()
    assert counts.tolist() == [4, 0, 1, 1]
    np.testing.assert_allclose(feature_density(counts, 4), [1.0, 0.0, 0.25, 0.25])
    # dead: latent 1 -> 1/4; dense (> 0.1): latents 0, 2, 3 -> 3/4; (> 0.3): latent 0 -> 1/4
    assert density_stats(counts, 4, dense_threshold=0.1) == {"dead_frac": 0.25, "dense_frac": 0.75}
    assert density_stats(counts, 4, dense_threshold=0.3)["dense_frac"] == 0.25


def test_log10_density_floor():
    with np.errstate(all="raise"):  # no log10(0) warning either
        out = log10_density(np.array([0.0, 1.0, 0.01, 1e-3]), n_tokens=1000)
    np.testing.assert_allclose(out, [-4.0, 0.0, -2.0, -3.0])


def test_empty_accumulator_raises():
    with pytest.raises(ValueError):
        EvalAccumulator(3).result()


# --- spliced LM metrics ---------------------------------------------------------------------

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (registers boot_native)

    cfg = TransformerBridgeConfig(
        d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=50,
        act_fn="gelu_new", normalization_type="LN", seed=0,
    )
    return TransformerBridge.boot_native(cfg)


@pytest.fixture(scope="module")
def tokens():
    t = torch.randint(1, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    t[:, 0] = 0  # BOS
    return t


def test_spliced_identity(model, tokens):
    r = spliced_lm_metrics(model, tokens, HOOK, lambda a: a)
    assert r["ce_sae"] == pytest.approx(r["ce_clean"], abs=1e-6)
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(r["ce_zero"] - r["ce_clean"]) > 1e-3  # (a random model need not get worse)
    with torch.inference_mode():
        assert r["ce_clean"] == pytest.approx(model(tokens, return_type="loss").item(), rel=1e-6)


def test_spliced_zero_matches_zero_ablation(model, tokens):
    r = {}
    for skip_bos in (True, False):
        r[skip_bos] = spliced_lm_metrics(model, tokens, HOOK, torch.zeros_like, skip_bos=skip_bos)
        assert r[skip_bos]["ce_sae"] == r[skip_bos]["ce_zero"]
        assert r[skip_bos]["ce_loss_recovered"] == 0.0
    # skip_bos keeps position 0 clean, so its zero ablation differs from ablating everything
    assert r[True]["ce_zero"] != pytest.approx(r[False]["ce_zero"], abs=1e-4)
    # ... and reconstruct is never shown position 0
    seen = []
    spliced_lm_metrics(model, tokens, HOOK, lambda a: seen.append(a.shape) or a, skip_bos=True)
    assert seen == [torch.Size([3, 11, 32])]


def test_spliced_noise_kl_and_ce_independent(model, tokens):
    noise = torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(1))
    r = spliced_lm_metrics(model, tokens, HOOK, lambda a: a + noise[:, 1:])

    def hook(act, hook):
        out = act + noise
        out[:, 0] = act[:, 0]
        return out

    with torch.inference_mode():
        clean = model(tokens, return_type="logits")[:, :-1].double()
        noisy = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(HOOK, hook)])[:, :-1].double()
    kl = kl_divergence(Categorical(logits=clean), Categorical(logits=noisy)).mean().item()
    ce = Categorical(logits=noisy).log_prob(tokens[:, 1:]).neg().mean().item()
    assert kl > 1e-3
    assert r["kl"] == pytest.approx(kl, rel=1e-4)
    assert r["ce_sae"] == pytest.approx(ce, rel=1e-5)
    expected = (r["ce_zero"] - ce) / (r["ce_zero"] - r["ce_clean"])
    assert r["ce_loss_recovered"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("keep", [True, False])
def test_clean_runs_are_made_once_per_tokens_and_give_the_same_numbers(model, tokens, monkeypatch, keep):
    """Evals of several SAEs share the model's runs without an SAE: the same metrics as running them each
    time, with one clean and one zeroed run per set of tokens (and, when the clean log-probabilities are
    too large to keep, one more clean run per eval)."""
    noise = torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(2))
    fresh = [spliced_lm_metrics(model, tokens, HOOK, lambda a, s=s: a + s * noise[:, 1:]) for s in (0.5, 1.0)]
    runs = CleanRuns()
    monkeypatch.setattr(CleanRuns, "KEEP_BYTES", CleanRuns.KEEP_BYTES if keep else 0)
    calls = []
    real = model.run_with_hooks
    monkeypatch.setattr(model, "run_with_hooks", lambda *a, **kw: calls.append(len(kw["fwd_hooks"])) or real(*a, **kw))
    shared = [spliced_lm_metrics(model, tokens, HOOK, lambda a, s=s: a + s * noise[:, 1:],
                                 clean=runs.get(model, tokens, HOOK, skip_bos=True)) for s in (0.5, 1.0)]
    assert shared == fresh  # bit for bit
    # the clean and zeroed runs once, then one spliced run per eval (plus the clean run again when not kept)
    assert calls == [0, 1, 1, 1] if keep else calls == [0, 1, 1, 0, 1, 0]
    other = tokens.flip(0)
    runs.get(model, other, HOOK, skip_bos=True)
    assert len(calls) == (4 if keep else 6) + 2  # new tokens: made again


def test_count_per_column_counts_true_entries_as_int64():
    mask = torch.tensor([[True, False, True], [True, False, False], [True, True, False], [False, False, False]])
    counts = count_per_column(mask)
    assert counts.dtype == torch.int64 and counts.tolist() == [3, 1, 1]
    assert count_per_column(torch.zeros(0, 2, dtype=torch.bool)).tolist() == [0, 0]
