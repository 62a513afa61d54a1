"""Each explainer on tiny models: shapes, ranges, a planted ground truth, and LIME's determinism."""
import time

import numpy as np
import pytest
import torch
from torch import nn

from conftest import wrap
from report_builder.explanation.agreement import iou, top_n_mask
from report_builder.explanation.methods import EXPLAINERS, ExplainSettings, top_k
from report_builder.models.outputs import class_probabilities
from report_builder.spec.schema import ExplainSpec, LimeSpec

CPU = torch.device("cpu")


def settings(**lime) -> ExplainSettings:
    return ExplainSettings(ExplainSpec(lime=LimeSpec(num_samples=60, batch_size=20, **lime)), seed=0, device=CPU)


@pytest.mark.parametrize("method", sorted(EXPLAINERS))
def test_each_explainer_gives_a_map_at_input_resolution(method, tiny_model, tiny_crop):
    out = EXPLAINERS[method](tiny_model, tiny_crop, 1, settings())
    assert out["map"].shape == (32, 32)
    assert out["map"].dtype == np.float32
    assert 0.0 <= out["map"].min() and out["map"].max() <= 1.0
    assert out["seconds"] > 0
    if method == "lime":
        assert out["mask"].shape == (32, 32) and out["mask"].dtype == bool
        assert out["num_segments"] == len(np.unique(out["segments"]))
        assert -1.0 <= out["score"] <= 1.0


class BrightSpot(nn.Module):
    """Class 1's logit is the mean brightness of the red channel: evidence sits where red is."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].bias.zero_()
            self.features[0].weight[0, 0] = 1.0  # channel 0 copies red
            self.features[0].weight[1, 2] = 1.0  # channel 1 copies blue
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def planted_image() -> tuple[np.ndarray, np.ndarray]:
    crop = np.zeros((32, 32, 3), np.uint8)
    crop[..., 2] = 15  # dim blue everywhere: evidence for class 0, weaker than the red square
    truth = np.zeros((32, 32), bool)
    truth[4:14, 18:28] = True
    crop[truth, 0] = 255  # a red square: the only evidence for class 1
    return crop, truth


@pytest.mark.parametrize("method", sorted(EXPLAINERS))
def test_every_method_finds_the_planted_evidence(method):
    model = wrap(BrightSpot(), classes=2)
    crop, truth = planted_image()
    assert class_probabilities(model, crop[None], CPU)[0].argmax() == 1
    # hide with black: LIME's default (each superpixel's mean colour) cannot hide a uniform region
    lime = {"hide_color": 0, "segmentation": {"algorithm": "slic", "n_segments": 16, "compactness": 20}}
    out = EXPLAINERS[method](model, crop, 1, settings(**lime))
    found = out["mask"] if method == "lime" else top_n_mask(out["map"], int(truth.sum()))
    assert iou(found, truth) > 0.6


def test_lime_is_deterministic_and_seeded(tiny_model, tiny_crop):
    a = EXPLAINERS["lime"](tiny_model, tiny_crop, 0, settings())
    b = EXPLAINERS["lime"](tiny_model, tiny_crop, 0, settings())
    assert np.array_equal(a["mask"], b["mask"]) and np.array_equal(a["segments"], b["segments"])
    assert a["score"] == b["score"]
    other = ExplainSettings(settings().explain, seed=1, device=CPU)
    c = EXPLAINERS["lime"](tiny_model, tiny_crop, 0, other)
    assert c["score"] != a["score"]


def test_lime_segments_a_crop_once_per_process_and_still_times_the_segmentation(tiny_model, tiny_crop, monkeypatch):
    # the sanity check's steps and the sweep's settings explain one crop many times
    from report_builder.explanation import methods

    monkeypatch.setattr(methods, "_SEGMENTS", {})
    calls = []
    segmenter = methods.lime_segmenter

    def slow_segmenter(s):
        def segment(crop):
            calls.append(crop.shape)
            time.sleep(0.2)
            return segmenter(s)(crop)
        return segment

    monkeypatch.setattr(methods, "lime_segmenter", slow_segmenter)
    first, again = (methods.lime_explain(tiny_model, tiny_crop, 0, settings()) for _ in range(2))
    assert len(calls) == 1 and again["seconds"] >= 0.2  # its seconds count the segmentation it was handed
    assert np.array_equal(first["segments"], again["segments"]) and np.array_equal(first["mask"], again["mask"])
    methods.lime_explain(tiny_model, tiny_crop, 0, settings(segmentation={"algorithm": "slic", "n_segments": 12}))
    methods.lime_explain(tiny_model, 255 - tiny_crop, 0, settings())
    assert len(calls) == 3  # another segmentation, another crop: segmented anew


def test_top_k_orders_by_probability():
    probs = np.array([0.1, 0.6, 0.3])
    out = top_k(probs, ["a", "b", "c"], 2)
    assert [p["class_name"] for p in out] == ["b", "c"] and out[0]["rank"] == 1
    assert out[0]["probability"] == pytest.approx(0.6)


class SignedNet(nn.Module):
    """Like TinyNet, but its last block ends in a conv: activations go negative, which makes grad-cam
    ablate with its running-minimum values instead of zeros."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.mark.parametrize("net, batch", [("tiny", 32), ("tiny", 3), ("signed", 32), ("signed", 3)])
