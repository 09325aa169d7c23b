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
from .kv_cache import CacheError, KVCache
from .moe import MoE
from .norm import RMSNorm
from .recurrent import EXIT_ON, RecurrentBlock
from .rope import rope_angles


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
    loops_used: int = 0
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
    def _check_inputs(self, input_ids: torch.Tensor, start: int, n_loops: int) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seq) tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
        seq = input_ids.shape[1]
        if seq == 0:
            raise ValueError("input_ids is empty: need at least one token")
        if start + seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + seq} exceeds max_seq_len={self.cfg.max_seq_len}")
        if not isinstance(n_loops, int) or n_loops < 1:
            raise ValueError(f"n_loops must be an int >= 1, got {n_loops!r}")

    @staticmethod
    def _padding_mask(cache: KVCache, start: int, S: int, device: torch.device) -> torch.Tensor | None:
        """(B, 1, S, L) bool mask for a left-padded batch; None when no row is padded."""
        if cache is None or cache.key_valid is None:
            return None
        L = start + S
        q = torch.arange(start, L, device=device)[:, None]
        k = torch.arange(L, device=device)[None, :]
        allowed = (k <= q)[None] & cache.key_valid[:, None, :L]
        # a pad query attends to itself, so no row is fully masked (which would give NaNs)
        return (allowed | (k == q)[None])[:, None]

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        n_loops: int | None = None,
        bptt_depth: int | None = None,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        exit_threshold: float | None = None,
        last_logits_only: bool = False,
        collect_stats: bool = False,
        return_loop_logits: bool = False,
        exit_on: str = "all",
    ) -> MythosOutput:
        """input_ids (B, S) -> MythosOutput.

        n_loops: loop iterations (default cfg.n_loops; any count, also beyond training).
        bptt_depth: with autograd on, only the last bptt_depth iterations are differentiated
            (default cfg.bptt_depth in training mode, all iterations otherwise).
        cache: a KVCache to read and extend (generation). Decoding with more loops than the
            cache was prefilled with raises CacheError (unless the cache shares loops).
        exit_threshold: inference only; stop looping once every position's relative state
            change is below it (or every position has halted, with ACT).
        exit_on: "all" positions must converge, or only the "last" of each row (the one a
            one-token answer is read from; the others keep their state at the exit).
        """
        cfg = self.cfg
        n_loops = cfg.n_loops if n_loops is None else n_loops
        if bptt_depth is None and self.training:
            bptt_depth = cfg.bptt_depth
        start = cache.length if cache is not None else 0
        self._check_inputs(input_ids, start, n_loops)
        B, S = input_ids.shape
        if cache is not None and cache.length > 0 and not cache.share_loops and n_loops > (cache.n_loops or 0):
            raise CacheError(
                f"n_loops={n_loops} but the cache was filled with {cache.n_loops} loops: the extra iterations "
                "have no keys/values for earlier tokens. Decode with n_loops <= that, prefill again, or use "
                "KVCache(share_loops=True)"
            )
        device = input_ids.device
        positions = cache.positions(start, S, device) if cache is not None else \
            torch.arange(S, device=device)[None, :].expand(B, S)
        mask = self._padding_mask(cache, start, S, device)
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
            cache.n_loops = n_loops if cache.length == 0 else min(cache.n_loops or n_loops, n_loops)
            cache.length = start + S
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100)
        return MythosOutput(logits, loss, aux, rec.ponder_cost, rec.loops_used, rec.state_norms, loop_logits)
