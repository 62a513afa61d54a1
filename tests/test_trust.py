"""Verdicts that survive: each rule of "which explanation can we trust?" on a planted case. A map perfect up to a
tie, scored the same whichever way the tie is ordered; a model for which per-pixel noise is a weak bar and smooth
noise a strong one; a cascade whose verdict flips with the seed (inconclusive); ROAD's value equal to its stated
formula; the normalised areas; the near hits and the unmatched mask labels in the table."""
from __future__ import annotations

import html as html_lib
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TinyNet, wrap
from report_builder.evaluation import metrics as ev
from report_builder.evaluation import registry
from report_builder.report import analysis
from report_builder.spec.schema import DeletionSpec, EvaluateSpec, ExplainSpec, RoadSpec, SanitySpec

CPU = torch.device("cpu")


def settings(**deletion) -> ev.EvaluationSettings:
    spec = EvaluateSpec(deletion=DeletionSpec(**{"steps": 16, "baseline": "zero", **deletion}))
    return ev.EvaluationSettings(spec, seed=0, device=CPU)


class Quadrant(nn.Module):
    """Class 0's logit is the brightness of the top-left quadrant, a set that transposing the image keeps."""

    def forward(self, x):
        region = x[:, :, :16, :16].mean(dim=(1, 2, 3))
        return torch.stack([8 * (region - 0.3), torch.zeros_like(region)], dim=1)


@pytest.fixture(scope="module")
def quadrant():
    return wrap(Quadrant(), classes=2)


def _striped() -> np.ndarray:
    """An image whose quadrant is bright along its first rows and dark down its first columns: row-major and
    column-major orders of the same pixels remove very different brightness first."""
    crop = np.full((32, 32, 3), 120, np.uint8)
    crop[:4, :, :] = 255
    crop[4:, :4, :] = 0
    return crop


def _old_deletion(model, crop, target, saliency, s) -> float:
    """Deletion AUC with ties cut row by row (the rule before): the steps' pixel counts straight off pixel_order."""
    h, w = saliency.shape
    order = ev.pixel_order(saliency)
    curve = []
    for k in range(s.evaluate.deletion.steps + 1):
        gone = np.zeros(h * w, bool)
        gone[order[: round(k * h * w / s.evaluate.deletion.steps)]] = True
        image = np.where(gone.reshape(h, w)[..., None], 0, crop).astype(np.uint8)
        curve.append(ev.class_probabilities(model, torch.from_numpy(image[None]), CPU, 8)[0, target])
    return ev.auc(np.asarray(curve, np.float64))


def test_a_large_tie_no_longer_depends_on_the_orientation(quadrant):
    """A map with a few distinct pixels and the rest (97 %) tied at 0: transposing the image and the map moves the
    tie's row-major order, which changed the area; removing a tie at once does not."""
    crop = _striped()
    saliency = np.zeros((32, 32), np.float32)
    saliency[20:24, 28:32] = np.arange(16).reshape(4, 4) + 1  # distinct values off the quadrant, symmetric-free
    s = settings()
    flipped = (np.ascontiguousarray(crop.transpose(1, 0, 2)), np.ascontiguousarray(saliency.T))
    old = _old_deletion(quadrant, crop, 0, saliency, s), _old_deletion(quadrant, *flipped[:1], 0, flipped[1], s)
    assert abs(old[0] - old[1]) > 0.05  # the planted case: the old rule's score followed the orientation
    new = (ev.deletion_insertion(quadrant, crop, 0, saliency, None, s),
           ev.deletion_insertion(quadrant, flipped[0], 0, flipped[1], None, s))
    for key in ("deletion_auc", "insertion_auc", "deletion_norm", "insertion_norm"):
        assert new[0][key] == pytest.approx(new[1][key], abs=1e-6), key


