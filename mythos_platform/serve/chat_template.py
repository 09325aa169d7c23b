"""The chat template: how `/v1/chat/completions` turns messages into the prompt the model continues.

    template = ChatTemplate.load(model_folder)
    template.render([{"role": "user", "content": "Hi"}])      # -> "User: Hi\nAssistant:"

Where it comes from, first found wins:
1. `chat_template.jinja` in the model folder (the file Hugging Face tokenizers save since
   transformers 4.43), a Jinja2 template;
2. the `chat_template` string of the folder's `tokenizer_config.json` (the older Hugging Face place);
3. `DEFAULT_CHAT_TEMPLATE`, a plain transcript for models trained without one (every model this
   platform trains today: they learn plain text, so a transcript is what they can continue).

A template sees Hugging Face's variables: `messages` (a list of {"role", "content"[, "name"]}, content a
string), `add_generation_prompt` (true: end with the assistant's turn opening), `bos_token` and
`eos_token` (the special tokens' text, "" where they have none), and `raise_exception(msg)` (a 400
naming `messages`). It renders in Jinja2's sandbox (a template comes with a model, so it is data, not
code), with `trim_blocks` and `lstrip_blocks` as in transformers, so their templates render the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message.role | capitalize }}: {{ message.content }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template raised, or refused them)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, origin: str = "default", bos_token: str = "", eos_token: str = "") -> None:
        self.source, self.origin = source, origin
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source)  # a syntax error stops the replica at start
        self.specials = {"bos_token": bos_token, "eos_token": eos_token}

    @classmethod
    def load(cls, folder: str | Path, eos_token: str | None = None) -> "ChatTemplate":
        """The folder's template (see the module docstring), else the default one."""
        folder = Path(folder)
        specials = {"eos_token": eos_token or ""}
        path = folder / CHAT_TEMPLATE_FILE
        if path.exists():
            return cls(path.read_text(encoding="utf-8"), str(path), **specials)
        config = folder / "tokenizer_config.json"
        if config.exists():
            source = json.loads(config.read_text()).get("chat_template")
            if isinstance(source, str) and source:
                return cls(source, f"{config} (chat_template)", **specials)
        return cls(DEFAULT_CHAT_TEMPLATE, "default", **specials)

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self.specials)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError) as exc:
            raise ChatTemplateError(f"the chat template ({self.origin}) failed: {type(exc).__name__}: {exc}") from None
