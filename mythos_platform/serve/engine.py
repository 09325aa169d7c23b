"""The generation engine behind the Serve replicas: requests -> batches -> `mythos.generation.stream`.

    engine = Engine.load("runs/debug/export/debug")          # plain PyTorch, no Ray
    batcher = Batcher(engine, max_batch_size=8, max_wait_s=0.03)
    job = engine.job(prompt_ids, max_tokens=16, temperature=0.0, n_loops=8)
    async for event in batcher.submit([job]): ...            # Delta(text) ... Finished(reason, ...)

Batching. `Batcher` is the dynamic batching of the replica (what `@serve.batch` does, with one
difference that matters on a slow CPU): a batch is formed when the model becomes free, so every
request that queued while the previous batch ran joins the next one. `@serve.batch` closes a batch
`batch_wait_timeout_s` after its first request even while the model is still busy, so a short
timeout splits concurrent clients into several batches and a long one delays a lone client.
Here the wait (`max_wait_s`) is only spent when fewer requests are queued than the recent batches
held (the largest of the last 4): a lone client never waits, and a group of concurrent clients,
whose next requests come back one by one after their batch, is gathered into one batch again.

Grouping. One forward pass runs one loop count and one exit setting, and `stream` takes one
sampling setting per batch, so a batch is split into groups with equal (n_loops, exit_threshold,
temperature, top_p, top_k); a seeded sampling request runs alone, so its output depends only on
its seed. Greedy outputs do not depend on batch neighbours (left padding is masked); with the
adaptive exit, a group stops looping when all its rows have converged (a batch-wide decision).

Logprobs. A job with `logprobs` gets, with its events, each generated token's logprob and the k most
likely tokens (`logprobs.TokenLogprob`, computed from the logits the token was chosen from); a job
with `score_prompt_from` (echo) also gets the prompt's, from the prefill's logits at every prompt
position, first. A job of `max_tokens=0` only scores its prompt: it finishes after the prefill.

Stop strings are matched on the decoded text (byte-level tokens: a stop string may span tokens);
text that could still be the start of a stop string, or an incomplete UTF-8 character, is held
back until the next token decides (`mythos.stop.StopTracker`, shared with `generate` and the
lm-eval adapter).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Sequence

import torch

from mythos.checkpoint import load_pretrained
from mythos.generation import SamplingParams, stream
from mythos.stop import StopTracker
from mythos.tokenizer import load_tokenizer_from_folder

from .logprobs import TokenLogprob, prompt_logprobs, step_logprobs

log = logging.getLogger("mythos")


# ---------------------------------------------------------------------------------------
# Events a job sends to its request
# ---------------------------------------------------------------------------------------
@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Entries of the tokens generated since the last event (with logprobs); the echoed prompt's come
    first in the job's first event."""


@dataclass
class Finished:
    reason: str
    """'stop' (EOS or a stop string) or 'length' (max_tokens)."""
    completion_tokens: int
    loops_used: float
    """Mean loop iterations run per step (prefill included; the prefill's for a job of 0 tokens)."""
    text: str = ""
    """The last piece of text (held back until the end)."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Entries not sent yet (all of them for a job that does not stream)."""


@dataclass
class Failed:
    error: BaseException


# ---------------------------------------------------------------------------------------
# A request for one completion
# ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n_loops: int = 4
    exit_threshold: float | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    """Keep generating past EOS until max_tokens (benchmarks)."""
    logprobs: int | None = None
    """Report each generated token's logprob and the `logprobs` most likely tokens (None: none)."""
    score_prompt_from: int | None = None
    """Echo with logprobs: report the prompt tokens' logprobs from this index on (the tokens before it
    were put there by the server); None: the prompt is not scored."""
    stream: bool = True
    """Send text as it is generated (Delta events); false: all text with Finished, fewer thread hops."""
    cancelled: bool = False
    """Set by the request when its client went away; the engine then drops the row."""
    # filled in by the Batcher: where events go
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _queue: asyncio.Queue | None = field(default=None, repr=False)
    _index: int = field(default=0, repr=False)
    events: list = field(default_factory=list, repr=False)
    """Events of a job run without a Batcher (Engine.run_batch called directly)."""

    def result(self) -> tuple[str, Finished]:
        """(text, Finished) of a job run by `Engine.run_batch` directly (no Batcher)."""
        done = [e for e in self.events if not isinstance(e, Delta)]
        if not done:
            raise RuntimeError("the job has not finished")
        if isinstance(done[0], Failed):
            raise done[0].error
        return "".join(e.text for e in self.events if isinstance(e, (Delta, Finished))), done[0]

    def group_key(self) -> tuple:
        if self.temperature == 0:
            return (self.n_loops, self.exit_threshold, self.ignore_eos, 0.0, 1.0, 0, None)
        alone = id(self) if self.seed is not None else None
        return (self.n_loops, self.exit_threshold, self.ignore_eos, self.temperature, self.top_p, self.top_k, alone)

    def emit(self, event) -> None:
        if self._loop is None:
            self.events.append(event)
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (self._index, event))


