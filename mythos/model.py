"""The Recurrent-Depth Transformer: embed -> prelude -> looped recurrent block -> coda -> head.

Single-device PyTorch: no Ray, no torch.distributed. Build on the meta device and initialise
after sharding the usual way:

    with torch.device("meta"):
        model = Mythos(cfg)
    ...  # shard / wrap
    model.to_empty(device=device)
    model.init_weights()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .block import TransformerBlock
from .config import MythosConfig
from .kv_cache import KVCache
from .moe import MoE
from .norm import RMSNorm
from .recurrent import EXIT_ON, RecurrentBlock
from .rope import rope_angles
from .slot_cache import SlotBatch


@dataclass
class MythosOutput:
    logits: torch.Tensor
    """(B, S, V), or (B, 1, V) with last_logits_only."""
    loss: torch.Tensor | None = None
    """Mean next-token cross-entropy over targets != -100 (None without targets)."""
    aux_loss: torch.Tensor | None = None
    """MoE auxiliary balance loss (0 when disabled)."""
    ponder_cost: torch.Tensor | None = None
    """ACT ponder cost N + R averaged over positions (None with ACT off)."""
    loops_used: int | torch.Tensor = 0
    """Loop iterations run (a (B,) tensor, per row, when n_loops was given per row)."""
    state_norms: list[torch.Tensor] = field(default_factory=list)
    """Mean |h_t| after each loop iteration (with collect_stats)."""
    loop_logits: list[torch.Tensor] = field(default_factory=list)
    """Logits of coda+head applied to the state after each iteration under autograd (deep supervision)."""


class Mythos(nn.Module):
    def __init__(self, cfg: MythosConfig) -> None:
        super().__init__()
        MythosConfig.from_dict(cfg.to_dict())  # re-checks a config changed after it was built
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.prelude = nn.ModuleList(TransformerBlock(cfg, moe=False) for _ in range(cfg.prelude_layers))
        self.e_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.core = RecurrentBlock(cfg)
        self.coda = nn.ModuleList(TransformerBlock(cfg, moe=False) for _ in range(cfg.coda_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    # ------------------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Share the LM head with the embedding (again after to_empty, which can untie them)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.cfg
        self.tie_weights()
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers_total)
        nn.init.normal_(self.tok_emb.weight, std=std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in (*self.prelude, *self.coda):
            block.init_weights(std, out_std)
        self.core.init_weights(std, out_std)
        self.e_norm.init_weights(cfg.input_gain_init)
        self.norm.init_weights()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_router_biases(self, loads: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Aux-loss-free balancing step for every MoE layer; returns the loads used."""
        layers = self.moe_layers()
        loads = loads if loads is not None else [None] * len(layers)
        return [m.update_router_bias(load) for m, load in zip(layers, loads)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids: torch.Tensor, n_loops: int | torch.Tensor,
                      exit_threshold: float | torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seq) tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: need at least one token")
        if isinstance(n_loops, torch.Tensor):
            if n_loops.shape != input_ids.shape[:1] or n_loops.is_floating_point() or bool((n_loops < 1).any()):
                raise ValueError(f"n_loops per row must be {input_ids.shape[0]} ints >= 1, got {n_loops.tolist()!r}")
        elif not isinstance(n_loops, int) or n_loops < 1:
            raise ValueError(f"n_loops must be an int >= 1, got {n_loops!r}")
        if isinstance(exit_threshold, torch.Tensor) and not isinstance(n_loops, torch.Tensor):
            raise ValueError("an exit_threshold per row needs n_loops per row (a tensor)")

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        n_loops: int | torch.Tensor | None = None,
        bptt_depth: int | None = None,
        targets: torch.Tensor | None = None,
        cache: KVCache | SlotBatch | None = None,
        exit_threshold: float | torch.Tensor | None = None,
        last_logits_only: bool = False,
        collect_stats: bool = False,
        return_loop_logits: bool = False,
        exit_on: str = "all",
    ) -> MythosOutput:
        """input_ids (B, S) -> MythosOutput.

        n_loops: loop iterations (default cfg.n_loops; any count, also beyond training), or, in
            inference, a (B,) tensor of counts per row: a row takes no part in the iterations past
            its own count, so its result is what it would be alone (iteration-level batching).
        bptt_depth: with autograd on, only the last bptt_depth iterations are differentiated
            (default cfg.bptt_depth in training mode, all iterations otherwise).
        cache: a KVCache, or the rows of a SlotCache (`SlotCache.batch`), to read and extend
            (generation). Decoding with more loops than the cache was prefilled with raises
            CacheError (unless the cache shares loops).
        exit_threshold: inference only; stop looping once every position's relative state
            change is below it (or every position has halted, with ACT). With loop counts per
            row it may be a (B,) tensor (negative: that row never exits early), and each row exits on
            its own.
        exit_on: "all" positions must converge, or only the "last" of each row (the one a
            one-token answer is read from; the others keep their state at the exit).
        """
        cfg = self.cfg
        n_loops = cfg.n_loops if n_loops is None else n_loops
        if bptt_depth is None and self.training:
            bptt_depth = cfg.bptt_depth
        per_row = isinstance(n_loops, torch.Tensor)
        self._check_inputs(input_ids, n_loops, exit_threshold)
        B, S = input_ids.shape
        device = input_ids.device
        if cache is not None:
            start, positions, mask = cache.prepare(S, n_loops, device)
        else:
            start, positions, mask = 0, torch.arange(S, device=device)[None, :].expand(B, S), None
        if start + S > cfg.max_seq_len:
            raise ValueError(f"sequence length {start + S} exceeds max_seq_len={cfg.max_seq_len}")
        x = self.tok_emb(input_ids)
        rot = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.head_dim
        rope = rope_angles(positions, rot, cfg.rope_theta)

        aux = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.prelude):
            d, a = block(x, rope, mask, cache.slot("prelude", i) if cache is not None else None, start)
            x, aux = x + d, aux + a
        e = self.e_norm(x)
        if exit_on not in EXIT_ON:
            raise ValueError(f"exit_on must be 'all' or 'last', got {exit_on!r}")
        counts = n_loops.tolist() if per_row else None
        if per_row and exit_threshold is None and min(counts) == max(counts):
            # one count for every row and no exits: the plain loop computes the same, with less bookkeeping
            rec = self.core(e, rope, mask, counts[0], None, cache, start, None)
            rec.loops_used = torch.full((B,), rec.loops_used, dtype=torch.long)
        elif per_row:
            if self.training and torch.is_grad_enabled():
                raise ValueError("a loop count per row is for inference: call under torch.no_grad() in eval mode")
            rec = self.core.forward_rows(e, rope, mask, n_loops.to(device), cache, start, exit_threshold, exit_on)
        else:
            rec = self.core(e, rope, mask, n_loops, bptt_depth, cache, start, exit_threshold, collect_stats,
                            keep_loop_states=return_loop_logits, exit_on=exit_on)
        aux = aux + rec.aux_loss

        def coda_head(h: torch.Tensor, use_cache: bool) -> torch.Tensor:
            nonlocal aux
            for i, block in enumerate(self.coda):
                slot = cache.slot("coda", i) if (cache is not None and use_cache) else None
                d, a = block(h, rope, mask, slot, start)
                h, aux = h + d, aux + a
            if last_logits_only:
                h = h[:, -1:]
            return self.lm_head(self.norm(h))

        logits = coda_head(rec.h, use_cache=True)
        loop_logits = [coda_head(h, use_cache=False) for h in rec.loop_states] if return_loop_logits else []

        if cache is not None:
            cache.advance(S, n_loops)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100)
        return MythosOutput(logits, loss, aux, rec.ponder_cost, rec.loops_used, rec.state_norms, loop_logits)
