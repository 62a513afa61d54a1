"""Progress on stderr: a line per stage, and live bars with count, rate and ETA.

On a terminal, long loops draw one status line at the bottom (every open bar, innermost last) that is
redrawn in place; the stage lines print above it. Elsewhere (CI, a log file) the stage lines are the log, and
while any bar is open a line with every open bar (count, rate, ETA) is logged every LOG_SECONDS, so a long
stage never goes quiet in a log file. Stage code never takes a Progress argument: it asks for `current()`, which
is the run's Progress in the driver, a Forwarded one in a local worker process (its bars are shown beside its task
on the driver's line), and a silent one anywhere else (a Ray worker, a test).
"""
from __future__ import annotations

import contextvars
import sys
import threading
import time
import types
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
REDRAW_SECONDS = 0.1
LOG_SECONDS = 30.0  # off a terminal: the longest a run goes without a line while a bar is open
FORWARD_SECONDS = 1.0  # how often a worker process sends its bars to the driver


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _one(unit: str) -> str:
    """A plural unit in the singular, for 's per batch': batches -> batch, steps -> step, unit chunks -> unit chunk."""
    if unit.endswith(("ches", "shes", "xes", "sses")):
        return unit[:-2]
    return unit[:-1] if unit.endswith("s") and not unit.endswith("ss") else unit


class Bar:
    """One loop's progress: done / total, rate, and the time left at the average rate so far."""

    def __init__(self, owner: Progress, label: str, total: int | None, unit: str):
        self.owner, self.label, self.total, self.unit = owner, label, total, unit
        self.done = 0
        self.note = ""  # what it is doing now
        self.detail: Callable[[], str] | None = None  # or, read when drawn: what it is doing now
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        self.owner._draw()

    def refresh(self, force: bool = False) -> None:
        """Redraw the line, from any thread, now that its detail has changed (unless forced, at most every
        REDRAW_SECONDS)."""
        with self.owner._lock:
            self.owner._draw(force)

    def doing(self, note: str) -> None:
        self.note = note
        self.owner._draw(force=True)

    def text(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        if rate >= 1:
            speed = f"{rate:.1f}{unit}/s"
        elif rate > 0:
            speed = f"{1 / rate:.1f} s per {_one(self.unit) or 'item'}"
        else:
            speed = "…"
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else None
            eta = f" ETA {_clock(left)}" if left is not None and self.done < self.total else ""
            text = f"{self.label} {self.done}/{self.total} ({100 * self.done / self.total:.0f}%) {speed}{eta}"
        else:
            text = f"{self.label} {self.done} {speed}"
        note = self.detail() if self.detail is not None else self.note
        return f"{text} · {note}" if note else text


class Progress:
    """Stage lines (with their durations, kept for provenance) and live bars."""

    def __init__(self, stream=None, live: bool | None = None, quiet: bool = False, verbose: bool = False):
        self.stream = stream  # None: whatever sys.stderr is when a line is written
        self._live = live
        self.quiet = quiet
        self.verbose = verbose
        self.durations: dict[str, float] = {}
        self.start = time.perf_counter()
        self._bars: list[Bar] = []
        self._drawn = 0.0
        self._status = False
        self._lock = threading.RLock()  # the heartbeat thread writes too
        self._heartbeat: threading.Thread | None = None
        self._beat = threading.Condition(self._lock)

    @property
    def out(self):
        return self.stream or sys.stderr

    @property
    def live(self) -> bool:
        if self._live is None:
            return not self.quiet and hasattr(self.out, "isatty") and self.out.isatty()
        return self._live and not self.quiet

    def _clear(self) -> None:
        if self._status:
            self.out.write("\r\x1b[K")
            self._status = False

    def _draw(self, force: bool = False) -> None:
        if not self.live or not self._bars:
            return
        now = time.perf_counter()
        if not force and now - self._drawn < REDRAW_SECONDS:
            return
        self._drawn = now
        line = " | ".join(b.text() for b in self._bars)
        width = 160
        self.out.write("\r\x1b[K" + (line if len(line) <= width else "…" + line[-width + 1 :]))
        self.out.flush()
        self._status = True

    def say(self, text: str, detail: bool = False) -> None:
        """A line of the log; `detail` lines only with --verbose. Warnings always print, even with --quiet."""
        if (self.quiet and not text.startswith("warning")) or (detail and not self.verbose):
            return
        with self._lock:
            self._clear()
            print(f"[{time.perf_counter() - self.start:7.1f}s] {text}", file=self.out, flush=True)
            self._draw(force=True)

    def _log_bars(self) -> None:
        """Off a terminal: while bars are open, say where they stand every LOG_SECONDS (a daemon thread, so a
        stage that updates its bar rarely, or not at all for minutes, still shows it is alive)."""
        with self._lock:
            while self._bars:
                if not self._beat.wait_for(lambda: not self._bars, timeout=LOG_SECONDS):
                    self.say(" | ".join(b.text() for b in self._bars))
            self._heartbeat = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"{name} ...")
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.durations[name] = self.durations.get(name, 0.0) + seconds
        self.say(f"{name} done in {seconds:.1f} s")

    @contextmanager
    def bar(self, label: str, total: int | None = None, unit: str = "") -> Iterator[Bar]:
        bar = Bar(self, label, total, unit)
        with self._lock:
            self._bars.append(bar)
            self._draw(force=True)
            if not self.live and not self.quiet and self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._log_bars, name="progress-log", daemon=True)
                self._heartbeat.start()
        try:
            yield bar
        finally:
            with self._lock:
                self._bars.remove(bar)
                self._clear()
                self._draw(force=True)
                self._beat.notify_all()

    def track(self, items: Iterable[T], label: str, total: int | None = None, unit: str = "") -> Iterator[T]:
        """Iterate with a bar."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        with self.bar(label, total, unit) as bar:
            for item in items:
                yield item
                bar.update()

    @contextmanager
    def active(self) -> Iterator[Progress]:
        """Make this the Progress that stage code reaches through current()."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


class Forwarded(Progress):
    """A worker process's Progress: its open bars (count, rate, ETA) are handed to `send` as one line, at most every
    FORWARD_SECONDS and when a bar opens or closes, for the driver to show beside the task; it prints only
    warnings, as a silent Progress does."""

    def __init__(self, send: Callable[[str], None]):
        super().__init__(quiet=True)
        self._send = send

    @property
    def live(self) -> bool:
        return True  # its bars are drawn, by sending them (and no heartbeat thread is started)

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._drawn < FORWARD_SECONDS:
            return
        self._drawn = now
        self._send(" | ".join(b.text() for b in self._bars))


_current: contextvars.ContextVar[Progress] = contextvars.ContextVar("progress", default=Progress(quiet=True))


def current() -> Progress:
    return _current.get()


@contextmanager
def folded_tqdm(*modules: types.ModuleType, label: str, unit: str = "") -> Iterator[None]:
    """Run code that draws tqdm bars (grad-cam's ScoreCAM and AblationCAM) with our bar in their place."""
    progress = current()

    class _Shim:
        @staticmethod
        def tqdm(iterable=None, *args, **kwargs):
            return progress.track(iterable, label, kwargs.get("total"), unit)

    saved = [(m, m.tqdm) for m in modules]
    try:
        for m in modules:
            m.tqdm = _Shim
        yield
    finally:
        for m, original in saved:
            m.tqdm = original
