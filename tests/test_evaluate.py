"""Which explanation can we trust: deletion and insertion by hand and on a planted model, ROAD equal to grad-cam's
own metric, the sanity check on a planted model, the pointing game on hand-made masks, the LIME sweep."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TinyNet, wrap
from report_builder.evaluation import metrics as ev
from report_builder.data.images import ObjectLabels, same_object
from report_builder.spec.schema import DeletionSpec, EvaluateSpec, ExplainSpec, LimeSpec, RoadSpec, SanitySpec, SweepSpec
from report_builder.models import blocks
from report_builder.models.zoo import weights_hash

CPU = torch.device("cpu")


class RegionModel(nn.Module):
    """Class 0's logit is the brightness of the top-left quadrant, nothing else: the perfect map is that quadrant."""

    def forward(self, x):
        region = x[:, :, :16, :16].mean(dim=(1, 2, 3))
        return torch.stack([8 * region, torch.zeros_like(region)], dim=1)


def settings(**deletion) -> ev.EvaluationSettings:
    spec = EvaluateSpec(deletion=DeletionSpec(**{"steps": 16, "baseline": "zero", **deletion}))
    return ev.EvaluationSettings(spec, seed=0, device=CPU)


@pytest.fixture
def region_model():
    return wrap(RegionModel(), classes=2)


