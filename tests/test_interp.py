"""The interpretability proxies on hand-made activations with known answers, and the direct logit effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monosemantic.analysis.collect import CollectSettings, UnitAccumulator
from monosemantic.analysis.interp import direct_logit_effect, proxies, summarize, summarize_by_density
from monosemantic.models.components.transformer import Transformer

V, T, N_WINDOWS = 50, 16, 600
PHRASE = [40, 41, 42, 43, 44]


@pytest.fixture(scope="module")
def text():
    """Uniform random tokens (0..39) in windows of T, with PHRASE planted at the start of every third window."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 40, size=N_WINDOWS * T).astype(np.int32)
    for w in range(0, N_WINDOWS, 3):
        tokens[w * T + 2: w * T + 2 + len(PHRASE)] = PHRASE
    nxt = np.concatenate([tokens[1:], [-1]]).astype(np.int32)
    return tokens, nxt


def run_units(tokens: np.ndarray, acts_NU: torch.Tensor, n_sample: int = 64):
    acc = UnitAccumulator("u", acts_NU.shape[1], V, CollectSettings(n_sample=n_sample))
    for w0 in range(0, len(tokens), 64 * T):
        rows = slice(w0, min(len(tokens), w0 + 64 * T))
        acc.update(acts_NU[rows], torch.from_numpy(tokens[rows].astype(np.int64)),
                   torch.arange(rows.start, rows.stop), T)
    return acc.result()


def random_units(tokens, n_units, seed, rate=0.2):
    g = torch.Generator().manual_seed(seed)
    fire = torch.rand(len(tokens), n_units, generator=g) < rate
    return fire * torch.rand(len(tokens), n_units, generator=g).add(0.1)


def test_a_one_token_unit_scores_the_maximum_and_a_random_one_the_control_level(text):
    tokens, nxt = text
    g = torch.Generator().manual_seed(1)
    one_token = torch.from_numpy(tokens == 7).float() * torch.rand(len(tokens), generator=g).add(0.5)
    acts = torch.cat([one_token[:, None], random_units(tokens, 1, seed=2)], dim=1)
    control = random_units(tokens, 40, seed=3)
    effect = torch.randn(1 + 1 + 40, V, generator=g)
    units = proxies(run_units(tokens, acts), tokens, nxt, T, effect[:2])
    ctrl = proxies(run_units(tokens, control), tokens, nxt, T, effect[2:])
    assert units["token_specificity"][0] == pytest.approx(1.0)
    spec_ctrl = ctrl["token_specificity"]
    # a unit firing at random positions is indistinguishable from the control
    assert abs(float(units["token_specificity"][1]) - float(spec_ctrl.median())) < 4 * float(spec_ctrl.std())
    # the control level for 64 firings over 40 equally common tokens: far below 1
    assert 0.1 < float(spec_ctrl.median()) < 0.35


def test_context_consistency_is_one_for_a_fixed_phrase_and_low_at_random(text):
    tokens, nxt = text
    # fires on the last token of the planted phrase: every context (4 tokens before + itself) is the phrase
    at_phrase_end = torch.zeros(len(tokens))
    for w in range(0, N_WINDOWS, 3):
        at_phrase_end[w * T + 2 + len(PHRASE) - 1] = 1.0 + w / N_WINDOWS
    acts = torch.stack([at_phrase_end, random_units(tokens, 1, seed=5)[:, 0]], dim=1)
    control = random_units(tokens, 30, seed=6)
    effect = torch.zeros(2, V)
    units = proxies(run_units(tokens, acts), tokens, nxt, T, effect)
    ctrl = proxies(run_units(tokens, control), tokens, nxt, T, torch.zeros(30, V))
    assert units["context_consistency"][0] == pytest.approx(1.0)
    # the same token at the first position of every window has no context: unknown, not identical
    starts_tok = tokens.copy()
    starts_tok[::T] = 7
    at_start = torch.zeros(len(tokens))
    at_start[::T] = torch.linspace(1, 2, N_WINDOWS)
    starts = proxies(run_units(starts_tok, at_start[:, None]), starts_tok, nxt, T, torch.zeros(1, V))
    # each context is {7, four unknowns}: Jaccard 1 / (5 + 5 - 1)
    assert float(starts["context_consistency"][0]) == pytest.approx(1 / 9)
    c = ctrl["context_consistency"]
    assert float(c.median()) < 0.1
    assert abs(float(units["context_consistency"][1]) - float(c.median())) < 4 * float(c.std()) + 1e-6


