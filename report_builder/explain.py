"""Explanations of one model's prediction on one image.

CAM methods come from the `grad-cam` package, LIME from the `lime` package; each is an entry of
`EXPLAINERS`, a function (model, crop, target class, settings) -> a result dict with
`map` (HxW float32 in [0, 1], at the model's input resolution) and `seconds`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .spec import ExplainSpec
from .zoo import LoadedModel, get_layer

# Bump when a change alters what an explainer computes, so cached maps are recomputed.
CODE_VERSION = 1


@dataclass(frozen=True)
class Settings:
    explain: ExplainSpec
    seed: int
    device: torch.device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict(model: LoadedModel, crops: np.ndarray, device: torch.device, batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities, N x classes, for uint8 crops N x H x W x 3."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(crops), batch_size):
            x = model.preprocess.normalize(crops[i : i + batch_size], device)
            out.append(torch.softmax(model.module(x).float(), dim=1).cpu())
    return torch.cat(out).numpy()


def top_k(probs: np.ndarray, names: list[str], k: int) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        {"rank": r + 1, "class_index": int(c), "class_name": names[c], "probability": float(probs[c])}
        for r, c in enumerate(order)
    ]


def _cam(cam_class_name: str) -> Callable[..., dict]:
    def run(model: LoadedModel, crop: np.ndarray, target: int, settings: Settings) -> dict:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam_class = getattr(pytorch_grad_cam, cam_class_name)
        layer = get_layer(model, model.target_layer, f"model {model.id} target_layer")
        x = model.preprocess.normalize(crop[None], settings.device)
        kwargs = {"batch_size": settings.explain.cam.batch_size} if cam_class_name == "AblationCAM" else {}
        start = time.perf_counter()
        with cam_class(model=model.module, target_layers=[layer], **kwargs) as cam:
            if cam_class_name == "ScoreCAM":
                cam.batch_size = settings.explain.cam.batch_size
            saliency = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
        _sync(settings.device)
        seconds = time.perf_counter() - start
        return {"map": np.asarray(saliency, dtype=np.float32), "seconds": seconds}

    return run


def lime_explain(model: LoadedModel, crop: np.ndarray, target: int, settings: Settings) -> dict:
    """LIME on the model's input crop, fully seeded.

    `random_seed` of explain_instance seeds only the segmentation; the explainer's own
    `random_state` draws the perturbations, so it is seeded too. Two runs give identical masks.
    """
    from lime import lime_image
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    cfg = settings.explain.lime
    seg = cfg.segmentation
    seg_params = dict(seg.params)
    if seg.algorithm == "quickshift":
        seg_params["random_seed"] = settings.seed
    segmenter = SegmentationAlgorithm(seg.algorithm, **seg_params)
    explainer = lime_image.LimeImageExplainer(random_state=settings.seed)

    def classifier_fn(images: np.ndarray) -> np.ndarray:
        return predict(model, images, settings.device, batch_size=len(images))

    hide = cfg.hide_color
    hide = list(hide) if isinstance(hide, tuple) else hide
    start = time.perf_counter()
    explanation = explainer.explain_instance(
        crop,
        classifier_fn,
        labels=(target,),
        top_labels=None,
        hide_color=hide,
        num_features=cfg.num_features,
        num_samples=cfg.num_samples,
        batch_size=cfg.batch_size,
        segmentation_fn=segmenter,
        random_seed=settings.seed,
    )
    _sync(settings.device)
    seconds = time.perf_counter() - start
    _, mask = explanation.get_image_and_mask(
        target, positive_only=True, num_features=cfg.num_features, hide_rest=False
    )
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


EXPLAINERS: dict[str, Callable[[LoadedModel, np.ndarray, int, Settings], dict]] = {
    "gradcam": _cam("GradCAM"),
    "ablationcam": _cam("AblationCAM"),
    "scorecam": _cam("ScoreCAM"),
    "lime": lime_explain,
}


def cache_parts(method: str, model: LoadedModel, image_sha: str, target: int, settings: Settings) -> dict:
    """Everything that determines an explanation's result: the cache key."""
    params: dict = {"target_layer": model.target_layer}
    if method == "lime":
        params = {"lime": settings.explain.lime.model_dump(mode="json"), "seed": settings.seed}
    elif method in ("ablationcam", "scorecam"):
        params["batch_size"] = settings.explain.cam.batch_size
    return {
        "method": method,
        "code_version": CODE_VERSION,
        "weights": model.weights_hash,
        "preprocess": model.preprocess.as_dict(),
        "image": image_sha,
        "target": target,
        "params": params,
        "device": settings.device.type,
    }
