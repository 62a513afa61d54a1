"""Colour naming: each pixel takes the name of the nearest of the 11 Broden colour prototypes, in CIE Lab.

Pure functions of pixels (numpy, skimage), read by the colour concept scorer (dissection/scorers/colors.py) and
by the colour labels Network Dissection adds to images that have none (data/pixel_labels.py).
"""
from __future__ import annotations

import functools

import numpy as np

from report_builder.data.concepts import BRODEN_COLORS

# Prototype sRGB values of the 11 colour names; a pixel takes the name of the nearest prototype in CIE Lab.
COLOR_PROTOTYPES = {
    "black": (0, 0, 0), "blue": (0, 0, 255), "brown": (139, 69, 19), "green": (0, 128, 0),
    "grey": (128, 128, 128), "orange": (255, 165, 0), "pink": (255, 192, 203), "purple": (128, 0, 128),
    "red": (255, 0, 0), "white": (255, 255, 255), "yellow": (255, 255, 0),
}


@functools.cache
def _prototypes_lab() -> np.ndarray:
    """The colour prototypes in CIE Lab, computed once rather than for every probe image."""
    from skimage.color import rgb2lab

    rgb = np.array([COLOR_PROTOTYPES[c] for c in BRODEN_COLORS], np.uint8).reshape(-1, 1, 3)
    return rgb2lab(rgb).reshape(-1, 3)


def name_colors(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> HxW index into BRODEN_COLORS: each pixel named by the nearest prototype in CIE Lab."""
    from skimage.color import rgb2lab

    lab = rgb2lab(image.reshape(-1, 1, 3)).reshape(-1, 3)
    nearest = np.argmin(((lab[:, None, :] - _prototypes_lab()[None]) ** 2).sum(-1), axis=1)
    return nearest.reshape(image.shape[:2])


def color_fractions(image: np.ndarray) -> np.ndarray:
    """The fraction of pixels named by each Broden colour, in BRODEN_COLORS order."""
    nearest = name_colors(image).ravel()
    return np.bincount(nearest, minlength=len(BRODEN_COLORS)) / nearest.size
