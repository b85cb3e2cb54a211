"""Group commit: the calls that threads make at about the same time joined
into one call, so one transaction carries many of them.

A per-process thread takes what has queued up (up to `max_size`) and runs it
as one batch; each calling thread waits for its own result. With a `linger`,
a batch waits up to that long for every thread seen calling lately: a
worker's actor threads are back with their next message a moment after
their batch ends, and without the wait they split into two half-size
batches that take turns. A batch that raises hands the error to each of its
callers, who then do their work alone. Without a linger, a call that finds
fewer than `concurrency` batches running and none waiting runs in its
caller's thread: two webhooks on two connections then commit side by side,
as they would without the group, and only a crowd forms batches.

An `after` hook runs once per item after its caller has the result, in that
caller's context (contextvars): work that need not delay the callers, such as
a line per item, which the group's thread then writes for the whole batch
while the callers go on, instead of the callers all writing at once; the
lines a batch's hooks log go out in one write (logs.lines_together). (A call
run in its caller's thread runs the hook there, before it returns.)
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

from payfleet.platform import logs

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

# A queued call: its item, its caller's future, and the caller's context when
# there is an `after` hook to run in it.
_Call = tuple[T, Future[R], contextvars.Context | None]

# A thread that has not called for this long no longer counts as a caller.
_CALLER_SEEN_SECONDS = 1.0


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[T]], Sequence[R]],
        *,
        max_size: int,
        linger: float,
        name: str,
        concurrency: int = 1,
        after: Callable[[T, R], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._after = after
        self._max_size = max_size
        self._linger = linger
        self._name = name
        self._concurrency = concurrency
        self._queued: list[_Call[T, R]] = []
        self._callers: dict[int, float] = {}
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = 0  # batches running now, in callers' threads or the group's

    def call(self, item: T) -> R:
        """The batch's result for `item` (run_batch answers its items in
        order). Raises what the batch raised."""
        future: Future[R] = Future()
        with self._wakeup:
            # Started on first use, in the process that uses it (Dramatiq
            # forks its worker processes after importing the actors).
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
            if self._linger > 0:
                self._callers[threading.get_ident()] = time.monotonic()
            # Without a linger, a call that finds room and nothing waiting
            # runs here, as a batch of one: no hand-over to the thread and back.
            alone = self._linger == 0 and self._running < self._concurrency and not self._queued
            if alone:
                self._running += 1
            else:
                context = contextvars.copy_context() if self._after is not None else None
                self._queued.append((item, future, context))
                self._wakeup.notify_all()
        if not alone:
            return future.result()
        try:
            result = self._run_batch([item])[0]
        finally:
            self._done()
        self._run_after(item, result, None)
        return result

    def _done(self) -> None:
        with self._wakeup:
            self._running -= 1
            self._wakeup.notify_all()

    def _run_after(self, item: T, result: R, context: contextvars.Context | None) -> None:
        if self._after is None:
            return
        try:
            if context is None:
                self._after(item, result)
            else:
                context.run(self._after, item, result)
        except Exception:  # the hook's failure is not the batch's: its result stands
            log.exception("%s: the after hook failed for %r", self._name, item)

    def _take(self) -> list[_Call[T, R]]:
        with self._wakeup:
            # At most `concurrency` batches at a time: the next gathers while they run.
            self._wakeup.wait_for(lambda: bool(self._queued) and self._running < self._concurrency)
            if self._linger > 0:
                recent = time.monotonic() - _CALLER_SEEN_SECONDS
                self._callers = {ident: seen for ident, seen in self._callers.items() if seen > recent}
                expected = min(len(self._callers), self._max_size)
                self._wakeup.wait_for(lambda: len(self._queued) >= expected, timeout=self._linger)
            batch, self._queued = self._queued[: self._max_size], self._queued[self._max_size :]
            self._running += 1
            return batch

    def _serve(self) -> None:
        while True:
            batch = self._take()
            try:
                results = self._run_batch([item for item, _, _ in batch])
                answers = list(zip(batch, results, strict=True))
            except BaseException as error:  # handed to every caller; the thread lives on
                for _, future, _ in batch:
                    future.set_exception(error)
                continue
            finally:
                self._done()
            for (_, future, _), result in answers:
                future.set_result(result)
            # The batch's lines (what the hooks usually log) in one write.
            with logs.lines_together():
                for (item, _, context), result in answers:
                    self._run_after(item, result, context)
