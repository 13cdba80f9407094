"""A decoder-only Transformer prior over a code grid (GPT-style, after nanoGPT; DESIGN.md §3.8).

Slot t of the input predicts code c_t. Slot 0 holds a learned BOS vector (plus the class embedding when
conditioned), so the first code is modelled too; slot t > 0 holds the embedding of c_{t−1}. Every slot also
gets the learned embedding of the position it predicts: row + column (+ group when a cell holds C/d tokens).
Pre-LN blocks, causal self-attention, weight decay on matrices only (see geovq.training.prior).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from geovq.errors import GeovqError
from geovq.models.priors.base import CodeGrid, Prior


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.max_len, self.dropout = heads, max_len, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, L, D). With `cache` (sampling, L = 1): append this slot's key/value, attend to all so far."""
        b, length, dim = x.shape
        q, k, v = (t.view(b, length, self.heads, dim // self.heads).transpose(1, 2)  # (B, H, L, hd)
                   for t in self.qkv(x).split(dim, dim=2))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            if "k" not in cache:  # preallocated once: appending by torch.cat would copy the cache every step
                cache["k"] = k.new_zeros(b, self.heads, self.max_len, dim // self.heads)
                cache["v"], cache["len"] = torch.zeros_like(cache["k"]), 0
            t = cache["len"]
            cache["k"][:, :, t:t + length], cache["v"][:, :, t:t + length] = k, v
            cache["len"] = t + length
            # Only the newest slot queries, and every cached slot lies before it: no mask is needed.
            y = F.scaled_dot_product_attention(q, cache["k"][:, :, :t + length], cache["v"][:, :, :t + length])
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, length, dim)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, max_len, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class TransformerPrior(Prior):
    """GPT over the T codes of a grid: `layers` pre-LN blocks of width `dim` with `heads` heads."""

    def __init__(self, grid: CodeGrid, n_classes: int = 0, layers: int = 4, heads: int = 4, dim: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__(grid, n_classes)
        if dim % heads:
            raise GeovqError(f"transformer width {dim} must be divisible by its {heads} heads")
        self.code_emb = nn.Embedding(grid.n_codes, dim)
        self.bos = nn.Parameter(torch.zeros(dim))
        self.class_emb = nn.Embedding(n_classes, dim) if n_classes else None
        self.row_emb, self.col_emb = nn.Embedding(grid.height, dim), nn.Embedding(grid.width, dim)
        self.group_emb = nn.Embedding(grid.groups, dim) if grid.groups > 1 else None
        self.register_buffer("position", grid.positions(), persistent=False)  # (T, 3) row, column, group
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, grid.tokens, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, grid.n_codes, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2·layers)
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _position_emb(self) -> torch.Tensor:
        """(T, D): the embedding of the position each slot predicts."""
        rows, cols, groups = self.position.unbind(1)
        emb = self.row_emb(rows) + self.col_emb(cols)
        return emb if self.group_emb is None else emb + self.group_emb(groups)

    def _bos(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, 1, D) slot 0: BOS, plus the class embedding when conditioned."""
        bos = self.bos.expand(batch, 1, -1)
        return bos if labels is None else bos + self.class_emb(labels)[:, None]

    def logits(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([self._bos(labels, len(codes)), self.code_emb(codes[:, :-1])], 1)  # (N, T, D)
        x = self.drop(x + self._position_emb())
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (N, T, K)

    def next_logits(self, codes: torch.Tensor, labels: torch.Tensor | None) -> Iterator[torch.Tensor]:
        caches: list[dict[str, torch.Tensor]] = [{} for _ in self.blocks]
        position = self._position_emb()
        x = self._bos(labels, len(codes)) + position[0]  # (B, 1, D)
        for t in range(self.grid.tokens):
            h = x
            for block, cache in zip(self.blocks, caches):
                h = block(h, cache)
            yield self.head(self.ln_f(h[:, -1]))
            if t + 1 < self.grid.tokens:  # the code just chosen feeds the slot that predicts the next one
                x = self.code_emb(codes[:, t:t + 1]) + position[t + 1]
