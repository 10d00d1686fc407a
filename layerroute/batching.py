"""Dynamic batching of chat steps that keeps the savings of routing.

A batch of rows runs a block when any of its rows keeps it, so a mixed batch saves only the blocks every row skips.
:class:`BatchScheduler` therefore routes and prefills every step of a batch alone first (its prompt, batch of one:
:func:`~layerroute.chat.prefill_step`), and then decodes each group of steps that skip the same blocks as one batch,
from their prefilled caches, with those blocks forced off: every row keeps its own savings, the prompt runs once (the
decode appends the last prompt position from the prefill rather than running it again, so a grouped row executes and
counts what the step generated alone does), and decoding, where batching pays, still amortises the per-token overhead
over the group's rows.

The scheduler is framework-free (a worker thread and :class:`concurrent.futures.Future`); ``layerroute serve`` puts it
behind HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from .chat import ChatAnswer, ChatEngine, ChatStep, Prefill, TextDeltas, prefill_step

logger = logging.getLogger(__name__)


@dataclass
class Served:
    """A step's answer and what serving it took.

    Attributes:
        answer: the answer; ``answer.route`` is the step's own route (what it would cost alone at full depth, and
            what its routers skipped).
        queue_s: seconds between submission and the start of the batch that served it.
        batch_rows: rows of the ``generate`` call that served it.
        flops_executed: FLOPs the server executed for the step once: its ``flops_total`` less the blocks that every
            row of its batch skipped (a block the step skipped but a batch-mate kept ran for both), plus, for an
            answer retried at full depth (``route["retried"]``), its discarded routed attempt as the step alone
            would have run it (``route["flops_discarded"]``).
    """

    answer: ChatAnswer
    queue_s: float
    batch_rows: int
    flops_executed: int


@dataclass(eq=False)
class Job:
    """A submitted step. ``future`` resolves to its :class:`Served`; :meth:`cancel` frees its row."""

    step: ChatStep
    future: Future = field(default_factory=Future)
    deltas: TextDeltas | None = None
    on_text: Callable[[str], None] | None = None
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        """Give up on the answer: a job still waiting is dropped, a running one stops generating at the next token
        (its batch goes on for the other rows, and ends early when no row is left)."""
        self.cancelled = True
        self.future.cancel()


class BatchScheduler:
    """Collects submitted steps for a short window and generates them in batches, grouped by routed skip set.

    Args:
        engine: the chat engine that generates.
        max_batch_size: the most rows taken from the queue at once.
        window_s: how long an idle scheduler waits after a first step for others to join its batch (steps that
            arrive while a batch runs join the next one without waiting).
        grouping: group rows by routed skip set (see the module docstring); off, rows that share generation
            settings are batched as they come and the routers decide inside generation (a block runs when any row
            keeps it).
    """

    def __init__(self, engine: ChatEngine, *, max_batch_size: int = 16, window_s: float = 0.005,
                 grouping: bool = True) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.grouping = grouping
        self._pending: list[Job] = []
        self._condition = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="layerroute-batching", daemon=True)
        self._worker.start()

    def submit(self, step: ChatStep, on_text: Callable[[str], None] | None = None) -> Job:
        """Queue ``step``. With ``on_text``, its answer's visible text is handed over piece by piece as it is
        generated (from the worker thread; see :class:`~layerroute.chat.TextDeltas`)."""
        job = Job(step, deltas=self.engine.text_deltas(step) if on_text else None, on_text=on_text)
        with self._condition:
            if self._closed:
                raise RuntimeError("the batch scheduler is closed")
            self._pending.append(job)
            self._condition.notify()
        return job

    def close(self) -> None:
        """Stop the worker after the batch it runs; steps still queued are cancelled."""
        with self._condition:
            self._closed = True
            for job in self._pending:
                job.cancel()
            self._pending.clear()
            self._condition.notify()
        self._worker.join()

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while (jobs := self._next_batch()) is not None:
            if jobs:
                self._serve(jobs)

    def _next_batch(self) -> list[Job] | None:
        with self._condition:
            while not self._pending and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            deadline = self._pending[0].submitted + self.window_s
            while len(self._pending) < self.max_batch_size and (left := deadline - time.perf_counter()) > 0:
                self._condition.wait(left)
            jobs, self._pending = self._pending[: self.max_batch_size], self._pending[self.max_batch_size:]
        return [job for job in jobs if not job.cancelled and job.future.set_running_or_notify_cancel()]

    def _serve(self, jobs: list[Job]) -> None:
        began = time.perf_counter()
        by_settings: dict[tuple, list[Job]] = {}
        for job in jobs:
            by_settings.setdefault(job.step.batch_key, []).append(job)
        for same in by_settings.values():
            if len(same) == 1:  # alone: the routers decide inside generation, nothing is prefilled apart
                self._generate(same, None, began)
            elif self.grouping:
                by_skip: dict[frozenset[int], list[tuple[Job, Prefill]]] = {}
                for job in same:
                    if (prefill := self._prefill(job)) is not None:
                        by_skip.setdefault(prefill.skip, []).append((job, prefill))
                for group in by_skip.values():
                    self._generate([job for job, _ in group], [prefill for _, prefill in group], began)
            else:
                by_route: dict[tuple, list[Job]] = {}
                for job in same:
                    by_route.setdefault((job.step.routing, job.step.skip_threshold), []).append(job)
                for group in by_route.values():
                    self._generate(group, None, began)

    def _prefill(self, job: Job) -> Prefill | None:
        if job.cancelled:
            return None
        try:
            return prefill_step(self.engine, job.step)
        except Exception as error:  # the error belongs to the request, not to the worker
            logger.exception("prefilling a step failed")
            job.future.set_exception(error)
            return None

    def _generate(self, jobs: list[Job], prefills: list[Prefill] | None, began: float) -> None:
        def on_token(row: int, token: int) -> None:
            job = jobs[row]
            if job.deltas is not None and (piece := job.deltas.push(token)):
                job.on_text(piece)

        streaming = any(job.deltas is not None for job in jobs)
        try:
            answers = self.engine.generate([job.step for job in jobs], prefills=prefills,
                                           on_token=on_token if streaming else None,
                                           cancelled=lambda row: jobs[row].cancelled)
        except Exception as error:  # the error belongs to the requests, not to the worker
            logger.exception("generating a batch of %d rows failed", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        # a retried answer's route is its full-depth retry's; the blocks the batch skipped are the others' to say
        routed = [frozenset(a.route["skipped_layers"]) for a in answers if not a.route["retried"]]
        common = frozenset.intersection(*routed) if routed else frozenset()
        for job, answer in zip(jobs, answers):
            route = answer.route
            skipped = len(route["skipped_layers"])
            per_block = route["flops_skipped"] // skipped if skipped else 0
            served = Served(answer=answer, queue_s=began - job.submitted, batch_rows=len(jobs),
                            flops_executed=route["flops_total"] - per_block * len(common) + route["flops_discarded"])
            if not job.future.done():  # cancelled meanwhile: nobody waits for it
                job.future.set_result(served)