def test_auc_by_trapezoids():
    assert ev.auc(np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert ev.auc(np.array([1.0, 1.0, 0.0, 0.0])) == pytest.approx((1 + 0.5 + 0) / 3)


def test_deletion_and_insertion_by_hand():
    """A 1 x 4 image through a model whose class-0 logit is the sum of the four pixels' brightness."""

    class Sum(nn.Module):
        def forward(self, x):
            s = x.sum(dim=(1, 2, 3))
            return torch.stack([s, torch.zeros_like(s)], dim=1)

    m = wrap(Sum(), size=4, classes=2)
    m.preprocess = type(m.preprocess)(4, 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    crop = np.zeros((1, 4, 3), np.uint8)
    crop[0, :, 0] = [255, 0, 255, 0]  # two bright pixels (1.0 in the red channel), two black
    saliency = np.array([[0.9, 0.1, 0.8, 0.2]])  # the bright pixels first
    out = ev.deletion_insertion(m, crop, 0, saliency, None, settings(steps=2))
    sig = lambda s: 1 / (1 + math.exp(-s))  # noqa: E731 - softmax of (s, 0) is the sigmoid of s
    # deletion: both bright pixels, then one (the 0.9 one goes first: half of 4 pixels = pixels 0 and 2), then none
    assert out["deletion_curve"].tolist() == pytest.approx([sig(2), sig(0), sig(0)], abs=1e-6)
    assert out["insertion_curve"].tolist() == pytest.approx([sig(0), sig(2), sig(2)], abs=1e-6)
    assert out["deletion_auc"] == pytest.approx(((sig(2) + sig(0)) / 2 + sig(0)) / 2, abs=1e-6)


def test_the_perfect_map_beats_the_reversed_one_and_chance_lies_between(region_model):
    rng = np.random.default_rng(0)
    crop = rng.integers(180, 256, (32, 32, 3)).astype(np.uint8)
    perfect = np.zeros((32, 32), np.float32)
    perfect[:16, :16] = 1.0
    s = settings()
    best = ev.deletion_insertion(region_model, crop, 0, perfect, None, s)
    worst = ev.deletion_insertion(region_model, crop, 0, 1 - perfect, None, s)
    chance = ev.deletion_insertion(region_model, crop, 0, ev.random_map((32, 32), 0, "ab" * 32), None, s)
    assert best["deletion_auc"] < chance["deletion_auc"] < worst["deletion_auc"]
    assert best["insertion_auc"] > chance["insertion_auc"] > worst["insertion_auc"]


@pytest.mark.parametrize("kind", ["blur", "mean", "zero"])
def test_baselines(kind):
    crop = np.zeros((20, 20, 3), np.uint8)
    crop[:, 10:] = 200
    base = ev.baseline_image(crop, kind)
    assert base.shape == crop.shape and base.dtype == np.uint8
    if kind == "mean":
        assert (base == 100).all()
    elif kind == "zero":
        assert (base == 0).all()
    else:  # blurred: the edge is smoothed, the far sides keep their values
        assert 0 < base[10, 9, 0] < 200 and base[10, 0, 0] < 20 and base[10, 19, 0] > 180


def test_road_is_grad_cams_own_metric(tiny_model, tiny_crop):
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    saliency = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    spec = EvaluateSpec(road=RoadSpec(percentiles=(30, 70)))
    ours = ev.road(tiny_model, tiny_crop, 1, saliency, None, ev.EvaluationSettings(spec, seed=5, device=CPU))["road"]
    torch.manual_seed(5)
    x = tiny_model.preprocess.normalize(tiny_crop[None], CPU)
    theirs = ROADCombined(percentiles=[30, 70])(x, saliency[None], [ClassifierOutputSoftmaxTarget(1)], tiny_model.module)
    assert ours == pytest.approx(float(theirs[0]), abs=1e-7)


def test_pointing_game_and_energy_on_hand_made_masks():
    region = np.zeros((10, 10), bool)
    region[2:4, 2:4] = True
    saliency = np.zeros((10, 10))
    saliency[3, 3] = 1.0  # the peak on the object
    saliency[8, 8] = 0.5
    assert ev.pointing(saliency, region, 0) == {"pointing_hit": 1.0, "pointing_near_hit": 0.0,
                                                "energy": pytest.approx(1 / 1.5)}
    saliency[9, 9] = 2.0  # a new peak, sqrt(6² + 6²) = 8.5 pixels from the object's corner (3, 3)
    assert ev.pointing(saliency, region, 0)["pointing_hit"] == 0.0
    assert ev.pointing(saliency, region, 8)["pointing_hit"] == 0.0
    assert ev.pointing(saliency, region, 9)["pointing_hit"] == 1.0
    assert ev.pointing(saliency, region, 9)["pointing_near_hit"] == 1.0  # a hit by the tolerance only: counted apart
    assert math.isnan(ev.pointing(np.zeros((10, 10)), region, 0)["energy"])  # no mass: no energy


def test_the_object_of_the_explained_class():
    assert same_object("dining table", "diningtable") and same_object("mousetrap", "mouse traps")
    assert same_object("wine bottle", "bottle") and same_object("sock", "hanes socks")
    assert not same_object("tabby", "person") and not same_object("ox", "box")
    label = np.array([[0, 1], [2, 2]])
    objects = ObjectLabels(label, ("background", "bottle", "person"))
    region, what = objects.region("beer bottle")
    assert what == "bottle" and region.tolist() == [[False, True], [False, False]]
    region, what = objects.region("tabby")  # no label names a cat: every labelled object
    assert what == "any labelled object" and region.sum() == 3
    assert ObjectLabels(label > 0).region("tabby")[1] == "the masked object"


def test_the_cascade_runs_from_the_output_down():
    import torchvision

    blocks = ev.cascade(torchvision.models.resnet18())
    assert blocks[:3] == ["fc", "layer4.1", "layer4.0"] and blocks[-2:] == ["bn1", "conv1"]
    assert ev.cascade_steps(blocks, 3) == [1, 6, len(blocks)]
    assert ev.cascade_steps(blocks, 100) == list(range(1, len(blocks) + 1))


def test_randomising_a_model_changes_its_gradient_map_but_not_the_model(tiny_crop):
    torch.manual_seed(0)
    m = wrap(TinyNet())
    before = weights_hash(m.module)
    from report_builder.explanation.methods import EXPLAINERS, ExplainSettings

    explain = ExplainSpec()
    original = EXPLAINERS["gradcam"](m, tiny_crop, 1, ExplainSettings(explain, 0, CPU))
    spec = EvaluateSpec(sanity=SanitySpec(images=1, steps=3))
    out = ev.sanity_check(m, tiny_crop, "gradcam", explain, spec, 0, "cpu", {**original, "target": 1})
    assert out["layers"][-1] == "features.0" and len(out["spearman"]) == 3
    final = out["runs"][0]  # seed 0's last step; a map gone flat has no ρ and no SSIM
    assert final["spearman"] == out["spearman"][-1] and (final["flat"] or final["spearman"] < 0.5)
    assert final["flat"] == (final["ssim"] is None)
    assert out["maps"].shape == (4, ev.SANITY_MAP_SIZE, ev.SANITY_MAP_SIZE)
    assert [r["seed"] for r in out["runs"]] == [0, 1, 2]  # SanitySpec's default seeds
    assert weights_hash(m.module) == before  # a copy was randomised
    again = ev.sanity_check(m, tiny_crop, "gradcam", explain, spec, 0, "cpu", {**original, "target": 1})
    assert again["spearman"] == out["spearman"]  # seeded


def test_an_image_that_does_not_walk_the_steps_ends_where_the_walk_ends(tiny_crop, monkeypatch):
    """After `sanity.walk` images, an image makes the last step only: the same blocks with the same seeds, so its
    last-step map and its runs equal the walk's, for one explanation per seed instead of steps + seeds - 1."""
    from report_builder.explanation import methods

    torch.manual_seed(0)
    m = wrap(TinyNet())
    explain = ExplainSpec()
    original = methods.EXPLAINERS["gradcam"](m, tiny_crop, 1, methods.ExplainSettings(explain, 0, CPU))
    spec = EvaluateSpec(sanity=SanitySpec(images=2, steps=3, seeds=2))
    calls = []  # the randomised model is refolded before each of its explanations
    refold = ev.refold
    monkeypatch.setattr(ev, "refold", lambda *a: calls.append(1) or refold(*a))
    walked = ev.sanity_check(m, tiny_crop, "gradcam", explain, spec, 0, "cpu", {**original, "target": 1})
    assert len(calls) == 3 + 1  # every step, then the second seed's last step
    calls.clear()
    jumped = ev.sanity_check(m, tiny_crop, "gradcam", explain, spec, 0, "cpu", {**original, "target": 1}, walk=False)
    assert len(calls) == 1 + 1
    assert jumped["layers"] == walked["layers"][-1:] and jumped["blocks"] == walked["blocks"][-1:]
    assert jumped["spearman"] == walked["spearman"][-1:] and jumped["runs"] == walked["runs"]
    assert np.array_equal(jumped["maps"][-1], walked["maps"][-1]) and len(jumped["maps"]) == 2


class BatchNormNet(nn.Module):
    """Convolutions each followed by a BatchNorm, as real CNNs are: the kind whose forward-only calls run folded."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)
        for bn in (self.features[1], self.features[4]):  # statistics a trained model has
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.bias.data.uniform_(-0.3, 0.3)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_the_sanity_check_of_a_forward_only_method_sees_each_randomised_step(tiny_crop, monkeypatch):
    """ScoreCAM's masked images run through the folded copy: it must be remade from the randomised weights at
    every step, so the cascade gives what it gives with no folding at all."""
    from report_builder.models import zoo
    from report_builder.explanation.methods import EXPLAINERS, ExplainSettings

    torch.manual_seed(0)
    m = wrap(BatchNormNet())
    assert m.outputs is not m.module
    explain = ExplainSpec()
    original = EXPLAINERS["scorecam"](m, tiny_crop, 1, ExplainSettings(explain, 0, CPU))
    spec = EvaluateSpec(sanity=SanitySpec(images=1, steps=3, seeds=1))
    made, fold = [], zoo.fast_copy
    monkeypatch.setattr(zoo, "fast_copy", lambda *a: made.append(fold(*a)) or made[-1])
    folded = ev.sanity_check(m, tiny_crop, "scorecam", explain, spec, 0, "cpu", {**original, "target": 1})
    assert len(made) == 3 and all(f is not None for f in made)  # a folded copy of each step's weights
    monkeypatch.setattr(zoo, "fast_copy", lambda *a: None)
    plain = ev.sanity_check(m, tiny_crop, "scorecam", explain, spec, 0, "cpu", {**original, "target": 1})
    assert np.abs(folded["maps"].astype(np.float32) - plain["maps"].astype(np.float32)).max() < 1e-3
    assert np.allclose(folded["spearman"], plain["spearman"], atol=1e-4)


def test_the_pareto_front_on_hand_made_points():
    from report_builder.report.analysis import pareto_front

    points = [(0.5, 1.0), (0.6, 2.0), (0.4, 0.5), (0.5, 3.0), (0.6, 2.5), (0.2, 0.5)]
    # (0.5, 3.0) is beaten by (0.5, 1.0); (0.6, 2.5) by (0.6, 2.0); (0.2, 0.5) by (0.4, 0.5)
    assert pareto_front(points) == [2, 0, 1]


def test_sweep_settings_are_every_combination():
    base = LimeSpec(num_samples=100, batch_size=8)
    sweep = SweepSpec(num_samples=(50, 200), segmentation=({"algorithm": "slic", "n_segments": 20},
                                                           {"algorithm": "quickshift"}))
    combos = sweep.combinations(base)
    assert [(c.num_samples, c.segmentation.algorithm) for c in combos] == [
        (50, "slic"), (50, "quickshift"), (200, "slic"), (200, "quickshift")]
    assert all(c.batch_size == 8 and c.num_features == 5 and c.sweep is None for c in combos)
    assert combos[0].describe() == "50 samples, 5 features, slic (n_segments=20), mean colour"


def test_a_sweep_setting_is_deterministic(tiny_model, tiny_crop):
    from report_builder.explanation.methods import EXPLAINERS, ExplainSettings

    explain = ExplainSpec(lime=LimeSpec(num_samples=30, batch_size=30))
    gradcam = {**EXPLAINERS["gradcam"](tiny_model, tiny_crop, 1, ExplainSettings(explain, 0, CPU)), "target": 1}
    lime = explain.lime.model_copy(update={"num_features": 3})
    runs = [ev.sweep_run(tiny_model, tiny_crop, lime, explain, 0, "cpu", gradcam) for _ in range(2)]
    assert runs[0]["iou"] == runs[1]["iou"] and 0 <= runs[0]["iou"] <= 1


def test_a_tiny_negative_score_reads_as_zero_not_minus_zero():
    """ROAD scores near 0 came out as '-0.000' in the report's table and findings."""
    from report_builder.report import analysis
    from report_builder.report import render

    assert analysis._f(-0.00004, 3) == render._fmt(-0.00004, 3) == "0.000"
    assert analysis._f(-0.02, 3) == render._fmt(-0.02, 3) == "-0.020"
    assert render._fmt(float("nan")) == analysis._f(None) == "—"


@pytest.mark.parametrize("shape", ["blob", "scattered", "border", "everything"])
def test_our_road_imputer_gives_grad_cams_images_bit_for_bit(shape):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.random((3, 40, 48), dtype=np.float32))
    keep = {"blob": lambda: ~((np.arange(40)[:, None] - 18) ** 2 + (np.arange(48)[None] - 30) ** 2 < 150),
            "scattered": lambda: rng.random((40, 48)) > 0.5,
            "border": lambda: np.pad(np.ones((38, 46), bool), 1),  # the edge pixels are removed: fewer neighbours
            "everything": lambda: np.zeros((40, 48), bool)}[shape]()
    mask = torch.from_numpy(keep.astype(np.float32))
    torch.manual_seed(7)
    theirs = NoisyLinearImputer()(img, mask)
    torch.manual_seed(7)
    ours = ev.LinearImputer()(img, mask)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[:, mask.bool()], img[:, mask.bool()])  # kept pixels untouched


