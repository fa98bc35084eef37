"""GPT-2-style decoder-only language model with a key/value cache for token-by-token generation.

Not in the image-classifier registry (``create_model`` builds ``(C, S, S) -> classes`` models);
``gpt2_small()`` builds the real-size model and ``Decoder(**overrides)`` a tiny one for tests.
Attention projections are plain ``nn.Linear`` layers so sparsifiers and condensers see them.

Two caches: the functional one (a list of ``(keys, values)`` pairs that every step returns grown by
concatenation; what an exported graph takes) and :class:`KVCache`, fixed-capacity buffers that each
step writes in place (no per-step copy of the whole past; what ``generate`` uses).

``tie_head=False`` gives the output layer its own weight: the tied head shares the embedding, which
no sparsifier selects, so it stays a dense ``dim x vocab`` product that dominates a sparse model's
decoding step; untied, the head is an ordinary ``nn.Linear`` that the sparsity policy selects as the
output layer (sparse at constant fan-in, never ablated).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from srigl.errors import ContextLengthError, InvalidConfigError

__all__ = ["Decoder", "KVCache", "gpt2_small"]

PastPairs = list[tuple[Tensor, Tensor]]  # per block: keys, values, each (B, heads, T_past, head_dim)


class KVCache:
    """Fixed-capacity key/value cache of a :class:`Decoder`, written in place.

    Per block, ``keys[i]`` and ``values[i]`` are ``(B, heads, capacity, head_dim)`` buffers whose
    first ``length`` positions are filled. A forward given the cache writes the new tokens' keys and
    values at ``length .. length + T - 1``, attends over the first ``length + T`` positions (views,
    no copy) and advances ``length``; setting ``length`` back rewinds it (the next step overwrites).
    Build one with :meth:`Decoder.new_cache`.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], length: int = 0) -> None:
        self.keys, self.values, self.length = keys, values, length

    @property
    def capacity(self) -> int:
        """Positions each buffer holds."""
        return self.keys[0].shape[2]

    def pairs(self) -> PastPairs:
        """The filled part as the functional cache: per block ``(keys, values)`` views ``(B, H, length, D/H)``."""
        return [(k[:, :, : self.length], v[:, :, : self.length]) for k, v in zip(self.keys, self.values)]


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

    def forward(
        self, x: Tensor, past: tuple[Tensor, Tensor] | None, write_at: int | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``(proj(attention), (keys, values))`` for ``x`` ``(B, T, D)``.

        ``past`` is None, the functional cache's ``(keys, values)`` ``(B, H, T_past, D/H)`` (grown by
        concatenation), or with ``write_at`` a :class:`KVCache`'s buffers ``(B, H, capacity, D/H)``
        filled up to ``write_at``, into which the new keys and values are written.
        """
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        if write_at is not None:
            end = write_at + k.shape[2]
            past[0][:, :, write_at:end] = k
            past[1][:, :, write_at:end] = v
            k, v = past[0][:, :, :end], past[1][:, :, :end]  # (B, H, T_past + T, D/H) views of the buffers
        elif past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, T_past + T, D/H)
        t_new, t_all = q.shape[2], k.shape[2]
        # New tokens sit at positions t_all - t_new .. t_all - 1; each sees every key up to itself.
        # One new token sees every key: no mask to build (the common decoding step).
        mask = None if t_new == 1 else torch.ones(t_new, t_all, dtype=torch.bool, device=x.device).tril(t_all - t_new)
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

    def forward(
        self, x: Tensor, past: tuple[Tensor, Tensor] | None, write_at: int | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, present = self.attn(self.ln1(x), past, write_at)
        x = x + h
        return x + self.mlp(self.ln2(x)), present


class Decoder(nn.Module):
    """Decoder-only transformer with learned positions and a ``lm_head`` (tied to the token embedding
    unless ``tie_head=False``: then a ``Linear`` of its own that a sparsifier can select)."""

    def __init__(
        self,
        vocab_size: int = 50257,
        context: int = 1024,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        tie_head: bool = True,
    ) -> None:
        super().__init__()
        self.context, self.heads, self.tie_head = context, heads, tie_head
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_head:
            self.lm_head.weight = self.token_embed.weight  # GPT-2 ties input and output embeddings

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``capacity`` tokens (default: the
        context length), on the device and in the dtype of the model's embedding."""
        capacity = self.context if capacity is None else capacity
        weight = self.token_embed.weight
        dim = weight.shape[1]
        shape = (batch, self.heads, capacity, dim // self.heads)  # (B, H, capacity, D/H)
        buffers = [torch.zeros(shape, device=weight.device, dtype=weight.dtype) for _ in range(2 * len(self.blocks))]
        return KVCache(buffers[0::2], buffers[1::2])

    def forward(self, tokens: Tensor, past: PastPairs | KVCache | None = None) -> tuple[Tensor, PastPairs | KVCache]:
        """Logits ``(B, T, vocab)`` for ``tokens`` ``(B, T)`` following ``past``, and the cache.

        With the functional cache (a list of ``(keys, values)`` pairs, or None) the grown cache is a
        new list; a :class:`KVCache` is written in place, advanced by ``T`` and returned.

        Raises:
            ContextLengthError: If the cached plus new tokens exceed the context length, or the
                capacity of the ``KVCache``.
        """
        fixed = isinstance(past, KVCache)
        t_past = past.length if fixed else 0 if past is None else past[0][0].shape[2]
        t_all = t_past + tokens.shape[1]
        if t_all > self.context:
            raise ContextLengthError(
                f"{t_past} cached + {tokens.shape[1]} new tokens = {t_all} exceed the context "
                f"length {self.context}: drop the oldest {t_all - self.context} tokens or build the "
                f"Decoder with context >= {t_all}"
            )
        if fixed and t_all > past.capacity:
            raise ContextLengthError(
                f"{t_past} cached + {tokens.shape[1]} new tokens = {t_all} exceed the KVCache's capacity "
                f"{past.capacity}: build it with Decoder.new_cache(batch, capacity={t_all}) or more"
            )
        # The positions' rows of the table as a slice: what pos_embed(arange(t_past, t_all)) looks up,
        # without building the index tensor and gathering (two ops of every decoding step).
        x = self.token_embed(tokens) + self.pos_embed.weight[t_past:t_all]  # (B, T, D)
        if fixed:
            for block, k, v in zip(self.blocks, past.keys, past.values):
                x, _ = block(x, (k, v), t_past)
            past.length = t_all
            return self.lm_head(self.norm(x)), past
        present: PastPairs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            present.append(kv)
        return self.lm_head(self.norm(x)), present

    @torch.no_grad()
    def generate(self, prompt: Tensor, new_tokens: int) -> Tensor:
        """Greedy generation: one forward over ``prompt`` ``(B, T)``, then one cached step per token
        (a :class:`KVCache` of ``T + new_tokens`` positions, written in place).

        Returns:
            ``(B, T + new_tokens)`` token ids.
        """
        capacity = min(prompt.shape[1] + new_tokens, self.context)  # beyond the context, forward refuses
        logits, past = self(prompt, self.new_cache(prompt.shape[0], capacity))
        tokens = [prompt]
        for _ in range(new_tokens):
            next_token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens.append(next_token)
            logits, past = self(next_token, past)
        return torch.cat(tokens, dim=1)


def gpt2_small(tie_head: bool = True) -> Decoder:
    """GPT-2 small: 12 blocks, dim 768, 12 heads, vocabulary 50257, context 1024 (124M parameters with
    the tied head; ``tie_head=False`` adds a 768 x 50257 output layer of its own)."""
    return Decoder(tie_head=tie_head)
