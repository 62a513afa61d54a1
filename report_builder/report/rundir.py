"""Reading a run directory: results.json checked before anything trusts it.

render, diff and open_run read only a run directory, and a run directory can come from anywhere. So
results.json is bounded (file size, nesting, string lengths), its schema version is checked, every id
in it is checked again (ids become file names), and every path in it must resolve inside the run
directory. Every section they read is checked against its schema (RESULTS below: types, ranges, class
and unit indices, references to the run's models, images and methods, lengths), and so are the CSVs
beside it (header and cells). Anything else is a RunFormatError (a UserError: exit 2) naming the file
and the key, never a traceback later or a wrong number.
"""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

from report_builder.errors import UserError
from report_builder.evaluation import registry as metric_registry
from report_builder.label_quality import METRICS as QUALITY_METRICS, QUALITY_CSV
from report_builder.report.concepts import CONCEPTS_CSV

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
    "agreement.summary[*].mean_lime_seconds", "findings[timing=true]", "checks[timing=true]",
    "lime_sweep.rows[*].seconds", "lime_sweep.summary[*].mean_seconds", "lime_sweep.pareto", "lime_sweep.best",
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


# ---------------------------------------------------------------- what each section must be
#
# Every key that render, diff and open_run read is declared here, once, with what it must hold; check_results checks
# a run's results.json against these schemas (RESULTS), and its CSVs against theirs (*_CSV). A schema is
#   a kind           "text", "id" (check_id), "int", "count" (a whole number >= 0), "positive" (>= 1), "number" (finite),
#                    "probability" (a number from 0 to 1), "correlation" (from -1 to 1), "seconds" (>= 0), "hits" (>= 0),
#                    "bool", "mapping", "list", "path" (resolves inside the run: inside()), or a reference: "model", "image",
#                    "method", "scorer", "eval_method" (one of the ids the run lists for it)
#   Null(schema)     that, or null (a number that was undefined, NaN, when the run wrote it)
#   {key: schema}    a mapping with these keys, checked in this order (paths first: a tampered path is named before
#                    anything else); 'key?' may be absent; other keys are allowed
#   [schema]         a list of items that are each that
#   Map(schema, key) a mapping whose values are each that (its keys are of the kind `key`)
#   Then(schema, f)  that, then f(value, where, ctx) for what relates values: lengths, indices, order, uniqueness
# Schemas are compiled once into nested closures; a check is one pass over the values, no Path per value (a run of
# 2 models x 896 units has some 40,000 values to check).

MAX_FLOAT = 1.7976931348623157e308
SLACK = 1e-6  # float32 rounding: a probability or a share written as 1.0000001


class Null:
    def __init__(self, schema: Any):
        self.schema = schema


class Map:
    def __init__(self, schema: Any, key: str = "text"):
        self.schema, self.key = schema, key


class Then:
    def __init__(self, schema: Any, *checks):
        self.schema, self.checks = schema, checks


