"""How far two explanations agree: IoU of binary masks, with the binarisation spelled out.

LIME gives a binary mask (its positive superpixels among the top `num_features`). A CAM gives a
saliency map in [0, 1]. Two ways to make the CAM binary:

- top-n (the default): keep the n pixels with the highest saliency, n = the number of pixels in
  the LIME mask, so both masks cover the same area and IoU measures placement, not size;
- threshold t: keep the pixels with saliency >= t (after min-max scaling to [0, 1]).
"""
from __future__ import annotations

import math

import numpy as np

DEFINITION = (
    "IoU = |A ∩ B| / |A ∪ B| between the LIME mask A (the positive superpixels among LIME's top "
    "num_features) and a binary CAM mask B. Default binarisation (top-n): B keeps the n CAM pixels with "
    "the highest saliency, n = |A|, so both masks cover the same area. At a threshold t, B keeps the "
    "pixels whose min-max-scaled saliency is at least t. A flat CAM map or an empty LIME mask has no "
    "defined IoU and is shown as —."
)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape; NaN when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    a = a.astype(bool)
    b = b.astype(bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return math.nan
    return float(np.logical_and(a, b).sum() / union)


def scale01(saliency: np.ndarray) -> np.ndarray | None:
    """Min-max scale to [0, 1]; None for a flat map, which ranks no pixel above another."""
    s = saliency.astype(np.float64)
    lo, hi = s.min(), s.max()
    if hi - lo <= 1e-12:
        return None
    return (s - lo) / (hi - lo)


def top_n_mask(saliency: np.ndarray, n: int) -> np.ndarray:
    """The n highest pixels. Ties at the cut are broken by pixel order (row-major), so the result
    is deterministic and has exactly n pixels."""
    flat = saliency.ravel()
    n = int(max(0, min(n, flat.size)))
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:n]] = True
    return mask.reshape(saliency.shape)


def threshold_mask(saliency: np.ndarray, t: float) -> np.ndarray | None:
    scaled = scale01(saliency)
    return None if scaled is None else scaled >= t


def compare(lime_mask: np.ndarray, cam: np.ndarray, thresholds: tuple[float, ...]) -> dict:
    """All agreement numbers for one (LIME mask, CAM map) pair."""
    lime_mask = lime_mask.astype(bool)
    n = int(lime_mask.sum())
    flat = scale01(cam) is None
    row = {
        "lime_pixels": n,
        "iou": math.nan if flat or n == 0 else iou(lime_mask, top_n_mask(cam, n)),
        "flat_cam": flat,
    }
    for t in thresholds:
        b = threshold_mask(cam, t)
        row[f"iou@{t:g}"] = math.nan if b is None or n == 0 else iou(lime_mask, b)
    return row
