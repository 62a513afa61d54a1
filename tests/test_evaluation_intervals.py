"""Every headline number of the evaluation with its 95 % interval over images: computed by stats (a bootstrap of the
mean, Wilson's interval of a share of hits), under the registry's keys, printed `value [low, high]` in the trust
table, checked in a run directory, and carried by open_run().evaluation_summary. Hand-made results, no model runs."""
from __future__ import annotations

import copy
import html as html_lib
import re

import pytest

import test_registries
from report_builder.evaluation import registry
from report_builder.report import analysis, rundir
from report_builder.report.api import Run, evaluation_summary_columns
from report_builder.spec.schema import EvaluateSpec
from report_builder.stats import bootstrap, share

IMAGES = ["i0", "i1", "i2", "i3", "i4"]
DELETION = [0.12, 0.31, 0.05, 0.44, 0.27]  # Grad-CAM's deletion AUC per image
HITS = [1.0, 0.0, 1.0, 1.0, None]  # Grad-CAM's pointing game: 3 hits of the 4 images with object labels


def _results() -> dict:
    """One model, five images, Grad-CAM and the per-pixel random map; Grad-CAM's deletion AUC and pointing hits as
    above, every other mean column 0.1 * (image + 1); ROAD on no image at all."""
    settings = EvaluateSpec().model_dump(mode="json")
    rows = []
    for method in ("gradcam", "random"):
        for k, image in enumerate(IMAGES):
            row = {"model": "m", "image": image, "method": method, "object": "cat"}
            for _, c in registry.per_map():
                row[c.name] = 0.1 * (k + 1) if c.aggregate == "mean" else (0.0 if HITS[k] is not None else None)
            row["road"] = None
            if method == "gradcam":
                row["deletion_auc"] = DELETION[k]
                row["pointing_hit"] = HITS[k]
            rows.append(row)
    results = {"models": [{"id": "m", "display": "Model M"}],
               "evaluation": {"settings": settings, "methods": ["gradcam", "random"], "rows": rows, "sanity": []}}
    results["evaluation"]["summary"] = analysis.evaluation_summary(results)
    results["findings"] = analysis.evaluation_findings(results)
    return results


def _entry(results: dict, method: str = "gradcam") -> dict:
    return next(e for e in results["evaluation"]["summary"] if e["method"] == method)


def test_each_column_has_the_stats_interval_under_the_registry_keys():
    e = _entry(_results())
    deletion, hit, road = registry.column("deletion_auc"), registry.column("pointing_hit"), registry.column("road")
    assert (deletion.low_key, deletion.high_key, hit.low_key) == ("deletion_auc_low", "deletion_auc_high",
                                                                  "pointing_hit_low")
    expected = bootstrap(DELETION)
    assert expected.low < expected.value < expected.high  # a real interval, not the value three times
    assert (e["deletion_auc"], e[deletion.low_key], e[deletion.high_key]) == (expected.value, expected.low,
                                                                             expected.high)
    wilson = share(3, 4)
    assert (e[hit.hits_key], e[hit.images_key]) == (3, 4)
    assert (e[hit.low_key], e[hit.high_key]) == (wilson.low, wilson.high)
    assert e[hit.low_key] == pytest.approx(0.3006418, abs=1e-6)  # Wilson's 3 of 4 at 95 %, by hand
    assert e["road"] is None and e[road.low_key] is None and e[road.high_key] is None  # no image: no interval
    for _, c in registry.per_map():  # every column of the registry has both ends
        assert c.low_key in e and c.high_key in e, c.name


def test_the_findings_state_each_mean_with_its_interval():
    results = _results()
    texts = {f["id"]: f["text"] for f in results["findings"]}
    e = _entry(results)
    norm = registry.column("deletion_norm")
    stated = f"{e[norm.name]:.3f} [{e[norm.low_key]:.3f}, {e[norm.high_key]:.3f}] over 5 images"
    assert stated in texts["faithfulness-m"]
    assert "within noise" in texts["faithfulness-m"]  # the paired comparison with chance stays
    wilson = share(3, 4)
    assert f"Grad-CAM 3 of 4 [{100 * wilson.low:.0f} %, {100 * wilson.high:.0f} %]" in texts["pointing-m"]


def test_the_trust_table_prints_value_low_high():
    results = _results()
    page = re.sub(r"\s+", " ", html_lib.unescape(re.sub(r"<[^>]+>", "", test_registries._trust_html(results))))
    e = _entry(results)
    deletion, hit = registry.column("deletion_auc"), registry.column("pointing_hit")
    assert f"{e['deletion_auc']:.3f} [{e[deletion.low_key]:.3f}, {e[deletion.high_key]:.3f}]" in page
    assert f"3 / 4 [{100 * e[hit.low_key]:.0f} %, {100 * e[hit.high_key]:.0f} %]" in page


