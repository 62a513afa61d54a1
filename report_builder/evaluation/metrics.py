"""Which explanation can we trust? Agreement is not correctness: two wrong maps can agree. So each map is
tested against the model itself and against ground truth.

- Deletion and insertion (Petsiuk et al., RISE, BMVC 2018): the pixels are removed (deletion) or revealed
  (insertion) in order of the map's value, most salient first, in `steps` equal steps; a removed pixel shows
  the baseline (a blurred copy, the image's mean colour, or black). The target class's probability after
  each step draws a curve; its area (trapezoids over [0, 1]) is the score: deletion lower is better,
  insertion higher is better. Ties in the map are ordered by pixel index, row by row.
- ROAD (Rong et al., ICML 2022), grad-cam's `ROADCombined`: the most relevant pixels (MoRF) and the least
  relevant ones (LeRF) are imputed by noisy linear interpolation at each percentile, and the score is the
  mean over percentiles of (LeRF drop - MoRF drop) / 2 in the target's softmax probability (higher is better).
  The imputer's noise is seeded.
- A random map (seeded, one uniform value per pixel) scored the same way: each method is compared with chance.
- Localisation, where the image has object labels: the pointing game (Zhang et al., ECCV 2016: is the map's
  maximum on the object of the explained class, with `tolerance` pixels of slack?) and its energy-based
  variant (Wang et al., Score-CAM: the share of the map's mass on the object).
- The sanity check by cascading randomisation (Adebayo et al., NeurIPS 2018): the model's blocks are
  re-initialised from the output down, one more at each step, and the map for the same class is made
  again; its Spearman rank correlation (0 for a map gone flat) and SSIM with the original say how much it still
  resembles it. A map that stays similar while the model is destroyed does not explain the model.

Each metric is an entry of the registry (evaluation/registry.py: its columns, titles, directions, ranges, rule), and
its function is bound here by the metric's name in CALCULATIONS: f(model, crop, target, saliency, objects, settings)
-> numbers (the sanity check, with its steps, is a task of its own: sanity_task).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from report_builder.evaluation import registry
from report_builder.explanation import agreement
from report_builder.explanation.agreement import scale01
from report_builder.pipeline.progress import current
from report_builder.spec.schema import EvaluateSpec, ExplainSpec, resolve_batch
from report_builder.models.outputs import class_probabilities
from report_builder.models.zoo import LoadedModel, ModelRef, model_for, refold

CODE_VERSION = 2  # 2: SSIM on maps scaled in float64
BLUR_SIGMA = 5.0  # RISE's insertion baseline: a Gaussian blur of sigma 5 pixels at 224
SANITY_MAP_SIZE = 56  # the side of the maps kept for the randomisation figure


@dataclass(frozen=True)
class EvaluationSettings:
    evaluate: EvaluateSpec
    seed: int
    device: torch.device

    @property
    def batch(self) -> int:
        return resolve_batch(self.evaluate.batch_size, self.device.type)


# ---------------------------------------------------------------- deletion and insertion


def pixel_order(saliency: np.ndarray) -> np.ndarray:
    """Flat pixel indices, most salient first; ties by pixel index (row-major)."""
    return np.argsort(-saliency.astype(np.float64).ravel(), kind="stable")


def baseline_image(crop: np.ndarray, kind: str) -> np.ndarray:
    """What a removed pixel shows: a blurred copy of the image, its mean colour, or black."""
    if kind == "blur":
        from scipy.ndimage import gaussian_filter

        blurred = gaussian_filter(crop.astype(np.float32), sigma=(BLUR_SIGMA, BLUR_SIGMA, 0), mode="reflect")
        return np.clip(np.round(blurred), 0, 255).astype(np.uint8)
    if kind == "mean":
        return np.broadcast_to(np.round(crop.reshape(-1, 3).mean(axis=0)).astype(np.uint8), crop.shape).copy()
    return np.zeros_like(crop)


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at equal steps over [0, 1], by trapezoids."""
    steps = len(curve) - 1
    return float(((curve[:-1] + curve[1:]) / 2).sum() / steps)


