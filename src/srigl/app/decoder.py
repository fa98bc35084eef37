"""GPT-2-style decoder-only language model with a key/value cache for token-by-token generation.

Not in the image-classifier registry (``create_model`` builds ``(C, S, S) -> classes`` models);
``gpt2_small()`` builds the real-size model and ``Decoder(**overrides)`` a tiny one for tests.
Attention projections are plain ``nn.Linear`` layers so sparsifiers and condensers see them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from srigl.errors import ContextLengthError, InvalidConfigError

__all__ = ["Decoder", "gpt2_small"]

KVCache = list[tuple[Tensor, Tensor]]  # per block: keys, values, each (B, heads, T_past, head_dim)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``query``/``key``/``value``/``proj`` Linears."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise InvalidConfigError(f"dim {dim} is not a multiple of heads {heads} (dim % heads = {dim % heads})")
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, D/H)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, T_past + T, D/H)
        t_new, t_all = q.shape[2], k.shape[2]
        # New tokens sit at positions t_all - t_new .. t_all - 1; each sees every key up to itself.
        mask = torch.ones(t_new, t_all, dtype=torch.bool, device=x.device).tril(t_all - t_new)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D/H)
        out = out.transpose(1, 2).reshape(x.shape)  # (B, T, D)
        return self.proj(out), (k, v)


class DecoderBlock(nn.Module):
    """Pre-norm GPT-2 block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` with a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, present = self.attn(self.ln1(x), past)
        x = x + h
        return x + self.mlp(self.ln2(x)), present


class Decoder(nn.Module):
    """Decoder-only transformer with learned positions and a ``lm_head`` tied to the token embedding."""

    def __init__(
        self, vocab_size: int = 50257, context: int = 1024, dim: int = 768, depth: int = 12, heads: int = 12
    ) -> None:
        super().__init__()
        self.context = context
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.token_embed.weight  # GPT-2 ties input and output embeddings

    def forward(self, tokens: Tensor, past: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """Logits ``(B, T, vocab)`` for ``tokens`` ``(B, T)`` following ``past``, and the grown cache.

        Raises:
            ContextLengthError: If the cached plus new tokens exceed the context length.
        """
        t_past = 0 if past is None else past[0][0].shape[2]
        if t_past + tokens.shape[1] > self.context:
            raise ContextLengthError(
                f"{t_past} cached + {tokens.shape[1]} new tokens = {t_past + tokens.shape[1]} exceed the context "
                f"length {self.context}: drop the oldest {t_past + tokens.shape[1] - self.context} tokens or build the "
                f"Decoder with context >= {t_past + tokens.shape[1]}"
            )
        positions = torch.arange(t_past, t_past + tokens.shape[1], device=tokens.device)
        x = self.token_embed(tokens) + self.pos_embed(positions)  # (B, T, D)
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            present.append(kv)
        return self.lm_head(self.norm(x)), present

    @torch.no_grad()
    def generate(self, prompt: Tensor, new_tokens: int) -> Tensor:
        """Greedy generation: one forward over ``prompt`` ``(B, T)``, then one cached step per token.

        Returns:
            ``(B, T + new_tokens)`` token ids.
        """
        logits, past = self(prompt)
        tokens = [prompt]
        for _ in range(new_tokens):
            next_token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens.append(next_token)
            logits, past = self(next_token, past)
        return torch.cat(tokens, dim=1)


def gpt2_small() -> Decoder:
    """GPT-2 small: 12 blocks, dim 768, 12 heads, vocabulary 50257, context 1024 (124M parameters)."""
    return Decoder()
