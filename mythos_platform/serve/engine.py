"""The generation engine behind the Serve replicas: iteration-level batching of mixed loop depths.

    engine = Engine.load("runs/debug/export/debug", max_rows=16)   # plain PyTorch, no Ray
    engine.start()                                                  # the stepping thread
    queue = await engine.submit([engine.job(prompt_ids, max_tokens=16, n_loops=8)])
    async for i, event in events(queue, 1): ...                     # Delta(text) ... Finished(...)

Scheduling. Every request takes a row of a `mythos.slot_cache.SlotCache` (a KV cache with a length
per row) when one is free (`max_rows`). The engine thread repeats one step: drop the rows of
clients that went away, prefill the requests that arrived (each alone, writing its row of the
cache; its first token comes from the prefill), then run one decode pass over every running row:
one token each, each at its own position, with its own loop count, adaptive-exit threshold and
sampling settings. A row that finishes leaves at once and its row of the cache takes the next
request; a new request joins at the next step instead of waiting for a batch to finish. This is
what mainstream LLM servers call continuous (iteration-level) batching (Orca, Yu et al., OSDI 2022;
vLLM), with one thing they cannot do: rows of different depth share one forward pass. The rows are
kept deepest first, and a loop iteration runs only the rows whose count (or convergence) has not
ended (`Mythos.forward` with a loop count per row), so those are a prefix of the batch and of the
cache, and a shallow row is not computed past its own depth: rows of 1 and of 16 loops together
take the 16-loop row's iterations in time, not 17.

Exactness. A row attends only to its own positions and takes part only in its own iterations, so
its greedy output equals what it gets alone (tested for mixed loop counts, exits and prompt
lengths). A seeded sampling request draws from its own generator, so its output depends only on
its seed; unseeded ones draw from the process's generator.

Logprobs. A job with `logprobs` gets, with its events, each generated token's logprob and the k most
likely tokens (`logprobs.TokenLogprob`, from the logits the token was chosen from); a job with
`score_prompt_from` (echo) also gets the prompt's, from the prefill's logits, first. A job of
`max_tokens=0` only scores its prompt: it finishes after the prefill.

Stop strings are matched on the decoded text (byte-level tokens: a stop string may span tokens);
text that could still be the start of a stop string, or an incomplete UTF-8 character, is held
back until the next token decides (`mythos.stop.StopTracker`, shared with `generate` and the
lm-eval adapter).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from mythos.checkpoint import load_pretrained
from mythos.generation import SamplingParams, sample_next
from mythos.slot_cache import SlotCache
from mythos.stop import StopTracker
from mythos.tokenizer import load_tokenizer_from_folder

from .jobs import Delta, Failed, Finished, Job, events
from .logprobs import TokenLogprob, prompt_logprobs, step_logprobs

log = logging.getLogger("mythos")

__all__ = ["Delta", "Engine", "EngineStats", "Failed", "Finished", "Job", "events"]


@dataclass
class EngineStats:
    """What the engine has done (read by /health, the metrics route and the benchmark)."""

    requests: int = 0
    """Jobs admitted (prefilled)."""
    tokens: int = 0
    """Tokens generated."""
    prompt_tokens: int = 0
    steps: int = 0
    """Decode passes."""
    decoded: int = 0
    """Tokens from decode passes (rows summed over passes; the others come from prefills)."""
    busy_s: float = 0.0
    """Seconds spent in forward passes, prefills included."""
    occupancy: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    """(monotonic time, rows in the pass) of the recent decode steps."""
    observers: list[Callable[[str, float], None]] = field(default_factory=list)
    """Called as observer(event, value): ('step_rows', n), ('step_s', s), ('prefill_s', s),
    ('request_loops', mean loops), ('tokens', n), ('prompt_tokens', n) (the metrics route listens)."""

    def note(self, event: str, value: float) -> None:
        for observe in self.observers:
            observe(event, value)


class Engine:
    """One model and tokenizer in one process, and the rows it is generating."""

    def __init__(self, model, tokenizer, model_id: str = "mythos", max_rows: int = 8) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.cfg = model.cfg
        self.eos_id = tokenizer.eos_id
        self.device = next(model.parameters()).device
        self.max_rows = max_rows
        self.cache = SlotCache(max_rows, self.cfg.max_seq_len)
        self.rows: list[_Row] = []
        """The running rows, deepest first; rows[i] holds cache row i (see `_open_row`)."""
        self.stats = EngineStats()
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def load(cls, folder: str | os.PathLike, model_id: str | None = None, device: str = "cpu",
             torch_threads: int | None = None, max_rows: int = 8) -> "Engine":
        """Weights from model.safetensors only (`mythos.checkpoint.load_pretrained`)."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        folder = Path(folder)
        model = load_pretrained(folder, device=device)
        return cls(model, load_tokenizer_from_folder(folder), model_id or folder.name, max_rows)

    def job(self, prompt_ids: list[int], max_tokens: int, **kw) -> Job:
        kw.setdefault("n_loops", self.cfg.n_loops)
        return Job(list(prompt_ids), max_tokens, **kw)

    def check_health(self) -> None:
        """Raise if the model cannot run (non-finite weights) or the stepping thread has died."""
        p = next(self.model.parameters())
        if not torch.isfinite(p).all():
            raise RuntimeError("model weights are not finite")
        if not self.alive():
            raise RuntimeError("the engine's stepping thread has stopped")

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    # --- driving the engine -------------------------------------------------------------------
    def add(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (thread-safe); they are prefilled at the next step with a free row."""
        for j in jobs:
            if j._submitted:
                raise ValueError("a job can be submitted once (make a new one with Engine.job)")
            if not j.prompt_ids:
                raise ValueError("prompt is empty: need at least one token")
            if len(j.prompt_ids) + j.max_tokens > self.cfg.max_seq_len:
                raise ValueError(f"prompt ({len(j.prompt_ids)} tokens) + max_tokens ({j.max_tokens}) exceeds "
                                 f"max_seq_len={self.cfg.max_seq_len}")
        for j in jobs:
            j._submitted = True
        with self._wake:
            self._waiting.extend(jobs)
            self._wake.notify()

    def run(self, jobs: Sequence[Job]) -> None:
        """Generate for the jobs in this thread, stepping until all have finished (tests, benchmarks;
        not while the stepping thread runs). Jobs already added are not added again."""
        if self._thread is not None:
            raise RuntimeError("the engine's thread is running: use submit()")
        self.add([j for j in jobs if not j._submitted])
        while not all(j.done for j in jobs):
            self.step()

    def start(self) -> None:
        """Start the stepping thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="mythos-engine", daemon=True)
            self._thread.start()

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def stop(self) -> None:
        self._stopping = True
        with self._wake:
            self._wake.notify()

    async def submit(self, jobs: Sequence[Job]) -> asyncio.Queue:
        """Queue the jobs; returns the queue their events arrive on as (job index, event): Delta...,
        then Finished or Failed for each job."""
        self.start()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for i, j in enumerate(jobs):
            j._loop, j._queue, j._index = loop, queue, i
        self.add(jobs)
        return queue

    def _serve(self) -> None:
        while not self._stopping:
            with self._wake:
                while not self._waiting and not self.rows and not self._stopping:
                    self._wake.wait()
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a failing step fails its rows (step does), never the thread
                log.exception("engine step failed")

    # --- one step -------------------------------------------------------------------------------
    def step(self) -> None:
        """Drop the rows of clients that went away, prefill what arrived (while rows are free), one
        decode pass over every running row."""
        for row in [r for r in self.rows if r.job.cancelled]:
            row.finish("cancelled", "")
            self._release(row)
        while len(self.rows) < self.max_rows:
            with self._wake:
                job = self._waiting.popleft() if self._waiting else None
            if job is None:
                break
            if job.cancelled:
                continue
            self._prefill(job)
        if self.rows:
            self._decode()

    @torch.inference_mode()
    def _prefill(self, job: Job) -> None:
        slot = self._open_row(job.n_loops)
        t0 = time.perf_counter()
        try:
            out = self.model(torch.tensor([job.prompt_ids], device=self.device), cache=self.cache.batch([slot]),
                             n_loops=torch.tensor([job.n_loops], device=self.device),
                             exit_threshold=_thresholds([job], self.device),
                             last_logits_only=job.score_prompt_from is None)
        except Exception as exc:  # a failing request fails alone
            log.exception("prefill failed for a prompt of %d tokens", len(job.prompt_ids))
            self._close_row(slot)
            job.emit(Failed(exc))
            return
        seconds = time.perf_counter() - t0
        self.stats.busy_s += seconds
        self.stats.requests += 1
        self.stats.prompt_tokens += len(job.prompt_ids)
        self.stats.note("prefill_s", seconds)
        self.stats.note("prompt_tokens", len(job.prompt_ids))
        row = _Row(job, slot, StopTracker(self.tokenizer.decode, job.stop,
                                          () if job.ignore_eos or self.eos_id is None else (self.eos_id,)),
                   self.device)
        if job.score_prompt_from is not None:
            row.entries += prompt_logprobs(out.logits[0], job.prompt_ids, job.score_prompt_from, job.logprobs or 0)
        loops = int(out.loops_used[0])
        self.rows[slot] = row
        if job.max_tokens == 0:  # echo only: the prompt was scored by the prefill
            row.loops = loops
            row.finish("length", "")
            self._release(row)
            return
        self._take([row], out.logits[:, -1], [loops])

    @torch.inference_mode()
    def _decode(self) -> None:
        rows = list(self.rows)  # deepest first, in cache rows 0..n-1: every iteration runs a prefix
        t0 = time.perf_counter()
        try:
            out = self.model(torch.tensor([[r.last] for r in rows], device=self.device),
                             cache=self.cache.batch(range(len(rows))),
                             n_loops=torch.tensor([r.job.n_loops for r in rows], device=self.device),
                             exit_threshold=_thresholds([r.job for r in rows], self.device), last_logits_only=True)
        except Exception as exc:  # noqa: BLE001 - the rows of this pass fail, the engine goes on
            log.exception("decode step failed for %d rows", len(rows))
            for r in rows:
                r.job.emit(Failed(exc))
                self._release(r)
            return
        seconds = time.perf_counter() - t0
        s = self.stats
        s.busy_s += seconds
        s.steps += 1
        s.decoded += len(rows)
        s.occupancy.append((time.monotonic(), len(rows)))
        s.note("step_s", seconds)
        s.note("step_rows", len(rows))
        self._take(rows, out.logits[:, -1], out.loops_used.tolist())

    def _take(self, rows: list["_Row"], logits: torch.Tensor, loops: list[int]) -> None:
        """Choose each row's next token from its logits (B, V), send it on, retire finished rows."""
        tokens = _sample(rows, logits)
        k = max((r.job.logprobs for r in rows if r.job.logprobs is not None), default=None)
        entries = step_logprobs(logits, tokens, k) if k is not None else [None] * len(rows)
        self.stats.tokens += len(rows)
        self.stats.note("tokens", len(rows))
        for row, token, used, entry in zip(rows, tokens, loops, entries):
            if row.add(token, used, entry) or self.cache.lengths[row.slot] >= self.cache.capacity:
                if not row.finished:
                    row.finish("length", row.tracker.flush())
                self._release(row)

    def _release(self, row: "_Row") -> None:
        if row.finished and row.job.max_tokens:
            self.stats.note("request_loops", row.loops / max(row.n, 1))
        if row.slot < len(self.rows) and self.rows[row.slot] is row:
            self._close_row(row.slot)

    # --- keeping the rows in order ----------------------------------------------------------------
    # The rows sit in cache rows 0..n-1 ordered deepest first, so that a decode pass, and each loop
    # iteration in it (the rows whose count has not ended), reads a contiguous block of the cache:
    # buffer slices instead of gathered copies of every row's keys at every iteration. A row that
    # arrives or leaves moves at most one row per distinct loop count (`SlotCache.move`).
    def _open_row(self, depth: int) -> int:
        """Make a free cache row at the place of a new row of `depth` loops; returns it."""
        rows = self.rows
        rows.append(None)  # the hole, at the end
        hole = len(rows) - 1
        while hole > 0 and rows[hole - 1].job.n_loops < depth:  # a shallower class sits before the hole
            first = hole - 1
            while first > 0 and rows[first - 1].job.n_loops == rows[hole - 1].job.n_loops:
                first -= 1
            self._move(first, hole)  # the class's first row to its end: the hole moves up a class
            hole = first
        return hole

    def _close_row(self, slot: int) -> None:
        """Free cache row `slot` and close the gap: the last row of each later class moves up."""
        rows = self.rows
        rows[slot] = None
        self.cache.release(slot)
        hole = slot
        while hole < len(rows) - 1:
            depth = rows[hole + 1].job.n_loops
            last = hole + 1
            while last + 1 < len(rows) and rows[last + 1].job.n_loops == depth:
                last += 1
            self._move(last, hole)
            hole = last
        rows.pop()

    def _move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)
        row = self.rows[dst] = self.rows[src]
        self.rows[src] = None
        row.slot = dst