def deletion_insertion(model: LoadedModel, crop: np.ndarray, target: int, saliency: np.ndarray, objects,
                       settings: EvaluationSettings) -> dict:
    spec = settings.evaluate.deletion
    steps = spec.steps
    h, w = saliency.shape
    order = torch.from_numpy(pixel_order(saliency))
    counts = [round(k * h * w / steps) for k in range(steps + 1)]
    original = torch.from_numpy(crop).reshape(h * w, 3)
    base = torch.from_numpy(baseline_image(crop, spec.baseline)).reshape(h * w, 3)
    rank = torch.empty(h * w, dtype=torch.long)
    rank[order] = torch.arange(h * w)  # a pixel's place in the order
    gone = rank[None] < torch.tensor(counts)[:, None]  # steps+1 x pixels: removed (deletion) / revealed (insertion)
    deleted = torch.where(gone[..., None], base, original).reshape(steps + 1, h, w, 3)
    inserted = torch.where(gone[..., None], original, base).reshape(steps + 1, h, w, 3)
    # the target class's softmax probability for each image
    p = class_probabilities(model, torch.cat([deleted, inserted]), settings.device, settings.batch)[:, target]
    p = p.astype(np.float64)
    d, i = p[: steps + 1], p[steps + 1 :]
    return {"deletion_auc": auc(d), "insertion_auc": auc(i), "deletion_curve": d.astype(np.float32),
            "insertion_curve": i.astype(np.float32)}


# ---------------------------------------------------------------- ROAD


class LinearImputer:
    """ROAD's noisy linear imputation (grad-cam's NoisyLinearImputer): each removed pixel becomes the weighted mean
    of its 8 neighbours (1/6 for edges, 1/12 for corners), solved as one sparse linear system over all removed
    pixels, plus N(0, 0.01) noise. grad-cam writes the system's entries one fancy-index at a time into a
    lil_matrix, which took longer than the solve (0.44 s vs 0.29 s at 224 px); here the same entries are gathered
    into arrays and assembled at once. Same matrix, same solver, same noise draws: the same image, bit for bit."""

    noise = 0.01
    # (row, column) offset of a neighbour, its weight; grad-cam's order, which fixes the right-hand side's sums
    neighbours = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((0, -1), 1 / 6),
                  ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from scipy.sparse import coo_matrix
        from scipy.sparse.linalg import spsolve

        h, w = mask.shape
        known = mask.numpy().reshape(-1)
        values = img.numpy().reshape(img.shape[0], -1)
        removed = np.argwhere(known == 0).flatten()
        n = len(removed)
        unknown_id = np.zeros(len(known), dtype=int)
        unknown_id[removed] = np.arange(n)
        rhs = np.zeros((n, img.shape[0]))
        weight_sum = np.ones(n)
        rows, cols, weights = [np.arange(n)], [np.arange(n)], []
        for (dy, dx), weight in self.neighbours:
            y, x = removed // w + dy, removed % w + dx
            inside = (y >= 0) & (x >= 0) & (y < h) & (x < w)
            at = (removed + dy * w + dx)[inside]
            which = np.argwhere(inside).flatten()
            has_value = known[at] > 0.5
            rhs[which[has_value], :] -= weight * values[:, at[has_value]].T
            missing = known[at] < 0.5
            rows.append(which[missing])
            cols.append(unknown_id[at[missing]])
            weights.append(np.full(int(missing.sum()), weight))
            weight_sum[np.argwhere(~inside).flatten()] -= weight
        system = coo_matrix((np.concatenate([-weight_sum, *weights]), (np.concatenate(rows), np.concatenate(cols))),
                            shape=(n, n)).tocsc()
        system.sort_indices()
        solved = torch.tensor(spsolve(system, rhs), dtype=torch.float).reshape(n, -1)
        filled = img.reshape(img.shape[0], -1).clone()
        filled[:, removed] = solved.t() + self.noise * torch.randn_like(solved.t())
        return filled.reshape_as(img)


def road_score(model: torch.nn.Module, x: torch.Tensor, saliency: np.ndarray, targets: list,
               percentiles: list[int], imputer: Callable[[], Callable] = LinearImputer) -> np.ndarray:
    """grad-cam's ROADCombined, with the imputer as a parameter: (mean over percentiles of LeRF's confidence
    change - the same for MoRF) / 2, LeRF first, as grad-cam draws the imputation noise."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (AveragerAcrossThresholds,
                                                                   PerturbationConfidenceMetric,
                                                                   RemoveLeastRelevantFirst,
                                                                   RemoveMostRelevantFirst)

    def averaged(removal):
        return AveragerAcrossThresholds(lambda p: PerturbationConfidenceMetric(removal(p, imputer())), percentiles)

    lerf = averaged(RemoveLeastRelevantFirst)(x, saliency, targets, model)
    morf = averaged(RemoveMostRelevantFirst)(x, saliency, targets, model)
    return (lerf - morf) / 2


def road(model: LoadedModel, crop: np.ndarray, target: int, saliency: np.ndarray, objects, settings: EvaluationSettings) -> dict:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    x = model.preprocess.normalize(crop[None], settings.device)
    torch.manual_seed(settings.seed)  # the imputer draws its noise from torch's global generator
    score = road_score(model.outputs, x, saliency[None].astype(np.float32), [ClassifierOutputSoftmaxTarget(target)],
                       list(settings.evaluate.road.percentiles))
    return {"road": float(score[0])}


# ---------------------------------------------------------------- localisation


def pointing(saliency: np.ndarray, region: np.ndarray, tolerance: int) -> dict:
    """Pointing game (hit: the map's maximum, the first one row by row, within `tolerance` pixels of the
    object, straight-line distance) and energy (the share of the map's mass on the object)."""
    from scipy.ndimage import distance_transform_edt

    near = distance_transform_edt(~region) <= tolerance if region.any() else region
    peak = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    mass = float(np.clip(saliency, 0, None).sum())
    energy = float(np.clip(saliency, 0, None)[region].sum() / mass) if mass > 0 else math.nan
    return {"pointing_hit": float(near[peak]), "energy": energy}


def localisation(model: LoadedModel, crop: np.ndarray, target: int, saliency: np.ndarray, objects,
                 settings: EvaluationSettings) -> dict:
    if objects is None:
        return {}
    region, what = objects
    if not region.any():
        return {"object": what, "object_pixels": 0}
    out = pointing(saliency, region, settings.evaluate.localisation.tolerance)
    return {**out, "object": what, "object_pixels": int(region.sum())}


# The function of each metric computed on each map, by its name in the registry (on when its spec key is set).
CALCULATIONS: dict[str, Callable[..., dict]] = {
    "deletion": deletion_insertion,
    "road": road,
    "localisation": localisation,
}


def random_map(shape: tuple[int, int], seed: int, image_sha: str) -> np.ndarray:
    """The chance baseline: one uniform value per pixel, seeded by the run's seed and the image."""
    rng = np.random.default_rng([seed, int(image_sha[:15], 16)])
    return rng.random(shape).astype(np.float32)


def evaluate_task(model: ModelRef, crop: np.ndarray, objects, evaluate: EvaluateSpec, seed: int, device: str,
                  image_sha: str, predictions: np.ndarray, explanation: dict | None = None) -> dict:
    """Every metric of one map: an explanation's, or (no explanation) the random baseline's, for the model's
    top-1 class. `objects` (data.ObjectLabels or None) gives the object region of that class."""
    m = model_for(model, device)
    settings = EvaluationSettings(evaluate, seed, torch.device(device))
    target = int(np.argsort(-predictions[0], kind="stable")[0])
    saliency = random_map(crop.shape[:2], seed, image_sha) if explanation is None else explanation["map"]
    region = None
    if objects is not None:
        full, what = objects.region(m.class_names[target])
        region = (m.preprocess.crop_mask(full), what)
    out: dict = {"target": target}
    for metric in registry.METRICS:
        if not metric.per_step and getattr(evaluate, metric.spec_key) is not None:
            out.update(CALCULATIONS[metric.name](m, crop, target, saliency, region, settings))
    return out


# ---------------------------------------------------------------- sanity: cascading randomisation


def cascade(module: torch.nn.Module) -> list[str]:
    """The model's blocks holding parameters, from the output back to the input: top-level children, with a
    Sequential or ModuleList of blocks (ResNet's layer4, timm's blocks) opened one level down."""
    out = []
    for name, child in module.named_children():
        if isinstance(child, (torch.nn.Sequential, torch.nn.ModuleList)) and len(child) > 1:
            out.extend(f"{name}.{sub}" for sub, grandchild in child.named_children()
                       if any(True for _ in grandchild.parameters()))
        elif any(True for _ in child.parameters()):
            out.append(name)
    return out[::-1]


def cascade_steps(blocks: list[str], steps: int) -> list[int]:
    """How many blocks are randomised at each step: evenly spread, the first step only the output block, the
    last every block."""
    n = len(blocks)
    if steps >= n:
        return list(range(1, n + 1))
    return sorted({1 + round(k * (n - 1) / (steps - 1)) for k in range(steps)}) if steps > 1 else [n]


def reinitialise(module: torch.nn.Module, seed: int) -> None:
    """Fresh random parameters for every submodule that knows how to make them (reset_parameters), seeded;
    other parameters (and buffers such as BatchNorm statistics) are reset like torch's own initialisation."""
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()


def sanity_task(model: ModelRef, crop: np.ndarray, method: str, explain: ExplainSpec, evaluate: EvaluateSpec,
                seed: int, device: str, explanation: dict) -> dict:
    return sanity_check(model_for(model, device), crop, method, explain, evaluate, seed, device, explanation)


def sanity_check(base: LoadedModel, crop: np.ndarray, method: str, explain: ExplainSpec, evaluate: EvaluateSpec,
                 seed: int, device: str, explanation: dict) -> dict:
    """The map of `method` for the same class as blocks are randomised from the top, compared with the original.
    The model given is left as it is: a copy is randomised."""
    from skimage.metrics import structural_similarity

    from report_builder.explanation.methods import EXPLAINERS, ExplainSettings

    blocks = cascade(base.module)
    cuts = cascade_steps(blocks, evaluate.sanity.steps)
    target, original = explanation["target"], explanation["map"]
    randomised = dataclasses.replace(base, module=copy.deepcopy(base.module))  # never the shared model
    modules = dict(randomised.module.named_modules())
    settings = ExplainSettings(explain, seed, torch.device(device))
    rows = {"layers": [], "blocks": [], "spearman": [], "ssim": [], "maps": [small(original)]}
    done = 0
    for step, cut in enumerate(current().track(cuts, f"sanity {method}", unit="steps")):
        for name in blocks[done:cut]:
            reinitialise(modules[name], seed + 1000 * (step + 1))
        done = cut
        refold(randomised)  # forward-only calls fold these weights, not the last step's
        new = EXPLAINERS[method](randomised, crop, target, settings)["map"]
        rows["layers"].append(blocks[cut - 1])
        rows["blocks"].append(cut)
        rows["spearman"].append(rank_correlation(original, new))
        rows["ssim"].append(float(structural_similarity(_scaled(original), _scaled(new), data_range=1.0)))
        rows["maps"].append(small(new))
    rows["maps"] = np.stack(rows["maps"]).astype(np.float16)
    rows["total_blocks"] = len(blocks)
    return rows


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps' pixels; a flat map ranks nothing, so it shares no ranking with the other: 0."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def _scaled(m: np.ndarray) -> np.ndarray:
    """The map min-max scaled for SSIM (the agreement's scaling); a flat map as zeros."""
    scaled = scale01(m)
    return np.zeros(m.shape) if scaled is None else scaled


def small(m: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.asarray(m, np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(SANITY_MAP_SIZE, SANITY_MAP_SIZE), mode="area")[0, 0].numpy()


RESULT_SHAPE = {"target": int}
SANITY_SHAPE = {"layers": [str], **{c.name: [float] for _, c in registry.per_step()}, "maps": np.ndarray}


# ---------------------------------------------------------------- the LIME sweep


def sweep_task(model: ModelRef, crop: np.ndarray, lime, explain: ExplainSpec, seed: int, device: str,
               gradcam: dict) -> dict:
    return sweep_run(model_for(model, device), crop, lime, explain, seed, device, gradcam)


def sweep_run(m: LoadedModel, crop: np.ndarray, lime, explain: ExplainSpec, seed: int, device: str,
              gradcam: dict) -> dict:
    """One LIME setting on one image: its IoU with Grad-CAM (top-n, as the agreement section) and its time."""
    from report_builder.explanation.methods import ExplainSettings
    from report_builder.explanation.methods import lime_explain

    settings = ExplainSettings(explain.model_copy(update={"lime": lime}), seed, torch.device(device))
    value = lime_explain(m, crop, gradcam["target"], settings)
    numbers = agreement.compare(value["mask"], gradcam["map"], ())
    return {"iou": numbers["iou"], "seconds": float(value["seconds"]), "lime_pixels": numbers["lime_pixels"],
            "score": value["score"]}
