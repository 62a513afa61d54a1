"""Network Dissection (Bau et al., CVPR 2017): each unit's thresholded activation map against pixel labels.

For unit k of a layer:
- T_k is the `quantile` (0.995) quantile of the unit's activations over every spatial position of every
  probe image, at the layer's own resolution;
- its mask on an image is the activation map upsampled bilinearly to the label resolution, > T_k;
- IoU_{k,c} = sum over images of |mask ∩ L_c| / sum of |mask ∪ L_c|, where the sums run over the images
  that have labels in the category of concept c (an image with no object labels says nothing about how
  well a unit detects objects);
- the unit's label is the concept with the best IoU; it is a detector if that IoU is > `iou_threshold`.

Where NetDissect-Lite differs: it counts a unit's mask towards a category only on images where the mask
touches a label of that category; here every image that has labels of the category counts, as the
paper defines it.

The axis-rotation test rotates a layer's channels by a seeded random rotation Q (or Q^alpha, on the
geodesic from the identity to Q) and dissects again: the representation's information is unchanged,
only its basis moves, so fewer detectors under rotation means interpretability is tied to the axes.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .pixel_labels import Labels, PixelProbe
from .zoo import LoadedModel, get_layer

CODE_VERSION = 1
CHUNK = 32  # images per step when passing over recorded maps
EXACT_BUDGET = 64_000_000  # values kept per layer by the exact streaming quantile (256 MB of float32)
SAMPLE_SIZE = 200_000  # positions sampled per unit by the estimated quantile
MAPS_IN_MEMORY = 2 * 1024**3  # bytes of recorded maps kept in memory; larger layers go to a temporary file


@dataclass(frozen=True)
class Settings:
    quantile: float = 0.995
    threshold: str = "auto"  # exact | sampled | auto
    iou_threshold: float = 0.04
    top_images: int = 4
    seed: int = 0

    def as_dict(self) -> dict:
        return {"quantile": self.quantile, "threshold": self.threshold, "iou_threshold": self.iou_threshold,
                "top_images": self.top_images, "seed": self.seed}


# ---------------------------------------------------------------- activation maps


def model_input(model: LoadedModel, images: list[Image.Image], device: torch.device) -> torch.Tensor:
    """The whole image resized to the model's input size: no crop, so the labels stay aligned with it."""
    size = model.preprocess.input_size
    arrays = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.uint8) for im in images])
    return model.preprocess.normalize(arrays, device)


def record_maps(model: LoadedModel, layers: list[str], probe: PixelProbe, device: torch.device, batch_size: int,
                where: str, say: Callable[[str], None] = lambda s: None) -> dict[str, np.ndarray]:
    """One pass over the probe set; every layer's full activation maps, N x C x h x w float32."""
    modules = {name: get_layer(model, name, f"{where}.layers[{i}]") for i, name in enumerate(layers)}
    out: dict[str, np.ndarray] = {}
    current: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, o, name=name: current.__setitem__(name, o))
             for name, module in modules.items()]
    n, start = len(probe), 0
    try:
        with torch.inference_mode():
            for b, batch in enumerate(probe.image_batches(batch_size)):
                model.module(model_input(model, batch, device))
                for name, value in current.items():
                    if value.dim() != 4:
                        raise ValueError(f"{where}: layer {name} gives outputs of shape {tuple(value.shape)}; "
                                         "Network Dissection needs N x C x H x W activation maps")
                    if name not in out:
                        out[name] = _allocate((n, *value.shape[1:]))
                    out[name][start : start + len(batch)] = value.float().cpu().numpy()
                start += len(batch)
                if b % 10 == 0 or start == n:
                    say(f"  {model.id}: activation maps {start}/{n}")
    finally:
        for h in hooks:
            h.remove()
    return out


def _allocate(shape: tuple[int, ...]) -> np.ndarray:
    if math.prod(shape) * 4 <= MAPS_IN_MEMORY:
        return np.empty(shape, np.float32)
    tmp = tempfile.NamedTemporaryFile(prefix="report_builder-maps-", suffix=".npy", delete=False)  # noqa: SIM115
    return np.lib.format.open_memmap(tmp.name, mode="w+", dtype=np.float32, shape=shape)


def chunks(maps: np.ndarray, rotation: torch.Tensor | None = None,
           device: torch.device | str = "cpu") -> Callable[[], Iterator[torch.Tensor]]:
    """A re-iterable pass over recorded maps on `device`, optionally with the channels rotated (a' = R a)."""
    rotation = None if rotation is None else rotation.to(device=device, dtype=torch.float32)

    def run() -> Iterator[torch.Tensor]:
        for i in range(0, len(maps), CHUNK):
            a = torch.from_numpy(np.asarray(maps[i : i + CHUNK], np.float32)).to(device)
            yield a if rotation is None else torch.einsum("dc,nchw->ndhw", rotation, a)
    return run


