"""The `colors` concept scorer: the fraction of each image's pixels nearest (in CIE Lab) to each of the 11 Broden
colour names (data/colors.py), an offline stand-in for CLIP.

It loads nothing; its tasks count the colours of each probe shard's images, scaled down; its block of the
concept scores is those fractions.
"""
from __future__ import annotations

import numpy as np
import torch

from report_builder.data.colors import color_fractions
from report_builder.data.concepts import BRODEN_COLORS
from report_builder.data.probe import Pixels, ProbeSet, Thumbnail, cut_batches
from report_builder.dissection.scorers import ScorerPlan
from report_builder.pipeline.progress import current

CODE_VERSION = 3

COLOR_VIEW = Thumbnail(128)  # colours are counted on the whole image, scaled down


def colors_task(pixels: dict[str, list[np.ndarray]]) -> np.ndarray:
    """Per probe image (cut by probe.pixels_task), the fraction of its pixels named by each Broden colour
    (images x 11)."""
    return color_table(pixels[COLOR_VIEW.key])


def color_table(pixels: Pixels) -> np.ndarray:
    rows = []
    for batch in current().track(cut_batches(pixels, COLOR_VIEW, 64), "colours", -(-len(pixels) // 64), "batches"):
        rows.extend(color_fractions(small) for small in batch)
    return np.stack(rows).astype(np.float32)


def colors_scores(probe: ProbeSet) -> torch.Tensor:
    return torch.from_numpy(color_table(probe))


# ---------------------------------------------------------------- the registry's three functions


def plan(spec, scorer, where: str, device: torch.device) -> ScorerPlan:
    return ScorerPlan("colors", "pixel colours",
                      "fraction of pixels nearest (in CIE Lab) to each of the 11 Broden colour names — an offline "
                      "stand-in for CLIP", list(BRODEN_COLORS), COLOR_VIEW)


def tasks(g, sc: ScorerPlan, shards, pixel_keys: list[str], dev: str, batch: int) -> dict:
    """The colour fractions, a task per probe shard."""
    return {"images": [g.add("color-scores", colors_task, f"colour scores {j}",
                             {"probe": s.manifest, "code_version": CODE_VERSION}, {}, {"pixels": pk}, shape=np.ndarray)
                       for j, (s, pk) in enumerate(zip(shards, pixel_keys))]}


def combine(scorer: dict, images: np.ndarray, parts: dict) -> np.ndarray:
    return images
