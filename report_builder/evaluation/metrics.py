"""Which explanation can we trust? Agreement is not correctness: two wrong maps can agree. So each map is
tested against the model itself, against ground truth, and against maps made by chance.

The rules (what each metric computes, which way is better, when a method fails, what counts as beating chance) are
stated once, in the metrics registry (evaluation/registry.py: each metric's description and rule); the README and
the report's table of methods are rendered from it, and tests/test_evaluate.py checks the code below against those
words on planted cases. What this module adds is how:

- deletion and insertion: a tied group of pixels is removed (or revealed) all at once, and the curve is
  interpolated linearly across it, so no order inside a tie (row-major or other) enters the score;
- ROAD: grad-cam's `ROADCombined`, whose value is (MoRF drop - LeRF drop) / 2 = (mean over percentiles of the
  LeRF confidence change - the MoRF one) / 2; the imputer's noise is seeded;
- the chance maps (per-pixel noise, smooth noise at a few scales, a centre prior), several seeded draws each;
- the sanity cascade over several randomisation seeds: seed 0 runs every step (the figure), the others only the
  last step (every block random), which is where the rule is read;
- the images every map of one image shares go through the model once per task (`known_probabilities`): the intact
  crop (deletion's first point, insertion's last, ROAD's reference) comes from the prediction task, and the
  baseline (deletion's last point, insertion's first) is run once for all the maps and draws of a task.

Each metric's function is bound here by the metric's name in CALCULATIONS: f(model, crop, target, saliency,
objects, settings) -> numbers (the sanity check, with its steps, is a task of its own: sanity_task).
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
from report_builder.models.blocks import cascade, digest, replaying_head_inputs
from report_builder.models.zoo import LoadedModel, ModelRef, model_for, refold

# 4: the intact crop's probabilities from the prediction task, the baseline's once per task
CODE_VERSION = 4  # 2: SSIM on maps scaled in float64; 3: tied pixels removed together, chance maps, seeds
BLUR_SIGMA = 5.0  # RISE's insertion baseline: a Gaussian blur of sigma 5 pixels at 224
SANITY_MAP_SIZE = 56  # the side of the maps kept for the randomisation figure


@dataclass(frozen=True)
class EvaluationSettings:
    evaluate: EvaluateSpec
    seed: int
    device: torch.device
    # class probabilities already known, by (model, image): see known_probabilities
    known: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def batch(self) -> int:
        return resolve_batch(self.evaluate.batch_size, self.device.type)


def _known_key(model: LoadedModel, image: np.ndarray) -> tuple:
    return id(model), digest(image)


def known_probabilities(model: LoadedModel, image: np.ndarray, settings: EvaluationSettings) -> np.ndarray:
    """The class probabilities of one uint8 image (the intact crop, a baseline made from it), through the model once
    however many maps, draws and metrics of a task need them. evaluate_task seeds the intact crop's with the
    prediction task's, which are the same model's on the same crop."""
    key = _known_key(model, image)
    if key not in settings.known:  # the model is kept with its value, so its id names no other model meanwhile
        settings.known[key] = (model, class_probabilities(model, image[None], settings.device, 1)[0])
    return settings.known[key][1]


# ---------------------------------------------------------------- deletion and insertion


def pixel_order(saliency: np.ndarray) -> np.ndarray:
    """Flat pixel indices, most salient first; ties by pixel index (row-major). Only tie_bounds' groups are ever
    cut from this order, so the order inside a tie never reaches a score."""
    return np.argsort(-saliency.astype(np.float64).ravel(), kind="stable")


def tie_bounds(saliency: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The places in `order` where a tied group of pixels ends (0 and the pixel count included): removing the
    first k pixels for k in these is the same set of pixels whatever the order inside the ties."""
    values = saliency.astype(np.float64).ravel()[order]
    return np.concatenate([[0], np.flatnonzero(np.diff(values) != 0) + 1, [values.size]])


