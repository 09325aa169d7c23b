"""The serving engine's previous scheduler (static batching), kept only as `serve_bench.py`'s baseline.

The issue that replaced it with iteration-level batching (`mythos_platform/serve/engine.py`) asks
for the new engine's speed to be measured against the old one in the same run, on the same model
and load; this module is that old scheduler, cut down to what the benchmark uses (no logprobs, no
prompt scoring, no Ray). Nothing else imports it.

    engine = StaticEngine(model, tokenizer)
    batcher = Batcher(engine, max_batch_size=16, max_wait_s=0.1)
    queue = await batcher.submit([job])          # jobs: mythos_platform.serve.jobs.Job
    async for i, event in events(queue, 1): ...  # Delta ... Finished / Failed

How it schedules: a batch forms when the model becomes free (every request that queued while the
previous batch ran joins it; the wait `max_wait_s` for more is only spent when fewer are queued
than recent batches held), runs to completion, and is split into groups with equal (n_loops,
exit_threshold, sampling settings) that run one after the other through
`mythos.generation.stream`. A group runs until its longest request is done; a request that
arrives meanwhile waits for the whole batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Sequence

from mythos.generation import SamplingParams, stream
from mythos.stop import StopTracker
from mythos_platform.serve.engine import _Row as Row
from mythos_platform.serve.jobs import Failed, Job, events

__all__ = ["Batcher", "StaticEngine", "events"]

log = logging.getLogger("mythos")


def group_key(j: Job) -> tuple:
    """Jobs with equal keys can share a `stream` call (one loop count and sampling setting per batch)."""
    if j.temperature == 0:
        return (j.n_loops, j.exit_threshold, j.ignore_eos, 0.0, 1.0, 0, None)
    alone = id(j) if j.seed is not None else None  # a seeded request runs alone
    return (j.n_loops, j.exit_threshold, j.ignore_eos, j.temperature, j.top_p, j.top_k, alone)


class StaticEngine:
    """One model and tokenizer; `run_batch` generates for a list of jobs, group after group (blocking)."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.eos_id = tokenizer.eos_id
        self.busy_s = 0.0
        self.groups_run = 0

    def groups(self, jobs: Sequence[Job], max_batch_size: int) -> list[list[Job]]:
        """Jobs split by compatible settings, each group fitting max_seq_len and max_batch_size."""
        by_key: dict[tuple, list[Job]] = {}
        for j in jobs:
            by_key.setdefault(group_key(j), []).append(j)
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
        for group in self.groups(jobs, max_batch_size):
            t0 = time.perf_counter()
            try:
                self._run_group(group)
            except Exception as exc:  # noqa: BLE001 - a failing group fails its own requests
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
        self.groups_run += 1
        # the engine's own per-job bookkeeping (text held back, counts, Finished): only the scheduling differs
        tracker = (lambda j: StopTracker(self.tokenizer.decode, j.stop, params.stop_tokens))
        rows = [Row(j, 0, tracker(j), self.device) for j in jobs]
        active = set(range(len(jobs)))
        steps = stream(self.model, [j.prompt_ids for j in jobs], params, self.pad_id)
        try:
            for step in steps:
                toks = step.tokens.tolist()
                for i in sorted(active):
                    if rows[i].job.cancelled or rows[i].add(toks[i], step.loops_used, None):
                        active.discard(i)
                if not active:
                    break
        finally:
            steps.close()
        for i in sorted(active):  # the stream ended early (cache full): report what there is
            rows[i].finish("length", rows[i].tracker.flush())


class Batcher:
    """Collects jobs from concurrent requests into batches run one at a time in a worker thread."""

    def __init__(self, engine: StaticEngine, max_batch_size: int = 8, max_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="static-gen")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._recent: list[int] = [1]
        """Sizes of the last few batches: how many concurrent requests to expect back."""
        self.batch_sizes: list[int] = []

    async def submit(self, jobs: Sequence[Job]) -> asyncio.Queue:
        """Queue the jobs; returns the queue their events arrive on as (job index, event)."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        for i, j in enumerate(jobs):
            j._loop, j._queue, j._index = loop, out, i
            self._queue.put_nowait(j)
        return out

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False)

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
            self.batch_sizes.append(len(batch))
            try:
                await loop.run_in_executor(self._pool, self.engine.run_batch, batch, self.max_batch_size)
            except Exception as exc:  # noqa: BLE001 - never let the loop die
                log.exception("batch failed")
                for j in batch:
                    j.emit(Failed(exc))
