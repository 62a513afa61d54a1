"""Every registry is complete and agrees with the tables that loop over it: a missing piece fails here, by name.

One registry per kind (explanation methods, evaluation metrics, concept scorers, model sources, similarity
functions, report sections). Each test below parametrizes over the registry itself, as timm's tests do over its
models, so a new entry is checked the moment it is added.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from report_builder.report.sections import SECTION_IDS, SECTIONS, sections_of

PACKAGE = Path(__file__).resolve().parent.parent / "report_builder"


# ---------------------------------------------------------------- report sections


@pytest.mark.parametrize("section", SECTIONS, ids=[s.id for s in SECTIONS])
def test_every_report_section_is_complete(section):
    assert re.fullmatch(r"[a-z_]+", section.id), f"section {section.id!r}: its id is an anchor and a file name"
    assert section.title, f"section {section.id!r}: no title"
    assert (PACKAGE / "report" / "templates" / "partials" / f"{section.id}.html").is_file(), \
        f"section {section.id!r}: no template partials/{section.id}.html"
    assert callable(section.shown), f"section {section.id!r}: 'shown' is not a function of the results"


def test_every_finding_names_a_registered_section():
    text = "".join((PACKAGE / "report" / f).read_text() for f in ("analysis.py", "concepts.py"))
    named = set(re.findall(r'"section": "([a-z_]+)"', text))
    assert named and named <= set(SECTION_IDS), f"findings name sections the registry lacks: {named - set(SECTION_IDS)}"


def test_every_partial_template_belongs_to_a_section_or_is_shared():
    partials = {p.stem for p in (PACKAGE / "report" / "templates" / "partials").glob("*.html")}
    shared = {"title", "contents", "findings_list"}  # included by every page, not sections of their own
    assert partials - shared == set(SECTION_IDS), f"partials without a section: {partials - shared - set(SECTION_IDS)}"


def test_the_rendered_contents_follow_the_registry(monkeypatch):
    results = {"dissection": {"models": []}, "evaluation": {"rows": []}, "versions": []}
    shown = [s.id for s in sections_of(results)]
    assert shown == [s for s in SECTION_IDS if s not in ("netdissect", "versions", "checks", "concepts")]  # empty: none
    trimmed = tuple(s for s in SECTIONS if s.id != "trust")
    monkeypatch.setattr(sys.modules["report_builder.report.sections"], "SECTIONS", trimmed)
    assert "trust" not in [s.id for s in sections_of(results)]  # one table decides what the report shows


# ---------------------------------------------------------------- the package's shape


def _imports(path: Path) -> set[str]:
    """The report_builder modules a module imports, at its top level or inside a function (a deferred import that
    closes a cycle still ties the two modules together)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("report_builder"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("report_builder"))
    return found


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycles():
    graph = _module_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _printed_by(code: str) -> str:
    """What `code` prints in a fresh interpreter (so that modules this test process imported do not count)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_the_report_side_imports_no_torch_and_no_model_code():
    code = ("import sys, report_builder; from report_builder import open_run; "
            "import report_builder.report.api, report_builder.report.render, report_builder.report.diff, "
            "report_builder.report.analysis, report_builder.report.rundir; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('report_builder.models', "
            "'report_builder.explanation.methods', 'report_builder.evaluation.metrics', 'report_builder.dissection', "
            "'report_builder.pipeline.runner'))); print(bad)")
    out = _printed_by(code)
    assert out == "[]", f"opening a run imports {out}"


def test_no_two_public_classes_share_a_name():
    seen: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where = str(path.relative_to(PACKAGE))
                assert node.name not in seen, f"class {node.name} in both {seen[node.name]} and {where}"
                seen[node.name] = where


def test_no_module_is_named_like_a_sibling_folder():
    for path in PACKAGE.rglob("*.py"):
        assert not (path.parent / path.stem).is_dir(), f"{path.relative_to(PACKAGE)} shares its name with a folder"


# ---------------------------------------------------------------- explanation methods


def _typed(value, hint) -> bool:
    """Whether `value` has the type `hint` (the registry's field annotations: unions, Literal, tuples of pairs)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_typed(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_typed(v, args[0]) for v in value)
        return len(value) == len(args) and all(_typed(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _method_ids(grad_cam_only: bool = False) -> list[str]:
    from report_builder.explanation.registry import METHODS

    return [k for k, m in METHODS.items() if m.cam_class or not grad_cam_only]


@pytest.mark.parametrize("name", _method_ids())
def test_every_explanation_method_is_complete(name):
    import dataclasses
    import json
    import typing

    from report_builder.explanation.registry import METHODS, Method, resolve
    from report_builder.spec.schema import ExplainSpec

    entry = METHODS[name]
    assert entry.name == name, f"method {name!r}: registered under another name ({entry.name!r})"
    assert re.fullmatch(r"[a-z+]+", name), f"method {name!r}: its name is a file name and a README word"
    hints = typing.get_type_hints(Method)
    for field in dataclasses.fields(Method):
        value = getattr(entry, field.name)
        assert _typed(value, hints[field.name]), \
            f"method {name!r}: field {field.name} is {value!r}, expected {hints[field.name]}"
    assert entry.title.strip(), f"method {name!r}: no title"
    assert entry.implementation or entry.cam_class, \
        f"method {name!r}: no implementation (a 'module:function') and no grad-cam cam_class to run"
    if entry.implementation:
        try:
            function = resolve(entry.implementation)
        except (ImportError, AttributeError, ValueError) as exc:
            pytest.fail(f"method {name!r}: implementation {entry.implementation!r} cannot be imported ({exc})")
        assert callable(function), f"method {name!r}: implementation {entry.implementation!r} is not a function"
    assert entry.token_layouts is True or (isinstance(entry.token_layouts, str) and entry.token_layouts.strip()), \
        f"method {name!r}: token_layouts is neither True nor the reason it cannot explain token layers"
    assert entry.default is None or entry.default >= 1, f"method {name!r}: default is a place from 1"
    assert entry.key_settings is None or entry.key_settings in ExplainSpec.model_fields, \
        f"method {name!r}: key_settings {entry.key_settings!r} is not a section of explain"
    assert json.loads(json.dumps(dict(entry.key_params))) == dict(entry.key_params), \
        f"method {name!r}: key_params do not survive JSON, as cache keys must"
    if entry.kind != "cam":
        flags = ("cam_class", "all_layers", "own_targets", "second_derivatives", "forward_only_batches",
                 "ablation_batch")
        set_flags = [f for f in flags if getattr(entry, f)]
        assert not set_flags, f"method {name!r}: grad-cam flags {set_flags} on a method of kind {entry.kind}"


@pytest.mark.parametrize("name", _method_ids(grad_cam_only=True))
def test_every_grad_cam_class_the_registry_names_exists_and_agrees_on_gradients(name):
    import pytorch_grad_cam
    from torch import nn

    from report_builder.explanation.registry import METHODS

    entry = METHODS[name]
    cls = getattr(pytorch_grad_cam, entry.cam_class, None)
    assert cls is not None, f"method {name!r}: pytorch_grad_cam has no class {entry.cam_class}"
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    cam = cls(model=model, target_layers=[] if entry.all_layers else [model[0]])
    try:
        assert bool(cam.uses_gradients) == entry.needs_gradients, \
            f"method {name!r}: needs_gradients is {entry.needs_gradients}, grad-cam's {entry.cam_class} says otherwise"
    finally:
        getattr(cam, "base_cam", cam).activations_and_grads.release()


def test_the_spec_takes_exactly_the_registered_methods():
    from pydantic import ValidationError

    from report_builder.explanation.registry import DEFAULT, METHODS, NAMES
    from report_builder.spec.schema import ExplainSpec

    for name in NAMES:
        assert ExplainSpec(methods=[name]).methods == (name,), f"method {name!r}: the spec refuses it"
    assert ExplainSpec(methods="all").methods == NAMES
    assert ExplainSpec().methods == DEFAULT
    assert sorted(METHODS[k].default for k in DEFAULT) == list(range(1, len(DEFAULT) + 1))
    for unknown in ("randomcam", "gradcam2", "GradCAM", "guidedbackprop"):
        with pytest.raises(ValidationError):
            ExplainSpec(methods=[unknown])


def test_the_readme_lists_exactly_the_registered_methods():
    from report_builder.explanation.registry import NAMES

    text = (PACKAGE.parent / "README.md").read_text()
    start = text.index("`explain.methods` takes any of")
    listed = re.findall(r"`([a-z+]+)`", text[start : text.index("or `all`", start)])
    assert sorted(listed) == sorted(NAMES), \
        f"README.md: missing {sorted(set(NAMES) - set(listed))}, not registered {sorted(set(listed) - set(NAMES))}"


def test_no_generic_code_tests_a_method_by_its_name():
    """The flags of the registry say how a method is run, keyed and collected: no comparison with a method's name or
    its grad-cam class outside the registry, in the stages that run methods (the report reads the run's data)."""
    from report_builder.explanation.registry import METHODS

    words = set(METHODS) | {m.cam_class for m in METHODS.values() if m.cam_class}
    found = []
    for folder in ("explanation", "pipeline", "spec", "evaluation", "dissection", "models"):
        for path in (PACKAGE / folder).rglob("*.py"):
            if path.name == "registry.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare) and any(
                        isinstance(c, ast.Constant) and c.value in words for c in [node.left, *node.comparators]):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, f"method names compared in generic code (use a flag of the registry): {found}"


# ---------------------------------------------------------------- the hook recorder


def test_the_hook_recorder_removes_its_hooks_even_when_the_forward_pass_raises():
    import torch
    from torch import nn

    from report_builder.models.hooks import LayerRecorder

    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), Fails())
    with pytest.raises(RuntimeError, match="boom"):
        with LayerRecorder({"0": model[0], "1": model[1]}, history=True) as rec:
            model(torch.zeros(1, 3, 4, 4))
    assert [name for name, _ in rec.calls] == ["0", "1"]  # recorded up to the failure
    assert all(not m._forward_hooks for m in model.modules()), "a hook stayed on after the forward pass raised"
    with LayerRecorder({"0": model[0]}, lambda name, _m, _i, out: (name, out.shape)) as rec:
        model[:2](torch.zeros(1, 3, 4, 4))
    assert rec.latest == {"0": ("0", torch.Size([1, 2, 4, 4]))} and not model[0]._forward_hooks


