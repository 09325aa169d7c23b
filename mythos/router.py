"""The MoE router of DeepSeek-V3 (arXiv:2412.19437, section 2.1.2): which experts a token goes to,
and with which gate weights.

    scores  = sigmoid(logits) | softmax(logits)                      (N, E) affinities
    choose  = scores + bias                                           the bias only chooses
    groups  : experts split into n_groups groups of consecutive experts; a group's score is the
              sum of its top (top_k // topk_groups) biased affinities; each token keeps its
              topk_groups best groups (group-limited routing, the paper's node-limited routing)
    experts = top_k of `choose` inside the kept groups
    gates   = scores of the chosen experts, renormalised to sum to 1 for sigmoid scoring (softmax
              probabilities are used as they are), times route_scale

Everything is batched tensor work: no host sync, whatever the grouping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORES = ("sigmoid", "softmax")


@dataclass(frozen=True)
class RouterSpec:
    top_k: int
    score: str = "sigmoid"
    """sigmoid | softmax"""
    n_groups: int = 1
    topk_groups: int = 1
    route_scale: float = 1.0

    def group_top(self, group_size: int) -> int:
        """How many of a group's best affinities make its score."""
        return min(group_size, max(1, self.top_k // self.topk_groups))


def affinities(logits: torch.Tensor, score: str) -> torch.Tensor:
    """Router logits (N, E) -> affinities (N, E) in fp32."""
    if score not in SCORES:
        raise ValueError(f"router score must be one of {SCORES}, got {score!r}")
    logits = logits.float()
    return torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, dim=-1)


def group_mask(choose: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """(N, E) biased affinities -> (N, E) bool: the experts of each token's topk_groups best groups."""
    N, E = choose.shape
    size = E // spec.n_groups
    grouped = choose.view(N, spec.n_groups, size)
    group_score = grouped.topk(spec.group_top(size), dim=-1).values.sum(-1)  # (N, G)
    keep = group_score.topk(spec.topk_groups, dim=-1).indices  # (N, topk_groups)
    kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)  # (N, G)
    return kept[:, :, None].expand(N, spec.n_groups, size).reshape(N, E)


def route(logits: torch.Tensor, bias: torch.Tensor,
          spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (N, E) and selection bias (E,) -> chosen experts (N, k), gate weights (N, k),
    affinities (N, E)."""
    scores = affinities(logits, spec.score)
    choose = scores + bias
    if spec.n_groups > 1:
        choose = choose.masked_fill(~group_mask(choose, spec), float("-inf"))
    idx = choose.topk(spec.top_k, dim=-1).indices  # (N, k)
    gates = scores.gather(-1, idx)
    if spec.score == "sigmoid":
        gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-9)
    return idx, gates * spec.route_scale, scores
