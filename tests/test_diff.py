"""Diffs of run directories: a run against itself, a planted unit swap, runs that cannot be compared, bad input."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from report_builder.__main__ import main

SPEC = """
title: "{title}"
models:
  - {{id: net, source: checkpoint, name: resnet18, path: {ckpt}, layers: [conv1]}}
images: {{source: samples, names: [coffee, chelsea]}}
explain: {{methods: [gradcam, lime], lime: {{num_samples: 20, batch_size: 20}}}}
dissect:
  probe: {{source: samples-augmented, per_image: 2}}
  scorers: [colors]
  similarity_params: {{top_k: 5}}
concepts: {{draws: 20}}   # the ablation's bar at 20 random sets, not 100: conv1's tail is all of ResNet18
"""

SWAPS = [(0, 1), (2, 3), (4, 5), (10, 20)]


def _run(root: Path, name: str, ckpt: str) -> Path:
    spec = root / f"{name}.yaml"
    spec.write_text(SPEC.format(title=name, ckpt=ckpt))
    out = root / "output" / name
    assert main(["run", str(spec), "--out", str(out), "--no-pdf"]) == 0  # a diff reads results, and prints its own
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), root / "a.pt")
    state = net.state_dict()
    w = state["conv1.weight"].clone()
    for i, j in SWAPS:  # swap whole filters: the units' activations trade places, nothing else changes
        w[[i, j]] = w[[j, i]]
    state["conv1.weight"] = w
    torch.save(state, root / "b.pt")
    return {"root": root, "a": _run(root, "a", "a.pt"), "b": _run(root, "b", "b.pt")}


def _diff(a: Path, b: Path, out: Path, *extra: str) -> dict:
    assert main(["diff", str(a), str(b), "--out", str(out), *extra]) == 0
    return json.loads((out / "diff.json").read_text())


def test_a_run_against_itself_shows_no_change(runs):
    d = _diff(runs["a"], runs["a"], runs["root"] / "self")
    assert d["spec_changes"] == [] and d["notices"] == []
    (pair,) = d["pairs"]
    assert not pair["weights_changed"]
    assert pair["predictions"]["top1_changed"] == 0
    assert all(r["delta"] == 0 for r in pair["predictions"]["rows"])
    assert all(r["gradcam_iou"] == 1.0 and r["lime_gradcam_delta"] == 0 for r in pair["maps"]["rows"])
    (layer,) = pair["dissection"]["layers"]
    assert layer["changed"] == 0 and layer["gained"] == [] and layer["lost"] == [] and layer["unique_delta"] == 0
    assert (runs["root"] / "self" / "report.pdf").is_file()
    concepts = pair["concepts"]  # on by default: the run dissects conv1 and explains two images
    assert concepts["compared"] and concepts["classes"] and concepts["ablation"]
    assert all(x["gained"] == [] == x["lost"] for x in concepts["classes"])
    assert not any(x["changed"] for x in concepts["ablation"])


def test_concepts_a_class_gained_or_lost_are_named(runs, tmp_path):
    """B's profile of a class planted with one concept swapped for another: exactly that one is gained and lost."""
    b = tmp_path / "b"
    shutil.copytree(runs["a"], b)
    r = json.loads((b / "results.json").read_text())
    profile = r["concepts"]["profiles"][0]
    old = profile["concepts"][0]["label"]
    profile["concepts"][0]["label"] = "planted concept"
    (b / "results.json").write_text(json.dumps(r))
    d = _diff(runs["a"], b, tmp_path / "d")
    (pair,) = d["pairs"]
    changed = [x for x in pair["concepts"]["classes"] if x["gained"] or x["lost"]]
    assert len(changed) == 1 and changed[0]["class_name"] == profile["class_name"]
    assert changed[0]["gained"] == ["planted concept"] and changed[0]["lost"] == [old]
    assert any("gained planted concept and lost " + old in f for f in d["findings"])
    r["concepts"]["attribution"] = "another ranking"
    (b / "results.json").write_text(json.dumps(r))
    d = _diff(runs["a"], b, tmp_path / "e")
    assert d["pairs"][0]["concepts"]["compared"] is False
    assert any("concept attribution of net not compared" in n for n in d["notices"])


def test_planted_unit_swap_shows_exactly_the_swapped_labels(runs):
    ra = json.loads((runs["a"] / "results.json").read_text())
    labels = [u["label"] for u in ra["dissection"]["models"][0]["layers"][0]["labels"]]
    expected = sorted(k for i, j in SWAPS for k in (i, j) if labels[i] != labels[j])
    assert expected, "the planted swaps must exchange different labels to be a test"
    d = _diff(runs["a"], runs["b"], runs["root"] / "swap")
    (pair,) = d["pairs"]
    assert pair["weights_changed"]
    assert [c["key"] for c in d["spec_changes"]] == ["models[0].path", "title"]
    (layer,) = pair["dissection"]["layers"]
    assert sorted(c["unit"] for c in layer["changed_units"]) == expected
    for c in layer["changed_units"]:
        partner = next(j if c["unit"] == i else i for i, j in SWAPS if c["unit"] in (i, j))
        assert c["a"] == labels[c["unit"]] and c["b"] == labels[partner]
    assert layer["changed"] == len(expected) and layer["share"] == pytest.approx(len(expected) / 64)
    assert layer["gained"] == [] and layer["lost"] == []  # a permutation keeps the set of labels
    assert any(f"{len(expected)} of 64 units" in f for f in d["findings"])


