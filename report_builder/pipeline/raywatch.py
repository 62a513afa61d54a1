"""Stops the Ray processes a run started, when the run's driver dies without stopping them (kill -9, the OOM killer).

A local Ray started by `ray.init` outlives a killed driver: its workers notice after a few seconds, but its
dashboard and runtime-env agents stay up for good. So before it starts Ray the driver starts this watchdog
(`python -m report_builder.pipeline.raywatch MARK PID`) and puts `REPORT_BUILDER_RAY_RUN=MARK`, a fresh random token, in
the environment Ray's processes inherit: the GCS, the raylet, the agents and every worker. The watchdog waits
until the driver is done or gone (its stdin, a pipe from the driver, at end of file; or this process handed to
another parent), then stops every process whose environment holds that exact entry: SIGTERM, then SIGKILL
after `GRACE_S`. Processes this run did not start (a user's own cluster, another run's Ray) do not hold the
token and are never signalled. Linux only (it reads /proc); elsewhere it finds nothing to stop.

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


def marked(mark: str) -> list[int]:
    """The processes whose environment holds MARK_VARIABLE=mark (this one excepted)."""
    entry = f"{MARK_VARIABLE}={mark}".encode()
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone already, or not ours to read
            continue
        if entry in environ.split(b"\0"):
            found.append(int(name))
    return found


def _signal(pid: int, sig: int, mark: str) -> None:
    """Send `sig` to `pid` if it still holds the mark; a pidfd pins the process so a reused pid is never hit."""
    entry = f"{MARK_VARIABLE}={mark}".encode()
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if entry not in f.read().split(b"\0"):
                    return
        except OSError:
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


def sweep(mark: str, grace: float = GRACE_S, bound: float = SWEEP_BOUND_S) -> list[int]:
    """Stop every process holding the mark; return the pids that were signalled. Rounds repeat until none is left
    twice in a row (a process being stopped may still have started another, e.g. the raylet an agent, under load),
    for at most `bound` seconds."""
    signalled: list[int] = []
    end = time.monotonic() + bound
    quiet = 0
    while quiet < 2 and time.monotonic() < end:
        pids = marked(mark)
        if not pids:
            quiet += 1
            time.sleep(0.25)
            continue
        quiet = 0
        for pid in pids:
            _signal(pid, signal.SIGTERM, mark)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and marked(mark):
            time.sleep(0.1)
        for pid in marked(mark):  # Ray's agents catch SIGTERM and hang in their handler once the raylet is gone
            _signal(pid, signal.SIGKILL, mark)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and marked(mark):  # a killed process takes a moment to go
            time.sleep(0.05)
        signalled += [pid for pid in pids if pid not in signalled]
    return signalled


def watch(mark: str, driver: int) -> None:
    """Wait for the driver to finish or die, then sweep."""
    while os.getppid() == driver:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # end of file: the driver closed its end (done), or died
    sweep(mark)


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