class _Ctx:
    """What a check needs besides the value: where the run is, and the ids it lists (filled while checking)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.source = self.run_dir / "results.json"
        self.root = self.run_dir.resolve()
        self.refs: dict[Any, set] = {}
        self.classes: dict[str, int] = {}


def _bad(ctx: _Ctx, where: str, value: Any, expected: str) -> None:
    raise RunFormatError(f"{ctx.source}: {where or 'the top level'}: found {_short(value)}, expected {expected}")


def _of(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _typed(kind: type, expected: str):
    def check(v, where, ctx):
        if type(v) is not kind:
            _bad(ctx, where, v, expected)
    return check


def _ranged(lo: float, hi: float, expected: str, whole: bool = False):
    kinds = (int,) if whole else (int, float)

    def check(v, where, ctx):
        if type(v) not in kinds or not lo <= v <= hi:  # NaN and infinities fail the comparison
            _bad(ctx, where, v, expected)
    return check


def _id(v, where, ctx):
    check_id(v, where, ctx.source)


def _path(v, where, ctx):
    inside(ctx.run_dir, v, where, ctx.source, root=ctx.root)


def _ref(kind: str, plural: str):
    def check(v, where, ctx):
        known = ctx.refs.get(kind, ())
        if type(v) is not str or v not in known:
            listed = ", ".join(sorted(known)[:20]) + (", …" if len(known) > 20 else "")
            _bad(ctx, where, v, f"one of the run's {plural} ({listed or 'none'})")
    return check


_KINDS = {
    "text": _typed(str, "text"),
    "id": _id,
    "int": _ranged(-MAX_FLOAT, MAX_FLOAT, "a whole number", whole=True),
    "count": _ranged(0, MAX_FLOAT, "a whole number, 0 or more", whole=True),
    "positive": _ranged(1, MAX_FLOAT, "a whole number, 1 or more", whole=True),
    "number": _ranged(-MAX_FLOAT, MAX_FLOAT, "a finite number"),
    "seconds": _ranged(0, MAX_FLOAT, "a number of seconds, 0 or more"),
    "hits": _ranged(0, MAX_FLOAT, "a number of hits, 0 or more (a chance map's is a mean over its draws)"),
    "probability": _ranged(0, 1 + SLACK, "a number from 0 to 1"),
    "correlation": _ranged(-1 - SLACK, 1 + SLACK, "a number from -1 to 1"),
    "bool": _typed(bool, "true or false"),
    "mapping": _typed(dict, "a mapping"),
    "list": _typed(list, "a list"),
    "path": _path,
    "model": _ref("model", "models"),
    "image": _ref("image", "images"),
    "method": _ref("method", "methods"),
    "eval_method": _ref("eval_method", "evaluated methods"),
    "scorer": _ref("scorer", "concept scorers"),
}


def _compile(schema: Any):
    if isinstance(schema, str):
        return _KINDS[schema]
    if isinstance(schema, Null):
        inner = _compile(schema.schema)

        def nullable(v, where, ctx):
            if v is not None:
                inner(v, where, ctx)
        return nullable
    if isinstance(schema, Then):
        inner, checks = _compile(schema.schema), schema.checks

        def then(v, where, ctx):
            inner(v, where, ctx)
            for check in checks:
                check(v, where, ctx)
        return then
    if isinstance(schema, Map):
        key_check, value_check = _KINDS[schema.key], _compile(schema.schema)

        def each_value(v, where, ctx):
            if type(v) is not dict:
                _bad(ctx, where, v, "a mapping")
            for k, x in v.items():
                key_check(k, _of(where, k), ctx)
                value_check(x, _of(where, k), ctx)
        return each_value
    if isinstance(schema, list):
        (item,) = schema
        item_check = _compile(item)

        def each_item(v, where, ctx):
            if type(v) is not list:
                _bad(ctx, where, v, "a list")
            for i, x in enumerate(v):
                item_check(x, f"{where}[{i}]", ctx)
        return each_item
    fields = tuple((k.rstrip("?"), k.endswith("?"), _compile(s)) for k, s in schema.items())

    def mapping(v, where, ctx):
        if type(v) is not dict:
            _bad(ctx, where, v, "a mapping")
        for key, optional, check in fields:
            if key in v:
                check(v[key], _of(where, key), ctx)
            elif not optional:
                raise RunFormatError(f"{ctx.source}: {_of(where, key)}: missing")
    return mapping


# ---- relations between values, run after their section's types are checked


def _register(kind: str, key: str | None = None):
    """The ids a list declares (each once), for the references that follow it."""
    def check(items, where, ctx):
        ids = [x[key] for x in items] if key else list(items)
        _once(ids, where, key, ctx)
        ctx.refs[kind] = set(ids)
    return check


def _once(ids: list, where: str, key: str | None, ctx: _Ctx) -> None:
    seen = set()
    for i, x in enumerate(ids):
        if x in seen:
            _bad(ctx, f"{where}[{i}]{'.' + key if key else ''}", x, "each one once; it is listed twice")
        seen.add(x)


def _unique(key: str):
    def check(items, where, ctx):
        _once([x[key] for x in items], where, key, ctx)
    return check


def _models(models, where, ctx):
    ctx.classes = {m["id"]: m["num_classes"] for m in models}


def _explanations(records, where, ctx):
    seen = set()
    for i, e in enumerate(records):
        if (e["model"], e["image"]) in seen:
            raise RunFormatError(f"{ctx.source}: {where}[{i}]: a second record of {e['model']} on {e['image']}; "
                                 "expected one per model and image")
        seen.add((e["model"], e["image"]))


def _explanation(e, where, ctx):
    """Predictions in rank order with class indices of the model, probabilities from the highest; the target is the
    top-1 class (diff indexes the saved probabilities with it)."""
    n = ctx.classes[e["model"]]
    preds = e["predictions"]
    classes = f"a class index from 0 to {n - 1} ({e['model']} has {n} classes)"
    if not preds or len(preds) > n:
        _bad(ctx, f"{where}.predictions", preds, f"from 1 to {n} predictions")
    seen, highest = set(), None
    for k, p in enumerate(preds):
        at = f"{where}.predictions[{k}]"
        if p["rank"] != k + 1:
            _bad(ctx, f"{at}.rank", p["rank"], f"{k + 1} (predictions are listed by rank)")
        c = p["class_index"]
        if not 0 <= c < n or c in seen:
            _bad(ctx, f"{at}.class_index", c, classes + (", each once" if 0 <= c < n else ""))
        seen.add(c)
        if highest is not None and p["probability"] > highest + SLACK:
            _bad(ctx, f"{at}.probability", p["probability"], f"at most {highest} (predictions go from the most "
                                                             "probable class down)")
        highest = p["probability"]
    if not 0 <= e["target_class"] < n:
        _bad(ctx, f"{where}.target_class", e["target_class"], classes)
    if e["target_class"] != preds[0]["class_index"]:
        _bad(ctx, f"{where}.target_class", e["target_class"], f"{preds[0]['class_index']}, the class of predictions[0]")
    if e["target_name"] != preds[0]["class_name"]:
        _bad(ctx, f"{where}.target_name", e["target_name"], f"{preds[0]['class_name']!r}, the name in predictions[0]")


def _thresholds(values, where, ctx):
    ctx.refs["iou_keys"] = {f"iou@{t:g}" for t in values}


def _agreement_row(row, where, ctx):
    for key in ctx.refs["iou_keys"]:
        if key in row:
            _IOU(row[key], _of(where, key), ctx)


def _units(key: str):
    """A layer lists each of its `units` once, in order: the position is the unit index that diff and the report use."""
    def check(layer, where, ctx):
        rows, units = layer[key], layer["units"]
        if len(rows) != units:
            raise RunFormatError(f"{ctx.source}: {where}.{key}: lists {len(rows)} units, expected {units} "
                                 "(its 'units')")
        for k, u in enumerate(rows):
            if u["unit"] != k:
                _bad(ctx, f"{where}.{key}[{k}].unit", u["unit"], f"{k} (each unit once, in order)")
    return check


def _directions(entry, where, ctx):
    """A fit lists each of its `components` directions once, in order, and counts its labels' distinct concepts."""
    labels = entry["labels"]
    if len(labels) != entry["components"]:
        raise RunFormatError(f"{ctx.source}: {where}.labels: lists {len(labels)} directions, expected "
                             f"{entry['components']} (its 'components')")
    for k, u in enumerate(labels):
        if u["direction"] != k:
            _bad(ctx, f"{where}.labels[{k}].direction", u["direction"], f"{k} (each direction once, in order)")
    if entry["unique"] != len({u["label"] for u in labels}):
        _bad(ctx, f"{where}.unique", entry["unique"], f"{len({u['label'] for u in labels})}, its labels' distinct "
                                                       "concepts")