def _check(evaluation: dict, tmp_path) -> None:
    ctx = rundir._Ctx(tmp_path)
    ctx.refs.update({"model": {"m"}, "image": set(IMAGES), "method": {"gradcam"}})
    rundir._compile(rundir.EVALUATION)(evaluation, "evaluation", ctx)


@pytest.mark.parametrize("case, change, expected", [
    ("low above the mean", lambda e: e.update(deletion_auc_low=e["deletion_auc"] + 0.01),
     "evaluation.summary[0].deletion_auc_low: found 0.248, expected a number at most 0.238, the mean deletion_auc"),
    ("high below the mean", lambda e: e.update(deletion_auc_high=0.1),
     "evaluation.summary[0].deletion_auc_high: found 0.1, expected a number at least"),
    ("high out of range", lambda e: e.update(deletion_auc_high=1.5),
     "evaluation.summary[0].deletion_auc_high: found 1.5, expected a number from 0 to 1"),
    ("share low out of range", lambda e: e.update(pointing_hit_low=-0.2),
     "evaluation.summary[0].pointing_hit_low: found -0.2, expected a number from 0 to 1"),
    ("share high below the share", lambda e: e.update(pointing_hit_high=0.5),
     "expected a number at least 0.75, the share pointing_hits / pointing_images"),
    ("more hits than images", lambda e: e.update(pointing_hits=5),
     "evaluation.summary[0].pointing_hits: found 5, expected at most 4"),
    ("an interval without a mean", lambda e: e.update(road_low=0.1),
     "evaluation.summary[0].road_low: found 0.1, expected null"),
    ("an end missing", lambda e: e.pop("energy_high"), "evaluation.summary[0].energy_high: missing"),
])
def test_the_run_directory_check_catches_a_tampered_interval(tmp_path, case, change, expected):
    evaluation = _results()["evaluation"]
    _check(evaluation, tmp_path)  # as written: accepted
    bad = copy.deepcopy(evaluation)
    change(bad["summary"][0])
    with pytest.raises(rundir.RunFormatError) as raised:
        _check(bad, tmp_path)
    assert expected in str(raised.value), f"{case}: {raised.value}"


def test_the_api_summary_carries_the_low_high_columns():
    results = _results()
    run = Run.__new__(Run)
    run._results = results
    table = run.evaluation_summary
    assert list(table.columns) == evaluation_summary_columns()
    for _, c in registry.per_map():
        value = [c.hits_key, c.images_key] if c.aggregate == "hits" else [c.name]
        at = evaluation_summary_columns().index(value[-1])
        assert evaluation_summary_columns()[at + 1:at + 3] == [c.low_key, c.high_key], c.name
    row = table.set_index("method").loc["gradcam"]
    e = _entry(results)
    assert (row["deletion_auc_low"], row["deletion_auc_high"]) == (e["deletion_auc_low"], e["deletion_auc_high"])
    assert len(table) == 2
    run._results = {"evaluation": {}}
    del run.__dict__["evaluation_summary"]
    assert run.evaluation_summary.empty and list(run.evaluation_summary.columns) == evaluation_summary_columns()


def _two_methods(n: int, gap: float) -> dict:
    """Grad-CAM and LIME on n images, LIME's normalised deletion area `gap` below Grad-CAM's on every image (plus a
    small spread), the random map well above both; every other column alike."""
    settings = EvaluateSpec().model_dump(mode="json")
    rows = []
    for method, shift in (("gradcam", 0.0), ("lime", -gap), ("random", 0.3)):
        for k in range(n):
            row = {"model": "m", "image": f"i{k}", "method": method, "object": "cat"}
            for _, c in registry.per_map():
                row[c.name] = 0.1 + 0.01 * k if c.aggregate == "mean" else None
            row["deletion_norm"] = 0.4 + 0.02 * k + shift + 0.001 * ((k * 7) % 3)
            rows.append(row)
    results = {"models": [{"id": "m", "display": "Model M"}],
               "evaluation": {"settings": settings, "methods": ["gradcam", "lime", "random"], "rows": rows,
                              "sanity": []}}
    results["evaluation"]["summary"] = analysis.evaluation_summary(results)
    return {f["id"]: f["text"] for f in analysis.evaluation_findings(results)}


def test_a_finding_ranks_two_methods_only_beyond_noise():
    """Five images cannot separate two methods (the smallest two-sided signed-rank p is 1/16): the finding names the
    lowest mean and says it is within noise, and does not say which lowers the probability fastest; with 12 images
    and LIME lower on every one, it does."""
    few = _two_methods(5, 0.01)["faithfulness-m"]
    assert "no method lowers the top-1 probability beyond noise" in few and "ranks first lowers" not in few
    assert "the lowest mean is LIME's" in few and "within noise" in few and "over 5 images" in few
    many = _two_methods(12, 0.05)["faithfulness-m"]
    assert "removing the pixels LIME ranks first lowers the top-1 probability fastest" in many
    assert "no method lowers" not in many and "over 12 images" in many
