"""A one-layer transformer (the paper's model shape), nanoGPT-style, with a hook on the MLP.

Reading order: config → HookPoint → attention → MLP → block → Transformer.

Choices (paper: "Towards Monosemanticity", §Problem setup): one attention layer of 4 heads × 32,
one MLP of 512 ReLU neurons, d_model 128, learned positional embeddings. We use pre-LayerNorm and
an *untied* unembedding (a separate ``W_U``), as Anthropic's small models do; ``tied_unembed=True``
reuses the token embedding instead.

The MLP's post-ReLU activations pass through ``blocks.0.mlp.hook_post`` (a :class:`HookPoint`).
Functions attached to it can read, replace or edit those activations; later stages (activation
caching, loss recovered, steering) use nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from monosemantic.errors import ConfigError

HookFn = Callable[[torch.Tensor], torch.Tensor | None]

MLP_HOOK = "blocks.0.mlp.hook_post"


@dataclass
class TransformerConfig:
    vocab_size: int
    n_ctx: int = 128
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_layers: int = 1
    tied_unembed: bool = False
    ln_eps: float = 1e-5

    def to_dict(self) -> dict:
        return asdict(self)


class HookPoint(nn.Module):
    """Identity, unless functions are attached. Each function gets the tensor and may return a
    replacement (or ``None`` to leave it unchanged); functions run in the order they were added."""

    def __init__(self) -> None:
        super().__init__()
        self._fns: list[HookFn] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self._fns:
            out = fn(x)
            if out is not None:
                x = out
        return x

    @contextmanager
    def attach(self, fn: HookFn) -> Iterator[HookFn]:
        self._fns.append(fn)
        try:
            yield fn
        finally:
            self._fns.remove(fn)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.n_heads * cfg.d_head)
        self.out = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(self.n_heads * self.d_head, dim=-1)
        # (B, T, nh*hs) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, self.d_head).transpose(1, 2) for t in (q, k, v))
        z_BHTd = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(z_BHTd.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.hook_post = HookPoint()  # the 512 neurons the SAE decomposes

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        acts_BTM = self.hook_post(F.relu(self.fc_in(x_BTD)))
        return self.fc_out(acts_BTM)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.ln_attn(x_BTD))
        return x_BTD + self.mlp(self.ln_mlp(x_BTD))


class _StopForward(Exception):
    """Raised inside the MLP hook to skip the rest of the network when only activations are wanted."""


class Transformer(nn.Module):
    def __init__(self, vocab_size: int, n_ctx: int = 128, d_model: int = 128, n_heads: int = 4,
                 d_head: int = 32, d_mlp: int = 512, n_layers: int = 1, tied_unembed: bool = False,
                 ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.cfg = TransformerConfig(vocab_size, n_ctx, d_model, n_heads, d_head, d_mlp, n_layers,
                                     tied_unembed, ln_eps)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(n_ctx, d_model)
        self.blocks = nn.ModuleList([Block(self.cfg) for _ in range(n_layers)])
        self.ln_final = nn.LayerNorm(d_model, eps=ln_eps)
        self.unembed = None if tied_unembed else nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        # scaled init of residual-stream writers, per GPT-2
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def mlp_hook(self) -> HookPoint:
        return self.blocks[0].mlp.hook_post

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for int tokens ``[B, T]`` (T ≤ n_ctx)."""
        T = tokens_BT.shape[1]
        if T > self.cfg.n_ctx:
            raise ConfigError(f"sequence length {T} exceeds n_ctx={self.cfg.n_ctx}")
        pos_T = torch.arange(T, device=tokens_BT.device)
        x_BTD = self.embed(tokens_BT) + self.pos_embed(pos_T)
        for block in self.blocks:
            x_BTD = block(x_BTD)
        x_BTD = self.ln_final(x_BTD)
        if self.unembed is None:
            return x_BTD @ self.embed.weight.T
        return self.unembed(x_BTD)

    def mlp_acts(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Post-ReLU MLP activations ``[B, T, d_mlp]``; the forward stops at the hook (no unembedding)."""
        captured: list[torch.Tensor] = []

        def grab(acts_BTM: torch.Tensor) -> None:
            captured.append(acts_BTM)
            raise _StopForward

        with self.mlp_hook.attach(grab):
            try:
                self(tokens_BT)
            except _StopForward:
                pass
        return captured[0]

    def forward_with_mlp_hook(self, tokens_BT: torch.Tensor, fn: HookFn) -> torch.Tensor:
        """Logits with ``fn`` applied to the MLP's post-ReLU activations (see :mod:`.hooks`)."""
        with self.mlp_hook.attach(fn):
            return self(tokens_BT)