def _at_most(n: int):
    def check(items, where, ctx):
        if len(items) > n:
            raise RunFormatError(f"{ctx.source}: {where}: lists {len(items)}, expected at most {n}")
    return check


def _same_lengths(*keys: str):
    def check(entry, where, ctx):
        n = len(entry[keys[0]])
        for key in keys[1:]:
            if len(entry[key]) != n:
                raise RunFormatError(f"{ctx.source}: {where}.{key}: lists {len(entry[key])} values, expected {n}, one "
                                     f"per entry of {keys[0]}")
    return check


def _eval_methods(methods, where, ctx):
    known = ctx.refs.get("method", set()) | {"random"}
    for i, m in enumerate(methods):
        if m not in known and metric_registry.chance_kind(m) is None:
            _bad(ctx, f"{where}[{i}]", m, f"one of the run's methods or a chance map ('random', 'random-smooth<n>', "
                                          f"'random-centre'; {', '.join(sorted(known))})")
    ctx.refs["eval_method"] = set(methods)


def _categories(nd, where, ctx):
    """Every unit's category is one of the section's categories ('' for a unit with no concept)."""
    known = set(nd["categories"]) | {""}
    for i, m in enumerate(nd["models"]):
        for j, x in enumerate(m["layers"]):
            for k, u in enumerate(x["unit_labels"]):
                if u["category"] not in known:
                    _bad(ctx, f"{where}.models[{i}].layers[{j}].unit_labels[{k}].category", u["category"],
                         f"one of netdissect.categories ({', '.join(nd['categories'])}) or ''")


def _scorers(scorers, where, ctx):
    ctx.refs["scorer"] = set(scorers)


_IOU = _compile(Null("probability"))


def _in_range(lo: float, hi: float) -> str:
    """The kind of a number from lo to hi (a metric's value_range), float32 rounding allowed past a bound that is not
    0: from 0 to 1 is "probability", from -1 to 1 "correlation"."""
    name = f"from {lo:g} to {hi:g}"
    _KINDS.setdefault(name, _ranged(lo - SLACK if lo else lo, hi + SLACK if hi else hi, f"a number {name}"))
    return name


# The evaluation's numbers are the metrics registry's columns, each in its value_range.
_PER_MAP = {c.name: Null(_in_range(*c.value_range)) for _, c in metric_registry.per_map()}
_PER_STEP = {c.name: [Null(_in_range(*c.value_range))] for _, c in metric_registry.per_step()}



def _summary_schema() -> dict:
    """evaluation.summary's entry (analysis.evaluation_summary): per registry column its mean (a hits column: its hits
    and images) in the column's value_range, and the 95 % interval's ends (Column.low_key, high_key) in the same range
    (a share of hits: from 0 to 1)."""
    out: dict[str, Any] = {"model": "model", "method": "eval_method", "images": "count"}
    for _, c in metric_registry.per_map():
        if c.aggregate == "hits":
            out |= {c.hits_key: Null("hits"), c.images_key: "count",
                    c.low_key: Null("probability"), c.high_key: Null("probability")}
        else:
            kind = Null(_in_range(*c.value_range))
            out |= {c.name: kind, c.low_key: kind, c.high_key: kind}
    return out


def _summary_intervals(entry, where, ctx):
    """Each interval holds its value (low <= mean <= high; for hits, low <= hits / images <= high), and is there
    exactly when the value is; hits are at most the images scored."""
    for _, c in metric_registry.per_map():
        if c.aggregate == "hits":
            hits, n = entry[c.hits_key], entry[c.images_key]
            if hits is not None and hits > n + SLACK:
                _bad(ctx, _of(where, c.hits_key), hits, f"at most {n}, its {c.images_key}")
            value, what = (None if hits is None or n == 0 else hits / n), f"the share {c.hits_key} / {c.images_key}"
        else:
            value, what = entry[c.name], f"the mean {c.name}"
        low, high = entry[c.low_key], entry[c.high_key]
        if value is None:
            for key, end in ((c.low_key, low), (c.high_key, high)):
                if end is not None:
                    _bad(ctx, _of(where, key), end, f"null, as {what} is (no image has a value)")
            continue
        if low is None or low > value + SLACK:
            _bad(ctx, _of(where, c.low_key), low, f"a number at most {value:g}, {what} (an interval holds its value)")
        if high is None or high < value - SLACK:
            _bad(ctx, _of(where, c.high_key), high, f"a number at least {value:g}, {what} (an interval holds its value)")


