"""A content-keyed disk cache for expensive stage results.

Keys hash everything that determines a result (weights hash, image hash, layer, parameters,
the stage's code version), never a name alone. Each entry is written atomically and carries its own
key and a SHA-256 of its payload; on load both are verified and the value's structure is checked
against what the stage expects. An entry that fails any check is recomputed, and the run says so once.
A cache that cannot be written is a warning, not a failure: the run goes on without caching.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from report_builder.files import process_alive

MAGIC = b"report_builder-cache 2\n"
def _host() -> str:
    """This machine's name as temporary files carry it (its dots would split the file name)."""
    return socket.gethostname().replace(".", "_")


def _writer() -> str:
    """Who writes a temporary file, in its name: host and pid."""
    return f"{_host()}-{os.getpid()}"
    return True


def default_root() -> Path:
    """$REPORT_BUILDER_CACHE, else ~/.cache/report_builder (read at call time, so tests can redirect it)."""
    return Path(os.environ.get("REPORT_BUILDER_CACHE") or Path.home() / ".cache" / "report_builder")


def key_of(parts: dict[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_key(stage: str, parts: dict[str, Any]) -> str:
    """The key of one stage's entry: the stage's name and everything that determines its result."""
    return key_of({"stage": stage, **parts})


def _to_storable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, dict):
        return {k: _to_storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_storable(v) for v in value]
    return value


def _from_storable(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__ndarray__"} and isinstance(value["__ndarray__"], torch.Tensor):
            return value["__ndarray__"].numpy()
        return {k: _from_storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_storable(v) for v in value]
    return value


def conforms(value: Any, shape: Any) -> bool:
    """Whether `value` has the structure `shape` describes: a type (np.ndarray, float, str, ...), a dict of
    key -> shape (those keys must be present; others may be too), a one-item list (a list of such items),
    or a tuple of alternatives. Numbers: an int is a float too; a bool is neither."""
    if isinstance(shape, tuple):
        return any(conforms(value, s) for s in shape)
    if isinstance(shape, dict):
        return isinstance(value, dict) and all(k in value and conforms(value[k], s) for k, s in shape.items())
    if isinstance(shape, list):
        return isinstance(value, list) and all(conforms(v, shape[0]) for v in value)
    if shape is float:
        return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if shape is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if shape is None:
        return value is None
    if shape is Any:
        return True
    return isinstance(value, shape)


class Cache:
    def __init__(self, root: Path | None = None, enabled: bool = True,
                 warn: Callable[[str], None] | None = None):
        self.root = Path(root) if root else default_root()
        self.enabled = enabled
        self.writable = enabled
        self.hits = 0
        self.misses = 0
        self.warn_to = warn or (lambda text: print(f"warning: {text}", file=sys.stderr, flush=True))
        self._said: set[str] = set()

    def warn_once(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            self.warn_to(text)

    def _path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / f"{key}.pt"

    def contains(self, stage: str, key: str) -> bool:
        return self.enabled and self._path(stage, key).is_file()

    def load(self, stage: str, key: str, shape: Any = Any, count: bool = True) -> Any | None:
        """The entry's value, or None when it is absent or fails a check (then it is removed). `count` false:
        not a task's entry, so not in the hits and computed counts a run reports (the rendered figures')."""
        if not self.enabled:
            return None
        path = self._path(stage, key)
        try:
            if not path.is_file():
                return None
            data = path.read_bytes()
        except OSError as exc:
            self.warn_once(f"cache entry {path} cannot be read ({exc.strerror}); recomputing it")
            return None
        problem, value = self._decode(data, stage, key)
        if problem is None and not conforms(value, shape):
            problem = "holds a value of another structure than this stage writes"
        if problem is not None:
            self.warn_once(f"cache entry {path} {problem}; recomputing it")
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
            return None
        self.hits += count
        return value

    @staticmethod
    def _decode(data: bytes, stage: str, key: str) -> tuple[str | None, Any]:
        if not data.startswith(MAGIC):
            return "is not a cache entry of this report_builder version", None
        header_end = data.find(b"\n", len(MAGIC))
        try:
            header = json.loads(data[len(MAGIC) : header_end])
        except ValueError:
            return "has a damaged header", None
        payload = data[header_end + 1 :]
        if header.get("key") != key or header.get("stage") != stage:
            return "belongs to another key (was it copied or renamed?)", None
        if header.get("sha256") != hashlib.sha256(payload).hexdigest():
            return "failed its checksum (its bytes changed since it was written)", None
        try:
            return None, _from_storable(torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True))
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad entry
            return f"cannot be loaded ({type(exc).__name__})", None

    def save(self, stage: str, key: str, value: Any, count: bool = True) -> None:
        self.misses += count  # saved = computed
        if not self.writable:
            return
        buffer = io.BytesIO()
        torch.save(_to_storable(value), buffer)
        payload = buffer.getvalue()
        header = json.dumps({"stage": stage, "key": key, "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        path = self._path(stage, key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{_writer()}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + header + b"\n" + payload)
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            self.writable = False
            self.warn_once(f"the cache folder {self.root} cannot be written ({exc.strerror or exc}); "
                           "this run goes on without caching")
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def save_files(self, stage: str, key: str, files: dict[str, bytes]) -> None:
        """Files by name (figures, unit strips: drawn, not computed by a task), stored under one key; not counted
        among the run's task entries."""
        self.save(stage, key, {n: np.frombuffer(bytearray(data), np.uint8) for n, data in files.items()}, count=False)

    def load_files(self, stage: str, key: str) -> dict[str, bytes] | None:
        """What save_files stored: file name -> bytes, or None when absent or not plain file names and bytes."""
        stored = self.load(stage, key, {}, count=False)
        if stored is None or not all(isinstance(n, str) and Path(n).name == n and not n.startswith(".")
                                     and isinstance(v, np.ndarray) and v.dtype == np.uint8 for n, v in stored.items()):
            return None
        return {n: v.tobytes() for n, v in stored.items()}

    def remove_stale_temporaries(self) -> int:
        """Remove the half-written entries that ended processes left (a kill -9 in the middle of a write): each
        temporary file names its writer's host and pid. Another live process's temporaries are left alone."""
        removed = 0
        if not self.enabled:
            return removed
        for tmp in self.root.glob("*/*/.*.tmp"):
            host, _, pid = tmp.name[1:].split(".", 1)[0].rpartition("-")
            if host == _host() and pid.isdigit() and not process_alive(int(pid)):
                try:
                    tmp.unlink()
                    removed += 1
                except OSError:
                    pass
        return removed

    def get_or_compute(self, stage: str, parts: dict[str, Any], compute: Callable[[], Any],
                       shape: Any = Any) -> tuple[Any, bool]:
        """(value, was_cached)."""
        key = stage_key(stage, parts)
        value = self.load(stage, key, shape)
        if value is not None:
            return value, True
        value = compute()
        self.save(stage, key, value)
        return value, False
