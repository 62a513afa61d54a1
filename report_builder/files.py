"""Writing output: JSON with NaN as null, and folders that appear whole or not at all.

A command writes only where it was told to: into a folder that is absent, empty, or one of our own folders
of the same kind, which its marker file says (with the list of every file we wrote there). Anything else is
refused before any work starts. In a folder of ours, only the files the marker lists are replaced: what a
user added (notes, a .git folder, an extra figure) stays. Work happens in a hidden `.NAME.partial-PID`
folder beside the target, which carries an owner file so that a later run can tell a partial folder of a
dead process (removed) from one that is still being written (left alone).
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from report_builder.errors import UserError, raise_if_interrupted

MARKER = ".report_builder"  # in every folder we write: {"kind": "run" | "diff", "files": [what we wrote]}
MAX_MARKER_BYTES = 64 * 1024 * 1024
OWNER = ".owner"  # in a partial folder: {"host": ..., "pid": ...}
KINDS = ("run", "diff")


@functools.cache
def package_digest() -> str:
    """blake2b of every module of the package, for cached output drawn by code that has no version of its own (the
    figures, the unit galleries): they may use a helper, a title or a palette from any module."""
    h = hashlib.blake2b(digest_size=32)
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


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


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder we wrote: {"kind": "run" | "diff", "files": [every file we wrote there, relative]},
    or None when the folder has no readable marker of ours. Only the marker makes a folder ours: another tool's
    results.json is not enough."""
    marker = Path(folder) / MARKER
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > MAX_MARKER_BYTES:
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        return None
    files = data.get("files")
    if files is not None and not (isinstance(files, list) and all(_plain_relative(f) for f in files)):
        return None
    return {"kind": data["kind"], "files": files}


def _plain_relative(rel: object) -> bool:
    """A relative path with no '..', no empty part and no hidden leading part: what our manifests hold."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def folder_kind(folder: Path) -> str | None:
    """'run' or 'diff' for a folder whose marker says we wrote it, else None."""
    marker = read_marker(folder)
    return marker["kind"] if marker else None


def write_marker(folder: Path, kind: str, files: Iterable[str]) -> None:
    atomic_write(Path(folder) / MARKER, json.dumps({"kind": kind, "files": sorted(set(files))}).encode("utf-8"))


def files_under(folder: Path) -> list[str]:
    """Every file under `folder`, relative and '/'-separated, except our marker and owner files."""
    out = []
    for root, dirs, names in os.walk(folder):
        rel_root = os.path.relpath(root, folder)
        for name in names:
            rel = name if rel_root == "." else f"{rel_root}/{name}".replace(os.sep, "/")
            if rel not in (MARKER, OWNER):
                out.append(rel)
    return sorted(out)


def check_output(out: Path, kind: str, inputs: Iterable[Path] = (), option: str = "--out") -> None:
    """Refuse an output folder we may not write into, before any work starts (see the module docstring)."""
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
        entries = sorted(p.name for p in out.iterdir() if not _our_work_folder(p))
    except OSError as exc:
        raise UserError(f"{option} {out}: cannot read the folder ({exc.strerror})") from None
    if not entries:
        return
    marker = read_marker(out)
    if marker is None:
        listing = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
        raise UserError(f"{option} {out}: the folder holds files that report_builder did not write ({listing}); "
                        "it is left untouched. Give an empty or new folder")
    if marker["kind"] != kind:
        raise UserError(f"{option} {out}: is a report_builder {marker['kind']} folder, not a {kind} folder; it is "
                        "left untouched. Give another folder")
    if marker["files"] is None:
        raise UserError(f"{option} {out}: was written by an older report_builder that kept no list of the files it "
                        "wrote, so it cannot tell them from yours; it is left untouched. Move what you want to keep "
                        "and delete the folder, or give another folder")


def _symlinked_part(folder: Path, rel: str) -> str | None:
    """The first part of `rel` under `folder` that is a symbolic link (then writing there could reach outside)."""
    path = Path(folder)
    for part in rel.split("/")[:-1]:
        path = path / part
        if path.is_symlink():
            return str(path.relative_to(folder))
    return None


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _remove_empty_dirs(folder: Path, rels: Iterable[str]) -> None:
    """Remove the folders that held `rels` once they are empty (a folder holding anything else stays)."""
    dirs = {str(Path(r).parent) for r in rels} - {"."}
    for d in sorted({p for d in dirs for p in [d, *map(str, Path(d).parents)] if p != "."}, key=len, reverse=True):
        try:
            (folder / d).rmdir()
        except OSError:
            pass


def replace_ours(target: Path, work: Path, kind: str, scope: Callable[[str], bool] | None = None,
                 first: str | None = None) -> None:
    """Move every file of `work` into `target`, an existing folder that is empty or ours (check_output): the files
    our marker lists (those `scope` selects, all by default) are replaced, and anything else in `target` — a
    user's notes, a .git folder — stays where it is. `first`, the file that makes a folder readable (results.json),
    goes out first and comes back last, so an interrupted replacement is never read as a whole run.

    Crash safety: the marker first lists the old files and the new ones together, so whatever an interruption
    leaves in `target` is still known to be ours; the old files wait in a hidden folder with an owner file, which
    the next run removes (remove_stale)."""
    ours = set((read_marker(target) or {}).get("files") or [])
    old_files = sorted(f for f in ours if scope is None or scope(f))
    kept = ours - set(old_files)
    new_files = files_under(work)

    def in_the_way(f: str) -> bool:  # a file of the user's at f, or in place of one of f's folders
        return os.path.lexists(target / f) or any((target / p).is_file() and str(p) not in ours
                                                  for p in Path(f).parents if str(p) != ".")

    theirs = [f for f in new_files if f not in ours and in_the_way(f)]
    if theirs:
        raise UserError(f"{target}: holds files of yours where this {kind} writes its own ({', '.join(theirs[:5])}); "
                        "nothing was replaced. Move them, or give another folder")
    linked = next(filter(None, (_symlinked_part(target, f) for f in old_files + new_files)), None)
    if linked:
        raise UserError(f"{target}: {linked} is a symbolic link, where this {kind} writes its files; nothing was "
                        "replaced. Replace the link by a folder, or give another folder")
    order = sorted(old_files, key=lambda f: f != first)
    write_marker(target, kind, ours | set(new_files))
    old = target / f".{kind}.old-{os.getpid()}"
    if old_files:
        shutil.rmtree(old, ignore_errors=True)
        owned_folder(old)
    for f in order:
        path = target / f
        if os.path.lexists(path) and (path.is_symlink() or not path.is_dir()):  # a folder there now is the user's
            _move(path, old / f)
    _remove_empty_dirs(target, old_files)
    for f in sorted(new_files, key=lambda f: f == first):
        _move(work / f, target / f)
    write_marker(target, kind, kept | set(new_files))
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- atomic folders


def process_alive(pid: int) -> bool:
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
        return owner["host"] == socket.gethostname() and not process_alive(int(owner["pid"]))
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


def _our_work_folder(path: Path) -> bool:
    """A `.NAME.partial-PID` or `.NAME.old-PID` folder with our owner file: a run's work in progress or its leftover."""
    return (path.name.startswith(".") and (".partial-" in path.name or ".old-" in path.name) and path.is_dir()
            and not path.is_symlink() and (path / OWNER).is_file())


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