MODEL = {"id": "id", "display": "text", "num_classes": "positive"}
IMAGE = {"id": "id", "sha256": "text"}
METHOD = {"id": "id", "title": "text"}
PREDICTION = {"rank": "int", "class_index": "int", "class_name": "text", "probability": "probability"}
EXPLANATION = Then({
    "model": "model", "image": "image", "original": "path", "maps": "path",
    "methods": Map({"overlay": "path", "seconds": "seconds", "cached?": "bool"}, key="method"),
    "target_class": "int", "target_name": "text", "predictions": [PREDICTION],
}, _explanation)
AGREEMENT = {
    "thresholds": Then(["probability"], _thresholds),
    "rows": [Then({"image": "image", "model": "model", "method_a": "method", "method_b": "method",
                   "iou": Null("probability"), "lime_pixels?": "count", "flat_cam?": "bool"}, _agreement_row)],
}
# sanity.layers are every randomised block of the model (its own module names, never a file name): text. The layers
# the dissections list name folders of galleries: ids.
EVALUATION = {
    "sanity": [Then({"maps?": "path", "model": "model", "image": "image", "method": "method", "layers": ["text"],
                     **_PER_STEP, "blocks?": ["count"], "total_blocks?": "count",
                     "runs?": [{"seed": "count", **{k: v[0] for k, v in _PER_STEP.items()}, "flat": "bool"}]},
                    _same_lengths("layers", *_PER_STEP))],
    "methods": Then(["id"], _eval_methods),
    "rows": [{"model": "model", "image": "image", "method": "eval_method", **_PER_MAP, "object": Null("text")}],
    "summary": [Then(_summary_schema(), _summary_intervals)],  # the report's table and the findings read it
}
NETDISSECT = Then({
    "models": Then([{"model": "model", "layers": Then([Then({
        "layer": "id",
        "unit_labels": [{"gallery": "path", "unit": "int", "label": "text", "category": "text", "iou": "probability",
                         "detector": "bool", "threshold": Null("number"), "top_images?": ["text"]}],
        "units": "positive",
    }, _units("unit_labels"))], _unique("layer")),
        # learned directions (dissect.directions) dissected with pixel labels, and the bases side by side
        "directions?": [Then({"layer": "id", "method": "text", "units": "positive", "detectors": "count",
                              "unique": "count",
                              "unit_labels": [{"unit": "int", "label": "text", "category": "text", "iou": "probability",
                                               "detector": "bool"}]}, _units("unit_labels"))],
        "bases?": [{"layer": "id", "basis": "text", "title": "text", "size": "positive", "detectors": "count",
                    "unique": "count"}]}], _unique("model")),
    "categories": Then(["text"], _register("category")),
    "settings": "mapping", "probe": "mapping",
}, _categories)
ALTERNATIVE = {"label": "text", "similarity": Null("number"), "scorer": "scorer"}
# a label's quality (dissection/quality.py), present when the spec's dissect.quality was on
LABEL_QUALITY = {"heldout_label?": "text", "random_label?": "text", "stability?": Null("probability"),
                 "combination_pearson?": Null("correlation"),
                 "combination?": [{"label": "text", "weight": "number"}],
                 **{f"{p}{m}?": Null("correlation" if m == "pearson" else "probability")
                    for p in ("", "random_") for m in QUALITY_METRICS}}
