"""Writing output: JSON with NaN as null, and folders that appear whole or not at all.

A command writes only where it was told to. An output folder may be replaced only when it is absent,
empty, or one of our own folders of the same kind holding nothing but what we write; anything else is
refused before any work starts. Work happens in a hidden `.NAME.partial-PID` folder beside the target,
which carries an owner file so that a later run can tell a partial folder of a dead process (removed)
from one that is still being written (left alone).
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import UserError

MARKER = ".report_builder"  # in every folder we write: {"kind": "run" | "diff"}
OWNER = ".owner"  # in a partial folder: {"host": ..., "pid": ...}
# What our run and diff folders hold at their top level; anything else in a folder is someone else's.
OUR_ENTRIES = {
    "run": {MARKER, "results.json", "report.html", "report.pdf", "units.html", "agreement.csv", "evaluation.csv",
            "dissection", "explanations", "netdissect", "figures", "sweep.csv"},
    "diff": {MARKER, "diff.json", "report.html", "report.pdf", "figures"},
}
# Files that tell an older folder of ours (written before the marker existed) by its kind.
KIND_FILES = {"run": "results.json", "diff": "diff.json"}


def clean_nan(value):
    """NaN has no JSON form: undefined numbers become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_nan(v) for v in value]
    return value


def _default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, data: dict) -> None:
    atomic_write(Path(path), json.dumps(clean_nan(data), indent=2, default=_default, allow_nan=False).encode("utf-8"))


def atomic_write(path: Path, data: bytes) -> None:
    """Write beside the target, then rename: readers see the old file or the new one, never half of one.
    A failed write (a full disk) leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- reading text inputs

MAX_TEXT_BYTES = 64 * 1024 * 1024


def read_text(path: Path, where: str, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A user's text file (class names, concepts, an image list, a CSV), whole: its absence, size or encoding
    is a UserError naming the key, the file and the problem."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{where}: {what} {path} is a folder; expected a text file")
    if not path.is_file():
        raise UserError(f"{where}: {what} {path} does not exist")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UserError(f"{where}: {what} {path} is {size:,} bytes; at most {max_bytes:,} are read")
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{where}: cannot read {what} {path} ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{where}: {what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                        "save it as UTF-8") from None


# ---------------------------------------------------------------- which folders are ours


def folder_kind(folder: Path) -> str | None:
    """'run' or 'diff' for a folder we wrote, else None."""
    folder = Path(folder)
    marker = folder / MARKER
    try:
        if marker.is_file() and marker.stat().st_size < 4096:
            kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
            return kind if kind in KIND_FILES else None
    except (OSError, ValueError, AttributeError):
        return None
    for kind, name in KIND_FILES.items():  # folders written before the marker existed
        if (folder / name).is_file():
            return kind
    return None


def check_output(out: Path, kind: str, inputs: Iterable[Path] = (), option: str = "--out") -> None:
    """Refuse an output folder we may not replace, before any work starts (see the module docstring)."""
    out = Path(out)
    if out.is_symlink():
        raise UserError(f"{option} {out}: is a symbolic link; give the folder itself")
    resolved = out.resolve()
    for path in inputs:
        inp = Path(path).resolve()
        if resolved == inp or resolved.is_relative_to(inp) or inp.is_relative_to(resolved):
            raise UserError(f"{option} {out}: overlaps the input {path}; write the output somewhere else")
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == out else f"is inside {parent}, which is a file"
            raise UserError(f"{option} {out}: {what}; expected a folder")
        if parent.exists():
            break
    if not out.exists():
        return
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        raise UserError(f"{option} {out}: cannot read the folder ({exc.strerror})") from None
    if not entries:
        return
    found = folder_kind(out)
    if found is None:
        listing = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
        raise UserError(f"{option} {out}: the folder holds files that report_builder did not write ({listing}); "
                        "it is left untouched. Give an empty or new folder")
    if found != kind:
        raise UserError(f"{option} {out}: is a report_builder {found} folder, not a {kind} folder; it is left "
                        f"untouched. Give another folder")
    foreign = [name for name in entries if name not in OUR_ENTRIES[kind] and not name.startswith(".")]
    if foreign:
        raise UserError(f"{option} {out}: this {kind} folder also holds files that report_builder did not write "
                        f"({', '.join(foreign[:5])}); move them out first, or give another folder")


# ---------------------------------------------------------------- atomic folders


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    return True


def _owner_gone(folder: Path) -> bool:
    """True for a partial folder of ours whose process, on this machine, has ended."""
    try:
        owner = json.loads((folder / OWNER).read_text(encoding="utf-8"))
        return owner["host"] == socket.gethostname() and not _alive(int(owner["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not ours to judge: leave it


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Remove the partial folders of `name` that processes which have ended left behind."""
    removed = []
    for pattern in (f".{name}.partial-*", f".{name}.old-*"):
        for folder in parent.glob(pattern):
            if folder.is_dir() and not folder.is_symlink() and _owner_gone(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def _owned_by_this_pid(folder: Path) -> bool:
    try:
        owner = json.loads((folder / OWNER).read_text(encoding="utf-8"))
        return owner["host"] == socket.gethostname() and int(owner["pid"]) == os.getpid()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def owned_folder(path: Path) -> None:
    """Make a folder with an owner file: this process on this machine."""
    path.mkdir()
    (path / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


@contextmanager
def atomic_dir(target: Path, kind: str, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target`, on any failure it is
    removed, so a failed run never leaves a half-written output folder. `target` is checked first with
    `check_output`: a folder that is not ours is never replaced."""
    target = Path(target)
    check_output(target, kind, inputs)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent, target.name)
        work = parent / f".{target.name}.partial-{os.getpid()}"
        if work.exists() and _owned_by_this_pid(work):
            shutil.rmtree(work)  # left by an ended process that had our pid: this one has not made it yet
        owned_folder(work)
    except OSError as exc:
        raise output_error(exc, parent) from None
    try:
        yield work
        (work / MARKER).write_text(json.dumps({"kind": kind}))
        (work / OWNER).unlink()
        check_output(target, kind, inputs)  # again: someone may have written there while we worked
        old = parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            _owned_folder_from(target, old)
        work.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _owned_folder_from(target: Path, old: Path) -> None:
    """Move the folder being replaced aside, marked as ours, so that a crash before the end is cleaned up later."""
    target.rename(old)
    (old / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


# ---------------------------------------------------------------- messages for the disk's errors

_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EDQUOT: "the disk quota is exceeded", errno.ENAMETOOLONG: "a file name is too long"}


def output_error(exc: OSError, where: Path | str) -> UserError:
    """An OSError while writing output, as one clear sentence naming the place."""
    what = _DISK_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
    name = exc.filename or where
    return UserError(f"cannot write {name}: {what}. Nothing was written; free space or choose another folder")


def os_error_text(exc: OSError) -> str:
    """Any OSError that reached the command line, as one sentence naming the file."""
    what = _DISK_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
    return f"{exc.filename}: {what}" if exc.filename else what
