"""The transformer and its MLP hook: read, replace and edit give exactly the manual forward's output."""

import torch
import torch.nn.functional as F

from monosemantic.models.components import hooks
from monosemantic.models.components.transformer import MLP_HOOK, Transformer


def tiny(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(vocab_size=50, n_ctx=8, d_model=16, n_heads=2, d_head=8, d_mlp=32, **kw).eval()


def manual_forward(net: Transformer, tokens: torch.Tensor, edit=None):
    """The forward written out by hand, with ``edit`` applied to the post-ReLU activations."""
    blk = net.blocks[0]
    x = net.embed(tokens) + net.pos_embed(torch.arange(tokens.shape[1]))
    x = x + blk.attn(blk.ln_attn(x))
    acts = F.relu(blk.mlp.fc_in(blk.ln_mlp(x)))
    if edit is not None:
        acts = edit(acts)
    x = x + blk.mlp.fc_out(acts)
    return net.unembed(net.ln_final(x)), acts


def test_hook_name_and_shapes():
    net = tiny()
    assert dict(net.named_modules())[MLP_HOOK] is net.mlp_hook
    tokens = torch.randint(0, 50, (3, 8))
    assert net(tokens).shape == (3, 8, 50)
    assert net.mlp_acts(tokens).shape == (3, 8, 32)


def test_read_equals_manual_and_leaves_output_unchanged():
    net, tokens = tiny(), torch.randint(0, 50, (2, 8))
    store: list[torch.Tensor] = []
    logits = net.forward_with_mlp_hook(tokens, hooks.capture(store))
    ref_logits, ref_acts = manual_forward(net, tokens)
    torch.testing.assert_close(store[0], ref_acts)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(net.mlp_acts(tokens), ref_acts)
    assert not net.mlp_hook._fns, "hooks are removed after use"


def test_mlp_acts_stops_before_unembedding():
    net, calls = tiny(), []
    net.unembed.register_forward_hook(lambda *a: calls.append(1))
    net.mlp_acts(torch.randint(0, 50, (1, 8)))
    assert calls == []


def test_zero_and_mean_ablation_equal_manual():
    net, tokens = tiny(), torch.randint(0, 50, (2, 8))
    zero = net.forward_with_mlp_hook(tokens, hooks.zero_ablate())
    torch.testing.assert_close(zero, manual_forward(net, tokens, torch.zeros_like)[0])
    mean = torch.rand(32)
    out = net.forward_with_mlp_hook(tokens, hooks.mean_ablate(mean))
    torch.testing.assert_close(out, manual_forward(net, tokens, lambda a: mean.expand_as(a))[0])
    # ablating the MLP changes the output (the hook really is in the path)
    assert (zero - net(tokens)).abs().max() > 1e-4


def test_replace_with_reconstruction():
    net, tokens = tiny(), torch.randint(0, 50, (2, 8))
    W = torch.randn(32, 32) * 0.1
    out = net.forward_with_mlp_hook(tokens, hooks.replace_with(lambda a: a @ W))
    torch.testing.assert_close(out, manual_forward(net, tokens, lambda a: a @ W)[0])


def test_edit_feature_pins_and_ablates_exactly():
    net, tokens = tiny(), torch.randint(0, 50, (2, 8))
    d = torch.randn(32)
    d = d / d.norm()
    enc = torch.randn(32)

    def feat(a):  # a feature's activation: a linear read-out
        return a @ enc

    pinned = net.forward_with_mlp_hook(tokens, hooks.edit_feature(feat, d, value=3.0))
    ref = manual_forward(net, tokens, lambda a: a + (3.0 - feat(a)).unsqueeze(-1) * d)[0]
    torch.testing.assert_close(pinned, ref)
    ablated = net.forward_with_mlp_hook(tokens, hooks.edit_feature(feat, d, value=None))
    torch.testing.assert_close(ablated, manual_forward(net, tokens, lambda a: a - feat(a).unsqueeze(-1) * d)[0])
    # restricted to positions ≥ 5: earlier logits are untouched (causal model)
    late = net.forward_with_mlp_hook(tokens, hooks.edit_feature(feat, d, value=3.0, positions=slice(5, None)))
    torch.testing.assert_close(late[:, :5], net(tokens)[:, :5])
    torch.testing.assert_close(late[:, 5:], pinned[:, 5:])


def test_causal():
    net = tiny()
    a = torch.randint(0, 50, (1, 8))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % 50
    torch.testing.assert_close(net(a)[:, :6], net(b)[:, :6])


def test_tied_unembedding_uses_the_embedding():
    net = tiny(tied_unembed=True)
    assert net.unembed is None
    tokens = torch.randint(0, 50, (1, 8))
    blk = net.blocks[0]
    x = net.embed(tokens) + net.pos_embed(torch.arange(8))
    x = x + blk.attn(blk.ln_attn(x))
    x = x + blk.mlp(blk.ln_mlp(x))
    torch.testing.assert_close(net(tokens), net.ln_final(x) @ net.embed.weight.T)


def test_weight_decay_groups_by_parameter_identity():
    """Linear matrices decay (the unembedding too: its name contains "embed"); embeddings, biases and norms do
    not; a tied unembedding is the embedding, so it does not; every parameter is in exactly one group."""
    from monosemantic.models.transformer_module import TransformerModule

    for tied in (False, True):
        net = tiny(tied_unembed=tied)
        decay, no_decay = TransformerModule(net, optimizer=torch.optim.AdamW).param_groups()
        ids = {id(p) for p in decay}
        assert ids.isdisjoint(id(p) for p in no_decay)
        assert len(decay) + len(no_decay) == len(list(net.parameters()))
        assert id(net.embed.weight) not in ids and id(net.pos_embed.weight) not in ids
        if not tied:
            assert id(net.unembed.weight) in ids
        blk = net.blocks[0]
        for p in (blk.attn.qkv.weight, blk.attn.out.weight, blk.mlp.fc_in.weight, blk.mlp.fc_out.weight):
            assert id(p) in ids
        for p in (blk.attn.qkv.bias, blk.ln_attn.weight, blk.ln_mlp.bias, net.ln_final.weight):
            assert id(p) not in ids


def test_export_missing_a_tensor_is_an_error_naming_file_and_tensor(tmp_path):
    import pytest
    from safetensors.torch import load_file, save_file

    from monosemantic.models.transformer_module import export_transformer, load_transformer

    out = export_transformer(tiny(), tmp_path / "model", None)
    loaded, _ = load_transformer(out)
    torch.testing.assert_close(loaded.unembed.weight, tiny().unembed.weight)
    weights = load_file(str(out / "model.safetensors"))
    del weights["unembed.weight"]  # an untied model without its unembedding would load with random weights
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor\(s\) \['unembed\.weight'\]"):
        load_transformer(out)
    tied = export_transformer(tiny(tied_unembed=True), tmp_path / "tied", None)  # nothing missing: it is tied
    assert load_transformer(tied)[0].unembed is None


def test_export_replaces_a_folder_whole(tmp_path):
    from monosemantic.models.transformer_module import export_transformer, load_transformer

    out = export_transformer(tiny(seed=0), tmp_path / "model", None, {"val_loss": 1.0})
    (out / "stale.txt").write_text("from the old export")
    export_transformer(tiny(seed=1), out, None, {"val_loss": 2.0})
    net, cfg = load_transformer(out)
    assert cfg["val_loss"] == 2.0 and not (out / "stale.txt").exists()
    torch.testing.assert_close(net.embed.weight, tiny(seed=1).embed.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind
