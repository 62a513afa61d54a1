"""Pooled activations: every requested layer of a model, recorded in one forward pass over the probe set."""
from __future__ import annotations

import numpy as np
import torch

from report_builder.data.probe import Pixels, ProbeSet, cut_batches
from report_builder.pipeline.progress import current
from report_builder.models.hooks import LayerRecorder
from report_builder.models.zoo import LoadedModel, ModelRef, get_layer, model_for

# 2: a ViT's tokens are pooled over its patch tokens only (Layout.pool), no longer over the class token too
CODE_VERSION = 2


def identity(model: LoadedModel, layers: list[str], probe: ProbeSet, pooling: str) -> dict:
    """Everything that determines a shard's activations: the task's key."""
    return {"weights": model.weights_hash, "layers": list(layers), "preprocess": model.preprocess.as_dict(),
            "probe": probe.manifest, "pooling": pooling, "code_version": CODE_VERSION}


def activations_task(model: ModelRef, layers: list[str], pixels: dict[str, list[np.ndarray]], pooling: str,
                     device: str, batch_size: int) -> dict[str, np.ndarray]:
    """Every listed layer's pooled activations on a probe shard (cut by probe.pixels_task), images x units,
    from one pass."""
    m = model_for(model, device)
    return {name: values.numpy() for name, values in
            record(m, layers, pixels[m.preprocess.key], pooling, torch.device(device), batch_size,
                   model.where).items()}


def record(model: LoadedModel, layers: list[str], probe: Pixels, pooling: str, device: torch.device,
           batch_size: int, where: str) -> dict[str, torch.Tensor]:
    """One pass over the probe set (or its images cut already for this model) with a forward hook on each layer;
    returns images x units per layer."""
    for i, name in enumerate(layers):
        get_layer(model, name, f"{where}.layers[{i}]")
    network, modules = model.recording(layers)  # the BatchNorm-folded copy where it gives these layers' outputs
    layouts = {name: model.layout(name) for name in layers}
    pooled = LayerRecorder(modules, lambda name, _m, _i, out: layouts[name].pool(out, pooling).cpu(), history=True)
    with pooled, torch.inference_mode():
        for crops in current().track(cut_batches(probe, model.preprocess, batch_size), f"{model.id} activations",
                                     -(-len(probe) // batch_size), "batches"):
            network(model.preprocess.normalize(np.stack(crops), device))
    return {name: torch.cat(pooled.values(name)) for name in modules}
