"""Training losses beyond next-token cross-entropy: per-loop (deep) supervision, from the data's
per-loop labels (trajectory training) or from the next tokens (language modelling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loop_weights(n: int, scheme: str = "uniform") -> torch.Tensor:
    """Weights over n supervised iterations, summing to 1 ("uniform" or "linear": later ones weigh more)."""
    w = torch.ones(n) if scheme == "uniform" else torch.arange(1, n + 1, dtype=torch.float32)
    return w / w.sum()


def per_loop_lm_loss(loop_logits: list[torch.Tensor], targets: torch.Tensor, scheme: str = "linear") -> torch.Tensor:
    """Deep supervision for language modelling: every supervised iteration predicts the next tokens."""
    w = loop_weights(len(loop_logits), scheme)
    losses = [F.cross_entropy(l.float().flatten(0, 1), targets.flatten(), ignore_index=-100) for l in loop_logits]
    return sum(wj * lj for wj, lj in zip(w, losses))


def per_loop_label_loss(loop_logits: list[torch.Tensor], loop_labels: torch.Tensor,
                        scheme: str = "uniform") -> torch.Tensor:
    """Trajectory (deep) supervision from the data: loop_logits[t] (B, S, V) is the output after
    iteration t + 1 and loop_labels[:, t] (B, S) its labels (-100: no loss at that position)."""
    if len(loop_logits) != loop_labels.shape[1]:
        raise ValueError(f"{len(loop_logits)} loop outputs but labels for {loop_labels.shape[1]} loops")
    w = loop_weights(len(loop_logits), scheme)
    losses = [F.cross_entropy(l.float().flatten(0, 1), loop_labels[:, t].flatten(), ignore_index=-100)
              for t, l in enumerate(loop_logits)]
    return sum(wj * lj for wj, lj in zip(w, losses))
