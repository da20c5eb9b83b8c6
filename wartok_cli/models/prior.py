"""A decoder-only transformer prior over token sequences.

The first input position is a class token, or a single start token when the
prior is unconditional. Position t then predicts token t from the class and
tokens 0..t-1, so one forward pass gives the logits of every position.

Sampling goes one position at a time through ``step`` with a ``KVCache``: the
keys and values of earlier positions are stored, so each new position costs one
row of attention instead of a forward pass over the whole prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

POSITION_MODES = ("learned", "rope")
ROPE_BASE = 10000.0


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """Gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


def rotary_tables(length: int, head_dim: int, base: float = ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the cosine and sine tables of rotary embeddings, each (length, head_dim // 2), in fp32."""
    frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * frequencies[None]
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of every head's channels by the position's angles (GPT-NeoX layout).

    x is (batch, heads, length, head_dim); cos and sin are (length, head_dim // 2).
    """
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.type_as(x)


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, one pair of buffers per block.

    Each buffer is (batch, heads, seq_len, head_dim); ``length`` is the number of
    positions already filled, which is also the position of the next input.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    ) -> torch.Tensor:
        """Attend over x (batch, length, dim), or over the cached positions plus x when a cache is given.

        ``rotary`` contains the cosine and sine rows of x's positions. ``cache`` is
        (key buffer, value buffer, start): x's keys and values are written at
        positions start.. and the query attends to every position before its end.
        """
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, length, head_dim)
        if rotary is not None:
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=dropout)
        else:
            key_buffer, value_buffer, start = cache
            end = start + length
            key_buffer[:, :, start:end] = key
            value_buffer[:, :, start:end] = value
            # Only one new position at a time is supported here, so no mask is needed: it may see all of 0..end-1.
            out = F.scaled_dot_product_attention(
                query, key_buffer[:, :, :end], value_buffer[:, :, :end], dropout_p=dropout
            )
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio * 2 / 3), dropout)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary, cache)
        return x + self.mlp(self.mlp_norm(x))


class ARPrior(nn.Module):
    """Class-conditional (or unconditional) autoregressive transformer over tokens.

    ``positions`` selects the position encoding: "learned" adds a learned
    vector per position to the inputs. "rope" rotates queries and keys by rotary
    position embeddings instead, which needs an even head dimension.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        num_classes: int = 0,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        class_dropout: float = 0.1,
        positions: Literal["learned", "rope"] = "learned",
    ) -> None:
        super().__init__()
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        head_dim = width // heads
        if positions == "rope" and head_dim % 2:
            raise ValueError(
                f"rotary position embeddings need an even head dimension, got {width} / {heads} = {head_dim}"
            )
        self.config = {
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "num_classes": num_classes,
            "width": width,
            "depth": depth,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
            "dropout": dropout,
            "class_dropout": class_dropout,
            "positions": positions,
        }
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        self.positions = positions
        self.heads = heads
        # One embedding per class plus the null class (index num_classes) used for guidance and
        # for unconditional priors, where it is the start token.
        self.class_embedding = nn.Embedding(num_classes + 1, width)
        self.token_embedding = nn.Embedding(vocab_size, width)
        if positions == "learned":
            self.position = nn.Parameter(torch.zeros(1, seq_len, width))
        else:
            # The tables are derived from the sequence length, so they stay out of the state dict.
            cos, sin = rotary_tables(seq_len, head_dim)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(self._init_weights)
        if positions == "learned":
            nn.init.normal_(self.position, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def condition(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Map labels (batch,) to class indices; missing labels (-1 or None) become the null class."""
        null = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if labels is None or self.num_classes == 0:
            return null
        labels = torch.where(labels < 0, null, labels)
        if self.training and self.class_dropout > 0:
            drop = torch.rand(batch, device=device) < self.class_dropout
            labels = torch.where(drop, null, labels)
        return labels

    def _rotary(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.positions != "rope":
            return None
        return self.rotary_cos[start:end], self.rotary_sin[start:end]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Return next-token logits (batch, length, vocab) for tokens (batch, length), teacher-forced."""
        batch, length = tokens.shape
        classes = self.condition(labels, batch, tokens.device)
        x = torch.cat([self.class_embedding(classes)[:, None], self.token_embedding(tokens[:, :-1])], dim=1)
        if self.positions == "learned":
            x = x + self.position[:, :length]
        rotary = self._rotary(0, length)
        for block in self.blocks:
            x = block(x, rotary)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Return the mean next-token cross-entropy in nats per token."""
        logits = self(tokens, labels)
        return F.cross_entropy(logits.float().reshape(-1, self.vocab_size), tokens.reshape(-1))

    def new_cache(self, batch: int, device: torch.device | str | None = None) -> KVCache:
        """Return an empty key/value cache for ``batch`` sequences of up to seq_len positions."""
        reference = self.head.weight
        device = reference.device if device is None else device
        head_dim = reference.shape[1] // self.heads
        shape = (batch, self.heads, self.seq_len, head_dim)
        keys = [torch.zeros(shape, device=device, dtype=reference.dtype) for _ in self.blocks]
        values = [torch.zeros(shape, device=device, dtype=reference.dtype) for _ in self.blocks]
        return KVCache(keys, values)

    def step(
        self, cache: KVCache, tokens: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feed one position through the cache; return the logits (batch, vocab) of the next token.

        The first call (empty cache) takes ``labels`` (batch,), or None for the null
        class, and returns the logits of token 0. Every later call takes the token
        just chosen, ``tokens`` (batch,), and returns the logits of the token after
        it. The logits equal those of ``forward`` at the same position, up to
        floating-point rounding.
        """
        position = cache.length
        if position >= cache.capacity:
            raise ValueError(f"the cache is full: all {cache.capacity} positions are already filled")
        batch = cache.keys[0].shape[0]
        if position == 0:
            if tokens is not None:
                raise ValueError("the first step takes the class labels, not a token")
            device = cache.keys[0].device
            x = self.class_embedding(self.condition(labels, batch, device))[:, None]
        else:
            if tokens is None:
                raise ValueError(f"step {position} needs the token chosen at the previous step")
            x = self.token_embedding(tokens)[:, None]
        if self.positions == "learned":
            x = x + self.position[:, position : position + 1]
        rotary = self._rotary(position, position + 1)
        for block, keys, values in zip(self.blocks, cache.keys, cache.values):
            x = block(x, rotary, (keys, values, position))
        cache.length = position + 1
        return self.head(self.norm(x))[:, 0]
