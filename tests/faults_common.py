"""What the fault tests share: a small checkpoint, the spec that runs it, a reference run of it, and helpers to
run the CLI and to launch a run in a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from report_builder.__main__ import main

REPO = Path(__file__).resolve().parent.parent

SPEC = """
title: "Fault check"
models:
  - {{id: net, source: checkpoint, name: mobilenet_v3_small, path: {ckpt}}}
images: {images}
explain: {{methods: [gradcam, lime], lime: {{num_samples: 20, batch_size: 20}}}}
"""


def spec_file(folder: Path, ckpt: Path, images: str = "{source: samples, names: [coffee, chelsea]}",
              extra: str = "", name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(SPEC.format(ckpt=ckpt, images=images) + extra)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes: what 'left untouched' means."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, ckpt) -> Path:
    root = tmp_path_factory.mktemp("good")
    out = root / "run"
    assert main(["run", str(spec_file(root, ckpt)), "--out", str(out)]) == 0
    return out


MINIMAL = "models:\n  - {id: m, source: packaged, name: efficientnet_lite0}\nimages: samples\n"
WITH_LAYER = MINIMAL.replace("efficientnet_lite0}", "efficientnet_lite0, layers: [blocks.6]}")  # one layer to dissect


def _launch(spec: Path, out: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "report_builder", "run", str(spec), "--out", str(out),
                             "--cache-dir", str(cache)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