def partial_folder(parent: Path, name: str) -> Path:
    """A fresh hidden work folder `.NAME.partial-PID` in `parent`, after removing those of ended processes."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent, name)
        work = parent / f".{name}.partial-{os.getpid()}"
        if work.exists() and _owned_by_this_pid(work):
            shutil.rmtree(work)  # left by an ended process that had our pid: this one has not made it yet
        owned_folder(work)
    except OSError as exc:
        raise output_error(exc, parent) from None
    return work


@contextmanager
def atomic_dir(target: Path, kind: str, inputs: Iterable[Path] = (), first: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success its files go into `target`, on any failure it is removed, so a
    failed run never leaves a half-written output folder. `target` is checked first with `check_output`: a folder
    that is not ours is never written into. A new target appears whole (its work folder, beside it, is renamed);
    an existing one (empty, or ours) gets its work folder inside it, and only the files we wrote are replaced
    (replace_ours): it never goes missing, and nothing is written outside it."""
    target = Path(target)
    check_output(target, kind, inputs)
    existed = target.is_dir()
    work = partial_folder(target, kind) if existed else partial_folder(target.parent, target.name)
    try:
        yield work
        raise_if_interrupted()  # a Ctrl-C that a callback swallowed still stops the commit
        check_output(target, kind, inputs)  # again: someone may have written there while we worked
        (work / OWNER).unlink()
        if existed or target.exists():
            replace_ours(target, work, kind, first=first)
        else:
            write_marker(work, kind, files_under(work))
            work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_cache_apart(cache_root: Path, out: Path) -> None:
    """The cache and a run's output must not hold one another: the run would list cache entries as its files, or
    a rerun would replace cache entries."""
    c, o = Path(cache_root).resolve(), Path(out).resolve()
    if c == o or c.is_relative_to(o) or o.is_relative_to(c):
        where = "is inside" if c.is_relative_to(o) and c != o else "holds" if c != o else "is"
        raise UserError(f"--cache-dir {cache_root}: {where} the output folder {out}; keep the cache apart (the "
                        "default, ~/.cache/report_builder, is)")


# ---------------------------------------------------------------- messages for the disk's errors

_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EDQUOT: "the disk quota is exceeded", errno.ENAMETOOLONG: "a file name is too long"}


def output_error(exc: OSError, where: Path | str) -> UserError:
    """An OSError while writing output, as one clear sentence naming the place."""
    what = _DISK_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
    name = exc.filename or where
    return UserError(f"cannot write {name}: {what}. Nothing was written; free space or choose another folder")


def os_error_text(exc: OSError, places: str = "") -> str:
    """Any OSError that reached the command line, as one sentence naming the file (or, when the error names none,
    the folders the command writes: `places`)."""
    what = _DISK_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
    if exc.filename:
        return f"{exc.filename}: {what}"
    return f"{what} (writing {places})" if places else what
