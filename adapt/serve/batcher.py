"""Dynamic batching: the requests waiting when the model is free, decoded as one batch where they agree.

One worker thread owns the model and decodes one batch at a time (`adapt.sampling.generate_ids`, a row
per sample). It takes the oldest waiting job and every other waiting job with the same batch key, up to
`max_batch` rows: the same sampling options, length, steps and prompt length. Prompts are not padded:
the sampler has no padding mask, and a left pad would be context the model reads, so only prompts of
one length share a batch. Each row is then decoded exactly as it would be alone (every choice the
sampler makes is per row; a hybrid batch verifies as many drafts as its least lucky row, which leaves
greedy output as it is and a sample's distribution as it was). Only the random draws are shared: a
seeded request that draws at random runs alone, so that the same seed keeps giving the same answer.

Jobs wait in a bounded queue (`QueueFull` past `max_queue`). The worker tells each job what happened
through its own asyncio queue: `Progress` (the committed prefix of each of its rows grew: only for
streams), then `Done` or `Failed`. A job whose client has gone is `cancel`led; when every job of the
running batch is, the `on_step` hook stops the decoding.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field, replace

import torch

from ..errors import UserError
from ..sampling import SamplingOptions, decided_lengths, generate_ids

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already."""


class _Abandoned(Exception):
    """Raised from `on_step`: no job of the batch has a client any more."""


@dataclass
class Progress:
    committed: list[list[int]]  # per row of the job: its generated ids up to the first not yet committed


@dataclass
class Done:
    generated: list[list[int]]  # per row: every generated id (EOS and what follows included)
    decoded: list[int]  # per row: the positions the model decoded (what stopping at EOS saved not counted)
    forwards: int  # of the whole batch
    batch_rows: int  # rows decoded together, this job's included


@dataclass
class Failed:
    error: Exception


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    length: int
    steps: int | None
    options: SamplingOptions  # num_samples = the job's rows
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client has gone

    def batch_key(self):
        """Jobs with equal keys are decoded as one batch."""
        options = self.options
        deterministic = options.temperature == 0 and options.strategy != "random"
        if options.seed is not None and not deterministic:
            return id(self)  # its own draws: alone
        return replace(options, num_samples=1, seed=None), len(self.prompt_ids), self.length, self.steps

    def cancel(self) -> None:
        self.cancelled = True

    def tell(self, event) -> None:
        """Hand `event` to the request's coroutine (from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Batcher:
    def __init__(self, model, tokenizer, *, max_queue: int, max_batch: int):
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.max_batch = max_queue, max_batch
        self._waiting: list[Job] = []
        self._ready = threading.Condition()
        # answered requests, requests whose client left first, and batches stopped because all had
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0, "batches": 0, "stopped_batches": 0,
                       "rows": 0, "forwards": 0}
        self.running = 0  # jobs in the batch being decoded
        threading.Thread(target=self._work, name="adapt-serve-decoder", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self._ready:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            self._waiting.append(job)
            self._ready.notify()

    def waiting(self) -> int:
        with self._ready:
            return len(self._waiting)

    def _work(self) -> None:
        while True:
            self._decode(self._next_batch())

    def _next_batch(self) -> list[Job]:
        """The oldest waiting job with a client and every waiting job that agrees with it, up to max_batch rows."""
        with self._ready:
            while True:
                for job in [job for job in self._waiting if job.cancelled]:
                    self._waiting.remove(job)
                    self.counts["cancelled"] += 1
                if self._waiting:
                    break
                self._ready.wait()
            first = self._waiting[0]
            batch, rows = [], 0
            for job in list(self._waiting):
                if job.batch_key() == first.batch_key() and rows + job.options.num_samples <= self.max_batch:
                    batch.append(job)
                    rows += job.options.num_samples
                    self._waiting.remove(job)
            self.running = len(batch)
            return batch

    def _decode(self, jobs: list[Job]) -> None:
        prompts = [job.prompt_ids for job in jobs for _ in range(job.options.num_samples)]
        first = jobs[0]
        try:
            out = generate_ids(self.model, self.tokenizer, prompts, length=first.length, steps=first.steps,
                               options=replace(first.options, num_samples=len(prompts)), on_step=self._watch(jobs))
        except _Abandoned:
            self._count(jobs, stopped=True)
            return
        except UserError as err:  # the same options, length and prompt length: the same error for every job
            self._fail(jobs, err)
            return
        except Exception as err:  # a bug: logged with its traceback, answered without it
            logger.exception("decoding a batch of %d rows failed", len(prompts))
            self._fail(jobs, err)
            return
        start = len(first.prompt_ids)
        generated, decoded = out.ids[:, start:].tolist(), (out.commit_step[:, start:] >= 0).sum(dim=1).tolist()
        self._count(jobs, forwards=out.forwards)  # before the answers: a client that then asks /health sees them
        row = 0
        for job in jobs:
            rows = slice(row, row + job.options.num_samples)
            job.tell(Done(generated[rows], decoded[rows], out.forwards, len(prompts)))
            row = rows.stop

    def _watch(self, jobs: list[Job]):
        """The `on_step` hook of a batch: stop when every client has gone; tell each stream its committed prefixes."""
        start, shown = len(jobs[0].prompt_ids), {}

        def on_step(ids: torch.Tensor, commit_step: torch.Tensor) -> None:
            if all(job.cancelled for job in jobs):
                raise _Abandoned
            committed = decided_lengths(commit_step, start)
            row = 0
            for job in jobs:
                rows = range(row, row + job.options.num_samples)
                row = rows.stop
                lengths = [committed[r] for r in rows]
                if job.stream and not job.cancelled and lengths != shown.get(id(job)):
                    shown[id(job)] = lengths
                    job.tell(Progress([ids[r, start:start + committed[r]].tolist() for r in rows]))
        return on_step

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        with self._ready:
            self.counts["failed"] += len(jobs)
            self.running = 0
        for job in jobs:
            job.tell(Failed(error))

    def _count(self, jobs: list[Job], *, forwards: int = 0, stopped: bool = False) -> None:
        with self._ready:
            self.counts["forwards"] += forwards
            gone = sum(job.cancelled for job in jobs)
            self.counts["cancelled"] += gone
            self.counts["finished"] += len(jobs) - gone
            self.counts["batches"] += 1
            self.counts["stopped_batches"] += stopped
            self.counts["rows"] += sum(job.options.num_samples for job in jobs)
            self.running = 0
