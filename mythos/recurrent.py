"""The recurrent block: one shared stack of transformer blocks looped T times.

    u_t     = norm(h_t + loop_emb(t) + e)
    h_{t+1} = A * h_t + B * e + Block(u_t) + LoRA_t(u_t)            (Block returns its update)

with ACT weighting the states h_1..h_T into the output (or the output is h_T with ACT off).
With `moda`, the core layers' attention at iteration t also reads depth entries of each position
written from e and h_1..h_t (Mixture-of-Depths Attention, `mythos/moda.py`).
In training only the last `bptt_depth` iterations are under autograd (truncated
backpropagation through the loop); earlier ones run under no_grad.

Inference may exit early (`exit_threshold`): once every position's relative state change
|h_{t+1} - h_t| / |h_{t+1}| drops below the threshold (`exit_on="last"`: the last position of
each row, the one whose output a one-token answer is read from), or, with ACT, once every
position has halted. With a KV cache the skipped iterations' slots get the last computed entries
for these positions (the "latest entry" rule of Huginn's cache sharing), so later tokens decoded
with more loops still find keys and values for every iteration.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .act import ACTHalting, ACTState
from .block import TransformerBlock
from .config import MythosConfig
from .injection import LTIInjection
from .kv_cache import KVCache
from .loop_embedding import loop_index_embedding
from .lora import DepthLoRA
from .moda import DepthMemory, DepthWriter
from .norm import RMSNorm
from .slot_cache import SlotBatch

EXIT_ON = ("all", "last")
"""Which positions the adaptive exit waits for: every position, or the last of each row."""


@dataclass
class RecurrentOutput:
    h: torch.Tensor
    aux_loss: torch.Tensor
    ponder_cost: torch.Tensor | None
    loops_used: int | torch.Tensor
    """Iterations run; a (B,) tensor from `forward_rows`."""
    state_norms: list[torch.Tensor] = field(default_factory=list)
    loop_states: list[torch.Tensor] = field(default_factory=list)


def state_change(h_new: torch.Tensor, h: torch.Tensor, exit_on: str) -> torch.Tensor:
    """|h_new - h| / |h_new| per position (B, S), or of each row's last position only (B, 1) with
    exit_on="last": what the adaptive exit compares with its threshold."""
    if exit_on == "last":
        h_new, h = h_new[:, -1:], h[:, -1:]
    return (h_new - h).float().norm(dim=-1) / h_new.float().norm(dim=-1).clamp_min(1e-6)


class RecurrentBlock(nn.Module):
    def __init__(self, cfg: MythosConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerBlock(cfg, moe=cfg.use_moe, moda=cfg.moda)
                                    for _ in range(cfg.core_layers))
        # MoDA: writes each state's depth entries (outside the layers, so that an FSDP unit per
        # layer never has its parameters read outside its own forward)
        self.depth_writer = DepthWriter(cfg.dim, cfg.core_layers, cfg.n_kv_heads, cfg.head_dim,
                                        cfg.norm_eps) if cfg.moda else None
        self.in_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.injection = LTIInjection(cfg.dim, cfg.injection_init_decay)
        self.lora = DepthLoRA(cfg.dim, cfg.lora_rank, cfg.train_loops_max) if cfg.lora_rank > 0 else None
        self.act = ACTHalting(cfg.dim, cfg.act_threshold, cfg.act_init_bias) if cfg.act_enabled else None

    def init_weights(self, std: float, out_std: float) -> None:
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.in_norm.init_weights()
        self.injection.init_weights()
        if self.lora is not None:
            self.lora.init_weights(std)
        if self.act is not None:
            self.act.init_weights()
        if self.depth_writer is not None:
            self.depth_writer.init_weights(std)

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        if self.cfg.state_init == "noise":
            return torch.randn_like(e)
        return torch.zeros_like(e)

    def forward(
        self,
        e: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        n_loops: int,
        bptt_depth: int | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        exit_threshold: float | None = None,
        collect_stats: bool = False,
        keep_loop_states: bool = False,
        exit_on: str = "all",
    ) -> RecurrentOutput:
        grad = torch.is_grad_enabled()
        first_grad = max(0, n_loops - bptt_depth) if (grad and bptt_depth is not None) else 0
        h = self.initial_state(e)
        act = ACTState(self.act, e) if self.act is not None else None
        aux = e.new_zeros((), dtype=torch.float32)
        norms: list[torch.Tensor] = []
        loop_states: list[torch.Tensor] = []
        loops_used = n_loops
        memory = DepthMemory(len(self.layers)) if self.depth_writer is not None else None
        for t in range(n_loops):
            ctx = torch.no_grad() if t < first_grad else contextlib.nullcontext()
            with ctx:
                if memory is not None:  # MoDA: e first, then the state each iteration starts from
                    memory.write(self.depth_writer(e if t == 0 else h, rope))
                h_new, a = self.iteration(h, e, t, rope, mask, cache, start, memory)
                aux = aux + a
                last = t == n_loops - 1
                converged = False
                if exit_threshold is not None and not last and not grad:
                    converged = bool(state_change(h_new, h, exit_on).max() < exit_threshold)
                if act is not None:
                    act.step(h_new, last=last or converged)
                    if exit_threshold is not None and not grad and act.all_halted:
                        converged = True
                if collect_stats:
                    norms.append(h_new.detach().float().norm(dim=-1).mean())
                if keep_loop_states and t >= first_grad:
                    loop_states.append(h_new)
            h = h_new
            if converged and not last:
                loops_used = t + 1
                if cache is not None and not cache.share_loops:
                    self._fill_skipped(cache, t, n_loops, start, start + e.shape[1])
                break
        out = act.output if act is not None else h
        ponder = act.ponder_cost() if act is not None else None
        return RecurrentOutput(out, aux, ponder, loops_used, norms, loop_states)

    @torch.no_grad()
    def forward_rows(
        self,
        e: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        n_loops: torch.Tensor,
        cache: KVCache | SlotBatch | None = None,
        start: int = 0,
        exit_threshold: float | torch.Tensor | None = None,
        exit_on: str = "all",
    ) -> RecurrentOutput:
        """Inference with a loop count (and exit threshold) per row: n_loops (B,). Iteration t runs
        only the rows that are still looping (count above t, not converged), so a batch costs what
        its rows cost, not its deepest row times its size, and each row's result, state and cache
        entries are what it would get alone. The rows still looping only shrink from one iteration
        to the next; when rows are ordered deepest first they are a prefix (cache slices, no copies)."""
        B = e.shape[0]
        if isinstance(cache, KVCache) and bool((n_loops != n_loops[0]).any()):
            raise ValueError("loop counts per row need a SlotCache (KVCache rows share one loop count)")
        counts = n_loops.tolist()
        if exit_threshold is None and self.depth_writer is None and counts == sorted(counts, reverse=True):
            return self._deepest_first(e, rope, mask, n_loops, counts, cache, start)
        h = self.initial_state(e)
        act = ACTState(self.act, e) if self.act is not None else None
        memory = DepthMemory(len(self.layers)) if self.depth_writer is not None else None
        thresholds = None
        if exit_threshold is not None:
            thresholds = torch.as_tensor(exit_threshold, dtype=torch.float32, device=e.device).expand(B)
        looping = torch.ones(B, dtype=torch.bool, device=e.device)
        used = n_loops.clone()
        aux = e.new_zeros((), dtype=torch.float32)
        for t in range(max(counts)):  # read once above: no second host sync
            rows = looping.nonzero().squeeze(1)
            if len(rows) == 0:  # every row has exited early
                break
            every, k = len(rows) == B, len(rows)
            prefix = every or bool(rows[-1] == k - 1)  # rows ordered deepest first: the first k
            pick = (lambda x: x) if every else (lambda x: x[:k]) if prefix else (lambda x: x[rows])
            e_t, h_t, loops_t = pick(e), pick(h), pick(n_loops)
            rope_t = (pick(rope[0]), pick(rope[1]))
            cache_t = cache if cache is None or every else cache.select(rows)
            if memory is not None:
                memory.write(self.depth_writer(e_t if t == 0 else h_t, rope_t), None if every else rows, B)
            h_new, a = self.iteration(h_t, e_t, t, rope_t, None if mask is None else pick(mask), cache_t, start,
                                      memory, None if every else rows)
            aux = aux + a
            last = loops_t == t + 1
            converged = torch.zeros_like(last)
            if thresholds is not None:
                converged = (state_change(h_new, h_t, exit_on).amax(dim=1) < pick(thresholds)) & ~last
            if act is not None:
                act.step(h_new, last | converged, None if every else rows)
                if thresholds is not None:
                    halted = ~pick(act.running).any(dim=1)
                    converged = converged | (halted & (pick(thresholds) >= 0) & ~last)
            h = h_new if every else torch.cat((h_new, h[k:])) if prefix else h.index_copy(0, rows, h_new)
            if bool(converged.any()):
                exited = rows[converged]
                used[exited] = t + 1
                if cache is not None and not cache.share_loops:
                    self._fill_skipped(cache.select(exited), t, int(n_loops[exited].max()), start, start + e.shape[1])
            looping[rows[last | converged]] = False
        out = act.output if act is not None else h
        ponder = act.ponder_cost() if act is not None else None
        return RecurrentOutput(out, aux, ponder, used)

    def _deepest_first(self, e: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                       n_loops: torch.Tensor, counts: list[int], cache: SlotBatch | None, start: int) -> RecurrentOutput:
        """`forward_rows` for rows ordered deepest first with no adaptive exit (and no MoDA), what the
        serving engine runs when no request asks for an exit: the rows at iteration t are the first
        k_t, known from the counts, so the loop reads nothing back from the device (no host syncs on a
        GPU) and every row subset, of the states, of ACT's and of the cache, is a slice. The same
        operations on the same rows as the general loop, so the same numbers bit for bit."""
        B = e.shape[0]
        h = self.initial_state(e)
        act = ACTState(self.act, e) if self.act is not None else None
        aux = e.new_zeros((), dtype=torch.float32)
        for t in range(counts[0]):
            k = sum(c > t for c in counts)
            every = k == B
            part = (lambda x: x) if every else (lambda x: x[:k])
            h_new, a = self.iteration(part(h), part(e), t, (part(rope[0]), part(rope[1])),
                                      None if mask is None else part(mask),
                                      cache if cache is None or every else cache.head(k), start, None)
            aux = aux + a
            if act is not None:
                act.step(h_new, part(n_loops) == t + 1, None if every else slice(0, k))
            h = h_new if every else torch.cat((h_new, h[k:]))
        out = act.output if act is not None else h
        ponder = act.ponder_cost() if act is not None else None
        return RecurrentOutput(out, aux, ponder, n_loops.clone())

    def iteration(self, h: torch.Tensor, e: torch.Tensor, t: int, rope: tuple[torch.Tensor, torch.Tensor],
                  mask: torch.Tensor | None, cache: KVCache | SlotBatch | None, start: int,
                  memory: DepthMemory | None, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loop iteration t: state h (B, S, D) -> (next state, aux loss), the injection included.

        The unit a wrapper may replace on an instance (`block.iteration = wrapped`): activation
        checkpointing runs it again in the backward pass (mythos_platform/train/activation_checkpointing.py),
        so it reads nothing that changes after the call (MoDA: only the t + 1 depth entries written
        before it)."""
        emb = loop_index_embedding(t, self.cfg.loop_emb_dim, self.cfg.dim, e.device, e.dtype)
        u = self.in_norm(h + emb + e)
        update, a = self.step(u, t, rope, mask, cache, start, memory, rows)
        return self.injection(h, e, update), a

    def step(self, u: torch.Tensor, t: int, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
             cache: KVCache | SlotBatch | None, start: int, memory: DepthMemory | None,
             rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stack of core layers at iteration t on u (B, S, D) -> (summed update incl. LoRA, aux loss);
        `rows`: u holds only these rows of the batch the depth memory was written for."""
        x, update, aux = u, None, u.new_zeros((), dtype=torch.float32)
        for j, layer in enumerate(self.layers):
            slot = cache.slot("core", j, t) if cache is not None else None
            depth = memory.read(j, rows, t + 1) if memory is not None else None
            d, a = layer(x, rope, mask, slot, start, depth)
            x = x + d
            update = d if update is None else update + d
            aux = aux + a
        if self.lora is not None:
            update = update + self.lora(u, t)
        return update, aux

    def _fill_skipped(self, cache: KVCache | SlotBatch, t: int, n_loops: int, start: int, end: int) -> None:
        """After an exit at iteration t: later iterations' slots get iteration t's entries (positions
        start..end-1; in a SlotBatch, each exited row's own newest end - start positions)."""
        for j in range(len(self.layers)):
            src = cache.slot("core", j, t)
            for later in range(t + 1, n_loops):
                cache.slot("core", j, later).copy_positions(src, start, end)
