"""A request for one completion (`Job`) and the events the engine sends back for it.

A job's events go to the asyncio queue of the request that submitted it, as (job index, event):
`Delta`s while it streams, then one `Finished` or `Failed`. A job run without a queue (the engine
driven directly, in tests and benchmarks) keeps its events in `Job.events`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from .logprobs import TokenLogprob


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Entries of the tokens generated since the last event (with logprobs); the echoed prompt's come
    first in the job's first event."""


@dataclass
class Finished:
    reason: str
    """'stop' (EOS or a stop string), 'length' (max_tokens) or 'cancelled' (the client went away)."""
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
    """Set by the request when its client went away; the engine drops the row at its next step."""
    # filled in by Engine.submit: where events go
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _queue: asyncio.Queue | None = field(default=None, repr=False)
    _index: int = field(default=0, repr=False)
    _submitted: bool = field(default=False, repr=False)
    events: list = field(default_factory=list, repr=False)
    """Events of a job run without a queue (`Engine.run`)."""

    @property
    def done(self) -> bool:
        return any(not isinstance(e, Delta) for e in self.events)

    def result(self) -> tuple[str, Finished]:
        """(text, Finished) of a job run by `Engine.run` (no queue)."""
        done = [e for e in self.events if not isinstance(e, Delta)]
        if not done:
            raise RuntimeError("the job has not finished")
        if isinstance(done[0], Failed):
            raise done[0].error
        return "".join(e.text for e in self.events if isinstance(e, (Delta, Finished))), done[0]

    def emit(self, event) -> None:
        if self._loop is None:
            self.events.append(event)
            return
        if not isinstance(event, Delta):
            self.events.append(event)  # so that `done` holds for a job with a queue too
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (self._index, event))


async def events(queue: asyncio.Queue, n_jobs: int) -> AsyncIterator[tuple[int, Delta | Finished | Failed]]:
    """(job index, event) from `Engine.submit`'s queue until every job has finished or failed."""
    left = n_jobs
    while left:
        i, ev = await queue.get()
        if not isinstance(ev, Delta):
            left -= 1
        yield i, ev
