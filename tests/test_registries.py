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
