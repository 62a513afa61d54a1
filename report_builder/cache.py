"""A content-keyed disk cache for expensive stage results.

Keys hash everything that determines a result (weights hash, image hash, layer, parameters,
the stage's code version), never a name alone. Writes are atomic; an entry that fails to load
is recomputed, not trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch



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
        if set(value) == {"__ndarray__"}:
            return value["__ndarray__"].numpy()
        return {k: _from_storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_storable(v) for v in value]
    return value


class Cache:
    def __init__(self, root: Path | None = None, enabled: bool = True):
        self.root = Path(root) if root else default_root()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def _path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / f"{key}.pt"

    def load(self, stage: str, key: str) -> Any | None:
        if not self.enabled:
            return None
        path = self._path(stage, key)
        if not path.is_file():
            return None
        try:
            value = _from_storable(torch.load(path, map_location="cpu", weights_only=True))
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return value

    def save(self, stage: str, key: str, value: Any) -> None:
        self.misses += 1  # saved = computed
        if not self.enabled:
            return
        path = self._path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(_to_storable(value), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_or_compute(self, stage: str, parts: dict[str, Any], compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, was_cached)."""
        key = stage_key(stage, parts)
        value = self.load(stage, key)
        if value is not None:
            return value, True
        value = compute()
        self.save(stage, key, value)
        return value, False