# ---------------------------------------------------------------- evaluation metrics


def _metric_names() -> list[str]:
    from report_builder.evaluation.registry import METRICS

    return [m.name for m in METRICS]


@pytest.mark.parametrize("name", _metric_names())
def test_every_evaluation_metric_is_complete(name):
    import dataclasses
    import math

    from report_builder.evaluation.registry import ARROWS, BY_NAME, CHANCE, Column, Metric, Rule
    from report_builder.report import render
    from report_builder.spec.schema import EvaluateSpec

    metric = BY_NAME[name]
    assert metric.name == name, f"metric {name!r}: registered under another name ({metric.name!r})"
    for cls, entry, what in [(Metric, metric, f"metric {name!r}")] + [
            (Column, c, f"metric {name!r}, column {getattr(c, 'name', c)!r}") for c in metric.columns]:
        assert isinstance(entry, cls), f"{what}: not a {cls.__name__}"
        for field in dataclasses.fields(cls):
            value = getattr(entry, field.name)
            if field.name == "rule":
                assert value is None or isinstance(value, Rule), f"{what}: rule is {value!r}, expected a Rule or None"
                continue
            if field.name == "chance":  # () for a metric with a bar of its own (the sanity check's cascade)
                assert set(value) <= set(CHANCE), f"{what}: chance {value!r}, expected kinds of {sorted(CHANCE)}"
                continue
            assert value is not None and value != () and not (isinstance(value, str) and not value.strip()), \
                f"{what}: field {field.name} is missing"
    assert isinstance(metric.per_step, bool), f"metric {name!r}: per_step is {metric.per_step!r}"
    assert set(metric.summary) <= {c.name for c in metric.columns}, \
        f"metric {name!r}: summary {metric.summary!r} names columns it does not have"
    assert metric.spec_key in EvaluateSpec.model_fields, f"metric {name!r}: spec_key {metric.spec_key!r} is not a key of evaluate"
    for c in metric.columns:
        where = f"metric {name!r}, column {c.name!r}"
        assert re.fullmatch(r"[a-z_]+", c.name), f"{where}: its name is a CSV value and a DataFrame column"
        assert c.direction in ARROWS, f"{where}: direction is {c.direction!r}, expected one of {sorted(ARROWS)}"
        assert type(c.digits) is int and c.digits >= 0, f"{where}: digits is {c.digits!r}"
        assert c.aggregate in ("mean", "hits"), f"{where}: aggregate is {c.aggregate!r}"
        assert isinstance(c.value_range, tuple) and len(c.value_range) == 2, f"{where}: value_range {c.value_range!r}"
        lo, hi = c.value_range
        assert math.isfinite(lo) and math.isfinite(hi) and lo < hi, f"{where}: value_range {c.value_range}"
        assert c.aggregate != "hits" or (c.name.endswith("_hit") and not metric.per_step and c.value_range == (0, 1)), \
            f"{where}: a hits column is a 0/1 value per map named <x>_hit"
    if metric.rule is not None:
        judged = {c.name: c for c in metric.columns}.get(metric.rule.column)
        assert judged is not None, f"metric {name!r}: its rule judges {metric.rule.column!r}, not one of its columns"
        assert judged.value_range[0] <= metric.rule.threshold <= judged.value_range[1], \
            f"metric {name!r}: its rule's threshold lies outside {judged.name}'s value_range"
    settings = EvaluateSpec().model_dump(mode="json")[metric.spec_key]
    assert settings is not None, f"metric {name!r}: off by default; give a default spec section to render its row"
    env = render.environment()
    text = env.from_string("{{ describe(m, s) }}").render(m=metric, s=settings)  # strict: a missing setting fails
    assert text.strip() and "{" not in text, f"metric {name!r}: its description renders as {text!r}"


