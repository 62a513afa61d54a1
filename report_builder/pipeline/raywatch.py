"""Stops the Ray processes a run started, when the run's driver dies without stopping them (kill -9, the OOM killer).

A local Ray started by `ray.init` outlives a killed driver: its workers notice after a few seconds, but its
dashboard and runtime-env agents stay up for good. So before it starts Ray the driver starts this watchdog
(`python -m report_builder.pipeline.raywatch MARK PID`) and puts `REPORT_BUILDER_RAY_RUN=MARK`, a fresh random token, in
the environment Ray's processes inherit: the GCS, the raylet, the agents and every worker. The watchdog waits
until the driver is done or gone (its stdin, a pipe from the driver, at end of file; or this process handed to
another parent), then stops every process whose environment holds that exact entry: SIGTERM, then SIGKILL
after `GRACE_S`. Processes this run did not start (a user's own cluster, another run's Ray) do not hold the
token and are never signalled. Linux only (it reads /proc); elsewhere it finds nothing to stop.

A process's environment is not always readable to its end: Ray's runtime-env agent, shutting down after its raylet,
lived on for a minute with no mark to be seen in /proc/PID/environ, so a sweep that looked only for the mark left it
running. So while it waits the watchdog also remembers every marked process it sees, by pid and start time (which
together name one process for good), and the sweep stops those too, marked or not, if they are still the same
process. Set REPORT_BUILDER_RAYWATCH_LOG to a file to have the watchdog say what it saw and did.

This module imports nothing heavy: the watchdog costs a bare Python interpreter.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import time

MARK_VARIABLE = "REPORT_BUILDER_RAY_RUN"
GRACE_S = 2.0  # how long a process has to exit after SIGTERM before it gets SIGKILL
POLL_S = 0.5  # how often the watchdog checks that its driver is still its parent
SWEEP_BOUND_S = 20.0  # the longest a sweep goes on looking for processes started while it stopped others


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (with its pid, a name no later process can take), or None
    when it is gone or dead (a zombie waiting to be reaped: nothing left to stop). A zombie main thread with other
    threads still running is a live process: its environment reads empty, but it runs and holds its ports."""
    fields = _stat(f"/proc/{pid}/stat")
    if fields is None:
        return None
    if fields[0] in (b"Z", b"X"):
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None
        if not any((t := _stat(f"/proc/{pid}/task/{tid}/stat")) is not None and t[0] not in (b"Z", b"X")
                   for tid in threads):
            return None
    return int(fields[19])


def _stat(path: str) -> list[bytes] | None:
    """The fields of a /proc stat file after the command name (which, in parentheses, may hold spaces)."""
    try:
        with open(path, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _log(text: str) -> None:
    path = os.environ.get("REPORT_BUILDER_RAYWATCH_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} {text}\n")


def holds_mark(pid: int, mark: str) -> bool:
    """Whether the process's environment holds MARK_VARIABLE=mark (False when it is gone or cannot be read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{MARK_VARIABLE}={mark}".encode() in f.read().split(b"\0")
    except OSError:  # gone already, or not ours to read
        return False


def marked(mark: str) -> list[int]:
    """The processes whose environment holds MARK_VARIABLE=mark (this one excepted)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return [int(n) for n in names if n.isdigit() and int(n) != os.getpid() and holds_mark(int(n), mark)]


def _ours(pid: int, mark: str, seen: dict[int, int]) -> bool:
    """Whether `pid` is a process of this run: it holds the mark, or it is the very process seen holding it."""
    return holds_mark(pid, mark) or (pid in seen and start_time(pid) == seen[pid])


def remember(mark: str, seen: dict[int, int]) -> None:
    """Add the marked processes running now to `seen` (pid -> start time)."""
    for pid in marked(mark):
        if pid not in seen and (started := start_time(pid)) is not None:
            seen[pid] = started
            _log(f"seen {pid} {_cmdline(pid)}")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return "?"


def _left(mark: str, seen: dict[int, int]) -> list[int]:
    """This run's processes still alive: those holding the mark, and those seen holding it that still run."""
    now = set(marked(mark))
    now.update(pid for pid, started in seen.items() if start_time(pid) == started)
    return sorted(now)


def _signal(pid: int, sig: int, mark: str, seen: dict[int, int]) -> None:
    """Send `sig` to `pid` if it is still a process of this run; a pidfd pins the process so a reused pid is never
    hit."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        if not _ours(pid, mark, seen):
            return
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    finally:
        if fd is not None:
            os.close(fd)


def sweep(mark: str, grace: float = GRACE_S, bound: float = SWEEP_BOUND_S,
          seen: dict[int, int] | None = None) -> list[int]:
    """Stop every process of this run (holding the mark, or in `seen`); return the pids that were signalled. Rounds
    repeat until none is left twice in a row (a process being stopped may still have started another, e.g. the
    raylet an agent, under load), for at most `bound` seconds."""
    seen = {} if seen is None else seen
    signalled: list[int] = []
    end = time.monotonic() + bound
    quiet = 0
    while quiet < 2 and time.monotonic() < end:
        remember(mark, seen)  # so one whose mark stops showing mid-sweep is still followed
        pids = _left(mark, seen)
        if not pids:
            quiet += 1
            time.sleep(0.25)
            continue
        quiet = 0
        _log(f"SIGTERM {pids}")
        for pid in pids:
            _signal(pid, signal.SIGTERM, mark, seen)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _left(mark, seen):
            time.sleep(0.1)
        if stubborn := _left(mark, seen):  # Ray's agents catch SIGTERM and hang in their handler once the raylet is gone
            _log(f"SIGKILL {stubborn}")
        for pid in stubborn:
            _signal(pid, signal.SIGKILL, mark, seen)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and _left(mark, seen):  # a killed process takes a moment to go
            time.sleep(0.05)
        signalled += [pid for pid in pids if pid not in signalled]
    _log(f"swept: {signalled}; left {_left(mark, seen)}")
    return signalled


def watch(mark: str, driver: int) -> None:
    """Wait for the driver to finish or die, remembering the run's processes as they start, then sweep."""
    seen: dict[int, int] = {}
    _log(f"watching driver {driver}")
    while os.getppid() == driver:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            _log("driver done or gone (end of file)")
            break  # end of file: the driver closed its end (done), or died
        remember(mark, seen)
    else:
        _log("driver gone (new parent)")
    sweep(mark, seen=seen)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[1] or not argv[2].isdigit():
        print("usage: python -m report_builder.pipeline.raywatch MARK DRIVER_PID  (started by the Ray executor)",
              file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a Ctrl-C or a hang-up aimed at the driver must not stop the cleanup
    watch(argv[1], int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
