"""Admission: a parsed request checked against the server's limits and turned into engine jobs.

    admit = Admission(cfg, engine, template)
    plan = admit.completion(req)      # CompletionRequest -> Plan (one Job per prompt)
    plan = admit.chat(req)            # ChatCompletionRequest -> Plan (the messages rendered by the template)

Every refusal is an APIError(400) whose message starts with the field it is about.

The prefix token. With `model.prefix_token` the tokenizer's end-of-text token goes before a prompt
(training documents follow one: it is the start-of-document signal), unless the prompt already starts
with it: a client that sends token ids with its own prefix (lm-eval's empty-context requests) gets
exactly its tokens. The prefix is not counted in `usage.prompt_tokens` and not echoed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .chat_template import ChatTemplate, ChatTemplateError
from .config import ServeConfig
from .engine import Engine, Job
from .schemas import APIError, ChatCompletionRequest, CompletionRequest, OpenAIRequest


@dataclass
class Plan:
    """What a request runs: its jobs and what its response reports."""

    jobs: list[Job]
    n_loops: int
    exit_threshold: float | None
    prompt_tokens: int
    """Tokens of the prompts as the client sent them (no prefix token)."""
    echo: list[str] | None = None
    """The prompts' text, put before each choice's text (echo)."""


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param, code)


class Admission:
    def __init__(self, cfg: ServeConfig, engine: Engine, template: ChatTemplate) -> None:
        self.limits, self.defaults, self.engine, self.template = cfg.limits, cfg.defaults, engine, template
        eos = engine.tokenizer.eos_id
        self.prefix_id = eos if cfg.model.prefix_token and eos is not None else None

    def max_prompt_tokens(self) -> int:
        return min(self.limits.max_prompt_tokens, self.engine.cfg.max_seq_len - 1)

    # --- the two routes ----------------------------------------------------------------------
    def completion(self, req: CompletionRequest) -> Plan:
        prompts = req.prompts()
        if not prompts:
            raise _bad("prompt", "the list is empty", "empty")
        if len(prompts) > self.limits.max_prompts:
            raise _bad("prompt", f"{len(prompts)} prompts, more than the limit {self.limits.max_prompts}", "too_many")
        max_tokens = self._max_tokens(req.max_tokens, echo=req.echo)
        settings = self._settings(req)
        if req.logprobs is not None and req.logprobs > self.limits.max_logprobs:
            raise _bad("logprobs", f"{req.logprobs} is more than the limit {self.limits.max_logprobs}", "out_of_range")
        single = isinstance(req.prompt, str) or (bool(req.prompt) and isinstance(req.prompt[0], int))
        encoded = [self._encode(p, "prompt" if single else f"prompt[{k}]", max_tokens) for k, p in enumerate(prompts)]
        score = req.echo and req.logprobs is not None
        jobs = [self._job(req, settings, ids, max_tokens, req.logprobs, n_prefix if score else None)
                for ids, n_prefix in encoded]
        echo = [p if isinstance(p, str) else self.engine.tokenizer.decode(p) for p in prompts] if req.echo else None
        return Plan(jobs, *settings[:2], sum(len(ids) - n for ids, n in encoded), echo)

    def chat(self, req: ChatCompletionRequest) -> Plan:
        newer = req.max_completion_tokens is not None
        field = "max_completion_tokens" if newer else "max_tokens"
        max_tokens = self._max_tokens(req.max_completion_tokens if newer else req.max_tokens, echo=False, field=field)
        settings = self._settings(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise _bad("top_logprobs", "needs logprobs: true")
        k = req.top_logprobs or 0
        if k > self.limits.max_logprobs:
            raise _bad("top_logprobs", f"{k} is more than the limit {self.limits.max_logprobs}", "out_of_range")
        ids, n_prefix = self._encode(self.render(req.messages), "messages", max_tokens, field)
        job = self._job(req, settings, ids, max_tokens, k if req.logprobs else None, None)
        return Plan([job], *settings[:2], len(ids) - n_prefix)

    def render(self, messages: Sequence, add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render([m.for_template() for m in messages], add_generation_prompt)
        except ChatTemplateError as exc:
            raise _bad("messages", str(exc)) from None

    # --- shared checks ---------------------------------------------------------------------
    def _max_tokens(self, requested: int | None, echo: bool, field: str = "max_tokens") -> int:
        lim = self.limits
        max_tokens = lim.default_max_tokens if requested is None else requested
        if max_tokens > lim.max_tokens:
            raise _bad(field, f"{max_tokens} is more than the limit {lim.max_tokens}", "out_of_range")
        if max_tokens == 0 and not echo:
            raise _bad(field, "0 only with echo: true (scoring the prompt)", "out_of_range")
        return max_tokens

    def prefixed(self, ids: list[int]) -> tuple[list[int], int]:
        """(ids with the prefix token put first unless already there, tokens added)."""
        if self.prefix_id is None or (ids and ids[0] == self.prefix_id):
            return ids, 0
        return [self.prefix_id, *ids], 1

    def _encode(self, prompt: str | list[int], where: str, max_tokens: int,
                field: str = "max_tokens") -> tuple[list[int], int]:
        """A prompt's token ids as the model runs them (prefix first) and how many tokens were added."""
        if isinstance(prompt, str):
            own = self.engine.tokenizer.encode(prompt)
        else:
            own, V = list(prompt), self.engine.cfg.vocab_size
            bad = next((j for j, t in enumerate(own) if not 0 <= t < V), None)
            if bad is not None:
                raise _bad(f"{where}[{bad}]", f"token id {own[bad]} is outside the vocabulary (0..{V - 1})")
        if not own:
            raise _bad(where, "is empty; need at least one token", "empty")
        ids, added = self.prefixed(own)
        limit, L = self.max_prompt_tokens(), self.engine.cfg.max_seq_len
        if len(ids) > limit:
            raise _bad(where, f"{len(ids)} tokens, more than the limit {limit}", "too_long")
        if len(ids) + max(max_tokens, 1) > L:
            raise _bad(field, f"{where} ({len(ids)} tokens) + {field} ({max_tokens}) exceeds the model's "
                       f"max_seq_len={L}; ask for at most {L - len(ids)}", "out_of_range")
        return ids, added

    def _settings(self, req: OpenAIRequest) -> tuple[int, float | None, list[str]]:
        n_loops = req.n_loops or self.defaults.n_loops or self.engine.cfg.n_loops
        if n_loops > self.limits.max_loops:
            raise _bad("n_loops", f"{n_loops} is more than the limit {self.limits.max_loops}", "out_of_range")
        exit_threshold = req.exit_threshold if req.exit_threshold is not None else self.defaults.exit_threshold
        stops = req.stops()
        if len(stops) > self.limits.max_stop:
            raise _bad("stop", f"{len(stops)} stop strings, more than the limit {self.limits.max_stop}", "too_many")
        if any(not s for s in stops):
            raise _bad("stop", "stop strings must not be empty", "empty")
        return n_loops, exit_threshold, stops

    @staticmethod
    def _job(req: OpenAIRequest, settings: tuple[int, float | None, list[str]], ids: list[int], max_tokens: int,
             logprobs: int | None, score_from: int | None) -> Job:
        n_loops, exit_threshold, stops = settings
        return Job(ids, max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                   n_loops=n_loops, exit_threshold=exit_threshold, stop=stops, ignore_eos=req.ignore_eos,
                   stream=req.stream, logprobs=logprobs, score_prompt_from=score_from)
