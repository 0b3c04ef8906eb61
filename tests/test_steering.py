"""Steering: on a transformer built so that a known feature direction raises a known token's logit, pinning the
feature raises that token's probability and ablating it lowers it, by the amounts a hand-written forward pass
gives; the same seed gives the same baseline; the stage runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg

from monosemantic.models.components.hooks import pin_features
from monosemantic.models.components.sae import SparseAutoencoder
from monosemantic.models.components.transformer import Transformer
from monosemantic.stages import steer
from monosemantic.steering import generate, next_token_logits, scan_features

TARGET = 5  # the token feature 0 promotes


@pytest.fixture
def constructed():
    """A tiny transformer whose neuron 0 writes, through the MLP output, a direction the unembedding reads as
    token TARGET; an SAE whose feature 0 is neuron 0 (unit decoder row e_0) and whose features 1, 2 are
    neurons 1, 2 (neuron 3 is left to the SAE's error term)."""
    torch.manual_seed(0)
    net = Transformer(vocab_size=8, n_ctx=8, d_model=8, n_heads=2, d_head=4, d_mlp=4).eval()
    u = torch.randn(8)
    u = u - u.mean()  # survives the final LayerNorm's centring
    with torch.no_grad():
        net.embed.weight.mul_(50)  # a residual stream of unit scale, so the final LayerNorm does not amplify
        net.pos_embed.weight.mul_(50)
        net.blocks[0].mlp.fc_out.weight[:, 0] = 0.3 * u
        net.unembed.weight.mul_(25)
        net.unembed.weight[TARGET] = 2 * u / u.norm()
        net.blocks[0].mlp.fc_in.bias.fill_(0.3)  # neurons fire at moderate values on ordinary input
    sae = SparseAutoencoder(4, 3)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(4)[:3])
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return net, sae


def manual_probs(net: Transformer, tokens: list[int], edit) -> torch.Tensor:
    """The model's next-token distribution computed by hand, layer by layer, with ``edit`` applied to the
    post-ReLU MLP activations: independent of the hook machinery under test."""
    t = torch.tensor([tokens])
    blk = net.blocks[0]
    x = net.embed(t) + net.pos_embed(torch.arange(len(tokens)))
    x = x + blk.attn(blk.ln_attn(x))
    h = F.relu(blk.mlp.fc_in(blk.ln_mlp(x)))
    x = x + blk.mlp.fc_out(edit(h.clone()))
    return torch.softmax(net.unembed(net.ln_final(x))[0, -1], -1)


def probs(net, tokens, hook=None):
    return torch.softmax(next_token_logits(net, tokens, None if hook is None else (lambda start: hook)), -1)


@torch.no_grad()
def test_pinning_raises_and_ablating_lowers_the_target_token(constructed):
    net, sae = constructed
    tokens = [1, 2, 3, 4, 6]
    c = 4.0

    def set_neuron0(value):
        def edit(h):
            h[..., 0] = value
            return h
        return edit

    base = probs(net, tokens)
    assert torch.allclose(base, manual_probs(net, tokens, lambda h: h), atol=1e-6)
    pinned = probs(net, tokens, pin_features(sae, [0], [c]))
    ablated = probs(net, tokens, pin_features(sae, [0], [None]))
    # feature 0 is neuron 0 with a unit decoder row e_0: pinning it sets that neuron to c, ablating it to 0
    assert torch.allclose(pinned, manual_probs(net, tokens, set_neuron0(c)), atol=1e-6)
    assert torch.allclose(ablated, manual_probs(net, tokens, set_neuron0(0.0)), atol=1e-6)
    assert pinned[TARGET] > base[TARGET] + 0.05 and ablated[TARGET] < base[TARGET] - 0.01
    # the other tokens' probabilities fall together as the target's rises
    assert pinned[TARGET] > 0.5