class Engine:
    """One model and tokenizer in one process; `run_batch` generates for a list of jobs (blocking)."""

    def __init__(self, model, tokenizer, model_id: str = "mythos") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.cfg = model.cfg
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.eos_id = tokenizer.eos_id
        self.batches_run = 0
        self.rows_run = 0
        self.busy_s = 0.0
        """Seconds spent generating (for the benchmark: model time vs time in Serve)."""

    @classmethod
    def load(cls, folder: str | os.PathLike, model_id: str | None = None, device: str = "cpu",
             torch_threads: int | None = None) -> "Engine":
        """Weights from model.safetensors only (`mythos.checkpoint.load_pretrained`)."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        folder = Path(folder)
        model = load_pretrained(folder, device=device)
        return cls(model, load_tokenizer_from_folder(folder), model_id or folder.name)

    def job(self, prompt_ids: list[int], max_tokens: int, **kw) -> Job:
        kw.setdefault("n_loops", self.cfg.n_loops)
        return Job(list(prompt_ids), max_tokens, **kw)

    def check_health(self) -> None:
        """Raise if the model cannot run (non-finite weights)."""
        p = next(self.model.parameters())
        if not torch.isfinite(p).all():
            raise RuntimeError("model weights are not finite")

    # --- generation -------------------------------------------------------------------------
    def groups(self, jobs: Sequence[Job], max_batch_size: int) -> list[list[Job]]:
        """Jobs split by compatible settings, each group fitting max_seq_len and max_batch_size."""
        by_key: dict[tuple, list[Job]] = {}
        for j in jobs:
            by_key.setdefault(j.group_key(), []).append(j)
        out: list[list[Job]] = []
        L = self.cfg.max_seq_len
        for members in by_key.values():
            cur: list[Job] = []
            for j in members:
                P = max([len(x.prompt_ids) for x in cur] + [len(j.prompt_ids)])
                M = max([x.max_tokens for x in cur] + [j.max_tokens, 1])
                if cur and (P + M > L or len(cur) >= max_batch_size):
                    out.append(cur)
                    cur = []
                cur.append(j)
            if cur:
                out.append(cur)
        return out

    def run_batch(self, jobs: Sequence[Job], max_batch_size: int = 64) -> None:
        """Generate for every job; events go to each job's queue. Blocking (runs in a worker thread)."""
        for group in self.groups(jobs, max_batch_size):
            t0 = time.perf_counter()
            try:
                self._run_group(group)
            except Exception as exc:  # a failing group fails its own requests, not the server
                log.exception("generation failed for a batch of %d", len(group))
                for j in group:
                    j.emit(Failed(exc))
            self.busy_s += time.perf_counter() - t0

    def _params(self, jobs: list[Job]) -> SamplingParams:
        j0 = jobs[0]
        return SamplingParams(
            max_new_tokens=max(1, max(j.max_tokens for j in jobs)),
            temperature=j0.temperature,
            top_k=j0.top_k if j0.temperature > 0 else 0,
            top_p=j0.top_p if j0.temperature > 0 else 1.0,
            stop_tokens=(self.eos_id,) if self.eos_id is not None and not j0.ignore_eos else (),
            seed=j0.seed,
            n_loops=j0.n_loops,
            exit_threshold=j0.exit_threshold,
        )

    def _run_group(self, jobs: list[Job]) -> None:
        params = self._params(jobs)
        self.batches_run += 1
        self.rows_run += len(jobs)
        rows = [_Row(j, StopTracker(self.tokenizer.decode, j.stop, params.stop_tokens)) for j in jobs]
        top_k = max((j.logprobs for j in jobs if j.logprobs is not None), default=None)
        score = any(j.score_prompt_from is not None for j in jobs)
        active = set(range(len(jobs)))
        steps = stream(self.model, [j.prompt_ids for j in jobs], params, self.pad_id, prompt_logits=score)
        try:
            for step in steps:
                if step.prompt_logits is not None:
                    for row, logits in zip(rows, step.prompt_logits):
                        row.score_prompt(logits)
                toks = step.tokens.tolist()
                entries = step_logprobs(step.logits, toks, top_k) if top_k is not None else [None] * len(toks)
                for i in sorted(active):
                    if rows[i].job.cancelled or rows[i].add(toks[i], step.loops_used, entries[i]):
                        active.discard(i)
                if not active:
                    break
        finally:
            steps.close()
        for i in sorted(active):  # the stream ended early (cache full): report what there is
            rows[i].finish("length", rows[i].tracker.flush())


