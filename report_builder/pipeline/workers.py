"""The local executor with worker processes: independent tasks of a CPU run at the same time, each worker with its
share of the cores.

A model's forward pass on a small batch does not use two cores twice as well as one (EfficientNet-Lite's
depthwise convolutions are bound by memory), and much of an explanation's or an evaluation's time is single-threaded
(LIME's segmentation, ROAD's sparse solve, SSIM): two workers with one thread each finish such tasks sooner than one
process with two threads. `make bench` measures both on the demo's explanation tasks.

What stays as in-process:
- the same tasks, keys and cache: the driver loads cached values, sends each task its inputs, and stores what comes
  back, so the cache has one writer;
- the values: to the bit, at the same thread count per task. A forward pass's sums can change with the number of
  threads (oneDNN splits some 1x1 convolutions' reductions across threads: EfficientNet-Lite's outputs move by
  ~3e-6), so 2 workers x 1 thread equal 1 process x 1 thread, not 1 process x 2 threads;
- errors: a task's exception is raised in the driver (a UserError is printed as one); a worker that dies (killed,
  out of memory) is an error naming the task; Ctrl-C and SIGTERM stop the workers with the run (they ignore SIGINT,
  so the driver decides), and no output is written;
- memory: a worker holds the models of the tasks it ran (models.zoo keeps up to LOADED_MAX), so the peak is about
  workers x (models + one task's working set); a value that is not cached (a probe shard's decoded pixels) is read
  by its readers before more such values are made, as in-process.
"""
from __future__ import annotations

import heapq
import itertools
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from report_builder.errors import UserError
from report_builder.pipeline.cache import Cache
from report_builder.pipeline.progress import Forwarded, Progress
from report_builder.pipeline.tasks import Graph, LocalExecutor, Outcome, RayExecutor, StageClock

MAX_AUTO_WORKERS = 4  # `auto` on a many-core machine: 4 workers share the cores (each holds its own models)
WORKER_MEMORY = 2 << 30  # what `auto` sets aside per worker: the demo's workers peaked at about 1.5 GiB each


def auto_workers(device_type: str, threads: int, available: int | None = None) -> int:
    """`--workers auto`: on a CPU, one worker per thread this process was given (torch's thread count: the cores,
    or OMP_NUM_THREADS), at most MAX_AUTO_WORKERS and at most one per WORKER_MEMORY of the memory available now; on
    an accelerator one process, since every task that runs a model would queue for the one device anyway."""
    if device_type != "cpu":
        return 1
    available = memory_available() if available is None else available
    by_memory = MAX_AUTO_WORKERS if available is None else available // WORKER_MEMORY
    return max(1, min(threads, MAX_AUTO_WORKERS, by_memory))


def memory_available() -> int | None:
    """Bytes of memory available to start new processes (Linux's MemAvailable), or None where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


_TO_DRIVER = None  # in a worker: the queue its tasks' progress goes to


def _start_worker(threads: int, to_driver) -> None:
    """Each worker's first step: its share of the cores, and Ctrl-C left to the driver (which stops the pool)."""
    global _TO_DRIVER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _TO_DRIVER = to_driver
    to_driver.cancel_join_thread()  # a worker's exit never waits to deliver progress
    import torch

    torch.set_num_threads(threads)


def _send(key: str, text: str) -> None:
    try:
        _TO_DRIVER.put_nowait((key, text))
    except (AttributeError, ValueError, OSError):  # no queue, or closed: progress is not worth failing a task for
        pass


def _run(fn, args: dict[str, Any], values: dict[str, Any], key: str) -> tuple[Any, float]:
    start = time.perf_counter()
    with Forwarded(lambda text: _send(key, text)).active():  # the task's own bars, shown by the driver
        value = fn(**args, **values)
    return value, time.perf_counter() - start