# What the evaluation code returns beside the metrics' columns: curves for the figures, the object's name and size, the
# explained class; and the sanity check's cascade (its layers, blocks and the maps of its figure).
NOT_METRICS = {"deletion_curve", "insertion_curve", "object", "object_pixels", "target"}
NOT_STEP_METRICS = {"layers", "blocks", "total_blocks", "maps", "runs"}  # runs: the last step per seed


def _check_the_evaluation_code_agrees_with_the_metrics_registry() -> None:
    """Run every metric's function on a tiny model with every setting on: the columns they produce are the registry's
    columns, and each registered metric has its function and its sentence in the findings."""
    import numpy as np
    import torch

    from conftest import TinyNet, wrap
    from report_builder.evaluation import metrics as ev
    from report_builder.evaluation.registry import METRICS, per_map, per_step
    from report_builder.explanation.methods import EXPLAINERS, ExplainSettings
    from report_builder.report.analysis import SENTENCES
    from report_builder.spec.schema import DeletionSpec, EvaluateSpec, ExplainSpec, RoadSpec, SanitySpec

    names = {m.name for m in METRICS}
    per_map_names = {m.name for m in METRICS if not m.per_step}
    for label, table in (("CALCULATIONS (evaluation/metrics.py)", set(ev.CALCULATIONS)),
                         ("SENTENCES (report/analysis.py)", set(SENTENCES))):
        wanted = per_map_names if label.startswith("CALC") else names
        assert not table - wanted, f"{label} binds {sorted(table - wanted)}, which the metrics registry lacks"
        assert not wanted - table, f"metrics {sorted(wanted - table)} have no entry in {label}"

    torch.manual_seed(0)
    model = wrap(TinyNet())
    crop = np.random.default_rng(0).integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    saliency = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    region = np.zeros((32, 32), bool)
    region[4:12, 4:12] = True
    spec = EvaluateSpec(deletion=DeletionSpec(steps=4), road=RoadSpec(percentiles=(50,)),
                        sanity=SanitySpec(images=1, steps=2))
    settings = ev.EvaluationSettings(spec, seed=0, device=torch.device("cpu"))
    produced = set()
    for fn in ev.CALCULATIONS.values():
        produced |= set(fn(model, crop, 1, saliency, (region, "the masked object"), settings)) - NOT_METRICS
    registered = {c.name for _, c in per_map()}
    assert not produced - registered, f"the evaluation code produces {sorted(produced - registered)}, no metric's column"
    assert not registered - produced, f"registered columns {sorted(registered - produced)} are produced by no function"

    explain = ExplainSpec()
    original = EXPLAINERS["gradcam"](model, crop, 1, ExplainSettings(explain, 0, torch.device("cpu")))
    steps = set(ev.sanity_check(model, crop, "gradcam", explain, spec, 0, "cpu", {**original, "target": 1}))
    steps -= NOT_STEP_METRICS
    registered = {c.name for _, c in per_step()}
    assert steps == registered, f"the sanity check produces {sorted(steps)} per step, the registry lists {sorted(registered)}"


