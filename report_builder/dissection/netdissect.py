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
Learned directions (dissection/directions.py) are dissected the same way: a job (layer, method) applies the fitted
k x C projection to the layer's maps, in the same passes as the units and the rotations.

Sharding. The probe set is cut into shards that are dissected apart and merged, and the merge gives what
one pass over every image gives: a shard keeps its largest values per unit (the exact quantile needs only
the largest N·h·w·(1−q) of them overall), or the positions a counter-based hash picks for the sampled
estimate (the same positions however the probe is cut); intersections and areas are integer counts that
add up; each unit's top images are chosen by (peak, image index), so ties break the same way. Maps are
streamed batch by batch: memory does not grow with the probe set.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from report_builder.errors import UserError
from report_builder.data.pixel_labels import Labels, PixelProbe
from report_builder.pipeline.progress import current
from report_builder.models.hooks import LayerRecorder
from report_builder.models.zoo import LoadedModel, ModelRef, get_layer, model_for

CODE_VERSION = 2
CHUNK = 32  # images per step when passing over recorded maps
EXACT_BUDGET = 64_000_000  # values kept per layer by the exact streaming quantile (256 MB of float32)
SAMPLE_SIZE = 200_000  # positions sampled per unit by the estimated quantile


@dataclass(frozen=True)
class NetDissectSettings:
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