def tie_aware_counts(counts: list[int], bounds: np.ndarray) -> tuple[list[int], list[tuple[int, int, float]]]:
    """For each step's pixel count, the tied-group boundaries around it and the weight of the upper one: a count
    that cuts a tie is read off the straight line between the group removed not at all and the group removed
    whole. Returns the distinct counts to evaluate (in the steps' order) and, per step, (lower, upper, weight)."""
    needed: list[int] = []
    where = []
    for c in counts:
        k = int(np.searchsorted(bounds, c, side="right")) - 1
        lo = int(bounds[k])
        hi = lo if lo == c else int(bounds[k + 1])
        weight = 0.0 if hi == lo else (c - lo) / (hi - lo)
        for x in (lo, hi):
            if x not in needed:
                needed.append(x)
        where.append((lo, hi, weight))
    return needed, where


def step_counts(saliency: np.ndarray, steps: int) -> tuple[np.ndarray, list[int], list[tuple[int, int, float]]]:
    """A map's pixel order, the pixel counts deletion and insertion put through the model (0 and all pixels
    included) and each step's (lower, upper, weight): see tie_aware_counts."""
    h, w = saliency.shape
    order = pixel_order(saliency)
    counts = [round(k * h * w / steps) for k in range(steps + 1)]
    needed, where = tie_aware_counts(counts, tie_bounds(saliency, order))
    return order, needed, where


