"""IoU and binarisation on hand-made masks with known answers."""
import math

import numpy as np
import pytest

from report_builder.explanation.agreement import compare, iou, threshold_mask, top_n_mask
from report_builder.report import analysis


def test_iou_of_overlapping_squares():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0:2, 0:2] = True  # 4 pixels
    b[1:3, 1:3] = True  # 4 pixels, 1 shared
    assert iou(a, b) == pytest.approx(1 / 7)


def test_iou_identical_disjoint_and_empty():
    a = np.eye(3, dtype=bool)
    assert iou(a, a) == 1.0
    assert iou(a, ~a) == 0.0
    assert math.isnan(iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)))


def test_iou_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        iou(np.zeros((2, 2), bool), np.zeros((3, 3), bool))


def test_top_n_keeps_exactly_n_highest_with_ties_in_pixel_order():
    s = np.array([[0.9, 0.5], [0.5, 0.1]])
    assert top_n_mask(s, 1).tolist() == [[True, False], [False, False]]
    # two pixels tie at 0.5 for the second place: the earlier one (row-major) wins
    assert top_n_mask(s, 2).tolist() == [[True, True], [False, False]]
    assert top_n_mask(s, 10).sum() == 4


def test_threshold_scales_to_unit_interval_first():
    s = np.array([[2.0, 4.0], [6.0, 10.0]])  # scaled: 0, .25, .5, 1
    assert threshold_mask(s, 0.5).tolist() == [[False, False], [True, True]]
    assert threshold_mask(np.ones((2, 2)), 0.5) is None


def test_compare_hand_computed_case():
    lime = np.zeros((4, 4), bool)
    lime[0, :] = True  # 4 pixels in the top row
    cam = np.zeros((4, 4))
    cam[0, 0:2] = 1.0
    cam[3, 3] = 0.8
    cam[3, 2] = 0.6
    row = compare(lime, cam, (0.3, 0.7))
    # top-4 of cam: (0,0),(0,1),(3,3),(3,2): 2 shared of 6 in the union
    assert row["lime_pixels"] == 4
    assert row["iou"] == pytest.approx(2 / 6)
    # >= 0.3 keeps the same 4 pixels; >= 0.7 keeps (0,0),(0,1),(3,3)
    assert row["iou@0.3"] == pytest.approx(2 / 6)
    assert row["iou@0.7"] == pytest.approx(2 / 5)


def test_compare_flat_cam_and_empty_lime_are_undefined():
    lime = np.zeros((3, 3), bool)
    lime[1, 1] = True
    row = compare(lime, np.zeros((3, 3)), (0.5,))
    assert row["flat_cam"] and math.isnan(row["iou"]) and math.isnan(row["iou@0.5"])
    row = compare(np.zeros((3, 3), bool), np.arange(9.0).reshape(3, 3), (0.5,))
    assert math.isnan(row["iou"])


def _ranking_results(ious_a, ious_b):
    rows = [{"image": f"im{i}", "model": "m", "method_a": "lime", "method_b": b, "iou": v}
            for b, values in (("gradcam", ious_a), ("scorecam", ious_b)) for i, v in enumerate(values)]
    summary = [{"model": "m", "method_b": b, "mean_iou": float(np.mean(v)),
                **analysis._mean_interval(list(v), "mean_iou")} for b, v in (("gradcam", ious_a), ("scorecam", ious_b))]
    return {"models": [{"id": "m", "display": "M"}], "agreement": {"rows": rows, "summary": summary}}


def test_cam_ranking_ranks_only_a_significant_difference():
    from report_builder.report import analysis

    rng = np.random.default_rng(0)
    few = analysis._cam_ranking_findings(_ranking_results([0.5, 0.6, 0.4, 0.55, 0.45], [0.4, 0.5, 0.3, 0.45, 0.35]))
    # 5 images: the signed-rank test cannot go below p = 0.0625, so not even a constant gap of 0.1 is ranked
    assert "within noise" in few[0]["text"] and "over 5 images" in few[0]["text"]
    a = rng.uniform(0.4, 0.6, 20)
    many = analysis._cam_ranking_findings(_ranking_results(list(a), list(a - 0.1 + rng.normal(0, 0.01, 20))))
    assert "agrees best" in many[0]["text"] and "higher by 0.10" in many[0]["text"] and "over 20 images" in many[0]["text"]
    assert many[0]["numbers"]["difference"]["significant"]
    s = _ranking_results(list(a), list(a))["agreement"]["summary"][0]
    assert s["mean_iou_low"] < s["mean_iou"] < s["mean_iou_high"]