def test_a_map_perfect_up_to_a_tie_scores_the_same_whatever_the_tie_order(quadrant):
    """The quadrant tied at 1 and the rest tied at 0: perfect, with no order inside either tie. Both orientations
    give one score, between those of the best and the worst order inside the quadrant."""
    crop = _striped()
    perfect = np.zeros((32, 32), np.float32)
    perfect[:16, :16] = 1.0
    s = settings()
    # the quadrant is the same set under a transposition, and row-major order inside its tie becomes column-major
    scores = [ev.deletion_insertion(quadrant, image, 0, smap, None, s)["deletion_auc"] for image, smap in
              ((crop, perfect), (np.ascontiguousarray(crop.transpose(1, 0, 2)), np.ascontiguousarray(perfect.T)))]
    assert max(scores) - min(scores) < 1e-6
    # inside the quadrant, bright rows first is the best order and dark columns first the worst
    best = perfect.copy()
    best[:4, :16] = 2.0
    worst = perfect.copy()
    worst[:16, :4] = 2.0
    best_auc = ev.deletion_insertion(quadrant, crop, 0, best, None, s)["deletion_auc"]
    worst_auc = ev.deletion_insertion(quadrant, crop, 0, worst, None, s)["deletion_auc"]
    assert best_auc < scores[0] < worst_auc


def test_tie_aware_counts_interpolate_inside_a_tie():
    bounds = np.array([0, 2, 10])  # a group of 2, then a tie of 8
    needed, where = ev.tie_aware_counts([0, 2, 4, 10], bounds)
    assert needed == [0, 2, 10]
    assert where == [(0, 0, 0.0), (2, 2, 0.0), (2, 10, 0.25), (10, 10, 0.0)]


def test_without_ties_the_curve_is_the_steps_own(quadrant):
    """A map with no ties: every step is a group boundary, so the score is the plain one, to the bit."""
    crop = _striped()
    saliency = np.random.default_rng(3).random((32, 32)).astype(np.float32)
    s = settings()
    assert ev.deletion_insertion(quadrant, crop, 0, saliency, None, s)["deletion_auc"] == pytest.approx(
        _old_deletion(quadrant, crop, 0, saliency, s), abs=1e-6)


def test_the_normalised_areas_divide_by_the_intact_image(quadrant):
    crop = _striped()
    saliency = np.random.default_rng(4).random((32, 32)).astype(np.float32)
    out = ev.deletion_insertion(quadrant, crop, 0, saliency, None, settings())
    d, i = out["deletion_curve"].astype(np.float64), out["insertion_curve"].astype(np.float64)
    assert d[0] == pytest.approx(i[-1], abs=1e-6)  # both the intact image
    assert out["deletion_norm"] == pytest.approx(out["deletion_auc"] / d[0], rel=1e-5)
    assert out["insertion_norm"] == pytest.approx(out["insertion_auc"] / i[-1], rel=1e-5)


def test_road_is_the_morf_drop_minus_the_lerf_drop_over_two(tiny_model, tiny_crop):
    """The value is what the words say: with drop = p(intact) - p(imputed), (mean MoRF drop - mean LeRF drop) / 2,
    computed here by hand from grad-cam's masks (a percentile q keeps the pixels below the q-th percentile of the
    map, MoRF; of 1 - map, LeRF) with our imputer and the same noise draws (LeRF first)."""
    saliency = np.random.default_rng(5).random((32, 32)).astype(np.float32)
    spec = EvaluateSpec(road=RoadSpec(percentiles=(30, 70)))
    value = ev.road(tiny_model, tiny_crop, 1, saliency, None, ev.EvaluationSettings(spec, 0, CPU))["road"]
    x = tiny_model.preprocess.normalize(tiny_crop[None], CPU)

    def p(img):
        with torch.no_grad():
            return float(torch.softmax(tiny_model.outputs(img), dim=1)[0, 1])

    intact = p(x)
    torch.manual_seed(0)
    drops = {}
    for name, m in (("lerf", 1 - saliency), ("morf", saliency)):
        keep = [torch.from_numpy((m < np.percentile(m, q)).astype(np.float32)) for q in (30, 70)]
        drops[name] = np.mean([intact - p(ev.LinearImputer()(x[0], k)[None]) for k in keep])
    assert value == pytest.approx((drops["morf"] - drops["lerf"]) / 2, abs=1e-6)