@torch.no_grad()
def test_reconstruction_form_drops_the_error_term(constructed):
    """keep_error=False replaces the activations by the SAE's reconstruction: neuron 3, which no feature
    reconstructs, is lost, and the pinned feature takes its value."""
    net, sae = constructed
    tokens = [3, 1, 4, 1, 5]

    def recon(h):
        h[..., 0] = 2.0
        h[..., 3] = 0.0
        return h

    got = probs(net, tokens, pin_features(sae, [0], [2.0], keep_error=False))
    assert torch.allclose(got, manual_probs(net, tokens, recon), atol=1e-6)
    late = pin_features(sae, [0], [2.0], start=3)  # positions before 3 untouched
    h = torch.rand(1, 5, 4)
    out = late(h.clone())
    assert torch.equal(out[:, :3], h[:, :3]) and torch.allclose(out[:, 3:, 0], torch.full((2,), 2.0))


@torch.no_grad()
def test_generation_same_seed_same_baseline_and_steering_moves_it(constructed):
    net, sae = constructed
    a = generate(net, [1, 2], 12, seed=7)
    assert a == generate(net, [1, 2], 12, seed=7) and a != generate(net, [1, 2], 12, seed=8)
    hook = pin_features(sae, [0], [40.0])
    steered = generate(net, [1, 2], 12, seed=7, hook=lambda start: hook)
    assert steered.count(TARGET) >= 10 > a.count(TARGET)
    greedy = generate(net, [1, 2], 5, seed=0, temperature=0, hook=lambda start: hook)
    assert greedy == [TARGET] * 5


@torch.no_grad()
def test_scan_finds_each_features_maximum_and_the_token_specific_one(constructed):
    net, sae = constructed
    rng = np.random.default_rng(0)
    text = rng.integers(0, 8, size=8 * 20).astype(np.int32)
    max_F, score_F = scan_features(net, sae, text, token_id=3, batch_windows=3)
    f = sae.encode(net.mlp_acts(torch.from_numpy(text.astype(np.int64)).view(20, 8)))
    assert torch.allclose(max_F, f.flatten(0, 1).amax(0))
    flat, hit = f.flatten(0, 1), torch.from_numpy(text == 3)
    want = flat[hit].sum(0) / flat.sum(0) * (flat[hit] > 0).float().mean(0)
    assert torch.allclose(score_F, want, atol=1e-6)


def test_edit_start_leaves_the_prompt_alone_when_asked():
    from monosemantic.stages.steer import edit_start

    assert edit_start(5, 0, steer_prompt=True) == 0
    assert edit_start(5, 0, steer_prompt=False) == 4  # the prompt's last token picks the first new one
    assert edit_start(5, 3, steer_prompt=False) == 1  # the window has slid 3 tokens along
    assert edit_start(5, 10, steer_prompt=False) == 0  # the prompt has left the window


def test_steer_stage_end_to_end(sae_export, tmp_path, capsys):
    cfg = compose_cfg("steer", [f"ckpt_path={sae_export}", "prompt='def __init__(self'", "features=[3]",
                                "value=max", "max_new_tokens=8", "n_samples=2", "scan_tokens=4096"], tmp_path)
    result = steer.run(cfg)
    printed = capsys.readouterr().out
    assert "baseline" in printed and "steered" in printed
    assert result["features"] == [3] and result["values"][0] == pytest.approx(result["max_activation"][3])
    assert len(result["samples"]) == 2 and all(len(s["steered_ids"]) == 8 for s in result["samples"])
    assert json.loads((tmp_path / "steer.json").read_text())["prompt"] == "def __init__(self"
    ablate = steer.run(compose_cfg("steer", [f"ckpt_path={sae_export}", "token=self", "value=ablate",
                                             "max_new_tokens=4", "n_samples=1", "scan_tokens=4096"], tmp_path / "b"))
    assert ablate["values"] == [None] and len(ablate["features"]) == 1
    with pytest.raises(ValueError, match="token="):
        steer.run(compose_cfg("steer", [f"ckpt_path={sae_export}", "token=def __init__"], tmp_path / "c"))
    with pytest.raises(ValueError, match="repeats"):
        steer.run(compose_cfg("steer", [f"ckpt_path={sae_export}", "features=[1,1]"], tmp_path / "e"))
    with pytest.raises(ValueError, match="list of feature indices"):
        steer.run(compose_cfg("steer", [f"ckpt_path={sae_export}", "features=5"], tmp_path / "f"))
    with pytest.raises(ValueError, match="value="):
        steer.run(compose_cfg("steer", [f"ckpt_path={sae_export}", "features=[1]", "value=big",
                                        "scan_tokens=1024"], tmp_path / "d"))
