"""A decoder-only transformer prior over token sequences.

The first input position is a class token (or a single start token when the
prior is unconditional); position t then predicts token t from the class and
tokens 0..t-1, so one forward pass gives the logits of every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, length, head_dim)
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, dropout_p=self.dropout if self.training else 0.0
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ARPrior(nn.Module):
    """Class-conditional (or unconditional) autoregressive transformer over tokens."""

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
    ) -> None:
        super().__init__()
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
        }
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        # One embedding per class plus the null class (index num_classes) used for guidance and
        # for unconditional priors, where it is the start token.
        self.class_embedding = nn.Embedding(num_classes + 1, width)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(1, seq_len, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(self._init_weights)
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

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Return next-token logits (batch, length, vocab) for tokens (batch, length), teacher-forced."""
        batch, length = tokens.shape
        classes = self.condition(labels, batch, tokens.device)
        inputs = torch.cat([self.class_embedding(classes)[:, None], self.token_embedding(tokens[:, :-1])], dim=1)
        x = inputs + self.position[:, :length]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Return the mean next-token cross-entropy in nats per token."""
        logits = self(tokens, labels)
        return F.cross_entropy(logits.float().reshape(-1, self.vocab_size), tokens.reshape(-1))
