"""Tokenizers: a byte-level one that needs no files, and Hugging Face `tokenizers`.

Both expose the same small surface (`encode`, `decode`, `eos_id`, `pad_id`, `vocab_size`,
`save`), and a model folder records which one it was trained with in
`tokenizer_config.json` (plus `tokenizer.json` for a Hugging Face tokenizer), so a
checkpoint folder is self-contained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

TOKENIZER_CONFIG = "tokenizer_config.json"
HF_TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes 0..255, then PAD, BOS and EOS. Vocabulary of 259 ids."""

    kind = "byte"

    def __init__(self) -> None:
        self.pad_id = 256
        self.bos_id = 257
        self.eos_id = 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder, TOKENIZER_CONFIG).write_text(json.dumps({"type": "byte"}, indent=2))

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|padding|>")


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` loaded from a tokenizer.json file or hub name."""

    kind = "hf"

    def __init__(self, tokenizer, source: str, eos_token: str | None = None) -> None:
        self._tok = tokenizer
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find(eos_token, _EOS_CANDIDATES, "eos_token")
        pad = self._find(None, _PAD_CANDIDATES, "pad_token", required=False)
        self.pad_id = self.eos_id if pad is None else pad
        self.bos_id = None

    def _find(self, name: str | None, candidates: Sequence[str], what: str, required: bool = True):
        names = [name] if name else list(candidates)
        for n in names:
            i = self._tok.token_to_id(n)
            if i is not None:
                return i
        if required:
            raise ValueError(
                f"tokenizer {self.source!r} has no {what}: tried {names}; pass {what}=<token> explicitly"
            )
        return None

    @classmethod
    def from_file(cls, path: str | os.PathLike, eos_token: str | None = None) -> "HFTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), str(path), eos_token)

    @classmethod
    def from_hub(cls, name: str, eos_token: str | None = None) -> "HFTokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_pretrained(name)
        except Exception as exc:  # network errors come in many types
            raise OSError(
                f"could not load tokenizer {name!r} from the Hugging Face hub ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Offline, pass a local tokenizer.json "
                "path or use the byte tokenizer ('byte')."
            ) from exc
        return cls(tok, name, eos_token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, folder: str | os.PathLike) -> None:
        self._tok.save(str(Path(folder, HF_TOKENIZER_FILE)))
        eos = self._tok.id_to_token(self.eos_id)
        Path(folder, TOKENIZER_CONFIG).write_text(
            json.dumps({"type": "hf", "file": HF_TOKENIZER_FILE, "eos_token": eos}, indent=2)
        )

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str = "byte", eos_token: str | None = None) -> Tokenizer:
    """`"byte"`, a path to a tokenizer.json (or a folder holding one), or a hub name."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        if (path / TOKENIZER_CONFIG).exists():
            return load_tokenizer_from_folder(path)
        path = path / HF_TOKENIZER_FILE
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        return HFTokenizer.from_file(path, eos_token)
    return HFTokenizer.from_hub(spec, eos_token)


def load_tokenizer_from_folder(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved beside a model; a folder without one gets the byte tokenizer."""
    cfg_path = Path(folder, TOKENIZER_CONFIG)
    if not cfg_path.exists():
        return ByteTokenizer()
    cfg = json.loads(cfg_path.read_text())
    kind = cfg.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer.from_file(Path(folder, cfg.get("file", HF_TOKENIZER_FILE)), cfg.get("eos_token"))
    raise ValueError(f"{cfg_path}: unknown tokenizer type {kind!r}; allowed: 'byte', 'hf'")
