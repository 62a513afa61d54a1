"""Reading a run directory: results.json checked before anything trusts it.

render, diff and open_run read only a run directory, and a run directory can come from anywhere. So
results.json is bounded (file size, nesting, string lengths), its schema version is checked, every id
in it is checked again (ids become file names), and every path in it must resolve inside the run
directory. Anything else is a UserError naming the file and the key.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import UserError

SCHEMA_VERSION = 1
MAX_RESULTS_BYTES = 512 * 1024 * 1024
MAX_STRING = 20_000  # the longest string report_builder writes is a finding of a few hundred characters
MAX_DEPTH = 64
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
# Key paths of the numbers that are wall-clock timings: they change from run to run, and so does every
# finding marked "timing": true. diff and reproducibility checks set them apart.
TIMING_KEYS = (
    "provenance.started", "provenance.finished", "provenance.stage_seconds", "provenance.cache",
    "explanations[*].methods.*.seconds", "explanations[*].methods.*.cached", "timings",
    "agreement.summary[*].mean_lime_seconds", "findings[timing=true]", "lime_sweep.rows[*].seconds",
    "lime_sweep.summary[*].mean_seconds", "lime_sweep.pareto", "lime_sweep.best",
)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class RunFormatError(UserError):
    """results.json (or another file of a run directory) is not what report_builder writes."""


def read_json(path: Path, what: str = "results.json") -> Any:
    """A JSON file of a run directory, bounded in size and depth."""
    try:
        size = path.stat().st_size
        if size > MAX_RESULTS_BYTES:
            raise RunFormatError(f"{path}: is {size:,} bytes; a {what} is at most {MAX_RESULTS_BYTES:,} bytes")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RunFormatError(f"{path}: is not UTF-8 text") from None
    except OSError as exc:
        raise RunFormatError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise RunFormatError(f"{path}: is nested too deeply to be a {what}") from None
    except ValueError as exc:
        raise RunFormatError(f"{path}: not valid JSON ({exc})") from None


def check_bounds(value: Any, source: Path) -> None:
    """No string longer than MAX_STRING and no nesting deeper than MAX_DEPTH anywhere."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RunFormatError(f"{source}: {where or 'the top level'} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, str):
            if len(v) > MAX_STRING:
                raise RunFormatError(f"{source}: {where} is a string of {len(v):,} characters; report_builder "
                                     f"writes none longer than {MAX_STRING:,}")
        elif isinstance(v, dict):
            for k, child in v.items():
                if len(k) > 200:
                    raise RunFormatError(f"{source}: {where or 'the top level'} has a key of {len(k):,} characters")
                stack.append((child, f"{where}.{k}" if where else k, depth + 1))
        elif isinstance(v, list):
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(v))


def check_id(value: Any, where: str, source: Path) -> str:
    if not isinstance(value, str) or not ID.match(value):
        raise RunFormatError(f"{source}: {where}: found {_short(value)}, expected an id (letters, digits, '_', '.', "
                             "'-', not starting with '.' or '-')")
    return value


def inside(run_dir: Path, rel: Any, where: str, source: Path | None = None, must_exist: bool = True,
           root: Path | None = None) -> Path:
    """`rel`, a path stored in the run directory, as a path that resolves inside it (symbolic links followed).
    `root`: run_dir already resolved, for a caller checking thousands of paths."""
    source = source or run_dir / "results.json"
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\\" in rel or ":" in rel:
        raise RunFormatError(f"{source}: {where}: found {_short(rel)}, expected a relative path inside the run directory")
    base = str(root or Path(run_dir).resolve())
    path = os.path.realpath(os.path.join(base, rel))  # strings, not pathlib: a big run has thousands of paths
    if not path.startswith(base + os.sep):
        raise RunFormatError(f"{source}: {where}: {_short(rel)} leads outside the run directory; refused")
    if must_exist and not os.path.isfile(path):
        raise RunFormatError(f"{source}: {where}: {rel} is missing from the run directory")
    return Path(path)


