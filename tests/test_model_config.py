import json

import pytest

from mythos import ConfigError, MythosConfig, get_variant, VARIANTS


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_heads": 7}, "n_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"n_experts": 4, "top_k": 5}, "top_k"),
        ({"attn_type": "mla", "qk_rope_head_dim": 15}, "qk_rope_head_dim"),
        ({"attn_type": "linear"}, "attn_type"),
        ({"act_threshold": 1.5}, "act_threshold"),
        ({"loop_emb_dim": 33}, "loop_emb_dim"),
        ({"train_loops_mean": 40.0}, "train_loops_mean"),
        ({"injection_init_decay": 1.0}, "injection_init_decay"),
        ({"loop_distribution": "normal"}, "loop_distribution"),
        ({"dim": 0}, "dim"),
        ({"attn_type": "mla", "moda": True}, "moda"),
        ({"n_experts": 8, "n_groups": 3}, "n_groups"),
        ({"n_experts": 8, "n_groups": 4, "topk_groups": 5}, "topk_groups"),
        ({"n_experts": 8, "n_groups": 4, "topk_groups": 1, "top_k": 3}, "top_k"),
        ({"router_score": "relu"}, "router_score"),
        ({"route_scale": 0.0}, "route_scale"),
        ({"n_groups": 0}, "n_groups"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"^MythosConfig\.{field}: got "):
        MythosConfig(**overrides)


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match="n_layerz"):
        MythosConfig.from_dict({**MythosConfig().to_dict(), "n_layerz": 3})


def test_json_round_trip(tmp_path):
    cfg = get_variant("1b")
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert MythosConfig.from_json(path) == cfg
    assert MythosConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(path.read_text())["attn_type"] == "mla"


def test_variants_known_and_unknown():
    assert {"debug", "1b", "3b", "10b", "50b", "100b", "500b", "1t"} <= set(VARIANTS)
    with pytest.raises(ConfigError, match="unknown model variant '2b'"):
        get_variant("2b")
    assert get_variant("debug", n_loops=7).n_loops == 7


def test_group_and_moda_messages_say_what_is_allowed():
    with pytest.raises(ConfigError, match=r"n_groups: got 3; must divide n_experts=8"):
        MythosConfig(n_experts=8, n_groups=3)
    with pytest.raises(ConfigError, match=r"topk_groups: got 5; must be in 1..n_groups=4"):
        MythosConfig(n_experts=8, n_groups=4, topk_groups=5)
    with pytest.raises(ConfigError, match=r"top_k: got 3; must be <= the 2 experts reachable in topk_groups=1"):
        MythosConfig(n_experts=8, n_groups=4, topk_groups=1, top_k=3)
    with pytest.raises(ConfigError, match=r"moda: got True; MoDA is supported with attn_type='gqa' only, not 'mla'"):
        MythosConfig(attn_type="mla", moda=True)
    # the limits themselves are valid: top_k equal to the reachable experts, every group kept
    assert MythosConfig(n_experts=8, n_groups=4, topk_groups=1, top_k=2).top_k == 2
    assert MythosConfig(n_experts=8, n_groups=4, topk_groups=4, top_k=8, moda=True).moda
    # group settings are not checked without routed experts (n_experts = 0: a dense FFN)
    assert MythosConfig(n_experts=0, n_groups=3).n_groups == 3


@pytest.mark.parametrize("field", ["moda", "router_score", "n_groups", "topk_groups", "route_scale"])
def test_new_fields_carry_their_reference_text(field):
    """Field docstrings are the config reference (and the JSON schema's descriptions)."""
    text = MythosConfig.model_json_schema()["properties"][field].get("description", "")
    assert len(text) > 40