def test_fast_ablation_cam_equals_grad_cam(net, batch, tiny_crop):
    from report_builder.explanation.methods import PACKAGE_CAMS, ablation_cam
    from report_builder.spec.schema import CamSpec

    torch.manual_seed(3)
    model = wrap(__import__("conftest").TinyNet() if net == "tiny" else SignedNet())
    s = ExplainSettings(ExplainSpec(cam=CamSpec(batch_size=batch)), seed=0, device=CPU)
    ours = ablation_cam(model, tiny_crop, 2, s)["map"]
    reference = PACKAGE_CAMS["ablationcam"](model, tiny_crop, 2, s)["map"]
    assert ours.shape == reference.shape and np.abs(ours - reference).max() < 1e-4


def test_fast_ablation_cam_inside_a_sequential_block(tiny_model, tiny_crop):
    from report_builder.explanation.methods import PACKAGE_CAMS, ablation_cam, tail_after

    tiny_model.target_layer = "features.2"  # the last conv, before the block's final ReLU
    assert tail_after(tiny_model, "features.2") is not None
    s = settings()
    assert np.abs(ablation_cam(tiny_model, tiny_crop, 0, s)["map"] - PACKAGE_CAMS["ablationcam"](tiny_model, tiny_crop, 0, s)["map"]).max() < 1e-4


class Branchy(nn.Module):
    """A block that is not nn.Sequential: there is no tail to run, so grad-cam's own AblationCAM is used."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"a": nn.Conv2d(3, 4, 3, padding=1), "b": nn.Conv2d(3, 4, 1)})
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.block["a"](x) + self.block["b"](x))
        return self.fc(y.mean(dim=(2, 3)))


def test_fast_ablation_cam_falls_back_outside_sequential_containers(tiny_crop):
    from report_builder.explanation.methods import PACKAGE_CAMS, ablation_cam, tail_after

    torch.manual_seed(0)
    model = wrap(Branchy(), classes=2, layer="block.a")
    assert tail_after(model, "block.a") is None
    s = settings()
    assert np.abs(ablation_cam(model, tiny_crop, 1, s)["map"] - PACKAGE_CAMS["ablationcam"](model, tiny_crop, 1, s)["map"]).max() < 1e-6


@pytest.mark.parametrize("segmentation", [{"algorithm": "quickshift", "kernel_size": 2},
                                          {"algorithm": "slic", "n_segments": 12},
                                          {"algorithm": "felzenszwalb", "scale": 20}])
def test_fast_lime_equals_the_lime_package(segmentation, tiny_model, tiny_crop):
    from report_builder.explanation.methods import lime_explain, lime_package_explain

    s = settings(segmentation=segmentation)
    ours = lime_explain(tiny_model, tiny_crop, 1, s)
    reference = lime_package_explain(tiny_model, tiny_crop, 1, s, batch_size=7)  # batching changes nothing
    assert np.array_equal(ours["segments"], reference["segments"])
    assert np.array_equal(ours["mask"], reference["mask"])
    assert ours["score"] == pytest.approx(reference["score"], abs=1e-5)  # forward passes of other batch sizes round differently
    assert np.allclose(ours["map"], reference["map"], atol=1e-4)


def test_fast_lime_with_a_hide_colour(tiny_model, tiny_crop):
    from report_builder.explanation.methods import lime_explain, lime_package_explain

    s = settings(hide_color=(0, 128, 255))
    assert np.array_equal(lime_explain(tiny_model, tiny_crop, 0, s)["mask"],
                          lime_package_explain(tiny_model, tiny_crop, 0, s)["mask"])


class DeadAndTwinChannels(SignedNet):
    """SignedNet's head on eight channels at the target layer: 0-2 dead (always zero), 3 a constant 5, 4 and 5 the
    same map (twins), 6 and 7 maps of their own. ScoreCAM's masks: one all-zero mask for 0-3, one for 4-5, and 6
    and 7: four distinct masked images."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            conv = self.features[0]
            conv.weight[:4] = 0
            conv.bias[:3] = -1.0
            conv.bias[3] = 5.0
            conv.weight[5] = conv.weight[4]
            conv.bias[5] = conv.bias[4]


@pytest.mark.parametrize("net, batch", [("tiny", 32), ("tiny", 3), ("signed", 5), ("twins", 2)])
def test_our_score_cam_equals_grad_cam(net, batch, tiny_crop):
    from report_builder.explanation.methods import PACKAGE_CAMS, score_cam
    from report_builder.spec.schema import CamSpec

    torch.manual_seed(3)
    modules = {"tiny": lambda: __import__("conftest").TinyNet(), "signed": SignedNet, "twins": DeadAndTwinChannels}
    model = wrap(modules[net]())
    model.target_layer = "features"
    s = ExplainSettings(ExplainSpec(cam=CamSpec(batch_size=batch)), seed=0, device=CPU)
    for target in range(3):
        ours = score_cam(model, tiny_crop, target, s)
        reference = PACKAGE_CAMS["scorecam"](model, tiny_crop, target, s)["map"]
        assert ours["map"].shape == reference.shape and np.abs(ours["map"] - reference).max() < 1e-5
        assert ours["channels"] == 8
    if net == "twins":  # the planted duplicates are run once: 1 pass for the activations, 4 masked images
        assert ours["passes"] == 1 + 4