def test_the_evaluation_code_produces_exactly_the_registered_metrics():
    _check_the_evaluation_code_agrees_with_the_metrics_registry()


@pytest.mark.parametrize("name", _metric_names())
def test_a_metric_missing_from_the_registry_is_named(name, monkeypatch):
    from report_builder.evaluation import registry

    trimmed = tuple(m for m in registry.METRICS if m.name != name)
    monkeypatch.setattr(registry, "METRICS", trimmed)
    with pytest.raises(AssertionError, match=name if name != "sanity" else "sanity|spearman"):
        _check_the_evaluation_code_agrees_with_the_metrics_registry()


def test_the_spec_has_one_section_per_metric_key():
    from pydantic import BaseModel

    from report_builder.evaluation.registry import METRICS
    from report_builder.spec.schema import EvaluateSpec

    from report_builder.evaluation.registry import SHARED_SECTIONS

    sections = {k for k, f in EvaluateSpec.model_fields.items() if isinstance(f.default, BaseModel)}
    sections -= set(SHARED_SECTIONS)  # the chance maps' settings: every metric's, no metric's own
    keys = {m.spec_key for m in METRICS}
    assert sections == keys, f"evaluate's sections without a metric: {sorted(sections - keys)}; metrics' keys not in " \
                             f"the spec: {sorted(keys - sections)}"


def test_the_run_directory_checks_take_the_registry_columns_and_ranges():
    from report_builder.evaluation.registry import per_map, per_step
    from report_builder.report import rundir

    rows = rundir.EVALUATION["rows"][0]
    sanity = rundir.EVALUATION["sanity"][0].schema
    assert [k for k in rows if k not in ("model", "image", "method", "object")] == [c.name for _, c in per_map()]
    assert [k for k in sanity if k in {c.name for _, c in per_step()}] == [c.name for _, c in per_step()]
    assert rundir.EVALUATION_METRICS == tuple(m.csv_metric(c) for m, c in per_map())
    for (_, c), schema in [(mc, rows[mc[1].name]) for mc in per_map()] + [(mc, sanity[mc[1].name][0])
                                                                          for mc in per_step()]:
        check = rundir._KINDS[schema.schema]
        lo, hi = c.value_range
        for v in (lo, hi, (lo + hi) / 2):
            check(v, c.name, None)  # accepted
        for v in (lo - 0.01, hi + 0.01, float("nan")):
            with pytest.raises(Exception):
                check(v, c.name, type("Ctx", (), {"source": "results.json"})())
    for m, c in per_map():
        assert rundir._metric_cell(m.csv_metric(c), None, None), f"evaluation.csv's metric {c.name} is refused"
    for m, c in per_step():
        assert rundir._metric_cell(m.csv_metric(c, "layer4.1"), None, None)
    assert not rundir._metric_cell("pointing", None, None)
    summary = rundir.EVALUATION["summary"][0].schema  # the summary's interval ends: the registry's keys, its ranges
    for _, c in per_map():
        assert c.low_key in summary and c.high_key in summary, f"evaluation.summary's {c.name}: no interval checked"
        ends = "probability" if c.aggregate == "hits" else rundir._in_range(*c.value_range)
        assert summary[c.low_key].schema == summary[c.high_key].schema == ends, c.name


def test_the_api_evaluation_columns_are_the_registry_columns():
    from report_builder.evaluation.registry import per_map, per_step
    from report_builder.report.api import Run

    run = Run.__new__(Run)
    run._results = {"evaluation": {"rows": [], "sanity": [
        {"model": "a", "image": "b", "method": "gradcam", "layers": ["fc", "conv"],
         **{c.name: [0.5, 0.25] for _, c in per_step()}}]}}
    assert list(run.evaluation.columns) == ["model", "image", "method", *[c.name for _, c in per_map()], "object"]
    assert list(run.sanity.columns) == ["model", "image", "method", "step", "layer", *[c.name for _, c in per_step()]]
    assert run.sanity[per_step()[0][1].name].tolist() == [0.5, 0.25]
    columns = list(run.evaluation_summary.columns)
    for _, c in per_map():  # each registry column with its interval's ends, as results.json keeps them
        assert {c.low_key, c.high_key} <= set(columns) and (c.name in columns or c.hits_key in columns), c.name


def _trust_html(results: dict) -> str:
    from report_builder.report import render
    from report_builder.explanation.registry import TITLES

    env = render.environment()
    return env.get_template("partials/trust.html").render(
        r=results, method_titles=TITLES, figures={"trust_curves": [], "trust_sanity": []},
        findings_by_section={"trust": [f for f in results.get("findings", []) if f["section"] == "trust"]})


def _trust_results(spearman_final: float, seeds: int = 9) -> dict:
    """One model, one image, Grad-CAM and the default chance maps, every column 0.5 (hits 1), and a sanity check
    whose last step gives `spearman_final` under each of `seeds` seeds; the summary and findings as collect makes
    them."""
    from report_builder.evaluation.registry import chance_methods, per_map, per_step
    from report_builder.report import analysis
    from report_builder.spec.schema import EvaluateSpec

    settings = EvaluateSpec().model_dump(mode="json")
    methods = ["gradcam", *chance_methods(settings)]
    rows = [{"model": "m", "image": "i", "method": method, "object": "cat",
             **{c.name: 1.0 if c.aggregate == "hits" else 0.5 for _, c in per_map()}} for method in methods]
    final = {c.name: spearman_final if c.name == registry_rule_column() else 0.4 for _, c in per_step()}
    sanity = [{"model": "m", "image": "i", "method": "gradcam", "layers": ["fc"], **{k: [v] for k, v in final.items()},
               "runs": [{"seed": k, **final, "flat": False} for k in range(seeds)]}]
    results = {"models": [{"id": "m", "display": "Model M"}],
               "evaluation": {"settings": settings, "methods": methods, "rows": rows, "sanity": sanity}}
    results["evaluation"]["summary"] = analysis.evaluation_summary(results)
    results["findings"] = analysis.evaluation_findings(results)
    return results