# ---------------------------------------------------------------- chance


class Pooled(nn.Module):
    """Class 0 reads the top-left quadrant through a 4 x 4 max pool: a pixel scattered out of a window leaves it
    bright, so per-pixel noise barely moves the model while removing whole regions (smooth noise) does."""

    def forward(self, x):
        pooled = nn.functional.max_pool2d(x.mean(dim=1, keepdim=True), 4)[:, 0, :4, :4].mean(dim=(1, 2))
        return torch.stack([6 * (pooled - 0.5), torch.zeros_like(pooled)], dim=1)


def test_per_pixel_noise_is_beaten_by_any_smooth_map_and_smooth_noise_is_the_bar():
    """A ramp map that ignores the object (it removes the right half first) 'beats' per-pixel noise on every image,
    only because removing regions beats removing scattered pixels; against smooth noise it does not beat chance."""
    model = wrap(Pooled(), classes=2)
    spec = EvaluateSpec(deletion=DeletionSpec(steps=16, baseline="zero"))
    s = ev.EvaluationSettings(spec, 0, CPU)
    ramp = np.tile(np.arange(32, dtype=np.float32), (32, 1))  # the right-most columns first
    chance = registry.chance_methods({"random_baseline": True, "chance": {"smooth": [4], "centre": False}})
    assert chance == ["random", "random-smooth4"]
    rows = []
    for k in range(8):
        crop = np.random.default_rng(10 + k).integers(150, 256, (32, 32, 3)).astype(np.uint8)
        sha = f"{k + 1:064x}"
        values = {"ramp": ev.deletion_insertion(model, crop, 0, ramp, None, s)}
        for method in chance:
            draws = [ev.deletion_insertion(model, crop, 0, m, None, s) for m in ev.chance_maps(method, (32, 32), 0, sha, 3)]
            values[method] = {key: float(np.mean([d[key] for d in draws])) for key in ("deletion_norm", "insertion_norm")}
        rows += [{"model": "m", "image": f"i{k}", "method": method, **{key: v[key] for key in
                                                                        ("deletion_norm", "insertion_norm")}}
                 for method, v in values.items()]
    summary = [{"model": "m", "method": method,
                **{key: np.mean([r[key] for r in rows if r["method"] == method]) for key in
                   ("deletion_norm", "insertion_norm")}} for method in ["ramp", *chance]]
    deletion = registry.BY_NAME["deletion"]
    pixel_only = analysis.chance_bars(
        registry.Metric(**{**deletion.__dict__, "chance": ("pixel",)}), "m", summary, rows)["deletion_norm"]
    assert pixel_only["strongest"] == "random" and pixel_only["methods"]["ramp"]["verdict"] == "beats"
    bars = analysis.chance_bars(deletion, "m", summary, rows)["deletion_norm"]
    assert bars["strongest"] == "random-smooth4"  # the stronger bar
    assert bars["methods"]["ramp"]["verdict"] != "beats"