def _need(mapping: Any, key: str, kind: type | tuple, where: str, source: Path) -> Any:
    names = {dict: "a mapping", list: "a list", str: "text", int: "a whole number", float: "a number"}
    if not isinstance(mapping, dict) or key not in mapping:
        raise RunFormatError(f"{source}: {where + '.' if where else ''}{key}: missing")
    value = mapping[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        expected = " or ".join(names.get(k, k.__name__) for k in kinds)
        raise RunFormatError(f"{source}: {where + '.' if where else ''}{key}: found {_short(value)}, expected {expected}")
    return value


def check_schema_version(data: Any, source: Path, supported: int = SCHEMA_VERSION) -> None:
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else type(data).__name__
        raise RunFormatError(f"{source}: found {kind} at the top level, expected the mapping report_builder writes")
    found = data.get("schema_version")
    if found is None:
        raise RunFormatError(f"{source}: has no schema_version; it was not written by report_builder")
    if found != supported:
        raise RunFormatError(f"{source}: has schema version {_short(found)}; this report_builder reads version "
                             f"{supported}. Re-run the spec, or use the report_builder version that wrote it")


def check_results(results: Any, run_dir: Path) -> dict:
    """Check what render, diff and open_run rely on. Returns results unchanged."""
    source = Path(run_dir) / "results.json"
    root = Path(run_dir).resolve()
    check_schema_version(results, source)
    check_bounds(results, source)
    for key, kind in (("title", str), ("run_name", str), ("models", list), ("images", list), ("methods", list),
                      ("explanations", list), ("agreement", dict), ("provenance", dict), ("findings", list),
                      ("timings", list), ("spec", dict)):
        _need(results, key, kind, "", source)
    model_ids = set()
    for i, m in enumerate(results["models"]):
        model_ids.add(check_id(_need(m, "id", str, f"models[{i}]", source), f"models[{i}].id", source))
        _need(m, "display", str, f"models[{i}]", source)
    image_ids = set()
    for i, im in enumerate(results["images"]):
        image_ids.add(check_id(_need(im, "id", str, f"images[{i}]", source), f"images[{i}].id", source))
    method_ids = set()
    for i, m in enumerate(results["methods"]):
        method_ids.add(check_id(_need(m, "id", str, f"methods[{i}]", source), f"methods[{i}].id", source))
        _need(m, "title", str, f"methods[{i}]", source)
    for i, e in enumerate(results["explanations"]):
        where = f"explanations[{i}]"
        if _need(e, "model", str, where, source) not in model_ids:
            raise RunFormatError(f"{source}: {where}.model: {_short(e['model'])} is not among the models")
        if _need(e, "image", str, where, source) not in image_ids:
            raise RunFormatError(f"{source}: {where}.image: {_short(e['image'])} is not among the images")
        inside(run_dir, _need(e, "original", str, where, source), f"{where}.original", source, root=root)
        inside(run_dir, _need(e, "maps", str, where, source), f"{where}.maps", source, root=root)
        _need(e, "predictions", list, where, source)
        for method, entry in _need(e, "methods", dict, where, source).items():
            if method not in method_ids:
                raise RunFormatError(f"{source}: {where}.methods: {_short(method)} is not among the methods")
            inside(run_dir, _need(entry, "overlay", str, f"{where}.methods.{method}", source),
                   f"{where}.methods.{method}.overlay", source, root=root)
            _need(entry, "seconds", (int, float), f"{where}.methods.{method}", source)
    for i, f in enumerate(results["findings"]):
        _need(f, "text", str, f"findings[{i}]", source)
        _need(f, "section", str, f"findings[{i}]", source)
    ev = results.get("evaluation")
    if ev is not None:
        for i, entry in enumerate(_need(ev, "sanity", list, "evaluation", source)):
            if isinstance(entry, dict) and "maps" in entry:
                inside(run_dir, entry["maps"], f"evaluation.sanity[{i}].maps", source, root=root)
    nd = results.get("netdissect")
    if nd is not None:
        for i, m in enumerate(_need(nd, "models", list, "netdissect", source)):
            check_id(_need(m, "model", str, f"netdissect.models[{i}]", source), f"netdissect.models[{i}].model", source)
            for j, x in enumerate(_need(m, "layers", list, f"netdissect.models[{i}]", source)):
                where = f"netdissect.models[{i}].layers[{j}]"
                for k, u in enumerate(_need(x, "unit_labels", list, where, source)):
                    inside(run_dir, _need(u, "gallery", str, f"{where}.unit_labels[{k}]", source),
                           f"{where}.unit_labels[{k}].gallery", source, root=root)
    return results


def load_results(run_dir: Path) -> dict:
    """results.json of a run directory, checked (see check_results)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise UserError(f"{run_dir}: is a file, not a run directory; give the folder a run wrote (e.g. output/demo)"
                        + (". To run a spec, use 'run'" if run_dir.suffix in (".yaml", ".yml") else ""))
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    path = run_dir / "results.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no results.json)")
    return check_results(read_json(path), run_dir)


def without_timings(results: dict) -> dict:
    """A copy of results with every timing-derived number and finding (TIMING_KEYS) removed: what two runs
    of the same spec must share exactly."""
    r = json.loads(json.dumps(results))
    for key in ("started", "finished", "stage_seconds", "cache"):
        r["provenance"].pop(key, None)
    for e in r["explanations"]:
        for m in e["methods"].values():
            m.pop("seconds", None)
            m.pop("cached", None)
    r.pop("timings", None)
    for s in r["agreement"].get("summary", []):
        s.pop("mean_lime_seconds", None)
    r["findings"] = [f for f in r["findings"] if not f.get("timing")]
    sweep = r.get("lime_sweep")
    if sweep:
        for row in sweep["rows"]:
            row.pop("seconds", None)
        for row in sweep.get("summary", []):
            row.pop("mean_seconds", None)
        sweep.pop("pareto", None)
        sweep.pop("best", None)
    return r
