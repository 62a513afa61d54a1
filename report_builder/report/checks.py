"""Checks: thresholds on a run's (or a diff's) numbers that pass or fail, for a CI to act on.

A check names a measure, optionally a scope (model, method, layer, image, category) and a threshold
(`at_least`, `at_most`): `{metric: pointing_hit, method: gradcam, at_least: 0.9}`. The measures are the columns of
open_run()'s tables, taken from the registries as they stand (every per-map and per-step column of the evaluation
metrics, each rule's verdict, the agreement IoUs, the timings), the dissection counts, and the measures between two
runs or two versions of a model (a diff's). Nothing here lists a metric by name: a column added to a registry is
checkable at once.

A check over several rows tests their mean over the images unless it says `each: true`; it is tested once per
value of every other scope it leaves open (per model and method, say), so `{metric: spearman, at_most: 0.5}` is
"no method of any model fails the sanity check". A check that names a measure the run cannot have is a spec error
(`spec_problems`, which `validate` runs); after the run, `evaluate` gives each check's outcome, `junit` the XML a CI
reads, and the report opens with them.

Torch-free: the report side and the spec read it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from xml.etree import ElementTree

from report_builder.evaluation import registry as metric_registry
from report_builder.explanation import registry as method_registry

SCOPES = ("model", "method", "layer", "image", "category")
AVERAGED = "image"  # the scope a check averages over unless it says each: true
BASELINE = "random"  # the random map of the evaluation: tested only when a check names it
CHECKS_XML = "checks.xml"


@dataclass(frozen=True)
class Measure:
    """One number a check can test: where its rows come from and what a run needs to have it."""

    name: str
    title: str
    kind: str  # "run": in a run directory; "pair": between two runs (a diff) or two versions of one model
    scopes: tuple[str, ...]  # the keys its rows carry, which a check may fix
    rows: Callable[["CheckSource"], list[dict]]  # each row: its scope keys and "value"
    needs: Callable[[Any], str | None] = field(default=lambda spec: None)  # why a spec cannot have it, or None
    direction: str | None = None  # "higher" or "lower" is better, where one is
    timing: bool = False  # a wall-clock time: its outcome differs between runs (rundir.TIMING_KEYS)


@dataclass
class CheckSource:
    """What a check reads: a run directory's results.json, or a diff's diff.json."""

    results: dict
    run_dir: Path | None = None
    kind: str = "run"  # "run" or "diff"
    _pairs: list[dict] | None = None

    @property
    def pairs(self) -> list[dict]:
        """The compared pairs: a diff's, or, in a run, each version of a model against the one before."""
        if self._pairs is None:
            if self.kind == "diff":
                self._pairs = list(self.results.get("pairs", []))
            else:
                from report_builder.report.diff import version_pairs

                self._pairs = version_pairs(self.run_dir, self.results)
        return self._pairs


# ---------------------------------------------------------------- what a spec needs for a measure


def _evaluate_needs(metric: metric_registry.Metric) -> Callable[[Any], str | None]:
    def needs(spec: Any) -> str | None:
        if spec.evaluate is None:
            return "the spec has no 'evaluate:'"
        if getattr(spec.evaluate, metric.spec_key) is None:
            return f"evaluate.{metric.spec_key} is off (null)"
        return None
    return needs


def _agreement_needs(threshold: float | None) -> Callable[[Any], str | None]:
    def needs(spec: Any) -> str | None:
        kinds = {method_registry.METHODS[m].kind for m in spec.explain.methods}
        if kinds != {"cam", "superpixels"}:
            return "explain.methods needs LIME and at least one CAM method for the agreement"
        if threshold is not None and threshold not in spec.agreement.thresholds:
            return f"agreement.thresholds does not hold {threshold:g} (it holds {list(spec.agreement.thresholds)})"
        return None
    return needs


def _section_needs(key: str) -> Callable[[Any], str | None]:
    def needs(spec: Any) -> str | None:
        return None if getattr(spec, key) is not None else f"the spec has no '{key}:'"
    return needs


def _pair_needs(inner: Callable[[Any], str | None] | None = None) -> Callable[[Any], str | None]:
    def needs(spec: Any) -> str | None:
        if not any(len(m.versions) >= 2 for m in spec.models):
            return ("it compares two versions of a model: list them under a model's 'versions:', or check a diff "
                    "directory (report-builder check DIFF_DIR)")
        return inner(spec) if inner else None
    return needs


