"""A thread pool with the part of concurrent.futures' API procsnap uses
(submit, map, shutdown, with; a job's result, exception, done).

Why not ThreadPoolExecutor: importing concurrent.futures imports logging,
and the two cost a small dump's CLI run as much as argparse and json
together. Threads start on the first submit, so a pool that gets no work
costs nothing.
"""

from __future__ import annotations

import threading

_STOP = object()


class Job:
    """One submitted call: its outcome once done."""

    __slots__ = ("_done", "_value", "_error")

    def __init__(self):
        self._done = threading.Event()
        self._value = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self) -> BaseException | None:
        self._done.wait()
        return self._error

    def cancelled(self) -> bool:
        return False

    @classmethod
    def completed(cls, value=None) -> Job:
        """A job already done, with this result."""
        job = cls()
        job._value = value
        job._done.set()
        return job


class ThreadPool:
    """`threads` worker threads, jobs run in submission order."""

    def __init__(self, threads: int, thread_name_prefix: str = "procsnap"):
        import queue  # cheap, unlike concurrent.futures

        self.max = threads
        self.prefix = thread_name_prefix
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.cancel = False

    def submit(self, fn, *args) -> Job:
        job = Job()
        self.queue.put((job, fn, args))
        if len(self.threads) < self.max:
            t = threading.Thread(target=self._work, name=f"{self.prefix}_{len(self.threads)}", daemon=True)
            self.threads.append(t)
            t.start()
        return job

    def map(self, fn, items):
        jobs = [self.submit(fn, item) for item in items]
        return (job.result() for job in jobs)

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            job, fn, args = item
            if self.cancel:
                job._error = RuntimeError("cancelled: the pool was shut down")
            else:
                try:
                    job._value = fn(*args)
                except BaseException as err:  # handed to whoever asks for the result
                    job._error = err
            job._done.set()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Jobs not started are dropped with cancel_futures, else run."""
        self.cancel = self.cancel or cancel_futures
        for _ in self.threads:
            self.queue.put(_STOP)
        if wait:
            for t in self.threads:
                t.join()

    def __enter__(self) -> ThreadPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
