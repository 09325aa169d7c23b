"""The tokenizer routes of vLLM's API, which lm-eval's `remote` tokenizer backend calls (and picks by
itself, `tokenizer_backend=auto`, when they answer), so that a client counts tokens exactly as the
server does:

    GET  /tokenizer_info   {"eos_token", "eos_token_id", "bos_token", "pad_token", "prefix_token_id",
                            "model_max_length", "vocab_size", "tokenizer_class", "chat_template"}
    POST /tokenize         {"prompt": str} or {"messages": [...]}, "add_special_tokens" (default true: the
                           prefix token first, as the completion routes run it) -> {"tokens", "count",
                           "max_model_len"}
    POST /detokenize       {"tokens": [int]} -> {"prompt": str}

`eos_token` is the end-of-text token's text, which the tokenizer turns back into its id; the
byte-level tokenizer's special tokens have no text, so it is null there (lm-eval then needs
`custom_prefix_token_id=<eos_token_id>` for requests with an empty context; docs/serving.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .admission import Admission
from .schemas import APIError, DetokenizeRequest, TokenizeRequest


def eos_text(folder: str | Path) -> str | None:
    """The end-of-text token's text as the model folder's tokenizer_config.json records it (Hugging Face
    tokenizers); None for the byte-level tokenizer, whose special tokens have no text."""
    path = Path(folder, "tokenizer_config.json")
    if not path.exists():
        return None
    value = json.loads(path.read_text()).get("eos_token")
    return value if isinstance(value, str) and value else None


def tokenizer_info(admit: Admission, eos_token: str | None) -> dict[str, Any]:
    engine = admit.engine
    tok = engine.tokenizer
    return {"tokenizer_class": f"mythos-{getattr(tok, 'kind', 'tokenizer')}", "eos_token": eos_token,
            "eos_token_id": tok.eos_id, "bos_token": None, "pad_token": None, "pad_token_id": tok.pad_id,
            "prefix_token_id": admit.prefix_id, "model_max_length": engine.cfg.max_seq_len,
            "vocab_size": engine.cfg.vocab_size, "chat_template": admit.template.source}


def tokenize(admit: Admission, req: TokenizeRequest) -> dict[str, Any]:
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "prompt: give either prompt or messages", "prompt", "invalid_value")
    text = req.prompt if req.prompt is not None else admit.render(req.messages, req.add_generation_prompt)
    ids = list(admit.engine.tokenizer.encode(text))
    if req.add_special_tokens:
        ids = admit.prefixed(ids)[0]
    return {"tokens": ids, "count": len(ids), "max_model_len": admit.engine.cfg.max_seq_len}


def detokenize(admit: Admission, req: DetokenizeRequest) -> dict[str, Any]:
    V = admit.engine.cfg.vocab_size
    bad = next((j for j, t in enumerate(req.tokens) if not 0 <= t < V), None)
    if bad is not None:
        raise APIError(400, f"tokens[{bad}]: token id {req.tokens[bad]} is outside the vocabulary (0..{V - 1})",
                       "tokens", "invalid_value")
    return {"prompt": admit.engine.tokenizer.decode(req.tokens)}
