"""Named model sizes, from a debug model that trains in minutes on 2 CPU cores to 1T parameters.

Totals (stored parameters, tied embeddings once) are exact counts from `sizing.parameter_counts`
and land within 2% of each name; "active" is what one token passes through in one pass (top-k
of the routed experts). A looped model's stored size is its prelude + one recurrent block +
coda; its compute per token grows with the loop count (see `sizing.flops_per_token`).

    name   total    active   dim    layers (prelude/core/coda)  experts (top-k, dim)
    1b     1.00B    0.44B    2048   2/4/2                        32 (2, 768)
    3b     2.95B    0.70B    2560   2/4/2                        64 (4, 1216)
    10b    9.92B    2.26B    4096   2/6/2                        64 (6, 1792)
    50b    49.9B    5.52B    5120   2/8/2                        128 (8, 3008)
    100b   99.4B    9.02B    7168   2/8/2                        160 (8, 3456)
    500b   502B     22.4B    7168   3/12/3                       256 (8, 7488)
    1t     1.005T   30.1B    8192   3/16/3                       384 (8, 6592)
"""

from __future__ import annotations

from .config import ConfigError, MythosConfig

_LARGE_COMMON = dict(
    max_seq_len=4096,
    attn_type="mla",
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    n_loops=8,
    train_loops_mean=8.0,
    train_loops_max=32,
    bptt_depth=8,
    lora_rank=16,
    rope_theta=500000.0,
    init_std=0.006,
)


def _large(vocab: int, dim: int, heads: int, pre: int, core: int, coda: int, experts: int, top_k: int,
           shared: int, expert_dim: int, q_rank: int) -> MythosConfig:
    return MythosConfig(vocab_size=vocab, dim=dim, n_heads=heads, n_kv_heads=max(1, heads // 4),
                        prelude_layers=pre, core_layers=core, coda_layers=coda, n_experts=experts, top_k=top_k,
                        n_shared_experts=shared, expert_dim=expert_dim, q_lora_rank=q_rank, loop_emb_dim=dim // 8,
                        **_LARGE_COMMON)


def _debug() -> MythosConfig:
    """dim 256, 1/1/1 layers, 8 experts: ~3.4M parameters, trains on 2 CPU cores in minutes."""
    return MythosConfig()


def _small() -> MythosConfig:
    """dim 512, the benchmark's second size (MoE with 16 experts, GQA)."""
    return MythosConfig(dim=512, n_heads=8, n_kv_heads=2, prelude_layers=1, core_layers=2, coda_layers=1,
                        n_experts=16, top_k=2, n_shared_experts=1, expert_dim=512, loop_emb_dim=64,
                        max_seq_len=1024, lora_rank=16)


_BUILDERS = {
    "debug": _debug,
    "small": _small,
    "1b": lambda: _large(65536, 2048, 16, 2, 4, 2, 32, 2, 1, 768, 0),
    "3b": lambda: _large(65536, 2560, 20, 2, 4, 2, 64, 4, 1, 1216, 1024),
    "10b": lambda: _large(65536, 4096, 32, 2, 6, 2, 64, 6, 2, 1792, 1536),
    "50b": lambda: _large(65536, 5120, 40, 2, 8, 2, 128, 8, 2, 3008, 1536),
    "100b": lambda: _large(129280, 7168, 56, 2, 8, 2, 160, 8, 1, 3456, 1536),
    "500b": lambda: _large(129280, 7168, 56, 3, 12, 3, 256, 8, 1, 7488, 1536),
    "1t": lambda: _large(129280, 8192, 64, 3, 16, 3, 384, 8, 1, 6592, 1536),
}

VARIANTS: tuple[str, ...] = tuple(_BUILDERS)
NOMINAL_SIZES = {"1b": 1e9, "3b": 3e9, "10b": 10e9, "50b": 50e9, "100b": 100e9, "500b": 500e9, "1t": 1e12}


def get_variant(name: str, **overrides) -> MythosConfig:
    """The named size's config, with field overrides applied (validated)."""
    if name not in _BUILDERS:
        raise ConfigError("", f"unknown model variant {name!r}; allowed: {', '.join(VARIANTS)}")
    cfg = _BUILDERS[name]()
    return cfg.replace(**overrides) if overrides else cfg
