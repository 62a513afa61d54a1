"""Whether the model hubs can be reached, decided once and quickly, so that an offline start-up says what to fetch
within seconds instead of retrying for a minute (huggingface_hub retries each file five times with back-off).

The download code itself stays the libraries' own: this only tells them, when no network is there, to look in the
local cache alone.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

HUB_HOST = "huggingface.co"
PROBE_SECONDS = 3.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_decided: dict[str, bool] = {}


def _said_offline() -> str | None:
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def _reachable(host: str, port: int = 443, seconds: float = PROBE_SECONDS) -> bool:
    """A TCP connection to host:port within `seconds`, name lookup included (in a thread: a lookup can hang)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=seconds):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(result and result[0])


def hub_offline() -> str | None:
    """Why the hub cannot be used (an environment variable the user set, or no answer from it), or None."""
    said = _said_offline()
    if said:
        return f"{said} is set"
    if HUB_HOST not in _decided:
        _decided[HUB_HOST] = _reachable(HUB_HOST)
    return None if _decided[HUB_HOST] else f"{HUB_HOST} cannot be reached"


@contextmanager
def cache_only(offline: bool) -> Iterator[None]:
    """While offline: huggingface_hub reads only its local cache (no retries), and the libraries' own log lines
    about the failed download stay quiet (the caller raises one clear message instead)."""
    if not offline:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # no hub library: nothing will try it
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        logging.disable(logging.NOTSET)
