"""Group commit: the calls that actor threads make at about the same time
joined into one call, so one transaction carries many of them.

A per-process thread takes what has queued up (up to `max_size`) and runs it
as one batch; the actor threads wait for their own result. Under load the
threads of the last batch are back with their next message a moment after
it ends, so the next batch waits up to `linger` seconds for every thread
seen lately: without that, the threads split into two half-size batches
that take turns. A lone call waits at most `linger`. A batch that raises
hands the error to each of its callers, who then do their work alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

# A thread that has not called for this long no longer counts as a caller.
_CALLER_SEEN_SECONDS = 1.0


class GroupCommit(Generic[K, R]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[K]], dict[K, R]],
        *,
        max_size: int,
        linger: float,
        name: str,
    ) -> None:
        self._run_batch = run_batch
        self._max_size = max_size
        self._linger = linger
        self._name = name
        self._queued: list[tuple[K, Future[R | None]]] = []
        self._callers: dict[int, float] = {}
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None

    def call(self, key: K) -> R | None:
        """The batch's result for `key`; None when the batch left it out.
        Raises what the batch raised."""
        future: Future[R | None] = Future()
        with self._wakeup:
            # Started on first use, in the process that uses it (Dramatiq
            # forks its worker processes after importing the actors).
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
            self._callers[threading.get_ident()] = time.monotonic()
            self._queued.append((key, future))
            self._wakeup.notify()
        return future.result()

    def _take(self) -> list[tuple[K, Future[R | None]]]:
        with self._wakeup:
            self._wakeup.wait_for(lambda: bool(self._queued))
            recent = time.monotonic() - _CALLER_SEEN_SECONDS
            self._callers = {ident: seen for ident, seen in self._callers.items() if seen > recent}
            expected = min(len(self._callers), self._max_size)
            self._wakeup.wait_for(lambda: len(self._queued) >= expected, timeout=self._linger)
            batch, self._queued = self._queued[: self._max_size], self._queued[self._max_size :]
            return batch

    def _serve(self) -> None:
        while True:
            batch = self._take()
            try:
                results = self._run_batch([key for key, _ in batch])
            except BaseException as error:  # handed to every caller; the thread lives on
                for _, future in batch:
                    future.set_exception(error)
                continue
            for key, future in batch:
                future.set_result(results.get(key))