def test_the_finding_compares_each_method_with_the_strongest_chance_map_pairwise():
    """Planted per-image numbers: A is better than per-pixel noise on every image but within noise of smooth
    noise; B is better than both on every image. 'Beats chance' is said of B only."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(8):
        base = rng.uniform(0.3, 0.6)
        values = {"random": base + 0.3, "random-smooth4": base + 0.05 * (-1) ** k, "gradcam": base,
                  "lime": base - 0.2}
        rows += [{"model": "m", "image": f"i{k}", "method": m, "deletion_norm": v, "insertion_norm": 1 - v}
                 for m, v in values.items()]
    summary = [{"model": "m", "method": m, **{c: float(np.mean([r[c] for r in rows if r["method"] == m]))
                                              for c in ("deletion_norm", "insertion_norm")}}
               for m in ("gradcam", "lime", "random", "random-smooth4")]
    bars = analysis.chance_bars(registry.BY_NAME["deletion"], "m", summary, rows)["deletion_norm"]
    assert bars["strongest"] == "random-smooth4"
    assert bars["methods"]["gradcam"]["verdict"] == "within noise"
    assert bars["methods"]["lime"]["verdict"] == "beats"
    assert bars["methods"]["lime"]["n"] == 8


def test_the_chance_maps_are_seeded_and_of_their_kind():
    sha = "ab" * 32
    pixel = ev.chance_maps("random", (32, 32), 0, sha, 3)
    assert len(pixel) == 3 and np.array_equal(pixel[0], ev.random_map((32, 32), 0, sha))  # draw 0: the old map
    assert not np.array_equal(pixel[0], pixel[1])
    smooth = ev.chance_maps("random-smooth4", (32, 32), 0, sha, 2)
    assert np.array_equal(smooth[0], ev.chance_maps("random-smooth4", (32, 32), 0, sha, 2)[0])
    # smooth: neighbours nearly equal, per-pixel: not
    assert np.abs(np.diff(smooth[0], axis=1)).mean() < 0.2 * np.abs(np.diff(pixel[0], axis=1)).mean()
    (centre,) = ev.chance_maps("random-centre", (32, 32), 0, sha, 3)
    assert np.unravel_index(int(np.argmax(centre)), centre.shape) == (16, 16) and (centre == centre.max()).sum() == 1
    assert registry.chance_kind("gradcam") is None and registry.chance_kind("random-smooth16") == "smooth"


# ---------------------------------------------------------------- sanity over seeds


def _planted(resembles):
    """An explainer whose randomised map is the original (a failing run) when resembles(model) holds, else noise."""
    def explain(m, crop, target, settings):
        original = np.add.outer(np.arange(32.0), np.arange(32.0)).astype(np.float32)
        if resembles(m):
            return {"map": original}
        seed = int(abs(float(m.module.fc.weight.detach().sum())) * 1e6) % 2**31
        return {"map": np.random.default_rng(seed).random((32, 32)).astype(np.float32)}
    return explain


def _cascade(monkeypatch, tiny_crop, resembles, seeds=3, images=3, walk=3) -> list[dict]:
    from report_builder.explanation import methods

    monkeypatch.setattr(methods, "EXPLAINERS", {"planted": _planted(resembles)})
    torch.manual_seed(0)
    m = wrap(TinyNet())
    spec = EvaluateSpec(sanity=SanitySpec(images=images, steps=2, seeds=seeds))
    original = {"map": np.add.outer(np.arange(32.0), np.arange(32.0)).astype(np.float32), "target": 1}
    out = []
    for k in range(images):  # the planted map does not depend on the image: each image is a run of the seeds
        v = ev.sanity_check(m, tiny_crop, "planted", ExplainSpec(), spec, k, "cpu", original, walk=k < walk)
        out.append({"model": "m", "image": f"i{k}", "method": "gradcam", **{key: v[key] for key in
                                                                           ("layers", "spearman", "ssim", "runs")}})
    return out


def _summary(sanity: list[dict]) -> dict:
    results = {"models": [{"id": "m", "display": "M"}],
               "evaluation": {"methods": ["gradcam"], "rows": [], "sanity": sanity}}
    (entry,) = analysis.evaluation_summary(results)
    return entry


def test_a_verdict_that_flips_with_the_seed_is_inconclusive(monkeypatch, tiny_crop):
    """The map resembles the original under some randomisations and not others (the sign of the head's weights):
    the runs disagree, so no verdict is written."""
    sanity = _cascade(monkeypatch, tiny_crop, lambda m: float(m.module.fc.weight.detach().sum()) > 0)
    rule = registry.BY_NAME["sanity"].rule
    finals = [r["spearman"] for s in sanity for r in s["runs"]]
    assert any(rule.fails(v) for v in finals) and not all(rule.fails(v) for v in finals)  # it flips
    entry = _summary(sanity)
    assert entry["sanity_runs"] == 9 and entry["sanity_seeds"] == 3
    assert entry["sanity_verdict"] == "inconclusive"
    finding = analysis._sanity_finding("m", "M", [entry], [])
    assert "inconclusive on 9 runs" in finding["text"]


def test_a_verdict_that_holds_over_the_runs_is_written(monkeypatch, tiny_crop):
    entry = _summary(_cascade(monkeypatch, tiny_crop, lambda m: True))
    assert entry["sanity_fails"] == 9 and entry["sanity_verdict"] == "fails"
    assert entry["sanity_fail_share"]["low"] > 0.5
    assert "fails the sanity check" in analysis._sanity_finding("m", "M", [entry], [])["text"]
    entry = _summary(_cascade(monkeypatch, tiny_crop, lambda m: False))
    assert entry["sanity_fails"] == 0 and entry["sanity_verdict"] == "passes"


def test_only_the_walking_images_make_the_per_step_means_and_every_image_makes_the_verdict(monkeypatch, tiny_crop):
    sanity = _cascade(monkeypatch, tiny_crop, lambda m: float(m.module.fc.weight.detach().sum()) > 0, walk=1)
    assert [len(s["layers"]) for s in sanity] == [2, 1, 1]
    entry = _summary(sanity)
    assert entry["sanity_steps"] == 2 and entry["sanity_walked"] == 1 and entry["sanity_images"] == 3
    assert entry["sanity_spearman"] == pytest.approx(sanity[0]["spearman"])  # the walk's own steps
    finals = [s["spearman"][-1] for s in sanity if s["spearman"][-1] is not None]
    assert entry["spearman_final"] == pytest.approx(np.mean(finals))  # the last step of all three images
    assert entry["sanity_runs"] == 9  # 3 images x 3 seeds, as when every image walks
    text = analysis._sanity_finding("m", "M", [entry], [])["text"]
    assert "3 images × 3 seeds; the cascade from the output block walks 2 steps on 1 image, the others are " \
           "re-initialised at once" in text


def test_a_map_gone_flat_is_flat_not_rho_zero(monkeypatch, tiny_crop):
    from report_builder.explanation import methods

    monkeypatch.setattr(methods, "EXPLAINERS", {"planted": lambda m, crop, target, s: {"map": np.zeros((32, 32), np.float32)}})
    torch.manual_seed(0)
    spec = EvaluateSpec(sanity=SanitySpec(images=1, steps=2, seeds=2))
    original = {"map": np.random.default_rng(0).random((32, 32)).astype(np.float32), "target": 1}
    v = ev.sanity_check(wrap(TinyNet()), tiny_crop, "planted", ExplainSpec(), spec, 0, "cpu", original)
    assert v["spearman"] == [None, None] and v["ssim"] == [None, None]  # no SSIM against a flat map
    assert [r["flat"] for r in v["runs"]] == [True, True]
    entry = _summary([{"model": "m", "image": "i", "method": "gradcam", **v}])
    assert entry["sanity_flat"] == 2 and entry["sanity_fails"] == 0 and entry["spearman_runs"] is None


def test_the_sanity_rule_is_at_or_above_the_threshold():
    rule = registry.BY_NAME["sanity"].rule
    assert rule.fails(rule.threshold) and not rule.fails(rule.threshold - 1e-9)
    assert rule.stated == f"ρ ≥ {rule.shown}"
    assert rule.verdict(0.51, 0.9) == "fails" and rule.verdict(0.1, 0.49) == "passes"
    assert rule.verdict(0.3, 0.7) == "inconclusive"


# ---------------------------------------------------------------- localisation


def test_no_matching_mask_label_is_counted_and_shown():
    from report_builder.data.images import ObjectLabels

    label = np.array([[0, 1], [2, 2]])
    assert ObjectLabels(label, ("background", "bottle", "person")).region("tabby")[1] == analysis.ANY_OBJECT
    import test_registries

    results = test_registries._trust_results(0.1)
    for r in results["evaluation"]["rows"]:
        r["object"] = analysis.ANY_OBJECT
    results["evaluation"]["summary"] = analysis.evaluation_summary(results)
    results["findings"] = analysis.evaluation_findings(results)
    page = re.sub(r"\s+", " ", html_lib.unescape(test_registries._trust_html(results)))
    assert "On 1 labelled image(s) no mask label names the predicted class" in page
    assert "no mask label names the predicted class, so every labelled object counts" in page  # the finding
    assert "15 pixels" in page and "off the object itself are counted apart" in page  # the tolerance, stated
    assert "chance: centre prior" in page and "chance: smooth noise (4 × 4 cells)" in page  # the bars in the table


def test_a_chance_maps_hits_are_the_mean_over_draws():
    assert analysis._hits([1.0, 0.0, 1.0]) == 2 and analysis._hits([1 / 3, 1.0]) == 1.33
    assert math.isclose(analysis._hits([0.5, 0.5]), 1)


def test_the_new_values_survive_the_cache(quadrant, tiny_crop, tmp_path, monkeypatch):
    """The cache loads with weights_only: a NumPy scalar in a result (a normalised area, a run's ρ) would be refused
    and recomputed on every run."""
    from report_builder.explanation import methods
    from report_builder.pipeline.cache import Cache

    cache = Cache(tmp_path)
    value = ev.deletion_insertion(quadrant, _striped(), 0, np.zeros((32, 32), np.float32), None, settings())
    cache.save("evaluate", "a" * 64, value)
    assert cache.load("evaluate", "a" * 64, {"deletion_norm": float, "insertion_norm": float}) is not None
    monkeypatch.setattr(methods, "EXPLAINERS", {"planted": _planted(lambda m: True)})
    torch.manual_seed(0)
    spec = EvaluateSpec(sanity=SanitySpec(images=1, steps=2, seeds=2))
    original = {"map": np.add.outer(np.arange(32.0), np.arange(32.0)).astype(np.float32), "target": 1}
    sanity = ev.sanity_check(wrap(TinyNet()), tiny_crop, "planted", ExplainSpec(), spec, 0, "cpu", original)
    cache.save("sanity", "b" * 64, sanity)
    assert cache.load("sanity", "b" * 64, ev.SANITY_SHAPE) is not None


def test_a_tied_maximum_points_by_the_share_of_it_that_hits():
    """A LIME-like map: its top superpixel (tied) half on the object. The hit is 1/2 whichever way the image is
    turned, not the first tied pixel row by row (which would give 1 one way and 0 the other)."""
    region = np.zeros((10, 10), bool)
    region[:5, :] = True  # the top half
    saliency = np.zeros((10, 10))
    saliency[3:7, 2] = 1.0  # a tied maximum: rows 3-4 on the object, rows 5-6 off it
    for turn in range(4):
        out = ev.pointing(np.rot90(saliency, turn), np.rot90(region, turn), 0)
        assert out["pointing_hit"] == 0.5 and out["pointing_near_hit"] == 0.0
    out = ev.pointing(saliency, region, 1)  # row 5 is within 1 pixel: 3 of 4 hit, 1 of them off the object
    assert out["pointing_hit"] == 0.75 and out["pointing_near_hit"] == 0.25


def test_the_speed_finding_ranks_the_slowest_only_when_its_range_clears_the_next():
    from report_builder.report.analysis import _speed_findings

    def results(times: dict[str, list[float]]) -> dict:
        n = len(next(iter(times.values())))
        return {"models": [{"id": "m", "display": "M"}], "explanations": [{"model": "m", "image": f"im{i}",
                                  "methods": {k: {"seconds": v[i], "cached": False} for k, v in times.items()}}
                                 for i in range(n)]}

    fast = {"gradcam": [0.1, 0.2, 0.15], "ablationcam": [0.3, 0.4, 0.35]}
    overlapping = _speed_findings(results({**fast, "scorecam": [5.0, 9.0, 7.0], "lime": [6.0, 10.0, 8.0]}))[0]["text"]
    assert "LIME and ScoreCAM are the slowest" in overlapping and "which is slower can change" in overlapping
    apart = _speed_findings(results({**fast, "scorecam": [2.0, 3.0, 2.5], "lime": [6.0, 10.0, 8.0]}))[0]["text"]
    assert "LIME is the slowest" in apart and "which is slower" not in apart
