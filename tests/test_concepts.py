"""Concept attribution (explanation/concepts.py) on planted truth: a model whose class-3 logit reads only units 5 and
9 of a layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from report_builder.explanation import concepts
from report_builder.report import concepts as report_concepts
from report_builder.explanation.methods import tail_after
from report_builder.explanation.registry import ATTRIBUTIONS

from conftest import wrap

UNITS = 16
PLANTED = (5, 9)
TARGET = 3
SETTINGS = {"attribution": "gradcam_terms", "ks": [1, 2, 5], "draws": 30, "top_units": 4}


class Planted(nn.Module):
    """features: 16 non-negative units; the head reads units 5 and 9 for class 3 and nothing for the others, so
    class 3 wins and only those two units carry it."""

    def __init__(self, skip: bool = False, batch_read: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, UNITS, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            self.features[0].bias.fill_(0.5)  # every unit fires on every image
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(UNITS, 5)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            self.fc.weight[TARGET, list(PLANTED)] = 6.0
        self.skip = skip  # a forward that is not the children in order: the tail cannot stand in for it
        self.batch_read = batch_read  # and one that reshapes by the batch size of its input

    def forward(self, x):
        out = self.fc(self.pool(self.features(x)).flatten(1))
        if self.batch_read:
            out = out.reshape(len(x), -1)
        return out + x.mean() if self.skip else out  # the same shift of every logit: the same softmax


def _run(skip: bool = False, attribution: str = "gradcam_terms", batch_read: bool = False) -> dict:
    model = wrap(Planted(skip, batch_read), classes=5)
    crop = np.random.default_rng(0).integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    x = model.preprocess.normalize(crop[None], torch.device("cpu"))
    raw, maps, grads, logits = concepts.layer_terms(model, x, ["features"], TARGET)
    assert int(logits.argmax()) == TARGET
    return concepts.attribute_layer(model, x, "features", raw["features"], maps["features"], grads["features"],
                                    logits, TARGET, {**SETTINGS, "attribution": attribution}, seed=0)


@pytest.mark.parametrize("attribution", sorted(ATTRIBUTIONS))
def test_planted_units_rank_first_and_carry_the_whole_share(attribution):
    r = _run(attribution=attribution)
    order = concepts.ranking(r["contribution"].astype(np.float64))
    assert set(order[:2]) == set(PLANTED)
    share = concepts.shares(r["contribution"].astype(np.float64))
    assert share[list(PLANTED)].sum() == pytest.approx(1.0)
    assert set(r["shown"][:2]) == set(PLANTED)


def test_gradcam_terms_add_up_to_the_gradcam_map():
    r = _run()
    # Grad-CAM at the layer is ReLU(sum of the channel terms); every term is positive here, so the sums agree
    assert r["contribution"].sum() == pytest.approx(float(r["cam"].sum()), rel=1e-5)


def test_ablating_the_planted_units_beats_random_by_a_wide_margin():
    r = _run()
    k2 = r["ks"].index(2)
    top = r["drops"]["top"][k2][0]
    random = np.asarray(r["drops"]["random"][k2])
    assert len(random) == SETTINGS["draws"]
    assert top > 0.5  # class 3 loses its only evidence
    assert top > random.mean() + 0.4
    # a random pair is the planted pair 1 time in 120: at most a draw or two of 30 reach the top's drop
    assert report_concepts.empirical_p(top, random) <= 0.1


def test_the_tail_the_broadcast_and_the_whole_model_give_the_same_drops():
    fast, broadcast, hooked = _run(), _run(skip=True), _run(skip=True, batch_read=True)
    # the layers before run once where the model's rows stay apart; a reshape by the input's batch size mixes them
    assert (fast["forward"], broadcast["forward"], hooked["forward"]) == ("tail", "broadcast", "model")
    for name in fast["drops"]:
        np.testing.assert_allclose(fast["drops"][name], broadcast["drops"][name], atol=1e-5)
        np.testing.assert_allclose(fast["drops"][name], hooked["drops"][name], atol=1e-5)


def test_seeded_and_deterministic():
    a, b = _run(), _run()
    for name in a["drops"]:
        assert a["drops"][name] == b["drops"][name]
    np.testing.assert_array_equal(a["contribution"], b["contribution"])


def test_k_is_capped_by_the_layer_and_random_sets_have_k_distinct_units():
    model = wrap(Planted(), classes=5)
    crop = np.zeros((32, 32, 3), dtype=np.uint8)
    x = model.preprocess.normalize(crop[None], torch.device("cpu"))
    raw, maps, grads, logits = concepts.layer_terms(model, x, ["features"], TARGET)
    r = concepts.attribute_layer(model, x, "features", raw["features"], maps["features"], grads["features"], logits,
                                 TARGET, {**SETTINGS, "ks": [3, 50]}, seed=1)
    assert r["ks"] == [3, UNITS]
    assert np.allclose(r["drops"]["top"][1], r["drops"]["random"][1])  # every unit ablated, whichever way chosen
    for sets in (concepts.random_units(np.zeros(UNITS), 4, np.random.default_rng(0), 10)):
        assert len(set(sets.tolist())) == 4


def test_empirical_p_counts_ties_against_the_explanation():
    assert report_concepts.empirical_p(1.0, np.array([0.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert report_concepts.empirical_p(1.0, np.array([1.0, 0.0, 2.0])) == pytest.approx(0.75)


def test_tail_used_by_the_ablation_is_the_models_own():
    model = wrap(Planted(), classes=5)
    assert tail_after(model, "features") is not None


@pytest.mark.parametrize("name, layer, forward", [
    ("mobilenet_v3_small", "features.9", "tail"),  # its head: pool, then a Sequential that starts with a Linear
    ("mobilenet_v2", "features.17", "broadcast"),  # pools and flattens inside its forward, which no tail can see
])
def test_a_torchvision_model_runs_the_fastest_way_its_forward_allows_with_the_same_drops(name, layer, forward):
    import torchvision

    torch.manual_seed(0)
    model = wrap(getattr(torchvision.models, name)().eval(), size=64, classes=1000, layer=layer)
    x = torch.rand(1, 3, 64, 64)
    raw, maps, grads, logits = concepts.layer_terms(model, x, [layer], 0)
    r = concepts.attribute_layer(model, x, layer, raw[layer], maps[layer], grads[layer], logits, 0, SETTINGS, seed=1)
    assert r["forward"] == forward
    # against the whole model on one copy of the image per set, each with its ablated output hooked in
    fast, hooked = (concepts.Ablator(model, layer, x, raw[layer], logits, 0) for _ in range(2))
    hooked.tail, hooked.forward = None, "model"
    sets = concepts.random_units(r["activation"], 5, np.random.default_rng(0), 8)
    np.testing.assert_allclose(fast.probabilities(sets), hooked.probabilities(sets), rtol=1e-4, atol=1e-7)
    # concepts.batch_size sets only how many ablated copies share a pass
    np.testing.assert_allclose(fast.probabilities(sets, 3), fast.probabilities(sets), rtol=1e-6, atol=1e-9)


def test_the_planted_units_labels_lead_the_concept_list():
    from report_builder.pipeline.collect import _unit_row, concept_groups

    r = _run()
    clip = {u: {"label": f"texture{u % 3}", "scorer": "colours", "similarity": 0.1} for u in range(UNITS)}
    for u in PLANTED:
        clip[u] = {"label": "stripes", "scorer": "colours", "similarity": 0.9}
    nd = {u: {"label": "sky", "category": "scene", "iou": 0.01, "detector": False} for u in range(UNITS)}
    nd[9] = {"label": "cat", "category": "object", "iou": 0.2, "detector": True}
    contribution = r["contribution"].astype(np.float64)
    share = concepts.shares(contribution)
    units = [_unit_row(int(u), i + 1, r, share, clip, nd) for i, u in enumerate(concepts.ranking(contribution))]
    groups = concept_groups(units, "label")
    assert groups[0]["label"] == "stripes" and sorted(groups[0]["units"]) == list(PLANTED)
    assert groups[0]["share"] == pytest.approx(1.0)
    detected = concept_groups(units, "netdissect_label")
    assert [g["label"] for g in detected] == ["cat"]  # Network Dissection: detectors only


def _record(model: str, image: str, cls: int, top: list[float], random: list[list[float]], labels: dict) -> dict:
    return {"model": model, "image": image, "layer": "features", "units": UNITS, "target_class": cls,
            "target_name": f"class{cls}",
            "concepts": [{"label": k, "share": v, "units": []} for k, v in labels.items()],
            "ablation": {"ks": [1, 2], "draws": len(random[0]), "top": top,
                         "baselines": {"random": random, "activation": [[t / 2] for t in top]}}}


def _section(records: list[dict]) -> dict:
    from report_builder.explanation.registry import ABLATION_BASELINES

    return {"records": records, "attribution": "Grad-CAM channel terms", "label_source": "clip-dissect",
            "settings": {"top_units": 5},
            "baselines": [{"name": b.name, "title": b.title, "draws": b.draws, "bar": b.bar}
                          for b in ABLATION_BASELINES.values()]}


def test_the_ablation_test_beats_random_only_when_the_top_units_beat_every_set():
    from report_builder.report import concepts as analysis

    rng = np.random.default_rng(0)
    noise = lambda: rng.normal(0, 0.01, size=30).tolist()  # noqa: E731
    # k = 1: the top unit's drop is far above every random set; k = 2: it is one of them
    records = [_record("m", f"im{i}", 3, [0.5, 0.0], [noise(), noise()], {"stripes": 0.8}) for i in range(4)]
    rows = {r["k"]: r for r in analysis.ablation_summary(_section(records))}
    assert rows[1]["verdict"] == "beats random" and rows[1]["p_value"] == pytest.approx(1 / 31)
    assert rows[1]["images_beating"] == 4
    assert rows[2]["verdict"] == "fails" and rows[2]["p_value"] > 0.05
    assert rows[1]["top"] == pytest.approx(0.5) and rows[1]["top_low"] <= 0.5 <= rows[1]["top_high"]
    text = " ".join(f["text"] for f in analysis.findings({"concepts": {**_section(records), "ablation": list(rows.values())},
                                                          "models": [{"id": "m", "display": "M"}]}))
    # the sentence states k = 2 (nearest 5), which fails, and names the k that beats random
    assert "It fails at features" in text and "With other k the verdict differs: k = 1 at features beats random" in text


def test_the_profile_averages_each_class_over_its_images():
    from report_builder.report import concepts as analysis

    flat = [[0.0] * 30, [0.0] * 30]
    records = [_record("m", "a", 3, [0.1, 0.1], flat, {"stripes": 0.6, "fur": 0.2}),
               _record("m", "b", 3, [0.1, 0.1], flat, {"fur": 0.4}),
               _record("m", "c", 1, [0.1, 0.1], flat, {"sky": 0.9})]
    profiles = {p["class_index"]: p for p in analysis.profiles(_section(records))}
    three = {c["label"]: c for c in profiles[3]["concepts"]}
    assert profiles[3]["images"] == 2
    assert three["stripes"]["share"] == pytest.approx(0.3) and three["stripes"]["images"] == 1
    assert three["fur"]["share"] == pytest.approx(0.3) and three["fur"]["images"] == 2
    assert [c["label"] for c in profiles[1]["concepts"]] == ["sky"]


def test_top_pixels_iou_on_hand_made_maps():
    from report_builder.pipeline.collect import top_pixels_iou

    a = np.zeros((10, 10), np.float32)
    a[0:2] = 1.0  # rows 0-1: exactly the top 20% of pixels
    b = np.zeros((10, 10), np.float32)
    b[1:3] = 1.0  # rows 1-2: shares row 1 with a
    assert top_pixels_iou(a, b) == pytest.approx(10 / 30)
    lime = np.zeros((10, 10), np.float32)
    lime[0, :] = 0.5  # 10 weighted pixels and 90 at zero: the cut falls on zero, so only the 10 count
    assert top_pixels_iou(a, lime) == pytest.approx(10 / 20)
    small = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)  # a layer map, upsampled to the other's size
    corner, far = np.zeros((10, 10), np.float32), np.zeros((10, 10), np.float32)
    corner[:5, :5], far[5:, 5:] = 1.0, 1.0
    assert top_pixels_iou(small, far) == 0.0 and top_pixels_iou(small, corner) > 0.5
    assert top_pixels_iou(small, np.ones((10, 10), np.float32)) is None  # a flat map marks nothing


@pytest.mark.parametrize("images, leads", [(8, True), (2, False)])
def test_the_profile_finding_ranks_two_concepts_only_beyond_noise(images, leads):
    from report_builder.report import concepts as analysis

    flat = [[0.0] * 30, [0.0] * 30]
    shares = [{"stripes": 0.6 + 0.01 * i, "fur": 0.2} for i in range(images)]
    records = [_record("m", f"im{i}", 3, [0.1, 0.1], flat, s) for i, s in enumerate(shares)]
    section = {**_section(records), "ablation": analysis.ablation_summary(_section(records))}
    text = next(f["text"] for f in analysis.findings({"concepts": section, "models": [{"id": "m", "display": "M"}]})
                if f["id"] == "concepts-profile-m")
    stripes = next(c for c in analysis.mean_shares(records, 3) if c["label"] == "stripes")
    assert stripes["low"] <= stripes["share"] <= stripes["high"]
    assert f"stripes ({100 * stripes['share']:.0f}% [{100 * stripes['low']:.0f}%, {100 * stripes['high']:.0f}%])" in text
    assert ("stripes leads fur beyond noise" in text) == leads
    assert ("within noise of each other" in text) == (not leads)
