"""A small causal transformer language model, written with plain torch.nn (runs on a CPU).

Attention is spelled out with matmul/softmax rather than a fused kernel, so that every operation
has second derivatives (unrolled and implicit hypergradients) and forward-mode derivatives
(first-order hypergradients).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.models.mlp import check_sizes

__all__ = ["TinyGPT"]


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads) + mask
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        h = h + self.proj(y)
        return h + self.mlp(self.norm2(h))


class TinyGPT(nn.Module):
    """Decoder-only transformer: token + position embeddings and ``layers`` blocks.

    Args:
        vocab_size, max_len: from the data.
        d_model, heads, layers: sizes.

    ``forward(x)``: token ids ``[B, T]`` -> next-token logits ``[B, T, vocab_size]``.
    """

    def __init__(
        self, vocab_size: int, max_len: int, d_model: int = 64, heads: int = 4, layers: int = 2
    ) -> None:
        super().__init__()
        check_sizes("TinyGPT", vocab_size=vocab_size, max_len=max_len, d_model=d_model, heads=heads)
        check_sizes("TinyGPT", minimum=0, layers=layers)  # no blocks: a bigram model
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    @property
    def max_positions(self) -> int:
        """The longest sequence it has position embeddings for (the trainer checks the data)."""
        return self.pos.num_embeddings

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (Hugging Face's name: the trainer checks token ids against it)."""
        return self.tok

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        # built per call at the batch's length: a kept max_len x max_len table took
        # max_len^2 floats (40 GB at max_len 100k) before the first batch was seen
        mask = torch.full((t, t), float("-inf"), device=x.device, dtype=h.dtype).triu_(1)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))