def _method_needs(method: str) -> Callable[[Any], str | None]:
    def needs(spec: Any) -> str | None:
        return None if method in spec.explain.methods else f"explain.methods does not hold {method!r}"
    return needs


# ---------------------------------------------------------------- the rows of each measure


def _evaluation_rows(column: str) -> Callable[[CheckSource], list[dict]]:
    def rows(src: CheckSource) -> list[dict]:
        return [{"model": r["model"], "method": r["method"], "image": r["image"], "value": r.get(column)}
                for r in src.results.get("evaluation", {}).get("rows", [])]
    return rows


def _final_rows(column: str) -> Callable[[CheckSource], list[dict]]:
    """A per-step column after the last step (every block randomised), per image."""
    def rows(src: CheckSource) -> list[dict]:
        return [{"model": s["model"], "method": s["method"], "image": s["image"],
                 "value": s[column][-1] if s.get(column) else None}
                for s in src.results.get("evaluation", {}).get("sanity", [])]
    return rows


def _verdict_rows(metric: metric_registry.Metric, wanted: str) -> Callable[[CheckSource], list[dict]]:
    """1 where a method's verdict on the metric's rule is `wanted` ("fails" or "passes"), else 0, per model and method.
    The verdict is the summary's over the runs (images x seeds: an "inconclusive" one is neither); a summary without
    one (a run directory of one run per image) reads the rule on the mean over the images."""
    rule = metric.rule
    column = metric_registry.column(rule.column)
    key = metric.final_key(column) if metric.per_step else column.name
    verdict_key = f"{metric.name}_verdict"

    def rows(src: CheckSource) -> list[dict]:
        out = []
        for e in src.results.get("evaluation", {}).get("summary", []):
            if e.get(verdict_key) is not None:
                verdict = e[verdict_key]
            elif e.get(key) is not None:
                verdict = "fails" if rule.fails(e[key]) else "passes"
            else:
                continue
            out.append({"model": e["model"], "method": e["method"], "value": float(verdict == wanted)})
        return out
    return rows


def _agreement_rows(column: str) -> Callable[[CheckSource], list[dict]]:
    def rows(src: CheckSource) -> list[dict]:
        return [{"model": r["model"], "method": r["method_b"], "image": r["image"], "value": r.get(column)}
                for r in src.results.get("agreement", {}).get("rows", [])]
    return rows


def _timing_rows(src: CheckSource) -> list[dict]:
    return [{"model": e["model"], "method": method, "image": e["image"], "value": v.get("seconds")}
            for e in src.results.get("explanations", []) for method, v in e["methods"].items()]


def _unique_concepts_rows(src: CheckSource) -> list[dict]:
    return [{"model": m["model"], "layer": x["layer"], "value": float(len({u["label"] for u in x["labels"]}))}
            for m in src.results.get("dissection", {}).get("models", []) for x in m["layers"]]


def _netdissect_rows(total: str, per_category: str) -> Callable[[CheckSource], list[dict]]:
    """A layer's count (detectors, unique detector concepts): one row for the layer, one per category."""
    def rows(src: CheckSource) -> list[dict]:
        out = []
        for m in src.results.get("netdissect", {}).get("models", []):
            for x in m["layers"]:
                out.append({"model": m["model"], "layer": x["layer"], "category": None, "value": float(x[total])})
                out += [{"model": m["model"], "layer": x["layer"], "category": c, "value": float(v)}
                        for c, v in x[per_category].items()]
        return out
    return rows


def _pair_row(p: dict, **keys: Any) -> dict:
    """A row of a pair: named by B's model id, and also found by A's id and by the group of a versioned model."""
    return {"model": p["b"], "_aliases": {"model": {p["a"], p.get("group")}}, **keys}


def _top1_rows(src: CheckSource) -> list[dict]:
    return [_pair_row(p, value=1 - p["predictions"]["top1_changed"] / p["predictions"]["images"])
            for p in src.pairs if p["predictions"]["images"]]


def _gradcam_rows(src: CheckSource) -> list[dict]:
    return [_pair_row(p, image=r["image"], value=r["gradcam_iou"]) for p in src.pairs for r in p["maps"]["rows"]]


def _dissection_pair_rows(key: str) -> Callable[[CheckSource], list[dict]]:
    def rows(src: CheckSource) -> list[dict]:
        return [_pair_row(p, layer=x["layer"], value=x[key]) for p in src.pairs
                if (p.get("dissection") or {}).get("compared") for x in p["dissection"]["layers"]]
    return rows


