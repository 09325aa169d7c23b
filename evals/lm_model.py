"""The lm-eval model `mythos`: a Mythos checkpoint scored at a chosen inference loop count.

    lm_eval run --model mythos --model_args pretrained=runs/debug/export/debug,n_loops=8 ...
        (through `python -m evals.cli`, which registers the model first)
    MythosLM(pretrained="models:/mythos-rdt@champion", n_loops=16, exit_threshold=0.03)

Model arguments:
    pretrained      a model folder (config.json + model.safetensors) or an MLflow URI
                    (models:/<name>@<alias>, models:/<name>/<version>, runs:/<id>/model)
    tracking_uri    the MLflow store that holds a models:/ or runs:/ reference (default: MLflow's)
    n_loops         recurrent iterations per forward pass (default: the config's n_loops)
    exit_threshold  adaptive exit: stop looping once every position's relative state change is
                    below it (or every position has halted, with ACT); n_loops is then the cap.
    exit_on         "all" positions must converge (default), or only the "last" of each sequence,
                    the one a one-token continuation is scored from (loglikelihood requests)
                    `mean_loops_used` reports what was actually run. None = always n_loops.
    batch_size      sequences per forward pass ("auto" = 32)
    device, dtype   "cpu" / "cuda" / "cuda:0"; "float32" / "bfloat16" / "float16" / "auto"
                    (bf16 on CUDA, fp32 otherwise)
    prefix_token    prepend the end-of-text token to every context (default true): training
                    documents follow an EOS separator, so this is the start-of-document signal
    max_gen_toks    default generation budget when a task gives none (32)
    progress        progress bars (default true)

Request semantics (lm-eval's, made exact):
    loglikelihood          continuation tokens are those of the full string (context + continuation)
                           beyond the context's tokens; one forward pass per distinct input, so the
                           choices of a multiple-choice question that share the input share it.
    loglikelihood_rolling  windows of up to max_seq_len predicted tokens, each conditioned on the
                           preceding tokens (lm-eval's rolling windows); the first token is predicted
                           from the end-of-text token.
    generate_until         greedy (or sampled, with do_sample) decoding with the KV cache until a
                           stop sequence, the end-of-text token or max_gen_toks.

With an adaptive exit the loop stops for a whole batch at once, so batches then hold only
sequences of one length (no padding positions take part in the convergence test).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mythos.checkpoint import load_pretrained
from mythos.generation import SamplingParams, stream
from mythos.recurrent import EXIT_ON
from mythos.stop import StopTracker
from mythos.tokenizer import load_tokenizer_from_folder

log = logging.getLogger("mythos.evals")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_BATCH = 32
GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed"}


def _none(value: Any) -> Any:
    """lm-eval passes model_args as parsed strings: 'none' / '' mean None."""
    return None if isinstance(value, str) and value.strip().lower() in ("", "none", "null") else value


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").lower().replace("torch.", "")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


@register_model("mythos")
class MythosLM(TemplateLM):
    """lm-eval adapter for Mythos checkpoints; see the module docstring for the model arguments."""

    def __init__(
        self,
        pretrained: str | None = None,
        n_loops: int | None = None,
        exit_threshold: float | None = None,
        exit_on: str = "all",
        batch_size: int | str | None = DEFAULT_BATCH,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        tracking_uri: str | None = None,
        prefix_token: bool = True,
        max_gen_toks: int = 32,
        progress: bool = True,
        model: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(
                f"mythos: unknown model argument(s) {sorted(unknown)}; allowed: pretrained, n_loops, exit_threshold, "
                "exit_on, batch_size, max_batch_size, device, dtype, tracking_uri, prefix_token, max_gen_toks, "
                "progress")
        pretrained, tracking_uri = _none(pretrained), _none(tracking_uri)
        device = _none(device) or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("mythos: device %r requested but CUDA is not available; using the CPU", device)
            device = "cpu"
        self._device = torch.device(device)
        self.source = str(pretrained) if pretrained is not None else "<in-memory model>"
        if model is None:
            if pretrained is None:
                raise ValueError("mythos: give model_args pretrained=<model folder | models:/name@alias>")
            from mythos.model_ref import resolve_model

            folder = resolve_model(str(pretrained), tracking_uri=tracking_uri)
            model = load_pretrained(folder, device=self._device, dtype=resolve_dtype(dtype, self._device))
            tokenizer = tokenizer or load_tokenizer_from_folder(folder)
            self.model_dir: Path | None = Path(folder)
        else:
            model = model.to(self._device)
            self.model_dir = None
        if tokenizer is None:
            raise ValueError("mythos: an in-memory model needs its tokenizer (tokenizer=...)")
        self.model = model.eval()
        self.tok = tokenizer
        self.cfg = model.cfg
        n_loops = _none(n_loops)
        self.n_loops = int(n_loops) if n_loops is not None else int(self.cfg.n_loops)
        if self.n_loops < 1:
            raise ValueError(f"mythos: n_loops must be >= 1, got {n_loops!r}")
        exit_threshold = _none(exit_threshold)
        self.exit_threshold = float(exit_threshold) if exit_threshold is not None else None
        self.exit_on = str(exit_on)
        if self.exit_on not in EXIT_ON:
            raise ValueError(f"mythos: exit_on must be 'all' or 'last', got {exit_on!r}")
        if self.exit_threshold is not None and self.exit_threshold < 0:
            raise ValueError(f"mythos: exit_threshold must be >= 0, got {exit_threshold!r}")
        batch_size = _none(batch_size)
        if batch_size is None or str(batch_size).startswith("auto"):
            batch_size = max_batch_size or DEFAULT_BATCH
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"mythos: batch_size must be >= 1, got {batch_size!r}")
        self.use_prefix = _as_bool(prefix_token)
        self.max_gen_toks = int(max_gen_toks)
        self.progress = _as_bool(progress)
        self.reset_loop_stats()

    # ------------------------------------------------------------------ lm-eval plumbing
    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def max_length(self) -> int:
        return int(self.cfg.max_seq_len)

    @property
    def tokenizer_name(self) -> str:
        return f"mythos-{getattr(self.tok, 'kind', 'tokenizer')}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tok.decode(tokens)

    # ------------------------------------------------------------------ loop accounting
    def reset_loop_stats(self) -> None:
        self._loop_sum = 0.0
        self._loop_rows = 0

    def _count_loops(self, loops_used: int, rows: int) -> None:
        self._loop_sum += loops_used * rows
        self._loop_rows += rows

    @property
    def mean_loops_used(self) -> float | None:
        """Loop iterations actually run per forward pass (prefill or decode step), averaged over
        sequences; equals n_loops without an adaptive exit. None before any request."""
        return self._loop_sum / self._loop_rows if self._loop_rows else None

    # ------------------------------------------------------------------ batching
    def _context(self, tokens: Sequence[int]) -> list[int]:
        return ([self.prefix_token_id] if self.use_prefix else []) + list(tokens)

    def _batches(self, seqs: Sequence[Sequence[int]]) -> list[list[int]]:
        """Indices of `seqs` in batches, longest first; one length per batch with an adaptive exit."""
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        if self.exit_threshold is None:
            return [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        by_len: dict[int, list[int]] = defaultdict(list)
        for i in order:
            by_len[len(seqs[i])].append(i)
        return [group[i: i + self.batch_size] for group in by_len.values()
                for i in range(0, len(group), self.batch_size)]

    @torch.inference_mode()
    def _forward(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Right-padded batch -> logits (B, S, V). Causal attention: padding after a sequence
        never changes its logits."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), int(self.tok.pad_id), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        out = self.model(ids.to(self._device), n_loops=self.n_loops, exit_threshold=self.exit_threshold,
                         exit_on=self.exit_on)
        self._count_loops(out.loops_used, len(seqs))
        return out.logits

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        new_reqs = []
        for context, continuation in [req.args for req in requests]:
            if context == "":
                # the continuation is predicted from the end-of-text token (always, prefix or not)
                ctx, cont = [self.prefix_token_id], self.tok_encode(continuation)
            else:
                ctx, cont = self._encode_pair(context, continuation)
                ctx = self._context(ctx)
            new_reqs.append(((context, continuation), ctx, cont))
        return self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [(cache key or None, context tokens, continuation tokens)] -> [(logprob, is_greedy)]."""
        L = self.max_length
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        users: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            cont = list(cont)
            if not cont:
                results[i] = (0.0, True)
                continue
            if len(cont) > L:
                raise ValueError(f"mythos: a continuation of {len(cont)} tokens exceeds max_seq_len={L}")
            full = (list(ctx) + cont)[-(L + 1):]
            users[tuple(full[:-1])].append((i, cont))
        inputs = list(users)
        quiet = disable_tqdm or not self.progress or len(inputs) < 2
        for batch in tqdm(self._batches(inputs), desc="mythos loglikelihood", disable=quiet):
            seqs = [inputs[b] for b in batch]
            logits = self._forward(seqs)
            for row, seq in enumerate(seqs):
                n = len(seq)
                for i, cont in users[seq]:
                    k = len(cont)
                    logp = logits[row, n - k: n].float().log_softmax(-1)  # (k, V)
                    target = torch.tensor(cont, device=logp.device)
                    ll = float(logp.gather(-1, target[:, None]).sum())
                    greedy = bool((logp.argmax(-1) == target).all())
                    results[i] = (ll, greedy)
                    key = requests[i][0]
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, (ll, greedy))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _sampling(self, gen_kwargs: dict, prompt_len: int) -> tuple[SamplingParams, list[str]]:
        extra = set(gen_kwargs) - GEN_KEYS
        if extra:
            log.warning("mythos: generation arguments %s are not supported and ignored", sorted(extra))
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        budget = int(gen_kwargs.get("max_gen_toks") or self.max_gen_toks)
        budget = min(budget, self.max_length - prompt_len)
        sample = _as_bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 1.0) or 0) > 0
        params = SamplingParams(
            max_new_tokens=max(budget, 1),
            temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_k=int(gen_kwargs.get("top_k") or 0) if sample else 0,
            top_p=float(gen_kwargs.get("top_p") or 1.0) if sample else 1.0,
            stop_tokens=(self.eot_token_id,),
            seed=gen_kwargs.get("seed"),
            n_loops=self.n_loops,
            exit_threshold=self.exit_threshold,
        )
        return params, [u for u in until if u]

    def _prompt(self, context: str, gen_kwargs: dict) -> list[int]:
        budget = int(gen_kwargs.get("max_gen_toks") or self.max_gen_toks)
        keep = max(1, self.max_length - min(budget, self.max_length - 1))
        tokens = self._context(self.tok_encode(context))[-keep:]
        return tokens or [self.prefix_token_id]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        bar = tqdm(total=len(requests), desc="mythos generate_until", disable=disable_tqdm or not self.progress)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            prompts = [self._prompt(requests[i].args[0], gen_kwargs) for i in indices]
            for batch in self._batches(prompts):
                seqs = [prompts[b] for b in batch]
                params, until = self._sampling(gen_kwargs, max(len(s) for s in seqs))
                for b, text in zip(batch, self._generate(seqs, params, until)):
                    i = indices[b]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], params: SamplingParams, until: list[str]) -> list[str]:
        """Decode until every row hit the end-of-text token, a stop sequence, or the budget; the text
        ends before the first stop sequence (`mythos.stop.StopTracker`)."""
        rows = [StopTracker(self.tok_decode, until, (self.eot_token_id,)) for _ in prompts]
        for step in stream(self.model, prompts, params, pad_id=int(self.tok.pad_id)):
            self._count_loops(step.loops_used, len(prompts))
            for row, t in zip(rows, step.tokens.tolist()):
                row.add(t)
            if all(row.stopped for row in rows):
                break
        return [row.text for row in rows]
