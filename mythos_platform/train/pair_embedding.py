"""A factored embedding of pair tokens, as a parametrization of the model's token embedding.

For the reasoning corpus (data/pointer.py) a pair word "xy" is one token. Its embedding row
is computed as E[x] + T[y]: E the model's own embedding of the symbol x, T a small table of
target embeddings (n_symbols x dim). Every pair then shares its parameters with the other
pairs of the same source or target, instead of owning a row that training touches rarely;
measured on this project's model, free pair rows (even initialised in this form) stayed at
chance on the one-hop lookup where the factored form learned it in a few hundred steps
(docs/depth.md).

It is a `torch.nn.utils.parametrize` parametrization, so the model code is unchanged (it
reads `tok_emb.weight` as always) and the model still takes plain token ids. `merge` writes
the computed rows into the weight and removes the parametrization: the exported model is a
plain Mythos whose pair rows hold E[x] + T[y]. The model must not tie its LM head to the
embedding (`tie_embeddings: false`): a tied head would be trained on the raw rows and
exported with the merged ones.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from mythos import Mythos


class FactoredPairs(nn.Module):
    """weight (V, D) -> weight with rows pair_offset + x*S + y replaced by weight[symbol_offset + x] + T[y]."""

    def __init__(self, n_symbols: int, symbol_offset: int, pair_offset: int, dim: int, std: float) -> None:
        super().__init__()
        S = n_symbols
        x = torch.arange(S).repeat_interleave(S)
        y = torch.arange(S).repeat(S)
        self.register_buffer("rows", pair_offset + x * S + y, persistent=False)
        self.register_buffer("sources", symbol_offset + x, persistent=False)
        self.register_buffer("targets", y, persistent=False)
        self.target = nn.Parameter(torch.randn(S, dim) * std)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        pairs = weight[self.sources] + self.target[self.targets].to(weight.dtype)
        return weight.index_copy(0, self.rows, pairs)


def factor_pair_embedding(model: Mythos, n_symbols: int, symbol_offset: int, pair_offset: int) -> FactoredPairs:
    """Parametrize `model.tok_emb.weight` so that pair rows are E[x] + T[y]; returns the parametrization."""
    if model.cfg.tie_embeddings:
        raise ValueError("a factored pair embedding needs an untied LM head: set model.overrides.tie_embeddings=false")
    if pair_offset + n_symbols**2 > model.cfg.vocab_size:
        raise ValueError(f"{n_symbols} symbols need vocab_size >= {pair_offset + n_symbols**2}, "
                         f"got {model.cfg.vocab_size}")
    weight = model.tok_emb.weight
    p = FactoredPairs(n_symbols, symbol_offset, pair_offset, model.cfg.dim, model.cfg.init_std).to(weight.device)
    parametrize.register_parametrization(model.tok_emb, "weight", p)
    return p


def merge(model: Mythos) -> None:
    """Write the factored rows into the embedding and drop the parametrization (no-op without one)."""
    if parametrize.is_parametrized(model.tok_emb, "weight"):
        parametrize.remove_parametrizations(model.tok_emb, "weight", leave_parametrized=True)