def _thresholds(jobs: Sequence[Job], device: torch.device) -> torch.Tensor | None:
    """Per-row adaptive-exit thresholds (-1: that row runs all its loops), or None when no row exits."""
    if all(j.exit_threshold is None for j in jobs):
        return None
    return torch.tensor([-1.0 if j.exit_threshold is None else j.exit_threshold for j in jobs], device=device)


def _sample(rows: list["_Row"], logits: torch.Tensor) -> list[int]:
    """The next token of each row: greedy rows together, sampling rows each with its own settings."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for i, row in enumerate(rows):
        j = row.job
        if j.temperature == 0:
            out.append(greedy[i])
            continue
        params = SamplingParams(temperature=j.temperature, top_k=j.top_k, top_p=j.top_p)
        out.append(int(sample_next(logits[i:i + 1], params, row.generator)[0]))
    return out


class _Row:
    """One job while it generates: its cache row, the token to feed next, text held back, counts."""

    def __init__(self, job: Job, slot: int, tracker: StopTracker, device: torch.device) -> None:
        self.job, self.slot, self.tracker = job, slot, tracker
        self.generator = torch.Generator(device=device).manual_seed(job.seed) if job.seed is not None else None
        self.last = 0
        """The token generated last (the next decode pass's input)."""
        self.held = ""
        """Text not sent yet (a job that does not stream gets all of it with Finished)."""
        self.entries: list[TokenLogprob] = []
        self.n = 0
        self.loops = 0
        self.finished = False

    def add(self, token: int, loops_used: int, entry: TokenLogprob | None) -> bool:
        """Take the step's token; True once the job has finished (Finished sent)."""
        job = self.job
        self.loops += loops_used
        self.n += 1
        self.last = token
        if entry is not None and job.logprobs is not None:  # the step's top-k, cut to the job's own k
            self.entries.append(TokenLogprob(entry.token, entry.logprob, entry.top[:job.logprobs]))
        text, stopped = self.tracker.add(token)  # EOS (unless ignore_eos) or a stop string
        if stopped:
            self.finish("stop", text)
            return True
        if self.n >= job.max_tokens:
            self.finish("length", text + self.tracker.flush())
            return True
        if job.stream and (text or self.entries):
            job.emit(Delta(self.held + text, self.entries))
            self.held, self.entries = "", []
        else:
            self.held += text
        return False

    def finish(self, reason: str, text: str) -> None:
        self.finished = True
        self.job.emit(Finished(reason, self.n, self.loops / max(self.n, 1), self.held + text, self.entries))