def test_logit_coherence_is_one_when_the_promoted_token_always_follows(text):
    tokens, nxt = text
    # unit 0 fires right before every 9; its logit effect promotes 9 most
    before_nine = torch.from_numpy(nxt == 9).float()
    acts = torch.stack([before_nine, random_units(tokens, 1, seed=8)[:, 0]], dim=1)
    effect = torch.zeros(2, V)
    effect[0, 9] = 5.0
    g = torch.Generator().manual_seed(9)
    effect[1] = torch.randn(V, generator=g)
    ctrl_effect = torch.randn(30, V, generator=g)
    units = proxies(run_units(tokens, acts), tokens, nxt, T, effect)
    ctrl = proxies(run_units(tokens, random_units(tokens, 30, seed=10)), tokens, nxt, T, ctrl_effect)
    assert units["logit_coherence"][0] == pytest.approx(1.0)
    lc = ctrl["logit_coherence"]
    # random units with random logit effects: about the share of next tokens among 10 of ~40 common ones
    assert 0.1 < float(lc.median()) < 0.4
    assert abs(float(units["logit_coherence"][1]) - float(lc.median())) < 4 * float(lc.std())


def test_rare_units_are_left_out_not_rewarded(text):
    """A unit that fired 3 times would have a top-5 token share of 1.0; with fewer firings than the sample
    size it gets no score and is counted as ineligible."""
    tokens, nxt = text
    rare = torch.zeros(len(tokens))
    rare[[5, 100, 2000]] = 1.0
    acts = torch.stack([rare, random_units(tokens, 1, seed=11)[:, 0]], dim=1)
    values = proxies(run_units(tokens, acts), tokens, nxt, T, torch.zeros(2, V))
    assert all(torch.isnan(values[p][0]) for p in ("token_specificity", "context_consistency", "logit_coherence"))
    s = summarize(values)
    assert s["n_eligible"] == 1 and s["n_units"] == 2
    assert s["token_specificity_median"] == pytest.approx(float(values["token_specificity"][1]))
    # by density band: the random unit (density ~0.2) alone in its band, the rare one in none
    bands = summarize_by_density(values, torch.tensor([3 / len(tokens), 0.2]))
    assert [b["n_eligible"] for b in bands] == [0, 0, 0, 1]
    assert bands[3]["token_specificity_median"] == pytest.approx(float(values["token_specificity"][1]))
    assert bands[0]["token_specificity_median"] is None


@torch.no_grad()
def test_direct_logit_effect_reads_the_direction_the_unembedding_sees():
    torch.manual_seed(0)
    net = Transformer(vocab_size=12, n_ctx=4, d_model=8, n_heads=2, d_head=4, d_mlp=6)
    u = torch.randn(8)
    u -= u.mean()
    net.blocks[0].mlp.fc_out.weight[:, 2] = u
    net.unembed.weight[7] = 5 * u / u.norm()
    eff = direct_logit_effect(net, torch.eye(6))
    assert int(eff[2].argmax()) == 7
    # the explicit formula with a non-trivial LayerNorm gain: W_U (γ ⊙ (r − mean r)), median-shifted
    net.ln_final.weight.copy_(torch.rand(8) + 0.5)
    r = net.blocks[0].mlp.fc_out.weight.clone()
    want = (net.unembed.weight @ (net.ln_final.weight[:, None] * (r - r.mean(0)))).T
    want -= want.median(dim=1, keepdim=True).values
    eff = direct_logit_effect(net, torch.eye(6))
    assert torch.allclose(eff, want, atol=1e-5)
    tied = Transformer(vocab_size=12, n_ctx=4, d_model=8, n_heads=2, d_head=4, d_mlp=6, tied_unembed=True)
    r = tied.blocks[0].mlp.fc_out.weight
    want = (tied.embed.weight @ (r - r.mean(0))).T
    assert torch.allclose(direct_logit_effect(tied, torch.eye(6)), want - want.median(1, keepdim=True).values,
                          atol=1e-5)
    assert torch.allclose(eff.median(dim=1).values, torch.zeros(6), atol=1e-6)  # median-shifted
    # linear in the direction, and a constant added to every residual coordinate (removed by the LayerNorm's
    # centring) changes nothing
    d = torch.randn(6, 3)
    assert torch.allclose(direct_logit_effect(net, 2 * d), 2 * direct_logit_effect(net, d), atol=1e-5)
    net.blocks[0].mlp.fc_out.weight.add_(0.3)
    assert torch.allclose(direct_logit_effect(net, torch.eye(6)), eff, atol=1e-5)