def test_road_with_our_imputer_equals_grad_cams_road_combined(tiny_model, tiny_crop):
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    x = tiny_model.preprocess.normalize(tiny_crop[None])
    saliency = np.random.default_rng(1).random((1, 32, 32)).astype(np.float32)
    targets = [ClassifierOutputSoftmaxTarget(1)]
    torch.manual_seed(0)
    theirs = ROADCombined(percentiles=[20, 50, 80])(x, saliency, targets, tiny_model.module)
    torch.manual_seed(0)
    ours = ev.road_score(tiny_model.module, x, saliency, targets, [20, 50, 80])
    assert np.array_equal(ours, theirs)


class Counting(nn.Module):
    """A module that counts the images it is given (and returns a fixed function of them)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.extend(x.detach().reshape(len(x), -1).clone())
        return self.inner(x)


def test_each_distinct_image_of_an_evaluation_goes_through_the_model_once(tiny_model, tiny_crop):
    """The intact crop is deletion's first point, insertion's last and ROAD's reference, and the baseline is every
    map's deletion end and insertion start: a task runs the intact crop not at all (the prediction task did) and the
    baseline once for all its draws, and its numbers are those of running every image."""
    counting = wrap(Counting(tiny_model.module), classes=3)
    spec = EvaluateSpec(deletion=DeletionSpec(steps=4, baseline="blur"), road=RoadSpec(percentiles=[50]))
    predictions = ev.class_probabilities(counting, tiny_crop[None], CPU, 1)  # what the prediction task gives
    runs = counting.outputs  # the copy the evaluation calls (BatchNorms folded), a Counting too
    runs.seen.clear()
    s = ev.EvaluationSettings(spec, seed=0, device=CPU)
    s.known[ev._known_key(counting, tiny_crop)] = (counting, predictions[0])
    maps = ev.chance_maps("random", (32, 32), 0, "ab" * 32, 3)
    shared = [{**ev.deletion_insertion(counting, tiny_crop, 1, m, None, s),
               **ev.road(counting, tiny_crop, 1, m, None, s)} for m in maps]
    seen = torch.stack(runs.seen)
    # per map: 3 steps between the ends for each curve and ROAD's 2 imputed images; the baseline once in all
    assert len(seen) == 3 * (2 * 3 + 2) + 1
    intact = counting.preprocess.normalize(tiny_crop[None]).reshape(1, -1)
    assert not (seen == intact).all(dim=1).any()
    # against a task that knows nothing beforehand and runs the ends of every curve anew
    for m, got in zip(maps, shared):
        alone = ev.EvaluationSettings(spec, seed=0, device=CPU)
        fresh = {**ev.deletion_insertion(counting, tiny_crop, 1, m, None, alone),
                 **ev.road(counting, tiny_crop, 1, m, None, alone)}
        for key, value in fresh.items():
            assert np.allclose(got[key], value, rtol=1e-6, atol=1e-7), key
        assert got["deletion_curve"][0] == got["insertion_curve"][-1] == np.float32(predictions[0, 1])


def test_deletion_passes_counts_the_images_deletion_and_insertion_run(tiny_model, tiny_crop):
    """What make bench counts as the evaluation's floor: on a 32 x 32 map with 4 steps (256 pixels a step), no ties
    cost 3 images a curve; two tied halves only the half-way image; 16 tied columns of 2 x 32 pixels (64 each) are
    cut by no step (256 is 4 columns); 3 tied bands of 384, 320 and 320 pixels are each cut by a step, and the
    groups' ends between 0 and 1,024 pixels are 384 and 704: 2 images a curve."""
    counting = wrap(Counting(tiny_model.module), classes=3)
    runs = counting.outputs
    spec = EvaluateSpec(deletion=DeletionSpec(steps=4, baseline="zero"), road=None)
    bands = np.repeat([3.0, 2.0, 1.0], [12, 10, 10])[:, None] * np.ones((1, 32))
    cases = {"no ties": (np.arange(1024.0).reshape(32, 32), 2 * 3),
             "halves": (np.repeat([[1.0], [0.0]], 16, 0) * np.ones((1, 32)), 2 * 1),
             "columns": (np.repeat(np.arange(16.0), 2)[None] * np.ones((32, 1)), 2 * 3),
             "bands": (bands, 2 * 2)}
    for name, (saliency, expected) in cases.items():
        s = ev.EvaluationSettings(spec, seed=0, device=CPU)
        for end in (tiny_crop, ev.baseline_image(tiny_crop, "zero")):  # the ends, known as in a task
            ev.known_probabilities(counting, end, s)
        runs.seen.clear()
        ev.deletion_insertion(counting, tiny_crop, 1, saliency, None, s)
        assert ev.deletion_passes(saliency, 4) == len(runs.seen) == expected, name


