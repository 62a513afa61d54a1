"""Errors a user can fix. The CLI prints them without a traceback and exits 2."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class UserError(Exception):
    """Bad input: a spec, a file, a missing download. The message says what and where."""

    exit_code = 2


class SpecError(UserError):
    """One or more problems in a spec file, each naming its key path."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        lines = [f"{path}: {p}" for p in problems]
        super().__init__("invalid spec\n" + "\n".join(f"  {line}" for line in lines))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: the command stops and cleans up, as for KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# Signals that arrived while the command ran. A signal handler's exception can land inside a weakref callback or a
# __del__, where Python prints it and drops it; the record stays, and raise_if_interrupted() raises it again at the
# points that commit output, so an interrupted command never writes its output as if it had finished.
_pending: list[int] = []


def _on_signal(signum: int, frame) -> None:  # noqa: ANN001 - the signal module's signature
    _pending.append(signum)
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    if _pending:
        raise Interrupted(_pending[0])


def pending_signal() -> int | None:
    """The signal that arrived while the command ran, if one did. An exception raised while one is pending is its
    consequence: the handler's Interrupted can come out as another error (a C extension being imported when it
    landed reports `ImportError: initialization failed`)."""
    return _pending[0] if _pending else None


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted for the duration (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    _pending.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _pending.clear()