def _delta_rows(column: str) -> Callable[[CheckSource], list[dict]]:
    """B − A of a per-map column's mean over the shared images, per model and method."""
    def rows(src: CheckSource) -> list[dict]:
        return [_pair_row(p, method=r["method"], value=r["delta"]) for p in src.pairs
                if (p.get("evaluation") or {}).get("compared") for r in p["evaluation"]["rows"]
                if r["column"] == column]
    return rows


# ---------------------------------------------------------------- the catalogue, from the registries as they stand


AGREEMENT_COLUMN = "iou"  # agreement.csv's and open_run().agreement's IoU (top-n); iou@<t> at each threshold


def measures() -> dict[str, Measure]:
    """Every measure a check may name, built from the registries now (a column added to one is checkable)."""
    out: list[Measure] = []
    each_map = ("model", "method", "image")
    for metric, column in metric_registry.per_map():
        out.append(Measure(column.name, column.title, "run", each_map, _evaluation_rows(column.name),
                           _evaluate_needs(metric), column.direction))
    for metric, column in metric_registry.per_step():
        out.append(Measure(column.name, f"{column.title} after the last step", "run", each_map,
                           _final_rows(column.name), _evaluate_needs(metric), column.direction))
    for metric in metric_registry.METRICS:
        if metric.rule:
            out.append(Measure(f"{metric.name}_failed", f"fails the {metric.title.lower()} over its runs (1) or not (0)",
                               "run", ("model", "method"), _verdict_rows(metric, "fails"), _evaluate_needs(metric),
                               "lower"))
            out.append(Measure(f"{metric.name}_passed", f"passes the {metric.title.lower()} over its runs (1) or not "
                               "(0: fails, or inconclusive)", "run", ("model", "method"), _verdict_rows(metric, "passes"),
                               _evaluate_needs(metric), "higher"))
    out.append(Measure(AGREEMENT_COLUMN, "LIME–CAM IoU (top-n)", "run", each_map, _agreement_rows(AGREEMENT_COLUMN),
                       _agreement_needs(None), "higher"))
    out.append(Measure("seconds", "seconds per explanation", "run", each_map, _timing_rows, direction="lower",
                       timing=True))
    out.append(Measure("unique_concepts", "unique CLIP-Dissect concepts of a layer", "run", ("model", "layer"),
                       _unique_concepts_rows, _section_needs("dissect"), "higher"))
    out.append(Measure("detectors", "Network Dissection detectors of a layer", "run", ("model", "layer", "category"),
                       _netdissect_rows("detectors", "per_category"), _section_needs("netdissect"), "higher"))
    out.append(Measure("unique_detectors", "unique concepts among a layer's detectors", "run",
                       ("model", "layer", "category"), _netdissect_rows("unique", "unique_per_category"),
                       _section_needs("netdissect"), "higher"))
    out.append(Measure("top1_agreement", "share of images whose top-1 class is unchanged", "pair", ("model",),
                       _top1_rows, _pair_needs(), "higher"))
    out.append(Measure("gradcam_iou", "IoU of the two Grad-CAM maps' top pixels", "pair", ("model", "image"),
                       _gradcam_rows, _pair_needs(_method_needs(method_registry.CAM_NAMES[0])), "higher"))
    out.append(Measure("relabelled_share", "share of a layer's units whose label changed", "pair",
                       ("model", "layer"), _dissection_pair_rows("share"), _pair_needs(_section_needs("dissect")),
                       "lower"))
    out.append(Measure("concept_jaccard", "Jaccard index of a layer's concept sets", "pair", ("model", "layer"),
                       _dissection_pair_rows("concept_jaccard"), _pair_needs(_section_needs("dissect")), "higher"))
    for metric, column in metric_registry.per_map():
        out.append(Measure(f"{column.name}_delta", f"{column.title}, B − A", "pair", ("model", "method"),
                           _delta_rows(column.name), _pair_needs(_evaluate_needs(metric)), column.direction))
    return {m.name: m for m in out}


_AT = re.compile(rf"^{AGREEMENT_COLUMN}@(\d*\.?\d+)$")


def find(name: str) -> Measure | None:
    """The measure called `name`; iou@<t> is the agreement IoU at threshold t."""
    found = measures().get(name)
    if found or not isinstance(name, str):
        return found
    at = _AT.match(name)
    if at:
        t = float(at.group(1))
        return Measure(name, f"LIME–CAM IoU at threshold {t:g}", "run", ("model", "method", "image"),
                       _agreement_rows(f"{AGREEMENT_COLUMN}@{t:g}"), _agreement_needs(t), "higher")
    return None