class ScaledAfterHead(BatchNormNet):
    """Its output block (fc) is not the last thing its forward runs: the head's inputs alone do not give its output."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("method", ["lime", "scorecam"])
def test_a_walks_first_step_reuses_the_explanations_passes_and_gives_the_same_numbers(tiny_crop, monkeypatch, method):
    """The first step randomises the output block alone, so the explanation's inputs to that block are all it needs:
    every batch of the step is replayed through the randomised block, and the numbers are those of running the
    randomised model in full, to the bit."""
    from report_builder.explanation.methods import EXPLAINERS, ExplainSettings

    torch.manual_seed(0)
    m = wrap(BatchNormNet())
    explain = ExplainSpec(lime=LimeSpec(num_samples=24, batch_size=8))
    keeping, kept = blocks.keeping_head_inputs(m)
    original = {**EXPLAINERS[method](keeping, tiny_crop, 1, ExplainSettings(explain, 0, CPU)), "target": 1}
    head_inputs = kept()
    assert head_inputs is not None and head_inputs["inputs"].shape[1:] == (8,)  # fc's input, per image
    # one input per perturbed image: LIME's samples, ScoreCAM's distinct masked images
    assert head_inputs["rows"].sum() == len(head_inputs["inputs"]) == (24 if method == "lime" else
                                                                        original["passes"] - 1)
    # the explanation is unchanged by keeping
    plain = EXPLAINERS[method](m, tiny_crop, 1, ExplainSettings(explain, 0, CPU))
    assert np.array_equal(plain["map"], original["map"])

    spec = EvaluateSpec(sanity=SanitySpec(images=1, steps=3, seeds=2))
    made, replaying = [], ev.replaying_head_inputs
    monkeypatch.setattr(ev, "replaying_head_inputs", lambda *a: made.append(replaying(*a)) or made[-1])
    reused = ev.sanity_check(m, tiny_crop, method, explain, spec, 0, "cpu", {**original, "head_inputs": head_inputs})
    assert len(made) == 1 and made[0].outputs.replayed == len(head_inputs["rows"])  # every batch of step 1
    anew = ev.sanity_check(m, tiny_crop, method, explain, spec, 0, "cpu", original)
    assert len(made) == 1  # without kept inputs nothing is replayed
    assert reused["spearman"] == anew["spearman"] and reused["ssim"] == anew["ssim"]
    assert reused["runs"] == anew["runs"] and np.array_equal(reused["maps"], anew["maps"])


def test_a_model_whose_output_block_is_not_last_keeps_nothing(tiny_crop):
    from report_builder.explanation.methods import EXPLAINERS, ExplainSettings

    torch.manual_seed(0)
    keeping, kept = blocks.keeping_head_inputs(wrap(ScaledAfterHead()))
    EXPLAINERS["scorecam"](keeping, tiny_crop, 1, ExplainSettings(ExplainSpec(), 0, CPU))
    assert kept() is None
