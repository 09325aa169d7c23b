import json
import struct

import pytest
import torch

from mythos import Mythos, get_variant
from mythos.checkpoint import load_pretrained, save_pretrained
from mythos.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, load_tokenizer_from_folder


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_round_trip_gives_identical_logits(tmp_path, attn):
    model = Mythos(get_variant("debug", attn_type=attn)).eval()
    with torch.no_grad():
        model.core.injection.b.mul_(1.3)
        model.moe_layers()[0].router_bias.add_(0.25)  # persistent buffer travels too
    save_pretrained(model, tmp_path, tokenizer=ByteTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    loaded = load_pretrained(tmp_path)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, n_loops=3).logits, model(x, n_loops=3).logits)
    assert torch.equal(loaded.moe_layers()[0].router_bias, model.moe_layers()[0].router_bias)
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # tying survives
    assert isinstance(load_tokenizer_from_folder(tmp_path), ByteTokenizer)


def test_weights_file_is_safetensors_not_pickle(tmp_path):
    save_pretrained(Mythos(get_variant("debug")), tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert "core.injection.b" in header
    assert b"\x80\x04" != raw[:2]  # no pickle protocol marker
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mythos"


def test_missing_folder_or_wrong_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Mythos model folder"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "config": {}}))
    with pytest.raises(ValueError, match="expected 'mythos'"):
        load_pretrained(tmp_path)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo → wörld"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256 and tok.eos_id == 258 and tok.vocab_size == 259


def test_hf_tokenizer_from_local_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["the cat sat on the mat"] * 20,
                           trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<|endoftext|>"]))
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer) and tok.eos_id == tk.token_to_id("<|endoftext|>")
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    out = tmp_path / "model"
    out.mkdir()
    tok.save(out)
    assert load_tokenizer_from_folder(out).encode("the mat") == tok.encode("the mat")


def test_missing_tokenizer_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