DISSECTION = {
    "similarity": "text", "similarity_params": "mapping", "pooling": "text",
    "probe": {"description": "text", "images": "count", "sha256": "text"},
    "scorers": Then(Map("text"), _scorers), "concepts": "count",
    "models": Then([{"model": "model", "layers": Then([Then({
        "layer": "id", "units": "positive",
        "labels": [{"unit": "int", "label": "text", "similarity": Null("number"), "scorer": "scorer",
                    "alternatives": Then([ALTERNATIVE], _at_most(3)), **LABEL_QUALITY}],
        "quality?": {"first_images": "count", "heldout_images": "count", "positives": "count", "resamples": "count",
                     "resample_labels": [["text"]]},
    }, _units("labels"))], _unique("layer"))}], _unique("model")),
    "summary?": "mapping", "quality?": "mapping",
    # learned directions (dissect.directions): per model, layer and method, the fit's numbers and each direction's label
    "directions?": [Then({"model": "model", "layer": "id", "method": "text", "title": "text", "components": "positive",
                          "components_asked": "positive", "reconstruction_error": "number",
                          "variance_explained": "number", "sparsity": "probability", "unique": "count",
                          "reports": Map("number"), "labels": [{"direction": "int", "label": "text",
                                                                "similarity": Null("number"), "scorer": "scorer"}]},
                         _directions)],
}
def _ablation_lengths(entry, where, ctx):
    """One drop per k for the top units, and per k a list of draws for each baseline."""
    a = entry["ablation"]
    n = len(a["ks"])
    if len(a["top"]) != n:
        _bad(ctx, _of(where, "ablation.top"), a["top"], f"{n} values, one per k of ablation.ks")
    for name, per_k in a["baselines"].items():
        if len(per_k) != n or any(len(d) == 0 for d in per_k):
            _bad(ctx, _of(where, f"ablation.baselines.{name}"), per_k, f"{n} non-empty lists, one per k")


CONCEPT_UNIT = {"map": "path", "unit": "count", "rank": "positive", "contribution": "number", "share": "number",
                "label": Null("text"), "netdissect_label": Null("text"), "detector": Null("bool")}
CONCEPTS = {
    "settings": "mapping", "attribution": "text", "citation": "text", "label_source": "text",
    "baselines": [{"name": "text", "title": "text", "draws": "bool", "bar": "bool"}],
    "records": [Then({"model": "model", "image": "image", "layer": "id", "units": "positive",
                      "target_class": "count", "target_name": "text", "probability": "probability", "gradcam": "path",
                      "top": [CONCEPT_UNIT], "concepts": [{"label": "text", "share": "number", "units": ["count"]}],
                      "ablation": {"ks": ["positive"], "draws": "positive", "top": ["number"],
                                   "baselines": Map([["number"]])},
                      "cam_agreement?": Map(Null("probability"), key="method")}, _ablation_lengths)],
    "ablation": [{"model": "model", "layer": "id", "k": "positive", "images": "positive", "top": "number",
                  "top_low": "number", "top_high": "number", "p_value": "probability", "images_beating": "count",
                  "verdict": "text"}],
    "profiles": [{"model": "model", "layer": "id", "class_name": "text", "images": "positive",
                  "concepts": [{"label": "text", "share": "number", "images": "count"}]}],
}
RESULTS = {
    "title": "text", "run_name": "text",
    "models": Then([MODEL], _register("model", "id"), _models),
    "images": Then([IMAGE], _register("image", "id")),
    "methods": Then([METHOD], _register("method", "id")),
    "explanations": Then([EXPLANATION], _explanations),
    "agreement": AGREEMENT, "provenance": "mapping",
    "findings": [{"text": "text", "section": "text", "timing?": "bool"}],
    "timings": "list", "spec": "mapping",
    "evaluation?": EVALUATION, "netdissect?": NETDISSECT, "dissection?": DISSECTION, "concepts?": CONCEPTS,
    "checks?": [{"name": "text", "metric": "text", "title": "text", "value": Null("number"), "values": "count",
                 "at_least": Null("number"), "at_most": Null("number"), "passed": "bool", "message": "text", "group?": "text"}],
}
_check_results = _compile(RESULTS)


# ---------------------------------------------------------------- the CSVs beside results.json
#
# Each CSV's header must be what collect.py writes, and each cell must parse as its column's kind: the notebook, a
# spreadsheet and the report's readers take the numbers from these files as they are.


# evaluation.csv's metrics: one value per map, and per randomisation step (sanity_spearman@<layer>)
EVALUATION_METRICS = tuple(m.csv_metric(c) for m, c in metric_registry.per_map())
EVALUATION_STEPS = tuple(m.csv_metric(c, "") for m, c in metric_registry.per_step())


