"""Checks: each kind passes and fails on hand-made numbers; run and check exit 3 with a JUnit file; a check the run
cannot measure is a spec error (exit 2, key path named); the diff's new sections against hand-computed values."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
import torchvision

from report_builder import open_run
from report_builder.__main__ import main
from report_builder.evaluation import registry as metric_registry
from report_builder.report import checks, diff
from report_builder.report.checks import CheckSource, evaluate

PER_MAP = [c.name for _, c in metric_registry.per_map()]
PER_STEP = [c.name for _, c in metric_registry.per_step()]
FIRST = PER_MAP[0]  # whichever column the registry lists first: the checks read the registry, not a list of ours


def _check(metric: str, **kw) -> dict:
    return {"metric": metric, **{k: None for k in checks.SCOPES}, "at_least": None, "at_most": None, "each": False,
            "name": None, **kw}


def _results() -> dict:
    """A hand-made results dict: two images, two methods and the random map, one model, every section a check reads."""
    rows = []
    for method, values in (("gradcam", (0.2, 0.6)), ("lime", (0.9, 0.7)), ("random", (0.1, 0.1))):
        for image, v in zip(("a", "b"), values):
            rows.append({"model": "m", "image": image, "method": method, **{c: v for c in PER_MAP}})
    sanity = [{"model": "m", "image": "a", "method": method, "layers": ["l1", "l2"],
               **{c: [0.9, final] for c in PER_STEP}} for method, final in (("gradcam", 0.1), ("lime", 0.8))]
    rule = metric_registry.BY_NAME["sanity"].rule
    final = metric_registry.Metric.final_key(metric_registry.column(rule.column))
    summary = [{"model": "m", "method": "gradcam", final: 0.1}, {"model": "m", "method": "lime", final: 0.8},
               {"model": "m", "method": "scorecam", final: 0.3, "sanity_verdict": "inconclusive"}]
    return {
        "models": [{"id": "m", "display": "M"}],
        "evaluation": {"rows": rows, "sanity": sanity, "summary": summary},
        "agreement": {"rows": [{"model": "m", "image": "a", "method_a": "lime", "method_b": "gradcam", "iou": 0.5,
                                "iou@0.5": 0.25},
                               {"model": "m", "image": "b", "method_a": "lime", "method_b": "gradcam", "iou": 0.3,
                                "iou@0.5": None}]},
        "explanations": [{"model": "m", "image": "a", "methods": {"gradcam": {"seconds": 0.5}, "lime": {"seconds": 3.0}}},
                         {"model": "m", "image": "b", "methods": {"gradcam": {"seconds": 1.5}, "lime": {"seconds": 5.0}}}],
        "dissection": {"models": [{"model": "m", "layers": [
            {"layer": "l4", "labels": [{"label": c} for c in ("dog", "dog", "cat", "sky")]}]}]},
        "netdissect": {"models": [{"model": "m", "layers": [
            {"layer": "l4", "detectors": 5, "unique": 3, "per_category": {"object": 4, "color": 1},
             "unique_per_category": {"object": 2, "color": 1}}]}]},
    }


def _values(outcomes: list[dict]) -> dict:
    return {o["group"]: (o["value"], o["passed"]) for o in outcomes}


def test_an_evaluation_column_is_the_mean_over_images_per_model_and_method_without_the_random_map():
    src = CheckSource(_results())
    got = _values(evaluate([_check(FIRST, at_least=0.5)], src))
    assert got == {"m, gradcam": (pytest.approx(0.4), False), "m, lime": (pytest.approx(0.8), True)}
    # scoped to one method, and each image on its own
    each = evaluate([_check(FIRST, method="gradcam", at_least=0.5, each=True)], src)
    assert {o["image"]: o["passed"] for o in each} == {"a": False, "b": True}
    # the random map only when named
    (rand,) = evaluate([_check(FIRST, method="random", at_most=0.1)], src)
    assert rand["value"] == pytest.approx(0.1) and rand["passed"]


@pytest.mark.parametrize("column", PER_MAP)
def test_every_per_map_column_of_the_registry_is_checkable(column):
    assert checks.find(column) is not None and checks.find(f"{column}_delta") is not None


def test_a_column_added_to_the_registry_is_checkable_without_edits(monkeypatch):
    import dataclasses

    first = metric_registry.METRICS[0]
    extra = metric_registry.Column("planted_auc", "Planted", "higher", 3, (0.0, 1.0))
    monkeypatch.setattr(metric_registry, "METRICS",
                        (dataclasses.replace(first, columns=first.columns + (extra,)),) + metric_registry.METRICS[1:])
    r = _results()
    for row in r["evaluation"]["rows"]:
        row["planted_auc"] = 0.25
    (o, _) = evaluate([_check("planted_auc", at_least=0.3)], CheckSource(r))
    assert o["value"] == pytest.approx(0.25) and not o["passed"]


def test_the_sanity_check_final_step_and_verdict():
    src = CheckSource(_results())
    got = _values(evaluate([_check(PER_STEP[0], at_most=0.5)], src))
    assert got == {"m, lime": (0.8, False), "m, gradcam": (0.1, True)}
    verdict = _values(evaluate([_check("sanity_failed", at_most=0)], src))
    # no verdict over runs: the rule on the mean (ρ ≥ 0.5 fails); one over runs: that verdict, inconclusive not failing
    assert verdict == {"m, lime": (1.0, False), "m, gradcam": (0.0, True), "m, scorecam": (0.0, True)}
    passed = _values(evaluate([_check("sanity_passed", at_least=1)], src))
    assert passed == {"m, lime": (0.0, False), "m, gradcam": (1.0, True), "m, scorecam": (0.0, False)}


def test_agreement_timings_and_dissection_counts():
    src = CheckSource(_results())
    assert _values(evaluate([_check("iou", at_least=0.4)], src)) == {"m, gradcam": (pytest.approx(0.4), True)}
    # an undefined IoU (null) is left out of the mean, not counted as 0
    (at,) = evaluate([_check("iou@0.5", at_least=0.3)], src)
    assert at["value"] == 0.25 and at["values"] == 1 and not at["passed"]
    times = _values(evaluate([_check("seconds", at_most=2.0)], src))
    assert times == {"m, gradcam": (1.0, True), "m, lime": (4.0, False)}
    assert _values(evaluate([_check("unique_concepts", at_least=3)], src)) == {"m, l4": (3.0, True)}
    assert _values(evaluate([_check("detectors", category="object", at_least=5)], src)) == {"m, l4": (4.0, False)}
    (layer,) = [o for o in evaluate([_check("unique_detectors", at_least=3)], src) if o["category"] is None]
    assert layer["value"] == 3.0 and layer["passed"]


def test_a_versioned_entry_id_takes_in_each_version():
    r = _results()
    r["models"] = [{"id": "m", "display": "M", "group": "net"}]
    (o, _) = evaluate([_check(FIRST, model="net", at_least=0.5)], CheckSource(r))
    assert o["model"] == "m" and o["value"] == pytest.approx(0.4)


def _pair(a: str = "m-v1", b: str = "m-v2") -> dict:
    return {"a": a, "b": b, "group": "m",
            "predictions": {"images": 4, "top1_changed": 1},
            "maps": {"rows": [{"image": "x", "gradcam_iou": 0.5}, {"image": "y", "gradcam_iou": 0.7}]},
            "dissection": {"compared": True, "layers": [{"layer": "l4", "share": 0.25, "concept_jaccard": 0.6}]},
            "evaluation": {"compared": True, "rows": [{"method": "gradcam", "column": FIRST, "delta": -0.1}]}}


def test_measures_between_versions_are_found_by_the_later_earlier_or_group_id():
    src = CheckSource({"pairs": [_pair()]}, kind="diff")
    for model in (None, "m", "m-v1", "m-v2"):
        (o,) = evaluate([_check("top1_agreement", model=model, at_least=0.95)], src)
        assert o["value"] == 0.75 and not o["passed"]  # 1 − 1/4
    (o,) = evaluate([_check("gradcam_iou", at_least=0.6)], src)
    assert o["value"] == pytest.approx(0.6) and o["passed"]
    (o,) = evaluate([_check("concept_jaccard", layer="l4", at_least=0.7)], src)
    assert o["value"] == 0.6 and not o["passed"]
    (o,) = evaluate([_check(f"{FIRST}_delta", at_least=-0.05)], src)
    assert o["value"] == -0.1 and not o["passed"]


def test_failed_first_and_the_junit_xml():
    outcomes = evaluate([_check(FIRST, at_least=0.5), _check("seconds", at_most=2.0)], CheckSource(_results()))
    assert [o["passed"] for o in outcomes] == [False, False, True, True]
    root = ElementTree.fromstring(checks.junit(outcomes))
    (suite,) = root
    assert suite.get("tests") == "4" and suite.get("failures") == "2"
    cases = suite.findall("testcase")
    assert [c.find("failure") is not None for c in cases] == [True, True, False, False]
    first = cases[0]
    assert first.get("classname") == f"checks.{FIRST}"
    assert {p.get("name"): p.get("value") for p in first.find("properties")}["value"] == "0.4"
    assert "is 0.4 (the mean of 2 values); expected ≥ 0.5" in first.find("failure").get("message")


def test_a_check_with_no_value_fails_rather_than_passes():
    r = _results()
    for row in r["evaluation"]["rows"]:
        row[FIRST] = None
    outcomes = evaluate([_check(FIRST, at_least=0.0)], CheckSource(r))
    assert outcomes and not any(o["passed"] for o in outcomes) and "no value to test" in outcomes[0]["message"]


# ---------------------------------------------------------------- spec errors


SPEC = """
models:
  - {{id: net, source: checkpoint, name: mobilenet_v3_small, path: {ckpt}}}