def deletion_passes(saliency: np.ndarray, steps: int) -> int:
    """The forward passes deletion and insertion make for one map: each curve's points between its two ends (the
    intact crop and the baseline, which every map of an image shares). A map without ties needs steps - 1 per
    curve; a step that cuts a tied group needs both of the group's ends, so a map of few large ties (LIME's
    superpixels) can need up to twice as many, and one of two halves only one."""
    return 2 * max(len(step_counts(saliency, steps)[1]) - 2, 0)


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
    h, w = saliency.shape
    order_np, needed, where = step_counts(saliency, spec.steps)
    order = torch.from_numpy(order_np)
    original = torch.from_numpy(crop).reshape(h * w, 3)
    base = torch.from_numpy(baseline_image(crop, spec.baseline)).reshape(h * w, 3)
    rank = torch.empty(h * w, dtype=torch.long)
    rank[order] = torch.arange(h * w)  # a pixel's place in the order
    gone = rank[None] < torch.tensor(needed)[:, None]  # counts x pixels: removed (deletion) / revealed (insertion)
    deleted = torch.where(gone[..., None], base, original).reshape(len(needed), h, w, 3)
    inserted = torch.where(gone[..., None], original, base).reshape(len(needed), h, w, 3)
    # the target class's softmax probability for each image (a map without ties: the steps' images, as before).
    # needed runs from 0 pixels to all of them, so each curve's two ends are the intact crop and the baseline,
    # which every map of the image shares: those come from known_probabilities, the steps between from the model
    intact = known_probabilities(model, crop, settings)[target]
    blank = known_probabilities(model, base.reshape(h, w, 3).numpy(), settings)[target]
    middle = class_probabilities(model, torch.cat([deleted[1:-1], inserted[1:-1]]), settings.device,
                                 settings.batch)[:, target] if len(needed) > 2 else np.zeros(0, np.float32)
    n = len(needed)
    p = np.concatenate([[intact], middle[: n - 2], [blank], [blank], middle[n - 2 :], [intact]]).astype(np.float64)
    at = {c: j for j, c in enumerate(needed)}

    def curve(offset: int) -> np.ndarray:
        return np.array([p[offset + at[lo]] if weight == 0 else
                         (1 - weight) * p[offset + at[lo]] + weight * p[offset + at[hi]] for lo, hi, weight in where])

    d, i = curve(0), curve(n)
    intact_d, intact_i = float(d[0]), float(i[-1])  # the intact image: deletion's first point, insertion's last
    return {"deletion_auc": auc(d), "insertion_auc": auc(i),
            "deletion_norm": auc(d) / intact_d if intact_d > 0 else math.nan,
            "insertion_norm": auc(i) / intact_i if intact_i > 0 else math.nan,
            "deletion_curve": d.astype(np.float32), "insertion_curve": i.astype(np.float32)}


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
               percentiles: list[int], imputer: Callable[[], Callable] = LinearImputer,
               intact: np.ndarray | None = None) -> np.ndarray:
    """grad-cam's ROADCombined, with the imputer as a parameter: (mean over percentiles of LeRF's confidence
    change - the same for MoRF) / 2, LeRF first, as grad-cam draws the imputation noise. A confidence change is
    (perturbed - original), so this is (MoRF drop - LeRF drop) / 2: higher when removing the top pixels hurts more
    than removing the bottom ones. Computed as grad-cam computes it (its removal masks, float32 scores, the same
    order of noise draws and means), except that the intact image goes through the model once: grad-cam's
    PerturbationConfidenceMetric repeats that pass for every percentile of each order (9 passes instead of 16 per
    map with the default 4 percentiles; a test holds the result equal to grad-cam's, bit for bit). `intact`, when
    given, is that pass's scores, already known (8 passes)."""
    from pytorch_grad_cam.metrics.perturbation_confidence import RemoveLeastRelevantFirst, RemoveMostRelevantFirst

    def scores(inputs: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return np.float32([target(output).cpu().numpy() for target, output in zip(targets, model(inputs))])

    intact = scores(x) if intact is None else np.float32(intact)

    def averaged(removal) -> np.ndarray:
        changes = []
        for percentile in percentiles:
            perturb = removal(percentile, imputer())
            imputed = torch.cat([perturb(x[i].cpu(), torch.from_numpy(saliency[i])).to(x.device)[None]
                                 for i in range(x.shape[0])])
            changes.append(scores(imputed) - intact)
        return np.mean(np.float32(changes), axis=0)

    lerf = averaged(RemoveLeastRelevantFirst)
    morf = averaged(RemoveMostRelevantFirst)
    return (lerf - morf) / 2


def road(model: LoadedModel, crop: np.ndarray, target: int, saliency: np.ndarray, objects, settings: EvaluationSettings) -> dict:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    x = model.preprocess.normalize(crop[None], settings.device)
    torch.manual_seed(settings.seed)  # the imputer draws its noise from torch's global generator
    intact = known_probabilities(model, crop, settings)[target : target + 1]
    score = road_score(model.outputs, x, saliency[None].astype(np.float32), [ClassifierOutputSoftmaxTarget(target)],
                       list(settings.evaluate.road.percentiles), intact=intact)
    return {"road": float(score[0])}


# ---------------------------------------------------------------- localisation


def pointing(saliency: np.ndarray, region: np.ndarray, tolerance: int) -> dict:
    """Pointing game (a hit: the map's maximum within `tolerance` pixels of the object, straight-line distance; when
    several pixels tie for the maximum, as a LIME map's top superpixel does, the share of them that hit, which is
    the expected hit of a tie broken at random: no order among them counts), the near hits (those hits off the
    object itself, counted the same way) and energy (the share of the map's mass on the object)."""
    from scipy.ndimage import distance_transform_edt

    near = distance_transform_edt(~region) <= tolerance if region.any() else region
    peaks = saliency == saliency.max()
    mass = float(np.clip(saliency, 0, None).sum())
    energy = float(np.clip(saliency, 0, None)[region].sum() / mass) if mass > 0 else math.nan
    return {"pointing_hit": float(near[peaks].mean()), "pointing_near_hit": float((near & ~region)[peaks].mean()),
            "energy": energy}


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


def random_map(shape: tuple[int, int], seed: int, image_sha: str, draw: int = 0) -> np.ndarray:
    """Per-pixel noise: one uniform value per pixel, seeded by the run's seed, the image and the draw (draw 0 is
    the single random map of earlier versions)."""
    key = [seed, int(image_sha[:15], 16)] + ([draw] if draw else [])
    return np.random.default_rng(key).random(shape).astype(np.float32)


def smooth_map(shape: tuple[int, int], seed: int, image_sha: str, cells: int, draw: int = 0) -> np.ndarray:
    """Smooth noise: a cells x cells grid of uniform values, upsampled bilinearly to the map's size, so that whole
    regions rank together as a real map's do."""
    rng = np.random.default_rng([seed, int(image_sha[:15], 16), cells, draw])
    grid = torch.from_numpy(rng.random((cells, cells)))[None, None]
    return torch.nn.functional.interpolate(grid, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy().astype(np.float32)


def centre_map(shape: tuple[int, int]) -> np.ndarray:
    """The centre prior: a Gaussian bump (sigma a quarter of the side) on the pixel (h // 2, w // 2), its one
    maximum; photographers put the object in the middle, so this is the localisation bar a reviewer asks for."""
    h, w = shape
    y, x = np.mgrid[:h, :w]
    return np.exp(-(((y - h // 2) / (h / 4)) ** 2 + ((x - w // 2) / (w / 4)) ** 2) / 2).astype(np.float32)


def chance_maps(method: str, shape: tuple[int, int], seed: int, image_sha: str, draws: int) -> list[np.ndarray]:
    """The draws of one chance map (registry.chance_kind names its kind; the centre prior has one draw)."""
    kind = registry.chance_kind(method)
    if kind == "pixel":
        return [random_map(shape, seed, image_sha, k) for k in range(draws)]
    if kind == "smooth":
        return [smooth_map(shape, seed, image_sha, registry.smooth_cells(method), k) for k in range(draws)]
    if kind == "centre":
        return [centre_map(shape)]
    raise ValueError(f"{method!r} is not a chance map")


def evaluate_task(model: ModelRef, crop: np.ndarray, objects, evaluate: EvaluateSpec, seed: int, device: str,
                  image_sha: str, predictions: np.ndarray, explanation: dict | None = None,
                  chance: str = "random") -> dict:
    """Every metric of one map: an explanation's, or (no explanation) the chance map `chance`'s, averaged over its
    draws, for the model's top-1 class. `objects` (data.ObjectLabels or None) gives the object region of that class."""
    m = model_for(model, device)
    settings = EvaluationSettings(evaluate, seed, torch.device(device))
    settings.known[_known_key(m, crop)] = (m, predictions[0])  # the prediction task's pass of this crop
    target = int(np.argsort(-predictions[0], kind="stable")[0])
    draws = evaluate.chance.draws if evaluate.chance is not None else 1
    maps = (chance_maps(chance, crop.shape[:2], seed, image_sha, draws) if explanation is None
            else [explanation["map"]])
    region = None
    if objects is not None:
        full, what = objects.region(m.class_names[target])
        region = (m.preprocess.crop_mask(full), what)
    kind = None if explanation is not None else registry.chance_kind(chance)
    each: list[dict] = []
    for saliency in maps:
        one: dict = {}
        for metric in registry.METRICS:
            # a chance map is scored only where it is a bar (registry: Metric.chance): the centre prior on
            # localisation alone, which costs no forward pass
            if (not metric.per_step and getattr(evaluate, metric.spec_key) is not None
                    and metric.scores(kind)):
                one.update(CALCULATIONS[metric.name](m, crop, target, saliency, region, settings))
        each.append(one)
    out: dict = {"target": target, "draws": len(maps), **each[0]}
    if len(each) > 1:  # the mean over the draws, curves included; NaN (no mass on the map) left out
        for key, value in each[0].items():
            if isinstance(value, float):
                values = np.array([e[key] for e in each], np.float64)
                out[key] = float(np.nanmean(values)) if not np.isnan(values).all() else math.nan
            elif isinstance(value, np.ndarray):
                out[key] = np.mean([e[key] for e in each], axis=0).astype(value.dtype)
    return out


# ---------------------------------------------------------------- sanity: cascading randomisation


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
                seed: int, device: str, explanation: dict, walk: bool = True) -> dict:
    return sanity_check(model_for(model, device), crop, method, explain, evaluate, seed, device, explanation, walk)


def sanity_check(base: LoadedModel, crop: np.ndarray, method: str, explain: ExplainSpec, evaluate: EvaluateSpec,
                 seed: int, device: str, explanation: dict, walk: bool = True) -> dict:
    """The map of `method` for the same class as blocks are randomised from the top, compared with the original.
    Seed 0 of `sanity.seeds` walks every step (the per-step numbers and the figure); each further seed re-initialises
    every block at once and makes the last step's map only, since the rule reads the last step: seeds - 1 more
    explanations per image, not steps x seeds. With `walk` False (an image after the first `sanity.walk`), seed 0
    makes the last step only too: the same blocks get the same seeds, so its map is the one the walk ends with, at
    one explanation instead of `steps`. The model given is left as it is: a copy is randomised."""
    from report_builder.explanation.methods import EXPLAINERS, ExplainSettings

    blocks = cascade(base.module)
    cuts = cascade_steps(blocks, evaluate.sanity.steps)
    target, original = explanation["target"], explanation["map"]
    randomised = dataclasses.replace(base, module=copy.deepcopy(base.module))  # never the shared model
    modules = dict(randomised.module.named_modules())
    settings = ExplainSettings(explain, seed, torch.device(device))
    rows = {"layers": [], "blocks": [], "spearman": [], "ssim": [], "maps": [small(original)], "runs": []}
    seeds = evaluate.sanity.seeds
    done = 0
    for step, cut in enumerate(current().track(cuts, f"sanity {method}", unit="steps")):
        for name in blocks[done:cut]:
            reinitialise(modules[name], seed + 1000 * (step + 1))
        done = cut
        if not walk and cut != cuts[-1]:
            continue  # only the last step's map is made: the blocks are randomised as the walk would leave them
        refold(randomised)  # forward-only calls fold these weights, not the last step's
        head_inputs = explanation.get("head_inputs") if cut == 1 else None
        runs = randomised if head_inputs is None else replaying_head_inputs(randomised, head_inputs)
        new = EXPLAINERS[method](runs, crop, target, settings)["map"]
        similar = similarity(original, new)
        rows["layers"].append(blocks[cut - 1])
        rows["blocks"].append(cut)
        rows["spearman"].append(similar["spearman"])
        rows["ssim"].append(similar["ssim"])
        rows["maps"].append(small(new))
    rows["runs"].append({"seed": 0, **similar})
    for run in range(1, seeds):
        for k, name in enumerate(blocks):
            reinitialise(modules[name], seed + 1000 * (len(cuts) + 1) + 100_003 * run + k)
        refold(randomised)
        rows["runs"].append({"seed": run, **similarity(original, EXPLAINERS[method](randomised, crop, target,
                                                                                    settings)["map"])})
    rows["maps"] = np.stack(rows["maps"]).astype(np.float16)
    rows["total_blocks"] = len(blocks)
    return rows


def similarity(original: np.ndarray, new: np.ndarray) -> dict:
    """A randomised map against the original: Spearman's ρ and SSIM, both None when either map is flat (a flat
    map ranks nothing, and SSIM against a constant rewards a sparse map for being mostly empty); `flat` says so."""
    from skimage.metrics import structural_similarity

    flat = bool(np.ptp(original) == 0 or np.ptp(new) == 0)
    if flat:
        return {"spearman": None, "ssim": None, "flat": True}
    return {"spearman": rank_correlation(original, new),
            "ssim": float(structural_similarity(_scaled(original), _scaled(new), data_range=1.0)), "flat": False}


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps' pixels; a flat map ranks nothing, so it shares no ranking with the other: 0
    (the sanity check reports a flat map as flat instead: see similarity)."""
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
SANITY_SHAPE = {"layers": [str], **{c.name: [(float, None)] for _, c in registry.per_step()}, "maps": np.ndarray,
                "runs": [{"seed": int, "flat": bool}]}


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
