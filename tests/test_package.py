"""report_builder as an installed package: a wheel built from the source holds everything a run needs (templates,
concept lists, the demo spec) and, installed outside the repository, runs a spec and renders its report."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (tracked and new files, as a clean clone would have them)."""
    src = tmp_path_factory.mktemp("src")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for rel in filter(None, listed):
        if (REPO / rel).is_file() or (REPO / rel).is_symlink():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel, follow_symlinks=False)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(out), str(src)], check=True, capture_output=True, text=True)
    return next(out.glob("report_builder-*.whl"))


def test_the_wheel_holds_the_templates_the_concept_lists_and_the_demo(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {f"report_builder/report/templates/{p.relative_to(REPO / 'report_builder/report/templates')}"
                 for p in (REPO / "report_builder/report/templates").rglob("*") if p.is_file()}
    assert templates and templates <= names, sorted(templates - names)
    assert {"report_builder/demo.yaml", "report_builder/data/places365_categories.txt"} <= names
    stages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "report_builder").rglob("__init__.py")}
    assert {f"{s}/__init__.py" for s in stages} <= names
    assert not any(n.startswith(("tests/", "specs/", "output/")) for n in names)


def test_an_installed_wheel_runs_a_spec_and_renders_outside_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, text=True)
    work = tmp_path / "elsewhere"  # no repository around: only the installed files
    work.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), work / "net.pt")
    (work / "spec.yaml").write_text(
        "title: From a wheel\nmodels:\n  - {id: net, source: checkpoint, name: mobilenet_v3_small, path: net.pt}\n"
        "images: {source: samples, names: [coffee]}\n"
        "explain: {methods: [gradcam, lime], lime: {num_samples: 20, batch_size: 20}}\n")
    env = {**os.environ, "PYTHONPATH": str(target), "REPORT_BUILDER_CACHE": str(tmp_path / "cache")}
    where = subprocess.run([sys.executable, "-c", "import report_builder; print(report_builder.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target)), where  # the installed copy, not the repository's
    for argv in (["run", "spec.yaml", "--out", "run", "-q"], ["render", "run"], ["demo", "--help"]):
        p = subprocess.run([sys.executable, "-m", "report_builder", *argv], cwd=work, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    assert (work / "run" / "report.pdf").read_bytes().startswith(b"%PDF")
    assert "LIME vs Grad-CAM agreement" in (work / "run" / "report.html").read_text()
    script = str(target / "bin" / "report-builder")  # the console script, whose exit code is the command's
    p = subprocess.run([script, "validate", str(target / "report_builder" / "demo.yaml")],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]
    p = subprocess.run([script, "validate", "no-such.yaml"], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "no-such.yaml" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
