"""A structured embedding for PairTokenFormat: pair token (x, y) -> E[x] + T[y].

E is the model's own (tied) token embedding, so a pair's source is written exactly as the
symbol it names; T is a separate table of target embeddings (n_symbols x dim). Every pair
token thus shares its parameters with the other pairs of the same source or target, instead
of owning an independent row that training touches once per 256 pairs. The pilot in
shared/RESEARCH.md summed a source and a target embedding per position; measured here, a
pair vocabulary of independent rows (even initialised as E[x] + Q E[y]) never left chance on
the one-hop lookup, the factored form learned it in ~300 steps (docs/depth.md).

`merge_into` writes E[x] + T[y] into the pair rows of a token-embedding table, so an exported
model embeds pair tokens through plain input_ids exactly as training did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.multihop_tokens import PairTokenFormat


class PairEmbedding(nn.Module):
    def __init__(self, fmt: PairTokenFormat, dim: int, std: float = 0.02) -> None:
        super().__init__()
        self.fmt = fmt
        self.target = nn.Parameter(torch.randn(fmt.n_symbols, dim) * std)

    def forward(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """ids (B, S), weight (V, D) the model's token embedding -> (B, S, D)."""
        x, y = self.fmt.pair_parts(ids)
        pair = F.embedding(x, weight) + F.embedding(y, self.target)
        return torch.where(self.fmt.is_pair(ids)[..., None], pair, F.embedding(ids, weight))

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor) -> None:
        """Write every pair token's embedding E[x] + T[y] into its row of `weight` (V, D)."""
        S, off = self.fmt.n_symbols, self.fmt.pair_offset
        rows = weight[:S, None, :] + self.target[None, :, :]  # (x, y, D)
        weight[off: off + S * S] = rows.reshape(S * S, -1).to(weight.dtype)