class _Row:
    """One job's state while its group generates: text held back, tokens and loops counted, logprobs."""

    def __init__(self, job: Job, tracker: StopTracker) -> None:
        self.job, self.tracker = job, tracker
        self.held = ""
        """Text not sent yet (a job that does not stream gets all of it with Finished)."""
        self.entries: list[TokenLogprob] = []
        self.n = 0
        self.loops = 0

    def score_prompt(self, logits: torch.Tensor) -> None:
        """logits (P, V) of this row's left-padded prompt at the prefill."""
        job = self.job
        if job.score_prompt_from is not None:
            self.entries += prompt_logprobs(logits, job.prompt_ids, job.score_prompt_from, job.logprobs or 0)

    def add(self, token: int, loops_used: int, entry: TokenLogprob | None) -> bool:
        """Take the step's token; True once the job has finished (Finished sent)."""
        job = self.job
        self.loops += loops_used
        if job.max_tokens == 0:  # echo only: the prompt was scored by the prefill
            self.finish("length", "")
            return True
        self.n += 1
        if entry is not None and job.logprobs is not None:  # the group's top-k, cut to the job's own k
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
        self.job.emit(Finished(reason, self.n, self.loops / max(self.n, 1), self.held + text, self.entries))


# ---------------------------------------------------------------------------------------
# Dynamic batching
# ---------------------------------------------------------------------------------------
class Batcher:
    """Collects jobs from concurrent requests into batches run one at a time in a worker thread."""

    def __init__(self, engine: Engine, max_batch_size: int = 8, max_wait_s: float = 0.05,
                 enabled: bool = True) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size if enabled else 1
        self.max_wait_s = max_wait_s if enabled else 0.0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mythos-gen")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._recent: list[int] = [1]
        """Sizes of the last few batches: how many concurrent requests to expect back."""
        self.batch_sizes: list[int] = []
        """Jobs per batch (the last 1000), for tests and metrics."""

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            if self._task is not None and self._task.done() and not self._task.cancelled():
                log.error("batcher loop had stopped: %r; restarting", self._task.exception())
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def alive(self) -> bool:
        return self._task is None or not self._task.done()

    async def submit(self, jobs: Sequence[Job]) -> asyncio.Queue:
        """Queue the jobs; returns the queue their events arrive on as (job index, event): Delta...,
        then Finished or Failed for each job."""
        self._ensure_started()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, j in enumerate(jobs):
            j._loop, j._queue, j._index = loop, events, i
            self._queue.put_nowait(j)
        return events

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # concurrent clients come back one by one after a batch: wait (bounded) for as many
            # as recent batches held; a lone client (recent batches of 1) does not wait
            target = min(self.max_batch_size, max(self._recent))
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            self._recent = (self._recent + [len(batch)])[-4:]
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
            try:
                await loop.run_in_executor(self._pool, self.engine.run_batch, batch, self.max_batch_size)
            except Exception as exc:  # noqa: BLE001 - never let the loop die
                log.exception("batch failed")
                for j in batch:
                    j.emit(Failed(exc))


async def events(queue: asyncio.Queue, n_jobs: int) -> AsyncIterator[tuple[int, Delta | Finished | Failed]]:
    """(job index, event) from `Batcher.submit`'s queue until every job has finished or failed."""
    left = n_jobs
    while left:
        i, ev = await queue.get()
        if not isinstance(ev, Delta):
            left -= 1
        yield i, ev