def _number_cell(lo: float = -MAX_FLOAT, hi: float = MAX_FLOAT, empty: bool = False, nan: bool = False,
                 expected: str = "a finite number"):
    def check(text: str, ctx: _Ctx, model: str | None) -> bool:
        if text == "":
            return empty
        if text == "nan":
            return nan
        try:
            return lo <= float(text) <= hi
        except ValueError:
            return False
    check.expected = expected + (", or empty" if empty else "") + (", or nan" if nan else "")
    return check


def _count_cell(text: str, ctx: _Ctx, model: str | None) -> bool:
    return text.isascii() and text.isdigit()


def _count_or_empty_cell(text: str, ctx: _Ctx, model: str | None) -> bool:
    return text == "" or text.isascii() and text.isdigit()


def _choice_cell(*allowed: str):
    def check(text: str, ctx: _Ctx, model: str | None) -> bool:
        return text in allowed
    check.expected = " or ".join(repr(a) for a in allowed)
    return check


def _ref_cell(kind: str, plural: str):
    def check(text: str, ctx: _Ctx, model: str | None) -> bool:
        return text in ctx.refs.get(kind, ())
    check.expected = f"one of the run's {plural}"
    return check


def _layer_cell(text: str, ctx: _Ctx, model: str | None) -> bool:
    return text in ctx.refs.get(("layers", model), ())


def _text_cell(text: str, ctx: _Ctx, model: str | None) -> bool:
    return True


def _metric_cell(text: str, ctx: _Ctx, model: str | None) -> bool:
    return text in EVALUATION_METRICS or text.startswith(EVALUATION_STEPS)


_count_cell.expected = "a whole number, 0 or more"
_count_or_empty_cell.expected = "a whole number, 0 or more, or empty"
_layer_cell.expected = "one of the layers results.json lists for this model"
_text_cell.expected = "text"
_metric_cell.expected = f"{', '.join(EVALUATION_METRICS)}, {' or '.join(f'{s}LAYER' for s in EVALUATION_STEPS)}"

_NUMBER = _number_cell(nan=True)
_ALT_NUMBER = _number_cell(empty=True, nan=True)
_SHARE = _number_cell(0, 1 + SLACK, empty=True, expected="a number from 0 to 1")
DISSECTION_CSV = {"layer": _layer_cell, "unit": _count_cell, "description": _text_cell, "similarity": _NUMBER,
                  "alt_1": _text_cell, "alt_1_similarity": _ALT_NUMBER, "alt_2": _text_cell,
                  "alt_2_similarity": _ALT_NUMBER, "alt_3": _text_cell, "alt_3_similarity": _ALT_NUMBER,
                  "scorer": _text_cell}
QUALITY_CSV_CELLS = {c: _text_cell if c.endswith(("label", "combination")) else _number_cell(empty=True)
                     for c in QUALITY_CSV}
NETDISSECT_CSV = {"unit": _count_cell, "layer": _layer_cell, "category": _text_cell, "label": _text_cell,
                  "iou": _number_cell(0, 1 + SLACK, expected="a number from 0 to 1"),
                  "detector": _choice_cell("0", "1"), "threshold": _NUMBER}
EVALUATION_CSV = {"model": _ref_cell("model", "models"), "image": _ref_cell("image", "images"),
                  "method": _ref_cell("eval_method", "evaluated methods"), "metric": _metric_cell,
                  "value": _number_cell(empty=True, nan=True)}


CONCEPTS_CSV_CELLS = {"model": _ref_cell("model", "models"), "image": _ref_cell("image", "images"), "layer": _text_cell,
                      "unit": _count_cell, "rank": _count_cell, "contribution": _NUMBER, "share": _NUMBER,
                      "activation": _NUMBER, "label": _text_cell, "scorer": _text_cell, "similarity": _ALT_NUMBER,
                      "netdissect_label": _text_cell, "netdissect_category": _text_cell, "iou": _SHARE,
                      "detector": _choice_cell("True", "False", "")}


