"""Pooled activations: every requested layer of a model, recorded in one forward pass over the probe set."""
from __future__ import annotations

import numpy as np
import torch

from .probe import ProbeSet
from .progress import current
from .zoo import Layout, LoadedModel, ModelRef, get_layer, model_for

CODE_VERSION = 1


def pool(output: torch.Tensor, how: str, layout: Layout | None = None) -> torch.Tensor:
    """A layer's output -> N x C: the mean or maximum over its map (for a ViT, over its patch tokens, not the
    class token), or its class token ('cls'). Without a layout, N x C x H x W is taken as a map."""
    return (layout or Layout("nchw" if output.dim() == 4 else "flat")).pool(output, how)


def identity(model: LoadedModel, layers: list[str], probe: ProbeSet, pooling: str) -> dict:
    """Everything that determines a shard's activations: the task's key."""
    return {"weights": model.weights_hash, "layers": list(layers), "preprocess": model.preprocess.as_dict(),
            "probe": probe.manifest, "pooling": pooling, "code_version": CODE_VERSION}


def activations_task(model: ModelRef, layers: list[str], probe: ProbeSet, pooling: str, device: str,
                     batch_size: int) -> dict[str, np.ndarray]:
    """Every listed layer's pooled activations on a probe shard, images x units, from one pass."""
    m = model_for(model, device)
    return {name: values.numpy() for name, values in
            record(m, layers, probe, pooling, torch.device(device), batch_size, model.where).items()}


def record(model: LoadedModel, layers: list[str], probe: ProbeSet, pooling: str, device: torch.device,
           batch_size: int, where: str) -> dict[str, torch.Tensor]:
    """One pass over the probe set with a forward hook on each layer; returns images x units per layer."""
    modules = {name: get_layer(model, name, f"{where}.layers[{i}]") for i, name in enumerate(layers)}
    layouts = {name: model.layout(name) for name in layers}
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: collected[name].append(
            pool(out, pooling, layouts[name]).cpu()))
        for name, module in modules.items()
    ]
    try:
        with torch.inference_mode():
            for batch in current().track(probe.batches(batch_size), f"{model.id} activations",
                                         -(-len(probe) // batch_size), "batches"):
                crops = np.stack([model.preprocess.crop(im) for im in batch])
                model.module(model.preprocess.normalize(crops, device))
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(chunks) for name, chunks in collected.items()}