def stream_maps(model: LoadedModel, layers: list[str], probe: PixelProbe, device: torch.device, batch_size: int,
                label: str) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(index of the batch's first image, every layer's maps N x C x h x w on `device`), batch by batch."""
    for name in layers:
        get_layer(model, name, f"{model.where}.layers")
    network, modules = model.recording(layers)  # the BatchNorm-folded copy where it gives these layers' outputs
    layouts = {name: model.layout(name) for name in layers}
    with LayerRecorder(modules) as rec, torch.inference_mode():
        current_maps = rec.latest
        start = 0
        for batch in current().track(probe.image_batches(batch_size), label, -(-len(probe) // batch_size),
                                     "batches"):
            network(model_input(model, batch, device))
            for name, value in current_maps.items():
                if layouts[name].kind == "flat":
                    raise UserError(f"{model.where}: layer {name} gives outputs of shape {tuple(value.shape)}; "
                                    "Network Dissection needs activation maps (N x C x H x W, or tokens)")
            # a ViT's patch tokens, reshaped to their grid, are its activation maps
            yield start, {name: layouts[name].maps(value).float() for name, value in current_maps.items()}
            start += len(batch)


def chunks(maps: np.ndarray, rotation: torch.Tensor | None = None,
           device: torch.device | str = "cpu") -> Callable[[], Iterator[torch.Tensor]]:
    """A re-iterable pass over recorded maps on `device`, optionally with the channels rotated (a' = R a)."""
    rotation = None if rotation is None else rotation.to(device=device, dtype=torch.float32)

    def run() -> Iterator[torch.Tensor]:
        for i in range(0, len(maps), CHUNK):
            a = torch.from_numpy(np.asarray(maps[i : i + CHUNK], np.float32)).to(device)
            yield rotate(a, rotation)
    return run


def rotate(a: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    return a if rotation is None else torch.einsum("dc,nchw->ndhw", rotation.to(a.device, torch.float32), a)


# ---------------------------------------------------------------- thresholds


def quantile_position(total: int, q: float) -> tuple[float, int, int]:
    """NumPy's linear quantile over `total` values: the fractional position, its floor, and how many of the
    largest values contain both neighbours of that position."""
    position = (total - 1) * q
    lower = math.floor(position)
    return position, lower, total - lower


def choose_method(method: str, total: int, q: float, channels: int) -> str:
    """'auto' is exact while the kept values fit in EXACT_BUDGET."""
    if method != "auto":
        return method
    return "exact" if quantile_position(total, q)[2] * channels <= EXACT_BUDGET else "sampled"


def _uniform(index: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per global position index, from a counter-based hash (splitmix64): the
    same position gets the same number however the images are split into shards and batches."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


class ThresholdState:
    """What a unit's quantile needs from the values seen so far, as plain data (a dict) that shards merge:
    exact: the largest `keep` values per unit; sampled: the values at the positions the hash picks."""

    def __init__(self, method: str, total: int, q: float, seed: int):
        self.method, self.total, self.q, self.seed = method, total, q, seed
        self.keep = quantile_position(total, q)[2]
        self.values: torch.Tensor | None = None  # units x kept

    def add(self, a: torch.Tensor, first_image: int) -> None:
        values = a.transpose(0, 1).reshape(a.shape[1], -1)
        if self.method == "exact":
            pool = values if self.values is None else torch.cat([self.values, values], dim=1)
            self.values = pool.topk(min(self.keep, pool.shape[1]), dim=1).values  # sorted, largest first
            return
        per_image = a.shape[2] * a.shape[3]
        index = np.arange(first_image * per_image, (first_image + a.shape[0]) * per_image, dtype=np.uint64)
        picked = torch.from_numpy(np.flatnonzero(_uniform(index, self.seed) < min(1.0, SAMPLE_SIZE / self.total)))
        # positions are image-major in `values` (n, h, w flattened), as in `index`
        chosen = values[:, picked.to(values.device)].cpu()
        self.values = chosen if self.values is None else torch.cat([self.values, chosen], dim=1)

    def as_dict(self) -> dict:
        values = self.values.cpu().numpy() if self.values is not None else np.zeros((0, 0), np.float32)
        return {"method": self.method, "total": self.total, "q": self.q, "seed": self.seed, "values": values}

    @classmethod
    def from_dict(cls, d: dict) -> ThresholdState:
        state = cls(d["method"], d["total"], d["q"], d["seed"])
        state.values = torch.from_numpy(d["values"]) if d["values"].size else None
        return state

    @classmethod
    def merge(cls, parts: list[dict]) -> dict:
        """Shards' states -> one state, as if every value had been seen by one."""
        state = cls.from_dict(parts[0])
        for other in parts[1:]:
            values = torch.from_numpy(other["values"])
            if not values.numel():
                continue
            if state.values is None:
                state.values = values
            elif state.method == "exact":
                pool = torch.cat([state.values, values], dim=1)
                state.values = pool.topk(min(state.keep, pool.shape[1]), dim=1).values
            else:
                state.values = torch.cat([state.values, values], dim=1)
        return state.as_dict()

    def thresholds(self) -> torch.Tensor:
        if self.method == "exact":
            position, lower, keep = quantile_position(self.total, self.q)
            top = self.values
            if top is None or top.shape[1] != keep:
                raise ValueError("the values seen do not add up to the total the thresholds were planned for")
            low = top[:, keep - 1].double()  # ascending index `lower`
            if keep == 1:
                return low.float()
            high = top[:, keep - 2].double()  # ascending index `lower + 1`
            return (low + (position - lower) * (high - low)).float()
        return torch.from_numpy(np.quantile(self.values.double().numpy(), self.q, axis=1)).float()


def quantile_thresholds(batches: Callable[[], Iterable[torch.Tensor]], total: int, q: float, method: str = "auto",
                        seed: int = 0) -> tuple[torch.Tensor, str]:
    """Per unit, the q-quantile of its values over all images and positions (NumPy's 'linear' definition).

    `total` is the number of values per unit (images x h x w). 'exact' keeps only the values at or above
    the quantile's lower neighbour while streaming: the largest total - floor((total - 1) q) of them.
    'sampled' estimates the quantile from about SAMPLE_SIZE positions picked by a counter-based hash (the
    same positions for every unit, and however the images are sharded); its rank error has standard
    deviation sqrt(q (1 - q) / SAMPLE_SIZE), about 1.6e-4 for q = 0.995. 'auto' is exact while the kept
    values fit in EXACT_BUDGET.
    """
    state = None
    first = 0
    for a in batches():
        if state is None:
            state = ThresholdState(choose_method(method, total, q, a.shape[1]), total, q, seed)
        state.add(a, first)
        first += a.shape[0]
    assert state is not None, "no values"
    return state.thresholds(), state.method


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


def top_by_peak(values: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the positions of the k largest values, ties broken by the smaller image index: the same
    choice whatever order the candidates came in."""
    by_index = torch.argsort(index, dim=1, stable=True)
    by_value = torch.argsort(-values.gather(1, by_index), dim=1, stable=True)[:, :k]
    return by_index.gather(1, by_value)


class TallyState:
    """Sums of intersections and areas over the images seen so far, each unit's peak on each of them, and its
    `top` images with their maps. Plain data (`as_dict`) that shards merge by adding."""

    def __init__(self, thresholds: torch.Tensor, n_labels: int, categories: list[str], top: int):
        self.thresholds = thresholds
        self.cat_index = {c: i for i, c in enumerate(categories)}
        units = len(thresholds)
        self.inter = torch.zeros(units, n_labels, dtype=torch.float64)
        self.unit_area = torch.zeros(units, len(categories), dtype=torch.float64)
        self.label_area = torch.zeros(n_labels, dtype=torch.float64)
        self.peaks: list[torch.Tensor] = []
        self.top = top
        self.best_value: torch.Tensor | None = None  # units x top
        self.best_index: torch.Tensor | None = None
        self.best_maps: torch.Tensor | None = None  # units x top x h x w

    def add(self, a: torch.Tensor, labels: list[Labels], first_image: int) -> None:
        thresholds = self.thresholds.to(a.device)
        # Bilinear upsampling never exceeds a map's maximum, so a unit whose map stays at or below its
        # threshold has an empty mask: only the units that fire on an image are upsampled and counted.
        peak = a.amax(dim=(2, 3))
        self.peaks.append(peak.cpu())
        self._keep_best(a, peak, first_image)
        for maps, fires, lab in zip(a, peak > thresholds, labels):
            pixels = lab.size[0] * lab.size[1]
            flat = torch.from_numpy(lab.pixel.reshape(len(lab.pixel), pixels)).long()
            present = torch.unique(flat[flat > 0])
            # pixel x label membership (a label drawn on several maps, like overlapping parts, counts once),
            # then a column of ones that counts each mask's area
            member = torch.cat([(flat[:, :, None] == present[None, None]).any(dim=0),
                                torch.ones(pixels, 1, dtype=torch.bool)], dim=1).float()
            self.label_area[present] += member[:, :-1].sum(dim=0).double()
            for label in lab.image:
                self.label_area[label] += pixels
            units_on = fires.nonzero()[:, 0]
            if not len(units_on):
                continue
            masks = unit_masks(maps[units_on], thresholds[units_on], lab.size).reshape(len(units_on), -1)
            counts = (masks.float() @ member.to(a.device)).double().cpu()
            units_on = units_on.cpu()
            area = counts[:, -1]
            self.inter[units_on[:, None], present[None]] += counts[:, :-1]
            for c in lab.categories:
                if c in self.cat_index:
                    self.unit_area[units_on, self.cat_index[c]] += area
            for label in lab.image:
                self.inter[units_on, label] += area

    def _keep_best(self, a: torch.Tensor, peak: torch.Tensor, first_image: int) -> None:
        units = a.shape[1]
        index = torch.arange(first_image, first_image + a.shape[0]).expand(units, -1)
        values, maps = peak.T.cpu(), a.transpose(0, 1).cpu()
        if self.best_value is not None:
            values = torch.cat([self.best_value, values], dim=1)
            index = torch.cat([self.best_index, index], dim=1)
            maps = torch.cat([self.best_maps, maps], dim=1)
        chosen = top_by_peak(values, index, self.top)
        self.best_value, self.best_index = values.gather(1, chosen), index.gather(1, chosen)
        self.best_maps = maps[torch.arange(units)[:, None], chosen]

    def as_dict(self) -> dict:
        return {"intersection": self.inter.numpy(), "unit_area": self.unit_area.numpy(),
                "label_area": self.label_area.numpy(), "peaks": torch.cat(self.peaks).numpy(),
                "best_value": self.best_value.numpy(), "best_index": self.best_index.numpy(),
                "best_maps": self.best_maps.numpy()}

    @staticmethod
    def merge(parts: list[dict], top: int) -> dict:
        """Shards' tallies (in image order) -> one tally, as if one pass had seen every image."""
        out = {k: sum(p[k] for p in parts) for k in ("intersection", "unit_area", "label_area")}
        out["peaks"] = np.concatenate([p["peaks"] for p in parts])
        values = torch.from_numpy(np.concatenate([p["best_value"] for p in parts], axis=1))
        index = torch.from_numpy(np.concatenate([p["best_index"] for p in parts], axis=1))
        maps = np.concatenate([p["best_maps"] for p in parts], axis=1)
        chosen = top_by_peak(values, index, top).numpy()
        rows = np.arange(len(chosen))[:, None]
        out.update(best_value=values.numpy()[rows, chosen], best_index=index.numpy()[rows, chosen],
                   best_maps=maps[rows, chosen])
        return out


def tally(batches: Callable[[], Iterable[torch.Tensor]], thresholds: torch.Tensor, labels: Iterable[Labels],
          n_labels: int, categories: list[str], top: int = 1) -> Tally:
    """Sum intersections and areas over every image (see the module docstring for the definition)."""
    state = TallyState(thresholds, n_labels, categories, top)
    label_iter = iter(labels)
    first = 0
    for a in batches():
        state.add(a, [next(label_iter) for _ in range(a.shape[0])], first)
        first += a.shape[0]
    d = state.as_dict()
    return Tally(*(torch.from_numpy(d[k]) for k in ("intersection", "unit_area", "label_area", "peaks")))


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


@functools.lru_cache(maxsize=16)
def rotation_for(channels: int, seed: int, alpha: float) -> torch.Tensor | None:
    """The rotation a job applies (None for alpha 0), computed once per process."""
    return None if alpha == 0 else partial_rotation(random_rotation(channels, seed), alpha)


# ---------------------------------------------------------------- one layer: the result


def finish(thresholds: torch.Tensor, method: str, counts: dict, probe_names: tuple[str, ...],
           label_category: torch.Tensor, keep_maps: bool) -> dict:
    """IoU, each unit's label and score, its top images (by peak activation) and their maps."""
    tally_ = Tally(*(torch.from_numpy(counts[k]) for k in ("intersection", "unit_area", "label_area", "peaks")))
    iou = tally_.iou(label_category)
    iou[:, 0] = 0  # label 0 is 'unlabelled'
    best_iou, best = iou.max(dim=1)
    return {
        "thresholds": thresholds.numpy(),
        "threshold_method": method,
        "iou": iou.float().numpy(),
        "label": best.numpy(),
        "best_iou": best_iou.float().numpy(),
        "top_images": counts["best_index"],
        "top_maps": counts["best_maps"].astype(np.float16) if keep_maps else None,  # the gallery shows unrotated units
        "label_area": counts["label_area"],
    }


def _label_category(probe: PixelProbe) -> torch.Tensor:
    categories = probe.category_names
    return torch.tensor([categories.index(c) if c in categories else 0 for c in probe.categories])


# ---------------------------------------------------------------- tasks: one model's layers over one shard


Job = tuple[str, "float | str"]  # (layer, rotation alpha), or (layer, a learned direction's method)


def _tally_batch(states: dict[str, TallyState], maps: dict[str, torch.Tensor], jobs: list[Job],
                 labels, thresholds: dict, probe, settings: NetDissectSettings, first: int,
                 projections: dict[str, np.ndarray]) -> None:
    """Add one batch of recorded maps to each job's tally (made on first use), rotated or projected as it asks."""
    batch_labels = [next(labels) for _ in range(next(iter(maps.values())).shape[0])]
    for layer, basis in jobs:
        a = maps[layer]
        name = job_name(layer, basis)
        if name not in states:
            states[name] = TallyState(torch.from_numpy(thresholds[name]["thresholds"]), len(probe.names),
                                      probe.category_names, settings.top_images)
        states[name].add(rotate(a, job_matrix(layer, basis, a.shape[1], settings.seed, projections)), batch_labels,
                         first)


def job_name(layer: str, basis: float | str) -> str:
    """'blocks.6@0' (the units), 'blocks.6@0.5' (rotated by Q^0.5), 'blocks.6@nmf' (a learned direction's basis)."""
    return f"{layer}@{basis}" if isinstance(basis, str) else f"{layer}@{basis:g}"


def job_title(basis: float | str) -> str:
    """What a job adds to a progress label."""
    if isinstance(basis, str):
        return f" {basis} directions"
    return f" rotated {basis:g}" if basis else ""


def job_matrix(layer: str, basis: float | str, channels: int, seed: int,
               projections: dict[str, np.ndarray]) -> torch.Tensor | None:
    """The matrix a job applies to the layer's channels: a rotation, a fitted projection (k x C), or None (units)."""
    if isinstance(basis, str):
        return torch.from_numpy(projections[job_name(layer, basis)])
    return rotation_for(channels, seed, basis)


def projections_of(directions: list[dict] | None) -> dict[str, np.ndarray]:
    """The fitted projections (dissection/direction_fits.py fit_task values) by job name."""
    return {job_name(d["layer"], d["method"]): d["projection"] for d in directions or ()}


def _jobs_by_layer(jobs: list[Job]) -> list[str]:
    return list(dict.fromkeys(layer for layer, _ in jobs))


def shard_thresholds_task(model: ModelRef, jobs: list[Job], probe: PixelProbe, first_image: int,
                          total_images: int, settings: NetDissectSettings, device: str, batch_size: int,
                          directions: list[dict] | None = None) -> dict:
    """Pass 1 over a shard: per job, what the threshold needs (ThresholdState, as a dict)."""
    m = model_for(model, device)
    projections = projections_of(directions)
    states: dict[str, ThresholdState] = {}
    for start, maps in stream_maps(m, _jobs_by_layer(jobs), probe, torch.device(device), batch_size,
                                   f"{model.id} thresholds"):
        for layer, basis in jobs:
            a = maps[layer]
            name = job_name(layer, basis)
            if name not in states:
                total = total_images * a.shape[2] * a.shape[3]
                method = choose_method(settings.threshold, total, settings.quantile, a.shape[1])
                states[name] = ThresholdState(method, total, settings.quantile, settings.seed)
            states[name].add(rotate(a, job_matrix(layer, basis, a.shape[1], settings.seed, projections)),
                             first_image + start)
    return {name: state.as_dict() for name, state in states.items()}


def merge_thresholds_task(parts: list[dict]) -> dict:
    return {name: ThresholdState.merge([p[name] for p in parts]) for name in parts[0]}


def thresholds_task(states: dict) -> dict:
    """Per (layer, alpha): the thresholds and how they were computed."""
    return {name: {"thresholds": ThresholdState.from_dict(s).thresholds().numpy(), "method": s["method"]}
            for name, s in states.items()}


def shard_tally_task(model: ModelRef, jobs: list[Job], probe: PixelProbe, first_image: int,
                     thresholds: dict, settings: NetDissectSettings, device: str, batch_size: int,
                     directions: list[dict] | None = None) -> dict:
    """Pass 2 over a shard: per job, intersections, areas, peaks and top images (TallyState)."""
    m = model_for(model, device)
    projections = projections_of(directions)
    states: dict[str, TallyState] = {}
    labels = probe.labels()
    for start, maps in stream_maps(m, _jobs_by_layer(jobs), probe, torch.device(device), batch_size,
                                   f"{model.id} IoU"):
        _tally_batch(states, maps, jobs, labels, thresholds, probe, settings, first_image + start, projections)
    return {name: state.as_dict() for name, state in states.items()}


MAPS_IN_MEMORY = 1024**3  # bytes of recorded maps a one-shard run keeps, to pass over them twice without the model


def whole_probe_task(model: ModelRef, jobs: list[Job], probe: PixelProbe, settings: NetDissectSettings,
                     device: str, batch_size: int, directions: list[dict] | None = None) -> dict:
    """Both passes over a probe set that is a single shard: {"thresholds": ..., "tally": ...} as the sharded
    tasks give them. The maps are recorded once and kept while they fit in MAPS_IN_MEMORY; beyond that the
    model runs twice (the same numbers either way: the states do not depend on how images are batched)."""
    m = model_for(model, device)
    layers = _jobs_by_layer(jobs)
    projections = projections_of(directions)
    kept: list[tuple[int, dict[str, torch.Tensor]]] = []
    size = 0
    states: dict[str, ThresholdState] = {}
    for start, maps in stream_maps(m, layers, probe, torch.device(device), batch_size, f"{model.id} maps"):
        for layer, basis in jobs:
            a = maps[layer]
            name = job_name(layer, basis)
            if name not in states:
                total = len(probe) * a.shape[2] * a.shape[3]
                states[name] = ThresholdState(choose_method(settings.threshold, total, settings.quantile, a.shape[1]),
                                              total, settings.quantile, settings.seed)
            states[name].add(rotate(a, job_matrix(layer, basis, a.shape[1], settings.seed, projections)), start)
        size += sum(t.numel() * 4 for t in maps.values())
        if kept is not None and size <= MAPS_IN_MEMORY:
            kept.append((start, {k: v.clone() for k, v in maps.items()}))
        else:
            kept = None  # too large: pass 2 runs the model again
    thresholds = thresholds_task({name: s.as_dict() for name, s in states.items()})
    if kept is None:
        tally_ = shard_tally_task(model, jobs, probe, 0, thresholds, settings, device, batch_size, directions)
    else:
        tallies: dict[str, TallyState] = {}
        labels = probe.labels()
        for start, maps in current().track(kept, f"{model.id} IoU", unit="batches"):
            _tally_batch(tallies, maps, jobs, labels, thresholds, probe, settings, start, projections)
        tally_ = {name: t.as_dict() for name, t in tallies.items()}
    return {"thresholds": thresholds, "tally": tally_}


def merge_tally_task(parts: list[dict], top: int) -> dict:
    return {name: TallyState.merge([p[name] for p in parts], top) for name in parts[0]}


def finish_task(name: str, probe_names: tuple[str, ...], label_category: np.ndarray, tally_: dict | None = None,
                thresholds: dict | None = None, both: dict | None = None) -> dict:
    """One job dissected: see `finish`. Takes the merged tally and the thresholds, or `both` from
    whole_probe_task. Only the units (alpha 0) keep their top maps, for the galleries."""
    if both is not None:
        tally_, thresholds = both["tally"], both["thresholds"]
    t = thresholds[name]
    return finish(torch.from_numpy(t["thresholds"]), t["method"], tally_[name], probe_names,
                  torch.from_numpy(label_category), name.rsplit("@", 1)[1] == "0")


RESULT_SHAPE = {"thresholds": np.ndarray, "iou": np.ndarray, "label": np.ndarray, "best_iou": np.ndarray,
                "top_images": np.ndarray, "label_area": np.ndarray, "threshold_method": str}


def label_categories(probe: PixelProbe) -> np.ndarray:
    return _label_category(probe).numpy()


# ---------------------------------------------------------------- rows for the report


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