class WorkerExecutor:
    """Tasks in `workers` processes of `threads` threads each, in the in-process executor's order (dependencies first,
    depth first), as many at once as there are workers."""

    name = "local"

    def __init__(self, workers: int, threads: int):
        self.workers = workers
        self.threads = threads
        self._pool: ProcessPoolExecutor | None = None
        self._from_workers = None  # a queue of (task key, its bars' line) from the workers
        self._doing: dict[str, str] = {}  # a running task's key -> its bars' latest line
        self._listening = threading.Event()
        self._bar = None  # the run's tasks bar, redrawn when a worker's progress comes

    @property
    def shares(self) -> dict:
        """How the cores were shared, for provenance: the tasks' timings depend on it."""
        return {"processes": self.workers, "threads": self.threads}

    def describe(self) -> str:
        return (f"local ({self.workers} worker processes × {self.threads} thread{'s' if self.threads != 1 else ''})")

    def __enter__(self) -> WorkerExecutor:
        return self

    def _start(self) -> None:
        """Start the workers, when there is something to compute (a warm rerun starts none)."""
        # spawn, not fork: a forked copy of a process whose OpenMP threads have run can hang in its first parallel op
        context = multiprocessing.get_context("spawn")
        self._from_workers = context.Queue()
        self._listening.set()
        threading.Thread(target=self._listen, args=(self._from_workers,), name="worker-progress", daemon=True).start()
        self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker,
                                         initargs=(self.threads, self._from_workers))
        # Start every worker now and wait until each has answered. A pool that spawns its workers as tasks come
        # can miss the death of one spawned while its manager thread was already waiting (the wait does not watch
        # the new process): a killed worker then went unnoticed until another task ended, up to minutes later.
        wait([self._pool.submit(os.getpid) for _ in range(self.workers)])

    def _listen(self, from_workers) -> None:
        """The driver's side of the workers' progress, a daemon thread that ends with the pool. The driver only reads
        the queue: a worker killed while writing to it can hold its lock, and nothing of the driver's waits on it."""
        while self._listening.is_set():
            try:
                key, text = from_workers.get(timeout=0.5)
            except queue.Empty:
                continue
            except (EOFError, OSError, ValueError):  # a worker killed mid-message: its progress is not worth more
                return
            self._doing[key] = text
            bar = self._bar
            if bar is not None:
                bar.refresh()

    def __exit__(self, exc_type, *exc) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        self._listening.clear()
        if exc_type is None:
            pool.shutdown(wait=True)
            return
        # an error or Ctrl-C: the other tasks' work is not wanted; stop the workers now rather than after their task
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            if p.is_alive():
                p.kill()
        for p in processes:
            p.join(timeout=5)

    def run(self, graph: Graph, wanted: list[str], cache: Cache, progress: Progress) -> Outcome:
        todo = graph.plan(wanted, cache)
        if todo and self._pool is None:
            self._start()
        clock = StageClock(graph, todo, progress)
        order = itertools.count()
        place: dict[str, int] = {}  # the in-process executor's order: the tie-break among ready tasks
        waiting: dict[str, set[str]] = {}  # a planned task -> its planned deps not yet computed
        readers: dict[str, list[str]] = defaultdict(list)
        remaining: Counter = Counter()  # a value -> its readers not yet started
        memo: dict[str, Any] = {}
        keep = set(wanted)
        computed: set[str] = set()
        ready: list[tuple[int, int, str]] = []  # (0 if it reads an uncached value else 1, place, key)
        running: dict[Future, str] = {}
        uncached_held = 0  # uncached values made and not yet read by all their readers, or being made

        def schedule(keys: list[str]) -> None:
            for k in keys:
                if k in place:
                    continue
                place[k] = next(order)
                deps = graph.dep_keys(graph.tasks[k])
                waiting[k] = {d for d in deps if d in place and d not in computed}
                for d in deps:
                    readers[d].append(k)
                    remaining[d] += 1
                if not waiting[k]:
                    push(k)

        def push(k: str) -> None:
            reads_uncached = any(not graph.tasks[d].cache and graph.tasks[d].fn is not None
                                 for d in graph.dep_keys(graph.tasks[k]))
            heapq.heappush(ready, (0 if reads_uncached else 1, place[k], k))

        def value_of(d: str) -> tuple[bool, Any]:
            """(available, value) of a dep: computed, a value node, or a cache entry (loaded once for its readers)."""
            if d in memo:
                return True, memo[d]
            t = graph.tasks[d]
            if t.fn is None:
                return True, t.value
            value = cache.load(t.stage, d, t.shape) if t.cache else None
            if value is None:
                return False, None
            memo[d] = value
            return True, value

        def release(d: str) -> None:
            nonlocal uncached_held
            remaining[d] -= 1
            if remaining[d] <= 0 and d not in keep and d in memo:
                del memo[d]
                if not graph.tasks[d].cache and graph.tasks[d].fn is not None:
                    uncached_held -= 1

        def start(k: str) -> bool:
            """Send task k to a worker; False when a cached input turned out bad and must be computed first."""
            nonlocal uncached_held
            t = graph.tasks[k]
            inputs = {d: value_of(d) for d in graph.dep_keys(t)}
            missing = [d for d, (available, _) in inputs.items() if not available]
            if missing:  # a cache entry failed its check (and was removed): compute it, then come back to k
                schedule(graph.plan(missing, cache))
                waiting[k] = {d for d in missing if d not in computed}
                return False
            values = {name: inputs[d][1] if isinstance(d, str) else [inputs[x][1] for x in d]
                      for name, d in t.deps.items()}
            for d in graph.dep_keys(t):
                release(d)
            if not t.cache:
                uncached_held += 1
            clock.start(t)
            bar.refresh(force=True)  # the line shows doing(): every running task, this one now too
            running[self._pool.submit(_run, t.fn, t.args, values, k)] = k
            return True

        def finish(future: Future) -> None:
            nonlocal uncached_held
            k = running.pop(future)
            self._doing.pop(k, None)
            t = graph.tasks[k]
            try:
                value, seconds = future.result()
            except BrokenProcessPool:  # every running task sees it: which one's worker died is not known
                labels = " or ".join(repr(graph.tasks[x].label) for x in [k, *running.values()])
                raise UserError(f"a worker process died while it ran {labels} (killed, or out of memory); "
                                "run again with --workers 1 to use one process") from None
            clock.finish(t, seconds)
            computed.add(k)
            bar.update()
            if t.cache:
                cache.save(t.stage, k, value)
            if remaining[k] > 0 or k in keep:
                memo[k] = value
            elif not t.cache:
                uncached_held -= 1
            for r in readers[k]:
                if r in waiting and k in waiting[r]:
                    waiting[r].discard(k)
                    if not waiting[r] and r not in computed:
                        push(r)

        def doing() -> str:
            """Every running task, with its own bars where it has sent them (what a worker is at, and its ETA)."""
            shown = []
            for k in list(running.values()):
                inner = self._doing.get(k)
                shown.append(f"{graph.tasks[k].label}: {inner}" if inner else graph.tasks[k].label)
            return " | ".join(shown)

        with progress.bar("tasks", len(todo)) as bar:
            bar.detail = doing
            self._bar = bar
            try:
                schedule(todo)
                while ready or running:
                    held = []
                    while ready and len(running) < self.workers:
                        item = heapq.heappop(ready)
                        k = item[2]
                        # a task that makes an uncached value waits while as many such values are held as there are
                        # workers, unless nothing else can run (then waiting could never end)
                        if not graph.tasks[k].cache and uncached_held >= self.workers and (running or ready):
                            held.append(item)
                            continue
                        start(k)
                    for item in held:
                        heapq.heappush(ready, item)
                    if not running:
                        continue
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        finish(future)
            finally:
                self._bar = None
        out = {}
        for k in wanted:
            available, value = value_of(k)
            if not available:  # a wanted entry that was cached when planned and failed its check when read
                return self._recompute(graph, wanted, cache, progress, computed, clock)
            out[k] = value
        return Outcome(out, computed, dict(clock.seconds))

    def _recompute(self, graph, wanted, cache, progress, computed, clock) -> Outcome:
        """A wanted cache entry was removed when read (it failed a check): plan again, which now computes it."""
        again = self.run(graph, wanted, cache, progress)
        seconds = Counter(clock.seconds)
        seconds.update(again.seconds)
        return Outcome(again.values, computed | again.computed, dict(seconds))


def executor_for(name: str, address: str | None = None, gpu: bool = False, workers: int = 1):
    """The executor of a run: in this process, in `workers` processes sharing the cores (local only), or on Ray.
    (Here rather than in tasks.py, which holds the other two: the worker executor builds on tasks.py.)"""
    if name == "local":
        if address:
            raise UserError("--ray-address: given with --executor local; add --executor ray")
        if workers > 1:
            import torch

            return WorkerExecutor(workers, max(1, torch.get_num_threads() // workers))
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address or None, gpu=gpu)
    raise UserError(f"--executor: found {name!r}, expected local or ray")