def test_runs_that_cannot_be_compared_say_so(runs, tmp_path):
    # run A as a run on another probe set records it: the probe's manifest hash and description (the diff reads
    # only results.json; a third full run cost the suite half a minute)
    other = tmp_path / "other_probe"
    shutil.copytree(runs["a"], other)
    r = json.loads((other / "results.json").read_text())
    r["dissection"]["probe"].update(sha256="0" * 64, description="12 packaged photos x 3 seeded crops and flips")
    (other / "results.json").write_text(json.dumps(r))
    d = _diff(runs["a"], other, runs["root"] / "probe")
    (pair,) = d["pairs"]
    assert pair["dissection"]["compared"] is False
    assert any("another probe set" in n for n in d["notices"])
    html = (runs["root"] / "probe" / "report.html").read_text()
    assert "Not compared" in html and "another probe set" in html


def test_missing_images_and_unmatched_models_are_named(runs, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(runs["a"], b)
    r = json.loads((b / "results.json").read_text())
    r["explanations"] = [e for e in r["explanations"] if e["image"] != "chelsea"]
    (b / "results.json").write_text(json.dumps(r))
    d = _diff(runs["a"], b, tmp_path / "d")
    assert any("images only in run A" in n and "chelsea" in n for n in d["notices"])
    assert main(["diff", str(runs["a"]), str(runs["b"]), "--out", str(tmp_path / "e"), "--pair", "net=nope"]) == 2


def test_missing_or_corrupt_run_directory_is_a_clear_error(runs, tmp_path, capsys):
    assert main(["diff", str(tmp_path / "nope"), str(runs["a"]), "--out", str(tmp_path / "x")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    assert main(["diff", str(bad), str(runs["a"]), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "results.json: not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_versions_in_one_spec_are_followed_in_the_report(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for k, scale in enumerate([1.0, 0.5, -1.0]):  # three "checkpoints": the last flips every conv1 unit
        state = net.state_dict()
        state["conv1.weight"] = state["conv1.weight"] * scale
        torch.save(state, tmp_path / f"v{k}.pt")
    spec = tmp_path / "versions.yaml"
    spec.write_text("""
models:
  - id: net
    source: checkpoint
    name: resnet18
    layers: [conv1]
    versions: [{label: v0, path: v0.pt}, {label: v1, path: v1.pt}, {label: v2, path: v2.pt}]
images: {source: samples, names: [coffee]}
explain: {methods: [gradcam]}
dissect:
  probe: {source: samples-augmented, per_image: 2}
  scorers: [colors]
  similarity_params: {top_k: 5}
concepts: {draws: 20}
""")
    out = tmp_path / "out"
    assert main(["run", str(spec), "--out", str(out), "--no-pdf"]) == 0  # the versions' section is read in the HTML
    r = json.loads((out / "results.json").read_text())
    assert [m["id"] for m in r["models"]] == ["net-v0", "net-v1", "net-v2"]
    (g,) = r["versions"]
    assert g["versions"] == ["v0", "v1", "v2"]
    (layer,) = g["layers"]
    labels = {e["model"]: [u["label"] for u in e["layers"][0]["labels"]] for e in r["dissection"]["models"]}
    # scaling by 0.5 keeps every unit's ranking of images, so no label changes; negating changes some
    assert layer["relabelled"][1] == 0.0
    assert layer["relabelled"][2] == sum(a != b for a, b in zip(labels["net-v1"], labels["net-v2"])) / 64 > 0
    assert layer["unique"] == [len(set(labels[m])) for m in ("net-v0", "net-v1", "net-v2")]
    html = (out / "report.html").read_text()
    assert "Model versions" in html and "versions_net" not in html  # figure inlined, not linked


def test_version_against_version_is_tested_over_the_shared_images():
    from report_builder.report.diff import version_tests

    def pair(n, shift):
        rows = [{"image": f"i{k}", "a_class_probability_in_b": 0.5 + 0.01 * k + shift, "delta": shift + 0.001 * (k % 3)}
                for k in range(n)]
        maps = [{"lime_gradcam_a": 0.3 + 0.01 * k, "lime_gradcam_b": 0.3 + 0.01 * k, "lime_gradcam_delta": 0.0}
                for k in range(n)]
        return {"predictions": {"rows": rows}, "maps": {"rows": maps}}

    few, many = version_tests("M", pair(4, 0.1)), version_tests("M", pair(12, 0.1))
    assert "within noise" in few[0] and "over 4 images" in few[0]  # 4 images cannot separate two versions
    assert "higher by 0.10" in many[0] and "over 12 images" in many[0]
    assert "within noise" in many[1] and "p = 1" in many[1]  # the same IoUs in both runs
