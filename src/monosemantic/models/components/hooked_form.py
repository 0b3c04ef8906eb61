"""Our one-layer transformer in TransformerLens's parameter layout (``HookedTransformer``), in plain torch.

TransformerLens itself is not needed to write this form, only to load it (:mod:`monosemantic.interop.tlens`).
The mapping, per block (our ``nn.Linear`` weights are ``[out, in]``; TransformerLens keeps ``[in, out]``
and splits attention by head)::

    ln_attn → ln1 (w, b)          qkv.weight [3·H·d, D] → W_Q, W_K, W_V [H, D, d]   (+ b_Q, b_K, b_V [H, d])
    ln_mlp  → ln2 (w, b)          out.weight [D, H·d]   → W_O [H, d, D]             (+ b_O [D])
    fc_in   → mlp.W_in [D, M]     fc_out → mlp.W_out [M, D]                         (+ b_in, b_out)
    embed → embed.W_E [V, D]      pos_embed → pos_embed.W_pos [n_ctx, D]            unembed → W_U [D, V], b_U = 0

Head ``h`` owns rows ``h·d … (h+1)·d`` of each of q, k, v (our ``view(B, T, H, d)``) and the same columns
of ``out``. Both models are pre-LayerNorm with ReLU MLPs and scale attention scores by ``1/√d``, so the
MLP's post-ReLU activations are ``blocks.0.mlp.hook_post`` in both, and logits agree to float rounding.
"""

from __future__ import annotations

import torch

from monosemantic.models.components.transformer import Transformer, TransformerConfig

MODEL_NAME = "monosemantic-1l"


def hooked_config(cfg: TransformerConfig) -> dict:
    """``HookedTransformerConfig`` keyword arguments (JSON-safe) for a model of shape ``cfg``."""
    return {
        "model_name": MODEL_NAME, "original_architecture": "monosemantic.Transformer",
        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_ctx": cfg.n_ctx, "n_heads": cfg.n_heads,
        "d_head": cfg.d_head, "d_mlp": cfg.d_mlp, "d_vocab": cfg.vocab_size, "d_vocab_out": cfg.vocab_size,
        "act_fn": "relu", "normalization_type": "LN", "eps": cfg.ln_eps, "positional_embedding_type": "standard",
        # our contexts are plain windows of the token stream: no BOS is prepended (the SAE export says so too)
        "default_prepend_bos": False, "tokenizer_prepends_bos": False,
    }


def hooked_state_dict(net: Transformer) -> dict[str, torch.Tensor]:
    """``net``'s parameters under TransformerLens's names and shapes (fp32, CPU, contiguous)."""
    cfg = net.cfg
    H, d, D = cfg.n_heads, cfg.d_head, cfg.d_model

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()

    sd = {"embed.W_E": t(net.embed.weight), "pos_embed.W_pos": t(net.pos_embed.weight)}
    for i, block in enumerate(net.blocks):
        p = f"blocks.{i}."
        w_q, w_k, w_v = block.attn.qkv.weight.split(H * d, dim=0)  # each [H·d, D]
        b_q, b_k, b_v = block.attn.qkv.bias.split(H * d, dim=0)
        for name, w, b in (("Q", w_q, b_q), ("K", w_k, b_k), ("V", w_v, b_v)):
            sd[f"{p}attn.W_{name}"] = t(w.view(H, d, D).transpose(1, 2))
            sd[f"{p}attn.b_{name}"] = t(b.view(H, d))
        sd[f"{p}attn.W_O"] = t(block.attn.out.weight.T.reshape(H, d, D))
        sd[f"{p}attn.b_O"] = t(block.attn.out.bias)
        for ours, theirs in ((block.ln_attn, "ln1"), (block.ln_mlp, "ln2")):
            sd[f"{p}{theirs}.w"], sd[f"{p}{theirs}.b"] = t(ours.weight), t(ours.bias)
        sd[f"{p}mlp.W_in"], sd[f"{p}mlp.b_in"] = t(block.mlp.fc_in.weight.T), t(block.mlp.fc_in.bias)
        sd[f"{p}mlp.W_out"], sd[f"{p}mlp.b_out"] = t(block.mlp.fc_out.weight.T), t(block.mlp.fc_out.bias)
    sd["ln_final.w"], sd["ln_final.b"] = t(net.ln_final.weight), t(net.ln_final.bias)
    w_u = net.embed.weight if net.unembed is None else net.unembed.weight  # [V, D]
    sd["unembed.W_U"] = t(w_u.T)
    sd["unembed.b_U"] = torch.zeros(cfg.vocab_size)
    return sd