images: {{source: samples, names: [coffee, chelsea]}}
explain: {{methods: [gradcam]}}
evaluate: {{deletion: {{steps: 2}}, road: null, sanity: null, random_baseline: false}}
checks:
{checks}
"""


@pytest.mark.parametrize("check, expected", [
    ("{metric: pointng_hit, at_least: 0.9}", "checks[0].metric: found 'pointng_hit' (did you mean 'pointing_hit'?)"),
    ("{metric: road, at_least: 0.1}", "checks[0].metric: found 'road', which this run does not measure: "
                                      "evaluate.road is off"),
    ("{metric: top1_agreement, at_least: 0.9}", "checks[0].metric: found 'top1_agreement', which this run does "
                                                "not measure: it compares two versions"),
    ("{metric: iou, at_least: 0.1}", "needs LIME and at least one CAM"),
    ("{metric: unique_concepts, at_least: 1}", "the spec has no 'dissect:'"),
    ("{metric: deletion_auc, method: lime, at_least: 0.1}", "checks[0].method: found 'lime'"),
    ("{metric: deletion_auc, model: other, at_least: 0.1}", "checks[0].model: found 'other'"),
    ("{metric: deletion_auc, layer: l4, at_least: 0.1}", "checks[0].layer: deletion_auc has no layer"),
    ("{metric: deletion_auc}", "checks[0]: give at_least, at_most or both"),
    ("{metric: deletion_auc, at_least: 0.6, at_most: 0.5}", "no value could pass"),
])
def test_a_check_the_run_cannot_measure_is_a_spec_error(tmp_path, capsys, check, expected):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(ckpt="net.pt", checks=f"  - {check}"))
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "invalid spec" in err and expected in err and "Traceback" not in err


# ---------------------------------------------------------------- a real run, and hand-made numbers in a copy


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checks")
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), root / "net.pt")
    (root / "spec.yaml").write_text(SPEC.format(ckpt=root / "net.pt", checks="\n".join([
        f"  - {{metric: {FIRST}, method: gradcam, at_least: -1.0, name: always passes}}",
        "  - {metric: seconds, at_most: 0.0, name: no time at all}"])))
    out = root / "run"
    assert main(["-q", "run", str(root / "spec.yaml"), "--out", str(out)]) == checks.CHECKS_FAILED
    return out


def test_a_run_with_a_failed_check_exits_3_writes_the_xml_and_opens_the_report_with_them(checked_run, capsys):
    root = ElementTree.parse(checked_run / "checks.xml").getroot()
    names = [c.get("name") for c in root.iter("testcase")]
    assert names == ["no time at all [net, gradcam]", "always passes [net]"]
    r = open_run(checked_run)
    assert list(r.checks.passed) == [False, True] and r.checks.metric.tolist() == ["seconds", FIRST]
    html = (checked_run / "report.html").read_text()
    box, questions = html.find('id="checks"'), html.find('id="summary"')
    assert 0 < box < questions and "1 of 2 checks failed" in html


def _planted(tmp_path: Path, run: Path) -> Path:
    """A copy of the run whose gradcam values of the first column are set by hand: 0.2 on coffee, 0.6 on chelsea."""
    copy = tmp_path / "planted"
    shutil.copytree(run, copy)
    r = json.loads((copy / "results.json").read_text())
    for row in r["evaluation"]["rows"]:
        row[FIRST] = {"coffee": 0.2, "chelsea": 0.6}[row["image"]]
    (copy / "results.json").write_text(json.dumps(r))
    return copy


@pytest.mark.parametrize("bound, each, code, failures", [
    ("at_least: 0.4", "false", 0, 0), ("at_least: 0.41", "false", 3, 1), ("at_least: 0.4", "true", 3, 1),
    ("at_most: 0.6", "true", 0, 0)])
def test_check_evaluates_an_existing_run_without_recomputing(tmp_path, capsys, checked_run, bound, each, code,
                                                            failures):
    run = _planted(tmp_path, checked_run)
    spec = tmp_path / "checks.yaml"
    spec.write_text(f"checks:\n  - {{metric: {FIRST}, method: gradcam, {bound}, each: {each}}}\n")
    assert main(["check", str(run), "--spec", str(spec)]) == code
    suite = ElementTree.parse(run / "checks.xml").getroot()[0]
    assert int(suite.get("failures")) == failures
    assert "checks.xml" in json.loads((run / ".report_builder").read_text())["files"]  # ours: a rerun replaces it


def test_check_names_what_an_existing_run_does_not_have(tmp_path, capsys, checked_run):
    spec = tmp_path / "checks.yaml"
    spec.write_text("checks:\n  - {metric: detectors, at_least: 1}\n  - {metric: seconds, method: lime, at_most: 1}\n"
                    "  - {metric: top1_agreement, at_least: 1}\n")
    assert main(["check", str(checked_run), "--spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "checks[0].metric: found 'detectors', which this run does not measure" in err
    assert "checks[1].method: found 'lime'; seconds is measured for gradcam" in err
    assert "checks[2].metric: found 'top1_agreement'" in err and "Traceback" not in err


def test_check_on_a_diff_reads_its_measures(tmp_path, capsys, checked_run):
    other = tmp_path / "b"
    shutil.copytree(checked_run, other)
    out = tmp_path / "diff"
    assert main(["diff", str(checked_run), str(other), "--out", str(out)]) == 0
    spec = tmp_path / "checks.yaml"
    spec.write_text("checks:\n  - {metric: top1_agreement, at_least: 0.95}\n  - {metric: gradcam_iou, at_least: 1}\n")
    assert main(["check", str(out), "--spec", str(spec)]) == 0
    spec.write_text(f"checks:\n  - {{metric: {FIRST}, at_least: 0.95}}\n")
    assert main(["check", str(out), "--spec", str(spec)]) == 2
    assert "a measure of one run" in capsys.readouterr().err


# ---------------------------------------------------------------- the diff's new sections, by hand


def _run_results(values: dict[str, list[float]], final: float, settings: dict | None = None) -> dict:
    rule = metric_registry.BY_NAME["sanity"].rule
    key = metric_registry.Metric.final_key(metric_registry.column(rule.column))
    images = [f"i{k}" for k in range(len(next(iter(values.values()))))]
    return {
        "images": [{"id": i, "sha256": i} for i in images],
        "evaluation": {"settings": settings or {"deletion": {"steps": 2}, "batch_size": 4}, "methods": list(values),
                       "rows": [{"model": "m", "image": i, "method": method, **{c: v[k] for c in PER_MAP}}
                                for method, v in values.items() for k, i in enumerate(images)],
                       "summary": [{"model": "m", "method": method, key: final} for method in values]},
        "netdissect": {"probe": {"sha256": "p", "description": "d"},
                       "settings": {"quantile": 0.995, "threshold": "auto", "iou_threshold": 0.04},
                       "models": [{"model": "m", "layers": [{"layer": "l4", "units": 8, "detectors": 3, "unique": 2,
                                                             "per_category": {"object": 2, "color": 1},
                                                             "unique_per_category": {"object": 1, "color": 1}}]}]},
        "lime_sweep": {"settings": [{"label": "s0"}, {"label": "s1"}], "best": {"m": 0},
                       "summary": [{"model": "m", "setting": 0, "mean_iou": 0.4},
                                   {"model": "m", "setting": 1, "mean_iou": 0.3}]},
    }


def test_the_diff_evaluation_deltas_verdicts_netdissect_and_sweep_by_hand():
    a = _run_results({"gradcam": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}, final=0.3)
    b = _run_results({"gradcam": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}, final=0.7, settings={"deletion": {"steps": 2},
                                                                                       "batch_size": 64})
    b["netdissect"]["models"][0]["layers"][0].update(detectors=5, unique=4, per_category={"object": 5, "color": 0},
                                                     unique_per_category={"object": 4, "color": 0})
    b["lime_sweep"]["best"] = {"m": 1}
    notices: list[str] = []
    ev = diff.compare_evaluation(a, b, "m", "m", notices)
    assert ev["compared"] and not notices  # another batch size changes no number
    for row in ev["rows"]:
        column = metric_registry.column(row["column"])
        assert row["a"] == pytest.approx(0.35) and row["b"] == pytest.approx(0.55)
        assert row["delta"] == pytest.approx(0.2) and row["images"] == 6
        # every difference is +0.2: the Wilcoxon p of 6 equal signs is 2/64, below 0.05
        assert row["better"] == ("B" if column.direction == "higher" else "A")
    (verdict,) = ev["verdicts"]
    assert (verdict["verdict_a"], verdict["verdict_b"], verdict["changed"]) == ("passes", "fails", True)
    nd = diff.compare_netdissect(a, b, "m", "m", notices)
    (layer,) = nd["layers"]
    assert (layer["detectors_delta"], layer["unique_delta"]) == (2, 2)
    assert {c["category"]: (c["detectors_a"], c["detectors_b"]) for c in layer["categories"]} == {
        "object": (2, 5), "color": (1, 0)}
    sw = diff.compare_sweep(a, b, "m", "m", notices)
    assert (sw["best_a"], sw["best_b"], sw["changed"], sw["best_iou_b"]) == ("s0", "s1", True, 0.3)


def test_the_diff_says_what_it_does_not_compare():
    a = _run_results({"gradcam": [0.1, 0.2]}, final=0.3)
    b = _run_results({"gradcam": [0.1, 0.2]}, final=0.3, settings={"deletion": {"steps": 10}})
    b["netdissect"]["probe"]["sha256"] = "q"
    b["lime_sweep"]["settings"] = [{"label": "s0"}]
    notices: list[str] = []
    assert not diff.compare_evaluation(a, b, "m", "m", notices)["compared"]
    assert not diff.compare_netdissect(a, b, "m", "m", notices)["compared"]
    assert not diff.compare_sweep(a, b, "m", "m", notices)["compared"]
    assert notices == ["evaluation of m not compared: other evaluate settings (evaluate.deletion)",
                       "Network Dissection of m not compared: another pixel-labelled probe (A: d; B: d)",
                       "LIME sweep of m not compared: the two runs' LIME sweeps try other settings"]


def test_small_differences_are_within_noise():
    a = _run_results({"gradcam": [0.1, 0.5, 0.3]}, final=0.3)
    b = _run_results({"gradcam": [0.2, 0.4, 0.3]}, final=0.3)
    ev = diff.compare_evaluation(a, b, "m", "m", [])
    assert {r["better"] for r in ev["rows"]} == {"within noise"} and not ev["verdicts"][0]["changed"]


def test_a_check_of_a_wall_clock_time_is_set_apart_from_what_two_runs_share():
    from report_builder.report.rundir import TIMING_KEYS, without_timings

    outcomes = evaluate([_check(FIRST, at_least=0.5), _check("seconds", at_most=2.0)], CheckSource(_results()))
    assert {o["metric"] for o in outcomes if o["timing"]} == {"seconds"} and "checks[timing=true]" in TIMING_KEYS
    r = {"provenance": {}, "explanations": [], "agreement": {}, "findings": [], "checks": outcomes}
    assert {c["metric"] for c in without_timings(r)["checks"]} == {FIRST}