# ---------------------------------------------------------------- checking a spec's checks


def _closest(word: str, options: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return match[0] if match else None


def _unknown(i: int, name: str) -> str:
    names = list(measures())
    close = _closest(name, names)
    return (f"checks[{i}].metric: found {name!r}{f' (did you mean {close!r}?)' if close else ''}, expected one of "
            f"{', '.join(names)}, or {AGREEMENT_COLUMN}@<threshold>")


def _scope_problems(i: int, check: dict, measure: Measure) -> list[str]:
    return [f"checks[{i}].{key}: {measure.name} has no {key} (it is measured per "
            f"{', '.join(measure.scopes)})" for key in SCOPES if check.get(key) is not None and key not in measure.scopes]


def spec_problems(spec: Any) -> list[str]:
    """What is wrong with a spec's checks given the rest of it: a measure it does not compute, a model, method or
    layer it does not have. Each problem names its key path."""
    out = []
    models = {m.id for m in spec.models} | {e.spec.id for e in spec.expanded_models()}
    layers = {layer for m in spec.models for layer in m.layers}
    for i, c in enumerate(spec.checks):
        check = c.model_dump()
        measure = find(check["metric"])
        if measure is None:
            out.append(_unknown(i, check["metric"]))
            continue
        scoped = _scope_problems(i, check, measure)
        if scoped:
            out += scoped
            continue
        why = measure.needs(spec)
        if why:
            out.append(f"checks[{i}].metric: found {measure.name!r}, which this run does not measure: {why}")
            continue
        if check.get("model") is not None and check["model"] not in models:
            out.append(f"checks[{i}].model: found {check['model']!r}, expected one of the spec's models "
                       f"({', '.join(sorted(models))})")
        methods = set(spec.explain.methods) | ({BASELINE} if spec.evaluate and spec.evaluate.random_baseline else set())
        if check.get("method") is not None and check["method"] not in methods:
            out.append(f"checks[{i}].method: found {check['method']!r}, expected one of explain.methods "
                       f"({', '.join(spec.explain.methods)})")
        if check.get("layer") is not None and check["layer"] not in layers:
            out.append(f"checks[{i}].layer: found {check['layer']!r}, expected one of the models' layers "
                       f"({', '.join(sorted(layers)) or 'none listed'})")
    return out


def source_problems(checks: list[dict], src: CheckSource, where: str) -> list[str]:
    """What is wrong with checks given to `report-builder check` against an existing run or diff: a measure it does
    not hold, a scope value none of its rows has."""
    out = []
    for i, check in enumerate(checks):
        measure = find(check["metric"])
        if measure is None:
            out.append(f"{where}: {_unknown(i, check['metric'])}")
            continue
        scoped = _scope_problems(i, check, measure)
        if scoped:
            out += [f"{where}: {s}" for s in scoped]
            continue
        if measure.kind == "run" and src.kind == "diff":
            out.append(f"{where}: checks[{i}].metric: found {measure.name!r}, a measure of one run; a diff directory "
                       "holds the measures between two runs")
            continue
        rows = [r for r in measure.rows(src) if r["value"] is not None]  # a metric switched off leaves nulls
        if not rows:
            what = "this diff" if src.kind == "diff" else "this run"
            out.append(f"{where}: checks[{i}].metric: found {measure.name!r}, which {what} does not measure")
            continue
        for key in measure.scopes:
            want = check.get(key)
            if want is not None and not any(_matches(r, key, want, _groups(src)) for r in rows):
                have = sorted({str(r.get(key)) for r in rows if r.get(key) is not None})
                out.append(f"{where}: checks[{i}].{key}: found {want!r}; {measure.name} is measured for "
                           f"{', '.join(have)}")
    return out


# ---------------------------------------------------------------- evaluating


def _matches(row: dict, key: str, want: Any, groups: dict[str, str] | None = None) -> bool:
    """Whether a row is in a check's scope; a versioned entry's id (`model: lite0`) takes in each of its versions."""
    if key == "model" and groups and groups.get(row.get("model")) == want:
        return True
    return row.get(key) == want or want in row.get("_aliases", {}).get(key, ())


def _groups(src: CheckSource) -> dict[str, str]:
    return {m["id"]: m["group"] for m in src.results.get("models", []) if m.get("group")}


def _shown(value: float) -> str:
    return f"{value:.4g}"


def describe(check: dict) -> str:
    """A check as a line: 'pointing_hit of gradcam ≥ 0.9' (its own name when it has one)."""
    if check.get("name"):
        return check["name"]
    scope = ", ".join(f"{k} {check[k]}" for k in SCOPES if check.get(k) is not None)
    bounds = " and ".join(f"{op} {_shown(check[k])}" for k, op in (("at_least", "≥"), ("at_most", "≤"))
                          if check.get(k) is not None)
    return f"{check['metric']}{f' ({scope})' if scope else ''}{' for each image' if check.get('each') else ''} {bounds}"


def evaluate(checks: list[dict], src: CheckSource) -> list[dict]:
    """Each check's outcomes, one per group of rows it tests (per model and method, say): the measured value (the
    mean over the images unless `each`), how many values it holds, and whether it passed. Failed ones first."""
    out = []
    for index, check in enumerate(checks):
        measure = find(check["metric"])
        groups = _groups(src)
        rows = [r for r in measure.rows(src)
                if all(_matches(r, k, check[k], groups) for k in SCOPES if check.get(k) is not None)]
        if check.get("method") is None:  # the random map is the bar to beat, not a method to test
            rows = [r for r in rows if r.get("method") != BASELINE]
        # tested per value of each scope left open; a versioned entry's id stays open: one test per version
        grouping = [k for k in measure.scopes if (k != AVERAGED or check.get("each"))
                    and (check.get(k) is None or (k == "model" and check[k] in groups.values()))]
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault(tuple(r.get(k) for k in grouping), []).append(r)
        if not groups:
            groups[tuple(None for _ in grouping)] = []
        for key, members in groups.items():
            group = {k: v for k, v in zip(grouping, key) if v is not None}
            scope = {k: group.get(k, check.get(k)) for k in SCOPES}
            scope = {k: v for k, v in scope.items() if v is not None}
            values = [float(r["value"]) for r in members if r["value"] is not None and r["value"] == r["value"]]
            value = sum(values) / len(values) if values else None
            low, high = check.get("at_least"), check.get("at_most")
            passed = value is not None and (low is None or value >= low) and (high is None or value <= high)
            out.append({**_outcome(index, check, measure, scope, value, len(values), passed),
                        "group": ", ".join(str(v) for v in group.values())})
    return sorted(out, key=lambda o: o["passed"])  # stable: failed first, each kind in the spec's order


def _outcome(index: int, check: dict, measure: Measure, scope: dict, value: float | None, n: int,
             passed: bool) -> dict:
    where = ", ".join(f"{k} {v}" for k, v in scope.items())
    bounds = " and ".join(f"{op} {_shown(check[k])}" for k, op in (("at_least", "≥"), ("at_most", "≤"))
                          if check.get(k) is not None)
    over = f" (the mean of {n} values)" if n > 1 else ""
    if value is None:
        message = f"{measure.name}{f' of {where}' if where else ''}: no value to test; expected {bounds}"
    else:
        message = f"{measure.name}{f' of {where}' if where else ''} is {_shown(value)}{over}; expected {bounds}"
    if check.get("name"):
        message = f"{check['name']}: {message}"
    return {"check": index, "name": describe(check), "metric": measure.name, "title": measure.title, **{
        k: scope.get(k) for k in SCOPES}, "value": value, "values": n, "at_least": check.get("at_least"),
            "at_most": check.get("at_most"), "each": bool(check.get("each")), "passed": passed, "message": message,
            "timing": measure.timing}


def junit(outcomes: list[dict], suite: str = "report_builder checks") -> bytes:
    """The outcomes as JUnit XML, one test case per outcome with its measured value, for a CI's test report."""
    failed = sum(not o["passed"] for o in outcomes)
    root = ElementTree.Element("testsuites", tests=str(len(outcomes)), failures=str(failed), errors="0")
    ts = ElementTree.SubElement(root, "testsuite", name=suite, tests=str(len(outcomes)), failures=str(failed),
                                errors="0", skipped="0", time="0")
    for o in outcomes:
        group = f" [{o['group']}]" if o.get("group") else ""
        case = ElementTree.SubElement(ts, "testcase", classname=f"checks.{o['metric']}", name=o["name"] + group,
                                      time="0")
        props = ElementTree.SubElement(case, "properties")
        for k in ("value", "values", "at_least", "at_most"):
            if o.get(k) is not None:
                ElementTree.SubElement(props, "property", name=k, value=f"{o[k]:.6g}" if isinstance(o[k], float)
                                       else str(o[k]))
        if not o["passed"]:
            ElementTree.SubElement(case, "failure", message=o["message"], type="CheckFailed").text = o["message"]
        ElementTree.SubElement(case, "system-out").text = o["message"]
    ElementTree.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root, encoding="utf-8") + b"\n"