def _agreement_csv(thresholds: list) -> dict:
    return {"image": _ref_cell("image", "images"), "model": _ref_cell("model", "models"),
            "method_a": _ref_cell("method", "methods"), "method_b": _ref_cell("method", "methods"), "iou": _SHARE,
            **{f"iou@{t:g}": _SHARE for t in thresholds}, "lime_pixels": _count_or_empty_cell,
            "flat_cam": _choice_cell("True", "False", "")}


def check_csv(ctx: _Ctx, rel: str, columns: dict, model: str | None = None) -> None:
    """One CSV of the run: inside it, bounded, UTF-8, the header `columns`, every cell of its column's kind."""
    path = inside(ctx.run_dir, rel, rel, ctx.run_dir, must_exist=False, root=ctx.root)
    shown = ctx.run_dir / rel
    checks = list(columns.values())
    if not os.path.isfile(path):
        raise RunFormatError(f"{shown}: is missing from the run directory (results.json has the section it holds)")
    try:
        size = path.stat().st_size
        if size > MAX_RESULTS_BYTES:
            raise RunFormatError(f"{shown}: is {size:,} bytes; report_builder writes none over {MAX_RESULTS_BYTES:,}")
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != list(columns):
                raise RunFormatError(f"{shown}: line 1, the header: found {_short(','.join(header or []))}, expected "
                                     f"{','.join(columns)}")
            for row in reader:
                if not row:
                    continue
                if len(row) != len(checks):
                    raise RunFormatError(f"{shown}: line {reader.line_num}: found {len(row)} values, expected "
                                         f"{len(checks)} ({','.join(columns)})")
                for text, check, name in zip(row, checks, columns):
                    if not check(text, ctx, model):
                        raise RunFormatError(f"{shown}: line {reader.line_num}, {name}: found {_short(text)}, expected "
                                             f"{check.expected}")
    except UnicodeDecodeError:
        raise RunFormatError(f"{shown}: is not UTF-8 text") from None
    except csv.Error as exc:
        raise RunFormatError(f"{shown}: not a valid CSV ({exc})") from None
    except OSError as exc:
        raise RunFormatError(f"{shown}: cannot be read ({exc.strerror})") from None


def _check_csvs(results: dict, ctx: _Ctx) -> None:
    check_csv(ctx, "agreement.csv", _agreement_csv(results["agreement"]["thresholds"]))
    dissection = DISSECTION_CSV | (QUALITY_CSV_CELLS if "quality" in results.get("dissection", {}) else {})
    for section, suffix, columns in (("dissection", "", dissection), ("netdissect", "-netdissect", NETDISSECT_CSV)):
        for m in results.get(section, {}).get("models", []):
            ctx.refs[("layers", m["model"])] = {x["layer"] for x in m["layers"]}
            check_csv(ctx, f"dissection/{m['model']}{suffix}.csv", columns, m["model"])
    if "evaluation" in results:
        check_csv(ctx, "evaluation.csv", EVALUATION_CSV)
    if "concepts" in results:
        check_csv(ctx, CONCEPTS_CSV, CONCEPTS_CSV_CELLS)


def check_results(results: Any, run_dir: Path) -> dict:
    """Check every section render, diff and open_run read (RESULTS), and the CSVs beside it. Returns results
    unchanged; anything else is a RunFormatError naming the file and the key (or the line and column)."""
    source = Path(run_dir) / "results.json"
    check_schema_version(results, source)
    check_bounds(results, source)
    ctx = _Ctx(run_dir)
    _check_results(results, "", ctx)
    _check_csvs(results, ctx)
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
    if "checks" in r:
        r["checks"] = [c for c in r["checks"] if not c.get("timing")]
    sweep = r.get("lime_sweep")
    if sweep:
        for row in sweep["rows"]:
            row.pop("seconds", None)
        for row in sweep.get("summary", []):
            row.pop("mean_seconds", None)
        sweep.pop("pareto", None)
        sweep.pop("best", None)
    return r