def registry_rule_column() -> str:
    from report_builder.evaluation import registry

    return registry.BY_NAME["sanity"].rule.column


def test_the_trust_section_states_the_registry_rule_and_columns(monkeypatch):
    import dataclasses
    import html as html_lib

    from report_builder.evaluation import registry

    rule = registry.BY_NAME["sanity"].rule
    page = html_lib.unescape(_trust_html(_trust_results(0.55)))
    assert f"a run fails when ρ {rule.fails_if} {rule.shown}" in page
    assert f"({rule.stated})" in page and "fails the sanity check" in page  # 0.55 ≥ 0.5 on all 9 runs
    headings = re.findall(r'<th class="num">([^<]*)</th>', page)
    assert headings == [c.heading for m in registry.METRICS for c in m.columns]
    for m in registry.METRICS:
        assert f"<th>{m.title}</th>" in page, f"metric {m.name!r}: no row in the trust section's table of methods"
    assert "inconclusive on 1 runs" in html_lib.unescape(_trust_html(_trust_results(0.55, seeds=1)))

    stricter = dataclasses.replace(rule, threshold=0.6)  # the rule lives once: the template and the finding follow it
    monkeypatch.setattr(registry, "METRICS", tuple(
        dataclasses.replace(m, rule=stricter) if m.name == "sanity" else m for m in registry.METRICS))
    monkeypatch.setattr(registry, "BY_NAME", {m.name: m for m in registry.METRICS})
    page = html_lib.unescape(_trust_html(_trust_results(0.55)))
    assert "a run fails when ρ ≥ 0.6" in page
    assert "passes the sanity check" in page and "fails the sanity check" not in page  # 0.55 < 0.6


def test_the_rendered_table_of_methods_is_the_registry():
    """Every stated rule comes from the registry: the trust section's table of methods holds each metric's
    description rendered with the run's settings, word for word, and the README holds it with the defaults."""
    import html as html_lib

    from report_builder.evaluation import registry
    from report_builder.report import render
    from report_builder.spec.schema import EvaluateSpec

    results = _trust_results(0.1)
    page = html_lib.unescape(re.sub(r"<[^>]+>", "", _trust_html(results)))
    page = re.sub(r"\s+", " ", page)
    settings = results["evaluation"]["settings"]
    for m in registry.METRICS:
        assert re.sub(r"\s+", " ", render.describe_text(m, settings[m.spec_key])) in page, \
            f"metric {m.name!r}: the table of methods does not state the registry's description"
    assert re.sub(r"\s+", " ", html_lib.unescape(re.sub(r"<[^>]+>", "", str(render._beats_chance(settings))))) in page
    readme = re.sub(r"\s+", " ", (PACKAGE.parent / "README.md").read_text())
    defaults = EvaluateSpec().model_dump(mode="json")
    for m in registry.METRICS:
        text = re.sub(r"\s+", " ", render.describe_text(m, defaults[m.spec_key]))
        assert text in readme, (f"README.md does not state metric {m.name!r} as the registry does; its words (regenerate "
                                f"with report.readme.readme_metrics()):\n{text}")


def test_only_the_registry_the_functions_and_the_sentences_name_metric_columns():
    """A column's name as a key (r["road"], {"road": ...}, .get("road"), a list of them) appears in
    evaluation/registry.py, its function (evaluation/metrics.py) and its sentence (report/analysis.py) only; everything
    else loops over the registry."""
    from report_builder.evaluation.registry import METRICS

    words = {c.name for m in METRICS for c in m.columns}
    allowed = {"evaluation/registry.py", "evaluation/metrics.py", "report/analysis.py",
               "report/render.py"}  # render: the sanity figure labels each step's map with its ρ

    def keys(node):
        if isinstance(node, ast.Subscript):
            yield node.slice
        elif isinstance(node, ast.Dict):
            yield from (k for k in node.keys if k is not None)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            yield from node.args[:1]
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            named = [e for e in node.elts if isinstance(e, ast.Constant) and e.value in words]
            if len(named) >= 2:  # a list of metrics (one concept word, as 'road' in a list of objects, is not)
                yield from named

    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if rel in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            for key in keys(node):
                if isinstance(key, ast.Constant) and key.value in words:
                    found.append(f"{rel}:{key.lineno} {key.value!r}")
    templates = PACKAGE / "report" / "templates"
    found += [f"templates/{p.relative_to(templates)}: {w}" for p in templates.rglob("*.html") for w in words
              if re.search(rf"[.\[\"']{w}\b", p.read_text())]
    assert not found, f"metric columns named outside the registry: {found}"


def test_an_incomplete_metric_is_named_with_its_field(monkeypatch):
    import dataclasses

    from report_builder.evaluation import registry

    monkeypatch.setitem(registry.BY_NAME, "road", dataclasses.replace(registry.BY_NAME["road"], citation=" "))
    with pytest.raises(AssertionError, match="metric 'road': field citation is missing"):
        test_every_evaluation_metric_is_complete("road")


# ---------------------------------------------------------------- concept scorers, similarity functions, model sources