def summary(outcomes: list[dict]) -> str:
    """One line, then each failed outcome on its own line: what `run` and `check` print."""
    failed = [o for o in outcomes if not o["passed"]]
    head = f"checks: {len(outcomes) - len(failed)} of {len(outcomes)} passed"
    return "\n".join([head + (f", {len(failed)} failed" if failed else "")] + [f"  FAILED {o['message']}"
                                                                              for o in failed])


# ---------------------------------------------------------------- the commands

CHECKS_FAILED = 3  # the exit code of `run` and `check` when a check failed (2: bad input, 1: a bug)


def run_outcome(run_dir: Path) -> tuple[bool, str]:
    """After `run`: whether a check failed, and the lines to print."""
    import json

    outcomes = json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8")).get("checks", [])
    failed = any(not o["passed"] for o in outcomes)
    return failed, summary(outcomes) + f"\n  (JUnit XML: {Path(run_dir) / CHECKS_XML})"


def _open(folder: Path) -> CheckSource:
    """A run directory or a diff directory, read and checked as render and diff read them."""
    from report_builder.files import folder_kind
    from report_builder.report.rundir import RunFormatError, load_results, read_json

    if not folder.is_dir():
        raise RunFormatError(f"{folder}: no such run or diff directory")
    if folder_kind(folder) == "diff" or ((folder / "diff.json").is_file() and not (folder / "results.json").exists()):
        data = read_json(folder / "diff.json", "diff.json")
        if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
            raise RunFormatError(f"{folder / 'diff.json'}: does not have the layout this report_builder writes")
        return CheckSource(data, folder, "diff")
    return CheckSource(load_results(folder), folder, "run")


