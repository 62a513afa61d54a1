"""Explanations of one model's prediction on one image.

Which methods exist, and how each is called, is the registry's (explanation/registry.py). CAM methods come from
the `grad-cam` package, LIME from the `lime` package; `EXPLAINERS[name]` is the function (model, crop, target
class, settings) -> a result dict with `map` (HxW float32 in [0, 1], at the model's input resolution) and
`seconds`.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from report_builder.errors import UserError
from report_builder.pipeline.progress import current, folded_tqdm
from report_builder.explanation.registry import ABLATION_BATCH, METHODS, resolve
from report_builder.models.hooks import LayerRecorder
from report_builder.models.outputs import class_probabilities
from report_builder.spec.schema import ExplainSpec, resolve_batch
from report_builder.models.zoo import LoadedModel, ModelRef, get_layer, model_for

# Bump when a change alters what an explainer computes, so cached maps are recomputed.
CODE_VERSION = 4  # 4: AblationCAM runs the tail of MobileNet- and VGG-style heads (nested Sequentials)


@dataclass(frozen=True)
class ExplainSettings:
    explain: ExplainSpec
    seed: int
    device: torch.device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def top_k(probs: np.ndarray, names: list[str], k: int) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        {"rank": r + 1, "class_index": int(c), "class_name": names[c], "probability": float(probs[c])}
        for r, c in enumerate(order)
    ]


def not_applicable(method: str, model: LoadedModel) -> str | None:
    """Why `method` cannot explain `model` (None: it can)."""
    kind = model.layout(model.target_layer).kind
    tokens = METHODS[method].token_layouts
    return tokens if tokens is not True and kind != "nchw" else None


def grad_cam(method: str) -> Callable[..., dict]:
    """The explainer that runs grad-cam's own class for `method` on the model's target layer, for its top-1 class.
    Token outputs (ViT, Swin) are reshaped to their grid for grad-cam (`Layout.maps`). The entry's flags say how
    the class is called."""
    entry = METHODS[method]
    cls = entry.cam_class

    def run(model: LoadedModel, crop: np.ndarray, target: int, settings: ExplainSettings) -> dict:
        import pytorch_grad_cam
        from pytorch_grad_cam import ablation_cam as ablation_module
        from pytorch_grad_cam import score_cam as score_module
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam_class = getattr(pytorch_grad_cam, cls, None)
        if cam_class is None:
            from importlib import metadata

            raise UserError(f"explain.methods: {method} needs grad-cam's {cls}, which the installed grad-cam "
                            f"{metadata.version('grad-cam')} does not have; upgrade it (pip install -U grad-cam)")
        layer = get_layer(model, model.target_layer, f"model {model.id} target_layer")
        layout = model.layout(model.target_layer)
        kwargs: dict = {"reshape_transform": None if layout.kind == "nchw" else layout.maps}
        if entry.ablation_batch:
            kwargs["batch_size"] = entry.ablation_batch
            if layout.kind in ("tokens", "nhwc"):  # channels in the last dimension: grad-cam's ViT ablation layer
                kwargs["ablation_layer"] = pytorch_grad_cam.AblationLayerVit()
        x = model.preprocess.normalize(crop[None], settings.device)
        start = time.perf_counter()
        # grad-cam draws tqdm bars of its own; ours take their place. Second derivatives (ShapleyCAM) need the
        # plain attention kernel: the fused ones have no double backward. grad-cam's own context manager swallows
        # IndexErrors, so its hooks are released here instead.
        cam = cam_class(model=model.module, target_layers=[] if entry.all_layers else [layer], **kwargs)
        try:
            with folded_tqdm(score_module, ablation_module, label=cls, unit="batches"), \
                    (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if entry.second_derivatives
                     else contextlib.nullcontext()):
                if entry.forward_only_batches:
                    cam.batch_size = resolve_batch(settings.explain.cam.batch_size, settings.device.type)
                if entry.own_targets:
                    saliency = cam(input_tensor=x, targets=None, target_idx=target)[0]
                else:
                    saliency = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
        except (RuntimeError, ValueError, IndexError) as exc:
            raise UserError(f"{model.where}: grad-cam's {cls} failed on {model.id} ({type(exc).__name__}: "
                            f"{str(exc)[:300]}); leave {method} out of explain.methods for this model") from None
        finally:
            _release_safely(cam)
            getattr(cam, "base_cam", cam).activations_and_grads.release()
        _sync(settings.device)
        seconds = time.perf_counter() - start
        return {"map": np.nan_to_num(np.asarray(saliency, dtype=np.float32)), "seconds": seconds}

    return run


def _release_safely(cam) -> None:
    """grad-cam detaches its stored tensors in place when it lets go of them, which fails for tensors that are views
    (ShapleyCAM keeps gradients attached, and a permuted layer output such as ConvNeXt's makes them views):
    hand it copies."""
    store = getattr(getattr(cam, "base_cam", cam), "activations_and_grads", None)
    if store is not None:
        store.gradients = [g.detach().clone() if isinstance(g, torch.Tensor) else g for g in store.gradients]
        store.activations = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in store.activations]


def lime_explain(model: LoadedModel, crop: np.ndarray, target: int, settings: ExplainSettings) -> dict:
    """LIME on the model's input crop, fully seeded, with the `lime` package's math.

    The same steps as `LimeImageExplainer.explain_instance`: the segmentation, the fill image (each
    superpixel's mean colour, or `hide_color`), one draw of `num_samples x superpixels` on/off bits
    from the explainer's seeded `random_state` (first row all on), cosine distances to the first row,
    and lime's own weighted ridge regression (`explainer.base`). What differs is only the speed: the
    perturbed images are built as whole batches with array indexing instead of a Python loop per
    sample and per superpixel, so the cost is the model's forward passes. `random_seed` of lime seeds
    only the segmentation; the explainer's `random_state` draws the perturbations, so both are seeded
    and two runs give identical masks.
    """
    from lime import lime_image
    from sklearn.metrics import pairwise_distances

    cfg = settings.explain.lime
    explainer = lime_image.LimeImageExplainer(random_state=settings.seed)
    segments, segment_seconds = lime_segments(crop, settings)
    start = time.perf_counter()
    fill = lime_fill_image(crop, segments, cfg.hide_color)
    n_features = np.unique(segments).shape[0]
    data = explainer.random_state.randint(0, 2, cfg.num_samples * n_features).reshape((cfg.num_samples, n_features))
    data[0, :] = 1
    # lime hides superpixel z when bit z is 0, matching bits to segment values; a segment value with
    # no bit (segmentations that start at 1) is never hidden, as in lime.
    column = torch.from_numpy(np.minimum(segments, n_features - 1).astype(np.int64))
    never_hidden = torch.from_numpy(segments >= n_features)
    bits = torch.from_numpy(data.astype(bool))
    crop_t, fill_t = torch.from_numpy(crop), torch.from_numpy(fill)
    labels = []
    batch = resolve_batch(cfg.batch_size, settings.device.type)
    for i in current().track(range(0, cfg.num_samples, batch), "LIME", unit="batches"):
        keep = bits[i : i + batch][:, column] | never_hidden  # batch x H x W: which pixels show the image
        images = torch.where(keep[..., None], crop_t, fill_t)
        labels.append(class_probabilities(model, images, settings.device, batch_size=len(images)))
    labels = np.concatenate(labels)
    distances = pairwise_distances(data, data[0].reshape(1, -1), metric="cosine").ravel()
    explanation = lime_image.ImageExplanation(crop, segments)
    (explanation.intercept[target], explanation.local_exp[target], explanation.score,
     explanation.local_pred) = explainer.base.explain_instance_with_data(
        data, labels, distances, target, cfg.num_features, model_regressor=None,
        feature_selection=explainer.feature_selection)
    _sync(settings.device)
    seconds = segment_seconds + time.perf_counter() - start
    return _lime_result(explanation, target, cfg.num_features, seconds)


_SEGMENTS: dict[tuple, tuple[np.ndarray, float]] = {}  # this process's recent segmentations, oldest first
_SEGMENTS_KEPT = 16


def forget_lime_segments() -> None:
    """Empty this process's segmentations (a benchmark timing one call as a user's first)."""
    _SEGMENTS.clear()


def lime_segments(crop: np.ndarray, settings: ExplainSettings) -> tuple[np.ndarray, float]:
    """lime's segmentation of `crop` (read-only) and the seconds it took. The sanity check's steps and the LIME
    sweep's settings explain one crop many times with one segmentation, so a crop segmented before in this process
    with the same settings is not segmented again; its seconds are those it took then, so that every LIME timing
    still counts the segmentation, as a single call would."""
    seg = settings.explain.lime.segmentation
    key = (hashlib.blake2b(crop.tobytes(), digest_size=16).digest(), crop.shape, str(crop.dtype), seg.algorithm,
           repr(sorted(dict(seg.params).items())), settings.seed)
    if key not in _SEGMENTS:
        start = time.perf_counter()
        segments = lime_segmenter(settings)(crop)
        segments.setflags(write=False)
        while len(_SEGMENTS) >= _SEGMENTS_KEPT:
            _SEGMENTS.pop(next(iter(_SEGMENTS)))
        _SEGMENTS[key] = (segments, time.perf_counter() - start)
    return _SEGMENTS[key]


def lime_segmenter(settings: ExplainSettings):
    """lime's segmentation wrapper with the spec's algorithm and parameters; quickshift is seeded."""
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    seg = settings.explain.lime.segmentation
    params = dict(seg.params)
    if seg.algorithm == "quickshift":
        params["random_seed"] = settings.seed
    return SegmentationAlgorithm(seg.algorithm, **params)


def lime_fill_image(crop: np.ndarray, segments: np.ndarray, hide_color) -> np.ndarray:
    """What a hidden superpixel shows: its mean colour (truncated to uint8, as lime does) or `hide_color`."""
    fill = crop.copy()
    if hide_color is None:
        for x in np.unique(segments):
            fill[segments == x] = crop[segments == x].mean(axis=0)
    else:
        fill[:] = hide_color
    return fill


def lime_package_explain(model: LoadedModel, crop: np.ndarray, target: int, settings: ExplainSettings,
                         batch_size: int | None = None) -> dict:
    """The `lime` package's own `explain_instance`, for equivalence tests and benchmarks."""
    from lime import lime_image

    cfg = settings.explain.lime
    explainer = lime_image.LimeImageExplainer(random_state=settings.seed)
    hide = list(cfg.hide_color) if isinstance(cfg.hide_color, tuple) else cfg.hide_color
    quiet = lime_image.tqdm
    lime_image.tqdm = lambda rows: rows  # lime draws a progress bar per call; keep the bench output readable
    start = time.perf_counter()
    try:
        explanation = explainer.explain_instance(
            crop, lambda images: class_probabilities(model, images, settings.device, batch_size=len(images)),
            labels=(target,), top_labels=None, hide_color=hide, num_features=cfg.num_features,
            num_samples=cfg.num_samples, batch_size=batch_size or resolve_batch(cfg.batch_size, settings.device.type),
            segmentation_fn=lime_segmenter(settings), random_seed=settings.seed)
    finally:
        lime_image.tqdm = quiet
    return _lime_result(explanation, target, cfg.num_features, time.perf_counter() - start)


def _lime_result(explanation, target: int, num_features: int, seconds: float) -> dict:
    _, mask = explanation.get_image_and_mask(target, positive_only=True, num_features=num_features, hide_rest=False)
    segments = explanation.segments
    weights = dict(explanation.local_exp[target])
    weight_map = np.vectorize(lambda s: weights.get(s, 0.0), otypes=[np.float32])(segments)
    peak = float(np.abs(weight_map).max()) or 1.0
    return {
        "map": np.clip(weight_map / peak, 0.0, 1.0).astype(np.float32),
        "mask": mask.astype(bool),
        "segments": segments.astype(np.int32),
        "score": float(explanation.score),
        "num_segments": int(len(np.unique(segments))),
        "seconds": seconds,
    }


def tail_after(model: LoadedModel, layer: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The part of the network after `layer`, as a function of that layer's output.

    `layer` is a top-level child (`layer4`) or a path through nn.Sequential containers (`blocks.6`):
    the later siblings at each level run in order, innermost first, then the top-level children after
    it, with a flatten before the first Linear. A later sibling that is itself an nn.Sequential runs as
    its children, so that a head like torchvision's MobileNet and VGG classifiers (a Sequential that
    starts with a Linear) gets its flatten too. That is the forward of ResNets, VGGs, MobileNets and
    EfficientNets; callers check the tail against the full model before trusting it. None when the
    path leaves nn.Sequential containers.
    """
    parent: torch.nn.Module = model.module
    stages: list[list[torch.nn.Module]] = []
    for depth, name in enumerate(layer.split(".")):
        children = list(parent.named_children())
        names = [n for n, _ in children]
        if name not in names or (depth > 0 and not isinstance(parent, torch.nn.Sequential)):
            return None
        stages.append([m for _, m in children[names.index(name) + 1 :]])
        parent = children[names.index(name)][1]
    rest = [leaf for stage in reversed(stages) for m in stage for leaf in _in_order(m)]

    def tail(x: torch.Tensor) -> torch.Tensor:
        for m in rest:
            if isinstance(m, torch.nn.Linear) and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = m(x)
        return x

    return tail


def _in_order(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules an nn.Sequential's forward runs, in order, nested Sequentials unrolled; else the module."""
    if type(module) is not torch.nn.Sequential:  # a subclass may have a forward of its own
        return [module]
    return [leaf for child in module for leaf in _in_order(child)]


def checked_tail(model: LoadedModel, layer: str, acts: torch.Tensor, logits: torch.Tensor
                 ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`tail_after(model, layer)` where it reproduces the model's logits from the layer's output `acts`, else None
    (the layers after it do not run in sequence, or their shapes do not fit: a ViT's tokens meet its pooled head)."""
    tail = tail_after(model, layer)
    if tail is None:
        return None
    try:
        with torch.inference_mode():
            return tail if torch.allclose(tail(acts), logits, rtol=1e-4, atol=1e-4) else None
    except (RuntimeError, ValueError):
        return None


def target_output(model: LoadedModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target layer's output and the model's logits, from one pass of the model itself (hooks need it)."""
    layer = get_layer(model, model.target_layer, f"model {model.id} target_layer")
    with LayerRecorder({model.target_layer: layer}, history=True) as rec:
        logits = model.module(x)
    return rec.values(model.target_layer)[0], logits


def ablation_cam(model: LoadedModel, crop: np.ndarray, target: int, settings: ExplainSettings) -> dict:
    """AblationCAM with grad-cam's math, recomputing only the network after the target layer.

    grad-cam re-runs the whole model for every ablated channel (its ablation layer replaces the target
    layer's output, but the layers before it still run). Here the target layer's activations are
    recorded once and each batch of ablated copies goes through the tail only. The ablation values are
    grad-cam's: 0 when the activations' minimum is 0, else the running minimum minus 1e7 per row of a
    batch (its AblationLayer lowers the minimum with every row), so the batch is grad-cam's default. Weights (s - s_c) / s, cam = ReLU(Σ_c w_c A_c), min-max scaled and resized as grad-cam does.
    Falls back to grad-cam's AblationCAM when the tail does not reproduce the model's output.
    """
    from pytorch_grad_cam.utils.image import scale_cam_image

    if tail_after(model, model.target_layer) is None:  # the layers after it do not run in sequence (a ViT)
        return {**PACKAGE_CAMS["ablationcam"](model, crop, target, settings), "implementation": "grad-cam"}
    x = model.preprocess.normalize(crop[None], settings.device)
    start = time.perf_counter()
    with torch.inference_mode():
        acts, logits = target_output(model, x)
        tail = checked_tail(model, model.target_layer, acts, logits) if acts.dim() == 4 else None
        if tail is None:  # grad-cam's own AblationCAM
            return {**PACKAGE_CAMS["ablationcam"](model, crop, target, settings), "implementation": "grad-cam"}
        original = float(logits[0, target])
        channels = acts.shape[1]
        batch = ABLATION_BATCH
        minimum = acts.min()
        scores = []
        for first in range(0, channels, batch):
            rows = min(batch, channels - first)
            ablated = acts.repeat(rows, 1, 1, 1)
            values = torch.zeros(rows, dtype=acts.dtype, device=acts.device)
            if minimum != 0:  # grad-cam's running minimum, row by row, in the activations' dtype
                running = minimum.clone()
                for r in range(rows):
                    running = running - 1e7
                    values[r] = running
            idx = torch.arange(rows, device=acts.device)
            ablated[idx, first + idx] = values[:, None, None]
            scores.append(tail(ablated)[:, target].float().cpu())
        scores = torch.cat(scores).numpy()
    weights = (np.float32(original) - scores.astype(np.float32)) / np.float32(original)
    activations = acts[0].float().cpu().numpy()
    cam = np.maximum((weights[:, None, None] * activations).sum(axis=0), 0)[None]
    size = (x.shape[-1], x.shape[-2])
    cam = scale_cam_image(cam, size)  # as grad-cam's compute_cam_per_layer
    cam = scale_cam_image(np.maximum(cam, 0))  # and its aggregate_multi_layers
    _sync(settings.device)
    return {"map": cam[0].astype(np.float32), "seconds": time.perf_counter() - start, "implementation": "ours"}


def score_cam(model: LoadedModel, crop: np.ndarray, target: int, settings: ExplainSettings) -> dict:
    """ScoreCAM with grad-cam's math, running each distinct masked image once.

    grad-cam runs the model once per channel of the target layer, on the image times that channel's map
    (upsampled bilinearly to the input, min-max normalised). Channels whose normalised maps are equal give the
    same masked image and the same score: every constant channel (a dead unit among them) normalises to zero.
    Each distinct map is run once and its score shared. Weights are the softmax of the scores over channels,
    cam = ReLU(sum_c w_c A_c), scaled as grad-cam does. `passes` counts the model calls made, `channels` the
    ones grad-cam would make."""
    import hashlib

    from pytorch_grad_cam.utils.image import scale_cam_image

    layout = model.layout(model.target_layer)
    x = model.preprocess.normalize(crop[None], settings.device)
    start = time.perf_counter()
    with torch.inference_mode():
        acts = layout.maps(target_output(model, x)[0]).float()  # 1 x C x h x w, as grad-cam's reshape gives it
        # grad-cam's normalisation, in its order of operations, so equal channels stay bit-equal.
        upsampled = torch.nn.functional.interpolate(acts, size=x.shape[-2:], mode="bilinear", align_corners=True)
        flat = upsampled.view(1, upsampled.shape[1], -1)
        maxs, mins = flat.max(dim=-1)[0][:, :, None, None], flat.min(dim=-1)[0][:, :, None, None]
        masks = ((upsampled - mins) / (maxs - mins + 1e-8))[0]
        first: dict[bytes, int] = {}  # digest of a normalised map -> the first channel with it
        source = []  # per channel: the channel whose masked image is run for it
        for c, m in enumerate(masks.cpu().numpy()):
            rep = first.setdefault(hashlib.blake2b(m.tobytes(), digest_size=16).digest(), c)
            source.append(rep if rep == c or torch.equal(masks[rep], masks[c]) else c)
        distinct = sorted(set(source))
        batch = resolve_batch(settings.explain.cam.batch_size, settings.device.type)
        scores: dict[int, float] = {}
        for i in current().track(range(0, len(distinct), batch), "ScoreCAM", unit="batches"):
            channels = distinct[i : i + batch]
            out = model.outputs(x * masks[channels][:, None])
            scores.update(zip(channels, out[:, target].float().cpu().tolist()))
    weights = torch.softmax(torch.tensor([scores[c] for c in source], dtype=torch.float32), dim=0).numpy()
    activations = acts[0].cpu().numpy()
    cam = np.maximum((weights[:, None, None] * activations).sum(axis=0), 0)[None]
    size = (x.shape[-1], x.shape[-2])
    cam = scale_cam_image(cam, size)  # as grad-cam's compute_cam_per_layer
    cam = scale_cam_image(np.maximum(cam, 0))  # and its aggregate_multi_layers
    _sync(settings.device)
    return {"map": cam[0].astype(np.float32), "seconds": time.perf_counter() - start, "implementation": "ours",
            "passes": 1 + len(distinct), "channels": len(source)}


# The grad-cam package's own classes, for equivalence tests and benchmarks (and our AblationCAM's fallback).
PACKAGE_CAMS = {name: grad_cam(name) for name, entry in METHODS.items() if entry.cam_class}

Explainer = Callable[[LoadedModel, np.ndarray, int, ExplainSettings], dict]


class _Explainers(Mapping):
    """Every registered method's explainer: its `implementation`, imported when first asked for, or grad-cam's own
    class."""

    def __init__(self) -> None:
        self._found: dict[str, Explainer] = {}

    def __getitem__(self, method: str) -> Explainer:
        if method not in self._found:
            entry = METHODS[method]
            self._found[method] = resolve(entry.implementation) if entry.implementation else PACKAGE_CAMS[method]
        return self._found[method]

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS)

    def __len__(self) -> int:
        return len(METHODS)


EXPLAINERS: Mapping[str, Explainer] = _Explainers()


def identity(method: str, model: LoadedModel, image_sha: str, settings: ExplainSettings) -> dict:
    """Everything that determines an explanation (with its prediction task's key, which fixes the target)."""
    entry = METHODS[method]
    params: dict = {"target_layer": model.target_layer} if entry.kind == "cam" else {}
    if entry.key_settings:
        params[entry.key_settings] = getattr(settings.explain, entry.key_settings).model_dump(mode="json",
                                                                                             exclude={"sweep"})
    if entry.seeded:
        params["seed"] = settings.seed
    params.update(entry.key_params)
    return {
        "method": method,
        "code_version": CODE_VERSION,
        "weights": model.weights_hash,
        "preprocess": model.preprocess.as_dict(),
        "image": image_sha,
        "params": params,
        "device": settings.device.type,
    }


RESULT_SHAPE = {"map": np.ndarray, "seconds": float, "target": int}


def predict_task(model: ModelRef, crops: np.ndarray, device: str) -> np.ndarray:
    """Softmax probabilities of every sample image, images x classes."""
    probs = class_probabilities(model_for(model, device), crops, torch.device(device))
    if not np.isfinite(probs).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(probs))[:, 0]})
        raise UserError(f"{model.where}: the outputs of {model.id} are not finite (NaN or infinity) on images "
                        f"{', '.join(str(i + 1) for i in bad[:5])}: its weights or inputs make it overflow")
    return probs.astype(np.float32)


def explain_task(model: ModelRef, crop: np.ndarray, index: int, method: str, explain: ExplainSpec, seed: int,
                 device: str, predictions: np.ndarray, keep_head_inputs: bool = False) -> dict:
    """One method's explanation of the model's top-1 class on one image. `keep_head_inputs` (an image whose sanity
    check walks its steps): also what its passes fed the model's output block, which the first step reuses."""
    from report_builder.models.blocks import keeping_head_inputs

    m = model_for(model, device)
    target = int(np.argsort(-predictions[index], kind="stable")[0])
    runs, kept = keeping_head_inputs(m) if keep_head_inputs else (m, lambda: None)
    value = EXPLAINERS[method](runs, crop, target, ExplainSettings(explain, seed, torch.device(device)))
    head_inputs = kept()
    return {**value, "target": target, **({"head_inputs": head_inputs} if head_inputs is not None else {})}