# ---------------------------------------------------------------- thresholds


def quantile_thresholds(batches: Callable[[], Iterable[torch.Tensor]], total: int, q: float, method: str = "auto",
                        seed: int = 0) -> tuple[torch.Tensor, str]:
    """Per unit, the q-quantile of its values over all images and positions (NumPy's 'linear' definition).

    `total` is the number of values per unit (images x h x w). 'exact' keeps only the values at or above
    the quantile's lower neighbour while streaming: the largest total - floor((total - 1) q) of them.
    'sampled' estimates the quantile from about SAMPLE_SIZE positions drawn uniformly at random (the same
    positions for every unit); its rank error has standard deviation sqrt(q (1 - q) / SAMPLE_SIZE),
    about 1.6e-4 for q = 0.995. 'auto' is exact while the kept values fit in EXACT_BUDGET.
    """
    position = (total - 1) * q
    lower = math.floor(position)
    keep = total - lower
    if method == "auto":
        channels = next(iter(batches())).shape[1]
        method = "exact" if keep * channels <= EXACT_BUDGET else "sampled"
    if method == "exact":
        top: torch.Tensor | None = None
        for a in batches():
            values = a.transpose(0, 1).reshape(a.shape[1], -1)
            pool = values if top is None else torch.cat([top, values], dim=1)
            top = pool.topk(min(keep, pool.shape[1]), dim=1).values  # sorted, largest first
        assert top is not None and top.shape[1] == keep, "total does not match the values seen"
        low = top[:, keep - 1].cpu().double()  # ascending index `lower`
        if keep == 1:
            return low.float(), method
        high = top[:, keep - 2].cpu().double()  # ascending index `lower + 1`
        return (low + (position - lower) * (high - low)).float(), method
    rng = np.random.default_rng(seed)
    rate = min(1.0, SAMPLE_SIZE / total)
    picked = []
    for a in batches():
        values = a.transpose(0, 1).reshape(a.shape[1], -1)
        chosen = torch.from_numpy(np.flatnonzero(rng.random(values.shape[1]) < rate)).to(values.device)
        picked.append(values[:, chosen].cpu())
    sample = torch.cat(picked, dim=1).double().numpy()
    return torch.from_numpy(np.quantile(sample, q, axis=1)).float(), "sampled"


# ---------------------------------------------------------------- IoU


def unit_masks(a: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """C x h x w activations -> C x H x W boolean masks: bilinear upsampling to the label size, then > T_k."""
    up = F.interpolate(a[None], size=size, mode="bilinear", align_corners=False)[0]
    return up > thresholds[:, None, None]


@dataclass
class Tally:
    intersection: torch.Tensor  # units x labels: pixels in both the mask and the label
    unit_area: torch.Tensor  # units x categories: mask pixels on images with labels in the category
    label_area: torch.Tensor  # labels: labelled pixels
    peaks: torch.Tensor  # images x units: each unit's largest activation on each image

    def iou(self, label_category: torch.Tensor) -> torch.Tensor:
        union = self.unit_area[:, label_category] + self.label_area[None] - self.intersection
        return torch.where(union > 0, self.intersection / union.clamp(min=1), torch.zeros_like(union))


def tally(batches: Callable[[], Iterable[torch.Tensor]], thresholds: torch.Tensor, labels: Iterable[Labels],
          n_labels: int, categories: list[str]) -> Tally:
    """Sum intersections and areas over every image (see the module docstring for the definition)."""
    cat_index = {c: i for i, c in enumerate(categories)}
    units = len(thresholds)
    inter = torch.zeros(units, n_labels, dtype=torch.float64)
    unit_area = torch.zeros(units, len(categories), dtype=torch.float64)
    label_area = torch.zeros(n_labels, dtype=torch.float64)
    label_iter = iter(labels)
    peaks = []
    for a in batches():
        thresholds = thresholds.to(a.device)
        # Bilinear upsampling never exceeds a map's maximum, so a unit whose map stays at or below its
        # threshold has an empty mask: only the units that fire on an image are upsampled and counted.
        peak = a.amax(dim=(2, 3))
        peaks.append(peak.cpu())
        for maps, fires in zip(a, peak > thresholds):
            lab = next(label_iter)
            pixels = lab.size[0] * lab.size[1]
            flat = torch.from_numpy(lab.pixel.reshape(len(lab.pixel), pixels)).long()
            present = torch.unique(flat[flat > 0])
            # pixel x label membership (a label drawn on several maps, like overlapping parts, counts once),
            # then a column of ones that counts each mask's area
            member = torch.cat([(flat[:, :, None] == present[None, None]).any(dim=0), torch.ones(pixels, 1, dtype=torch.bool)],
                               dim=1).float()
            label_area[present] += member[:, :-1].sum(dim=0).double()
            for label in lab.image:
                label_area[label] += pixels
            units_on = fires.nonzero()[:, 0]
            if not len(units_on):
                continue
            masks = unit_masks(maps[units_on], thresholds[units_on], lab.size).reshape(len(units_on), -1)
            counts = (masks.float() @ member.to(a.device)).double().cpu()
            units_on = units_on.cpu()
            area = counts[:, -1]
            inter[units_on[:, None], present[None]] += counts[:, :-1]
            for c in lab.categories:
                if c in cat_index:
                    unit_area[units_on, cat_index[c]] += area
            for label in lab.image:
                inter[units_on, label] += area
    return Tally(inter, unit_area, label_area, torch.cat(peaks))


# ---------------------------------------------------------------- rotation


def random_rotation(n: int, seed: int) -> torch.Tensor:
    """A rotation drawn uniformly (Haar measure) from SO(n), seeded."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    q = q * np.sign(np.diag(r))[None]  # makes the draw uniform, not biased by the QR sign convention
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return torch.from_numpy(q)


def partial_rotation(q: torch.Tensor, alpha: float) -> torch.Tensor:
    """Q^alpha = expm(alpha logm Q): alpha = 0 is the identity, 1 is Q, between them the geodesic on SO(n)."""
    from scipy.linalg import expm, logm

    if alpha == 0:
        return torch.eye(len(q), dtype=torch.float64)
    if alpha == 1:
        return q.clone()
    log = np.real(logm(q.numpy()))
    log = (log - log.T) / 2  # the logarithm of a rotation is skew-symmetric; remove rounding noise
    return torch.from_numpy(expm(alpha * log))


# ---------------------------------------------------------------- one layer


def dissect_layer(maps: np.ndarray, probe: PixelProbe, settings: Settings, rotation: torch.Tensor | None = None,
                  device: torch.device | str = "cpu") -> dict:
    """Thresholds, the full IoU matrix, each unit's label, and its top images (by peak activation)."""
    batches = chunks(maps, rotation, device)
    n, _, h, w = maps.shape
    thresholds, method = quantile_thresholds(batches, n * h * w, settings.quantile, settings.threshold, settings.seed)
    categories = probe.category_names
    label_category = torch.tensor([categories.index(c) if c in categories else 0 for c in probe.categories])
    counts = tally(batches, thresholds, probe.labels(), len(probe.names), categories)
    iou = counts.iou(label_category)
    iou[:, 0] = 0  # label 0 is 'unlabelled'
    best_iou, best = iou.max(dim=1)
    top = counts.peaks.topk(min(settings.top_images, n), dim=0).indices.T  # C x top
    top_maps = None
    if rotation is None:  # the gallery shows the unrotated layer only
        units = np.arange(top.shape[0])[:, None]
        top_maps = np.asarray(maps[top.numpy(), units]).astype(np.float16)  # C x top x h x w
    return {
        "thresholds": thresholds.numpy(),
        "threshold_method": method,
        "iou": iou.float().numpy(),
        "label": best.numpy(),
        "best_iou": best_iou.float().numpy(),
        "top_images": top.numpy(),
        "top_maps": top_maps,
        "label_area": counts.label_area.numpy(),
    }


def unit_rows(result: dict, probe: PixelProbe, iou_threshold: float) -> list[dict]:
    """One row per unit: its best concept, that concept's category, the IoU, and whether it is a detector."""
    rows = []
    for k, (label, value) in enumerate(zip(result["label"], result["best_iou"])):
        value = float(value)
        rows.append({"unit": k, "label": probe.names[label] if value > 0 else "", "category": probe.categories[label]
                     if value > 0 else "", "iou": value, "detector": value > iou_threshold,
                     "threshold": float(result["thresholds"][k])})
    return rows


def layer_counts(rows: list[dict], categories: list[str]) -> dict:
    """Detectors, unique detectors (distinct concepts among detectors) and both per category."""
    detectors = [r for r in rows if r["detector"]]
    return {
        "units": len(rows),
        "detectors": len(detectors),
        "unique": len({r["label"] for r in detectors}),
        "per_category": {c: sum(r["category"] == c for r in detectors) for c in categories},
        "unique_per_category": {c: len({r["label"] for r in detectors if r["category"] == c}) for c in categories},
    }