def check_dir(folder: Path, given: list[dict] | None = None, where: str = "", junit_path: Path | None = None) -> int:
    """`report-builder check RUN_DIR [--spec FILE] [--junit PATH]`: evaluate the checks (`given`, read from `where`,
    else the run's own) on an existing run or diff, print the outcome, write the JUnit XML; 0 when every check passes,
    CHECKS_FAILED when one fails."""
    from report_builder.errors import UserError
    from report_builder.files import atomic_write

    folder = Path(folder)
    src = _open(folder)
    if given is not None:  # from --spec, read and validated by the spec module
        checks = given
    else:
        checks = list((src.results.get("spec") or {}).get("checks") or [])
        where = f"{folder}/results.json: spec"
        if not checks:
            raise UserError(f"{folder}: its spec has no 'checks:'; give them with --spec FILE (a YAML file with a "
                            "'checks:' list)")
    problems = source_problems(checks, src, where)
    if problems:
        raise UserError("invalid checks\n" + "\n".join(f"  {p}" for p in problems))
    try:
        outcomes = evaluate(checks, src)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        from report_builder.report.rundir import RunFormatError

        raise RunFormatError(f"{folder}: does not have the layout this report_builder writes ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
    xml = junit(outcomes)
    target = junit_path or folder / CHECKS_XML
    if junit_path is None:
        _write_into(folder, src.kind, xml)
    else:
        atomic_write(Path(junit_path), xml)
    failed = any(not o["passed"] for o in outcomes)
    for o in outcomes:
        print(f"{'PASS' if o['passed'] else 'FAIL'}  {o['message']}")
    print(summary(outcomes).splitlines()[0] + f" (JUnit XML: {target})")
    return CHECKS_FAILED if failed else 0


def _write_into(folder: Path, kind: str, xml: bytes) -> None:
    """checks.xml into a run or diff directory of ours, as a re-render writes: only our own files are replaced."""
    import shutil

    from report_builder.files import OWNER, check_output, partial_folder, replace_ours

    check_output(folder, kind, option="check")
    stage = partial_folder(folder, kind)
    try:
        (stage / CHECKS_XML).write_bytes(xml)
        (stage / OWNER).unlink()
        replace_ours(folder, stage, kind, scope=lambda rel: rel == CHECKS_XML)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
