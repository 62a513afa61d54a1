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
    text = (PACKAGE / "report" / "analysis.py").read_text()
    named = set(re.findall(r'"section": "([a-z_]+)"', text))
    assert named and named <= set(SECTION_IDS), f"findings name sections the registry lacks: {named - set(SECTION_IDS)}"


def test_every_partial_template_belongs_to_a_section_or_is_shared():
    partials = {p.stem for p in (PACKAGE / "report" / "templates" / "partials").glob("*.html")}
    shared = {"title", "contents", "findings_list"}  # included by every page, not sections of their own
    assert partials - shared == set(SECTION_IDS), f"partials without a section: {partials - shared - set(SECTION_IDS)}"


def test_the_rendered_contents_follow_the_registry(monkeypatch):
    results = {"dissection": {"models": []}, "evaluation": {"rows": []}, "versions": []}
    shown = [s.id for s in sections_of(results)]
    assert shown == [s for s in SECTION_IDS if s not in ("netdissect", "versions")]  # an empty versions list: none
    trimmed = tuple(s for s in SECTIONS if s.id != "trust")
    monkeypatch.setattr(sys.modules["report_builder.report.sections"], "SECTIONS", trimmed)
    assert "trust" not in [s.id for s in sections_of(results)]  # one table decides what the report shows


# ---------------------------------------------------------------- the package's shape


def _imports(path: Path, module: str) -> set[str]:
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
    return {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}


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


def test_the_report_side_imports_no_torch_and_no_model_code():
    code = ("import sys, report_builder; from report_builder import open_run; "
            "import report_builder.report.api, report_builder.report.render, report_builder.report.diff, "
            "report_builder.report.analysis, report_builder.report.rundir; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('report_builder.models', "
            "'report_builder.explanation.methods', 'report_builder.evaluation.metrics', 'report_builder.dissection', "
            "'report_builder.pipeline.runner'))); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
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


# ---------------------------------------------------------------- evaluation metrics


def _metric_names() -> list[str]:
    from report_builder.evaluation.registry import METRICS

    return [m.name for m in METRICS]


@pytest.mark.parametrize("name", _metric_names())
def test_every_evaluation_metric_is_complete(name):
    import dataclasses
    import math

    from report_builder.evaluation.registry import ARROWS, BY_NAME, Column, Metric, Rule
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
            assert value is not None and value != () and not (isinstance(value, str) and not value.strip()), \
                f"{what}: field {field.name} is missing"
    assert isinstance(metric.per_step, bool), f"metric {name!r}: per_step is {metric.per_step!r}"
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
NOT_STEP_METRICS = {"layers", "blocks", "total_blocks", "maps"}


def _check_the_evaluation_code_agrees_with_the_metrics_registry() -> None:
    """Run every metric's function on a tiny model with every setting on: the columns they produce are the registry's
    columns, and each registered metric has its function and its sentence in the findings."""
    import numpy as np
    import torch

    from conftest import TinyNet, wrap
    from report_builder.evaluation import metrics as ev
    from report_builder.evaluation.registry import METRICS, per_map, per_step
    from report_builder.explanation.methods import EXPLAINERS, Settings as ExplainSettings
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
    settings = ev.Settings(spec, seed=0, device=torch.device("cpu"))
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

    sections = {k for k, f in EvaluateSpec.model_fields.items() if isinstance(f.default, BaseModel)}
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


def _trust_html(results: dict) -> str:
    from report_builder.report import render
    from report_builder.explanation.registry import TITLES

    env = render.environment()
    return env.get_template("partials/trust.html").render(
        r=results, method_titles=TITLES, figures={"trust_curves": [], "trust_sanity": []},
        findings_by_section={"trust": [f for f in results.get("findings", []) if f["section"] == "trust"]})


def _trust_results(spearman_final: float) -> dict:
    from report_builder.report import analysis
    from report_builder.spec.schema import EvaluateSpec

    summary = {"model": "m", "method": "gradcam", "images": 1, "deletion_auc": 0.1, "insertion_auc": 0.6, "road": 0.2,
               "pointing_hits": 1, "pointing_images": 1, "energy": 0.7, "sanity_images": 1, "sanity_layers": ["fc"],
               "sanity_spearman": [spearman_final], "sanity_ssim": [0.4], "spearman_final": spearman_final,
               "ssim_final": 0.4}
    results = {"models": [{"id": "m", "display": "Model M"}],
               "evaluation": {"settings": EvaluateSpec().model_dump(mode="json"), "summary": [summary]}}
    results["findings"] = analysis.evaluation_findings(results)
    return results


def test_the_trust_section_states_the_registry_rule_and_columns(monkeypatch):
    import dataclasses
    import html as html_lib

    from report_builder.evaluation import registry

    rule = registry.BY_NAME["sanity"].rule
    page = html_lib.unescape(_trust_html(_trust_results(0.55)))
    assert f"a method whose ρ stays above {rule.shown} fails" in page
    assert f"(ρ {rule.fails_if} {rule.shown})" in page and "fails the sanity check" in page  # 0.55 ≥ 0.5
    headings = re.findall(r'<th class="num">([^<]*)</th>', page)
    assert headings == [c.heading for m in registry.METRICS for c in m.columns]
    for m in registry.METRICS:
        assert f"<th>{m.title}</th>" in page, f"metric {m.name!r}: no row in the trust section's table of methods"

    stricter = dataclasses.replace(rule, threshold=0.6)  # the rule lives once: the template and the finding follow it
    monkeypatch.setattr(registry, "METRICS", tuple(
        dataclasses.replace(m, rule=stricter) if m.name == "sanity" else m for m in registry.METRICS))
    monkeypatch.setattr(registry, "BY_NAME", {m.name: m for m in registry.METRICS})
    page = html_lib.unescape(_trust_html(_trust_results(0.55)))
    assert "a method whose ρ stays above 0.6 fails" in page
    assert "as it should" in page and "fails the sanity check" not in page  # 0.55 < 0.6


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
