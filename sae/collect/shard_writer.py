"""Shards written in a background thread, so that the model's next forward passes overlap the last shard's write.

One thread writes the submitted jobs in order, one at a time; `submit` waits while `in_flight` shards are
still being written (memory holds at most that many finished shards beside the one being gathered). The
first error stops the writer: later jobs are dropped unwritten, and the same exception is raised in the
caller's thread at its next `submit` or at `close`. `stop` (Ctrl-C, an error in the caller) drops the
jobs not yet started and waits for the one being written; `close` waits for every job.
(sae.store.reader.in_background runs a producer ahead of its consumer; this is the other way round.)
"""
from __future__ import annotations

import queue
import threading

_END = object()


class ShardWriter:
    THREADED = True             # False: each job is written in the caller's thread at submit (tests compare)

    def __init__(self, write, in_flight: int = 1, name: str = "sae-shard-writer"):
        self.write = write                          # write(job), in the writer's thread
        self.jobs: queue.Queue = queue.Queue()
        self.slots = threading.Semaphore(in_flight)  # taken at submit, given back when the job is done
        self.dropping = threading.Event()           # set by stop() or by an error: later jobs are not written
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=name) if self.THREADED else None
        if self.thread is not None:
            self.thread.start()

    def _run(self):
        while (job := self.jobs.get()) is not _END:
            try:
                if not self.dropping.is_set():
                    self.write(job)
            except BaseException as error:  # noqa: BLE001 - raised in the caller's thread
                self.error = error
                self.dropping.set()
            finally:
                self.slots.release()

    def _raise(self):
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def submit(self, job) -> None:
        self._raise()
        if self.thread is None:
            self.write(job)
            return
        while not self.slots.acquire(timeout=0.5):      # the writer is busy: wait for a slot
            if not self.thread.is_alive():
                raise RuntimeError("the shard writer thread ended unexpectedly")
        self._raise()                                  # the job before this one failed
        self.jobs.put(job)

    def close(self) -> None:
        """Wait until every submitted job is written; raise the writer's error, if any."""
        self._end()
        self._raise()

    def stop(self) -> None:
        """Drop the jobs not yet started, wait for the one being written (idempotent; raises nothing)."""
        self.dropping.set()
        self._end()

    def _end(self):
        if self.thread is not None and self.thread.is_alive():
            self.jobs.put(_END)
            self.thread.join()
