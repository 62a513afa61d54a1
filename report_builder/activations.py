"""Pooled activations: every requested layer of a model, recorded in one forward pass over the probe set."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .cache import Cache, stage_key
from .probe import ProbeSet
from .zoo import LoadedModel, get_layer

CODE_VERSION = 1


def pool(output: torch.Tensor, how: str) -> torch.Tensor:
    """N x C x H x W -> N x C by mean or max over space; N x T x C (tokens) -> mean over tokens; N x C as is."""
    if output.dim() == 4:
        return output.float().amax(dim=(2, 3)) if how == "max" else output.float().mean(dim=(2, 3))
    if output.dim() == 3:
        return output.float().mean(dim=1)
    if output.dim() == 2:
        return output.float()
    raise ValueError(f"cannot pool a layer output of shape {tuple(output.shape)}")


def cache_parts(model: LoadedModel, layer: str, probe: ProbeSet, pooling: str) -> dict:
    return {"weights": model.weights_hash, "layer": layer, "preprocess": model.preprocess.as_dict(),
            "probe": probe.manifest, "pooling": pooling, "code_version": CODE_VERSION}


def record(model: LoadedModel, layers: list[str], probe: ProbeSet, pooling: str, device: torch.device,
           batch_size: int, where: str) -> dict[str, torch.Tensor]:
    """One pass over the probe set with a forward hook on each layer; returns images x units per layer."""
    modules = {name: get_layer(model, name, f"{where}.layers[{i}]") for i, name in enumerate(layers)}
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: collected[name].append(pool(out, pooling).cpu()))
        for name, module in modules.items()
    ]
    try:
        with torch.inference_mode():
            for batch in probe.batches(batch_size):
                crops = np.stack([model.preprocess.crop(im) for im in batch])
                model.module(model.preprocess.normalize(crops, device))
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(chunks) for name, chunks in collected.items()}


def activations(model: LoadedModel, layers: list[str], probe: ProbeSet, pooling: str, device: torch.device,
                batch_size: int, cache: Cache, where: str,
                say: Callable[[str], None] = lambda s: None) -> dict[str, torch.Tensor]:
    """Cached per layer, keyed by content; the layers not in the cache are computed together in one pass."""
    out: dict[str, torch.Tensor] = {}
    missing = []
    for name in layers:
        hit = cache.load("activations", _key(model, name, probe, pooling))
        if hit is not None:
            out[name] = torch.from_numpy(hit)
        else:
            missing.append(name)
    if missing:
        say(f"  {model.id}: recording {', '.join(missing)} on {len(probe)} probe images")
        fresh = record(model, missing, probe, pooling, device, batch_size, where)
        for name, values in fresh.items():
            cache.save("activations", _key(model, name, probe, pooling), values.numpy())
            out[name] = values
    return {name: out[name] for name in layers}


def _key(model: LoadedModel, layer: str, probe: ProbeSet, pooling: str) -> str:
    return stage_key("activations", cache_parts(model, layer, probe, pooling))