def _incomplete(entry, fields: tuple[str, ...]) -> list[str]:
    """The fields of a registry entry left empty."""
    return [f for f in fields if getattr(entry, f) in (None, "", ())]


def _scorer_problems(name: str) -> list[str]:
    import importlib
    import inspect

    from report_builder.dissection import scorers
    from report_builder.spec.schema import ScorerSpec

    entry = scorers.SCORERS[name]
    problems = [f"scorer {name!r}: field {f} is missing" for f in _incomplete(entry, ("name", "title", "module"))]
    if entry.name != name:
        problems.append(f"scorer {name!r}: its entry is named {entry.name!r}")
    for function, params in (("plan", ["spec", "scorer", "where", "device"]),
                             ("tasks", ["g", "sc", "shards", "pixel_keys", "dev", "batch"]),
                             ("combine", ["scorer", "images", "parts"])):
        fn = getattr(importlib.import_module(entry.module), function, None)
        if not callable(fn):
            problems.append(f"scorer {name!r}: field {function} is missing ({entry.module} defines no {function}())")
        elif len(inspect.signature(fn).parameters) != len(params):
            problems.append(f"scorer {name!r}: {function}() takes {list(inspect.signature(fn).parameters)}, "
                            f"expected {params}")
    keys = set(ScorerSpec.model_fields) - {"kind"}
    problems += [f"scorer {name!r}: allows {k!r}, which is no key of a scorer entry" for k in entry.allows - keys]
    problems += [f"scorer {name!r}: needs {k!r}, which it does not allow" for k in set(entry.needs) - entry.allows]
    problems += [f"scorer {name!r}: needs {k!r} without saying what it is" for k, what in entry.needs.items()
                 if not what.strip()]
    return problems


def _similarity_problems(name: str) -> list[str]:
    """An entry against its function's signature: every parameter listed is a keyword of the function, with a
    default inside its range (a whole number where it must be), and every keyword of the function is listed."""
    import inspect

    from report_builder.dissection import similarity

    entry = similarity.SIMILARITIES[name]
    problems = [f"similarity {name!r}: field {f} is missing" for f in _incomplete(entry, ("name", "title", "implementation"))]
    if entry.name != name:
        problems.append(f"similarity {name!r}: its entry is named {entry.name!r}")
    try:
        fn = entry.function
    except (ImportError, AttributeError, ValueError) as exc:
        return problems + [f"similarity {name!r}: field implementation {entry.implementation!r} does not resolve ({exc})"]
    signature = inspect.signature(fn).parameters
    positional = list(signature)[:2]
    if positional != ["P", "A"]:
        problems.append(f"similarity {name!r}: {entry.implementation} takes {positional} first, expected (P, A)")
    keywords = {k: p for k, p in list(signature.items())[2:]}
    for key, param in entry.params.items():
        if not isinstance(param, similarity.Param) or not param.low <= param.high:
            problems.append(f"similarity {name!r}: parameter {key!r} has no range (low <= high)")
            continue
        if key not in keywords:
            problems.append(f"similarity {name!r}: parameter {key!r} is not a keyword of {entry.implementation}")
            continue
        default = keywords[key].default
        if default is inspect.Parameter.empty:
            problems.append(f"similarity {name!r}: parameter {key!r} has no default in {entry.implementation}")
        elif (not isinstance(default, (int, float)) or isinstance(default, bool)
              or (param.whole and not isinstance(default, int)) or not param.low <= default <= param.high):
            problems.append(f"similarity {name!r}: parameter {key!r} defaults to {default!r}, outside its range "
                            f"{param.low:g} to {param.high:g}{' (whole numbers)' if param.whole else ''}")
    problems += [f"similarity {name!r}: keyword {k!r} of {entry.implementation} is not registered"
                 for k in keywords if k not in entry.params]
    return problems


def _source_problems(name: str) -> list[str]:
    import inspect

    from report_builder.models import sources
    from report_builder.spec.schema import ModelSpec

    entry = sources.SOURCES[name]
    problems = [f"source {name!r}: field {f} is missing" for f in _incomplete(entry, ("name", "description", "loader"))]
    if entry.name != name:
        problems.append(f"source {name!r}: its entry is named {entry.name!r}")
    try:
        loader = sources.resolve(entry.loader)
    except (ImportError, AttributeError, ValueError) as exc:
        problems.append(f"source {name!r}: field loader {entry.loader!r} does not resolve ({exc})")
    else:
        if list(inspect.signature(loader).parameters) != ["spec", "where"]:
            problems.append(f"source {name!r}: {entry.loader} takes {list(inspect.signature(loader).parameters)}, "
                            "expected (spec, where)")
    if not entry.needs:
        problems.append(f"source {name!r}: field needs is missing (the key that says which model: name or factory)")
    keys = set(sources.SOURCE_KEYS)
    problems += [f"source {name!r}: allows {k!r}, which is not in SOURCE_KEYS" for k in entry.allows - keys]
    problems += [f"source {name!r}: needs {k!r}, which it does not allow" for k in set(entry.needs) - entry.allows]
    problems += [f"source {name!r}: gives a reason to refuse {k!r}, which it allows" for k in set(entry.refused) & entry.allows]
    if entry.names and "name" not in entry.allows:
        problems.append(f"source {name!r}: lists names but does not allow 'name'")
    problems += [f"SOURCE_KEYS: {k!r} is no key of a model entry" for k in keys - set(ModelSpec.model_fields)]
    return problems


def _scorer_names() -> list[str]:
    from report_builder.dissection.scorers import SCORERS

    return list(SCORERS)


def _similarity_names(with_params: bool = False) -> list[str]:
    from report_builder.dissection.similarity import SIMILARITIES

    return [k for k, s in SIMILARITIES.items() if s.params or not with_params]


