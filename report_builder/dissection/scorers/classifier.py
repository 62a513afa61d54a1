"""The `classifier` concept scorer: a zoo model's softmax probabilities over its own class names, an offline
stand-in for CLIP.

Its plan loads the model (the spec entry's `classifier`); its tasks run it on each probe shard; its block of the
concept scores sums the probabilities of the classes that share a cleaned name (one concept).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from report_builder.data.concepts import clean
from report_builder.data.probe import cut_batches
from report_builder.dissection.scorers import ScorerPlan
from report_builder.models.zoo import ModelRef, load_model, model_for, remember
from report_builder.pipeline.progress import current
from report_builder.spec.schema import ScorerSpec

CODE_VERSION = 3


def classifier_task(model: ModelRef, pixels: dict[str, list[np.ndarray]], device: str, batch_size: int) -> np.ndarray:
    """Softmax probabilities of a zoo model over its class names on a probe shard (cut by probe.pixels_task),
    images x classes."""
    from report_builder.models.outputs import class_probabilities

    m = model_for(model, device)
    crops = pixels[m.preprocess.key]
    out = []
    for batch in current().track(cut_batches(crops, m.preprocess, batch_size), f"{model.id} scores",
                                 -(-len(crops) // batch_size), "batches"):
        out.append(class_probabilities(m, np.stack(batch), torch.device(device), batch_size))
    return np.concatenate(out).astype(np.float32)


def class_groups(class_names: list[str]) -> tuple[list[str], list[list[int]]]:
    """Classes that share a cleaned name are one concept: (concepts, the class indices of each)."""
    names: OrderedDict[str, list[int]] = OrderedDict()
    for i, name in enumerate(class_names):
        names.setdefault(clean(name), []).append(i)
    return list(names), list(names.values())


# ---------------------------------------------------------------- the registry's three functions


def plan(spec, scorer: ScorerSpec, where: str, device: torch.device) -> ScorerPlan:
    m = load_model(scorer.classifier, f"{where}.classifier", device)
    remember(m, device)
    concepts, groups = class_groups(m.class_names)
    return ScorerPlan("classifier", f"classifier {m.spec.display}",
                      f"{m.spec.display} class probabilities ({m.origin}) — an offline stand-in for CLIP",
                      concepts, m.preprocess, ref=m.ref, extra={"groups": groups})


def tasks(g, sc: ScorerPlan, shards, pixel_keys: list[str], dev: str, batch: int) -> dict:
    """The model's probabilities, a task per probe shard."""
    ident = {"weights": sc.ref.weights_hash, "preprocess": sc.view.as_dict(), "code_version": CODE_VERSION}
    return {"images": [g.add("classifier-scores", classifier_task, f"{sc.label} scores {j}",
                             {**ident, "probe": s.manifest}, {"model": sc.ref, "device": dev, "batch_size": batch},
                             {"pixels": pk}, model=True, shape=np.ndarray)
                       for j, (s, pk) in enumerate(zip(shards, pixel_keys))]}


def combine(scorer: dict, images: np.ndarray, parts: dict) -> np.ndarray:
    """A concept's score is the summed probability of its classes."""
    return np.stack([images[:, idx].sum(axis=1) for idx in scorer["groups"]], axis=1)