def _source_names() -> list[str]:
    from report_builder.models.sources import SOURCES

    return list(SOURCES)


@pytest.mark.parametrize("name", _scorer_names())
def test_every_concept_scorer_is_complete(name):
    problems = _scorer_problems(name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", _similarity_names())
def test_every_similarity_function_is_complete_and_agrees_with_its_signature(name):
    problems = _similarity_problems(name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", _source_names())
def test_every_model_source_is_complete(name):
    problems = _source_problems(name)
    assert not problems, "\n".join(problems)


def _spec_disagreements() -> list[str]:
    """The values the spec takes (the Literal of each field, built when the spec was imported) against the keys of
    the registries, read now: a registry that lost or gained an entry since disagrees here, by name."""
    import typing

    from report_builder.dissection import scorers, similarity
    from report_builder.models import sources
    from report_builder.spec.schema import DissectSpec, ModelSpec, ScorerSpec

    problems = []
    for what, field, registry in (("dissect.scorers[i].kind", ScorerSpec.model_fields["kind"], scorers.SCORERS),
                                  ("dissect.similarity", DissectSpec.model_fields["similarity"], similarity.SIMILARITIES),
                                  ("models[i].source", ModelSpec.model_fields["source"], sources.SOURCES)):
        taken = typing.get_args(field.annotation)
        problems += [f"{what}: the spec takes {v!r}, which the registry lacks" for v in taken if v not in registry]
        problems += [f"{what}: the registry has {v!r}, which the spec refuses" for v in registry if v not in taken]
        if list(taken) != [v for v in registry if v in taken]:
            problems.append(f"{what}: the spec lists {list(taken)}, the registry {list(registry)} (messages follow the order)")
    # every key of a scorer entry belongs to some kind, every source-specific key of a model entry to some source
    read = set().union(*(s.allows for s in scorers.SCORERS.values()))
    problems += [f"dissect.scorers[i].{k}: no scorer reads it" for k in set(ScorerSpec.model_fields) - {"kind"} - read]
    read = set().union(*(s.allows for s in sources.SOURCES.values()))
    problems += [f"models[i].{k}: no source reads it" for k in set(sources.SOURCE_KEYS) - read]
    return problems


def test_the_spec_takes_exactly_the_registered_scorers_similarities_and_sources():
    problems = _spec_disagreements()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("registry, attribute, name", [
    *[("report_builder.dissection.scorers", "SCORERS", n) for n in _scorer_names()],
    *[("report_builder.dissection.similarity", "SIMILARITIES", n) for n in _similarity_names()],
    *[("report_builder.models.sources", "SOURCES", n) for n in _source_names()],
])
def test_an_entry_removed_from_a_registry_is_named(registry, attribute, name, monkeypatch):
    import importlib

    module = importlib.import_module(registry)
    trimmed = {k: v for k, v in getattr(module, attribute).items() if k != name}
    monkeypatch.setattr(module, attribute, trimmed)
    problems = _spec_disagreements()
    assert any(f"{name!r}, which the registry lacks" in p for p in problems), problems


@pytest.mark.parametrize("name", _similarity_names(with_params=True))
def test_a_parameter_missing_from_a_similarity_entry_is_named(name, monkeypatch):
    import dataclasses

    from report_builder.dissection import similarity

    entry = similarity.SIMILARITIES[name]
    dropped = next(iter(entry.params))
    monkeypatch.setitem(similarity.SIMILARITIES, name, dataclasses.replace(
        entry, params={k: v for k, v in entry.params.items() if k != dropped}))
    assert f"similarity {name!r}: keyword {dropped!r} of {entry.implementation} is not registered" in \
        _similarity_problems(name)
    monkeypatch.setitem(similarity.SIMILARITIES, name, dataclasses.replace(
        entry, params={**entry.params, "nonsense": similarity.Param(0, 1)}))
    assert any("'nonsense' is not a keyword" in p for p in _similarity_problems(name))


def test_a_similarity_default_outside_its_range_is_named(monkeypatch):
    import dataclasses

    from report_builder.dissection import similarity

    entry = similarity.SIMILARITIES["soft_wpmi"]  # top_k defaults to 100
    monkeypatch.setitem(similarity.SIMILARITIES, "soft_wpmi", dataclasses.replace(
        entry, params={**entry.params, "top_k": similarity.Param(1, 10, True)}))
    assert any("'top_k' defaults to 100, outside its range 1 to 10" in p for p in _similarity_problems("soft_wpmi"))


def test_an_incomplete_scorer_or_source_is_named_with_its_field(monkeypatch):
    import dataclasses

    from report_builder.dissection import scorers
    from report_builder.models import sources

    monkeypatch.setitem(scorers.SCORERS, "colors", dataclasses.replace(scorers.SCORERS["colors"], title=""))
    assert "scorer 'colors': field title is missing" in _scorer_problems("colors")
    monkeypatch.setitem(scorers.SCORERS, "colors", dataclasses.replace(scorers.SCORERS["colors"],
                                                                       module="report_builder.dissection.similarity"))
    assert any("scorer 'colors': field plan is missing" in p for p in _scorer_problems("colors"))
    monkeypatch.setitem(sources.SOURCES, "timm", dataclasses.replace(sources.SOURCES["timm"], description=""))
    assert "source 'timm': field description is missing" in _source_problems("timm")
    monkeypatch.setitem(sources.SOURCES, "timm", dataclasses.replace(sources.SOURCES["timm"], loader=f"{sources.ZOO}:_nope"))
    assert any("source 'timm': field loader" in p for p in _source_problems("timm"))


def test_the_spec_checks_each_sources_and_scorers_own_rules():
    """The rules come from the entries: the keys each reads, the keys each needs, the names it takes."""
    from pydantic import ValidationError

    from report_builder.spec.schema import ModelSpec, ScorerSpec

    def refused(cls, **given) -> str:
        with pytest.raises(ValidationError) as info:
            cls(**given)
        return str(info.value)

    assert "'weights' goes with source 'torchvision'" in refused(ModelSpec, id="m", source="timm", name="x", weights="W")
    assert "'classes' goes with source 'timm', 'huggingface', 'checkpoint' or 'python'" in refused(
        ModelSpec, id="m", source="torchvision", name="resnet18", classes="c.txt")
    assert "'path' goes with source" in refused(ModelSpec, id="m", source="packaged", name="efficientnet_lite0", path="w.pt")
    assert "source 'packaged' has one set of weights" in refused(
        ModelSpec, id="m", source="packaged", name="efficientnet_lite0", versions=[{"label": "a", "path": "a.pt"}])
    assert "expected resnet18 or resnet50 for source 'places365'" in refused(ModelSpec, id="m", source="places365",
                                                                              name="vgg16")
    assert ModelSpec(id="m", source="checkpoint", name="resnet18", versions=[{"label": "a", "path": "a.pt"}]).versions
    assert "'prompt' goes with scorer 'clip'" in refused(ScorerSpec, kind="colors", prompt="a photo of {}")
    assert "scorer 'classifier' needs 'classifier' (a model entry)" in refused(ScorerSpec, kind="classifier")
    assert ScorerSpec(kind="colors", **ScorerSpec(kind="colors").model_dump(exclude={"kind"})).kind == "colors"


def test_the_registries_the_spec_reads_import_no_torch():
    code = ("import sys, report_builder.spec.schema, report_builder.dissection.scorers, "
            "report_builder.dissection.similarity, report_builder.models.sources; "
            "print(sorted(m for m in sys.modules if m in ('torch', 'numpy') or m.startswith(("
            "'report_builder.models.zoo', 'report_builder.dissection.scorers.', 'report_builder.dissection.clip_dissect'))))")
    out = _printed_by(code)
    assert out == "[]", f"the spec's registries import {out}"


def test_the_readme_lists_exactly_the_registered_similarity_functions():
    from report_builder.dissection.similarity import SIMILARITIES

    text = (PACKAGE.parent / "README.md").read_text()
    start = text.index("concept (CLIP cosines, or an offline stand-in);")
    listed = re.findall(r"`([a-z_]+)`", text[start : text.index("turns the two into", start)])
    assert listed == list(SIMILARITIES), f"README.md lists {listed}, the registry has {list(SIMILARITIES)}"


def test_no_generic_code_tests_a_scorer_kind_or_a_model_source_by_its_name():
    """A scorer's kind and a model's source are looked up in their registries, never compared by name, outside
    their own files (dissection/scorers/<kind>.py, the loaders of models/zoo.py)."""
    from report_builder.dissection.scorers import SCORERS
    from report_builder.models.sources import SOURCES

    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "scorers" and path.parent.parent.name == "dissection":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            names = {s.attr for s in sides if isinstance(s, ast.Attribute)}
            values = {s.value for s in sides if isinstance(s, ast.Constant)}
            if ("kind" in names and values & set(SCORERS)) or ("source" in names and values & set(SOURCES)):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, f"a scorer kind or model source compared by name (use its registry entry): {found}"


# ---------------------------------------------------------------- concept attribution


def _concept_entries() -> list[tuple[str, str]]:
    from report_builder.explanation.registry import ABLATION_BASELINES, ATTRIBUTIONS

    return [("ATTRIBUTIONS", n) for n in ATTRIBUTIONS] + [("ABLATION_BASELINES", n) for n in ABLATION_BASELINES]


@pytest.mark.parametrize("table, name", _concept_entries(), ids=[f"{t}-{n}" for t, n in _concept_entries()])
def test_every_concept_attribution_entry_is_complete(table, name):
    import dataclasses
    import typing

    from report_builder.explanation import registry

    entry = getattr(registry, table)[name]
    assert entry.name == name, f"{table} {name!r}: registered under another name ({entry.name!r})"
    hints = typing.get_type_hints(type(entry))
    for field in dataclasses.fields(entry):
        value = getattr(entry, field.name)
        assert _typed(value, hints[field.name]), f"{table} {name!r}: field {field.name} is {value!r}"
    assert entry.title.strip(), f"{table} {name!r}: no title"
    try:
        function = registry.resolve(entry.implementation)
    except (ImportError, AttributeError, ValueError) as exc:
        pytest.fail(f"{table} {name!r}: implementation {entry.implementation!r} cannot be imported ({exc})")
    assert callable(function), f"{table} {name!r}: implementation {entry.implementation!r} is not a function"


def test_the_concept_spec_takes_exactly_the_registered_attributions_and_one_bar():
    import typing

    from report_builder.explanation.registry import ABLATION_BASELINES, ATTRIBUTIONS
    from report_builder.spec.schema import ConceptSpec

    assert set(typing.get_args(ConceptSpec.model_fields["attribution"].annotation)) == set(ATTRIBUTIONS)
    bars = [n for n, b in ABLATION_BASELINES.items() if b.bar]
    assert len(bars) == 1 and ABLATION_BASELINES[bars[0]].draws, f"one baseline with draws is the bar, found {bars}"


def test_the_run_directory_checks_the_concept_csv_columns_as_collect_writes_them():
    from report_builder.report.concepts import CONCEPTS_CSV_COLUMNS
    from report_builder.report.rundir import CONCEPTS_CSV_CELLS

    assert tuple(CONCEPTS_CSV_CELLS) == CONCEPTS_CSV_COLUMNS
