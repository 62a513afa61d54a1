"""Concept attribution: which units of a dissected layer drive a prediction, and does removing them change it.

For the explained class y (the model's top-1) and a layer whose output on the image is A (C x h x w), with
G = ∂y/∂A, each unit c gets a contribution (an `ATTRIBUTIONS` entry of explanation/registry.py):
  gradcam_terms   α_c Σ_hw A_c with α_c = mean_hw G_c: the spatial sum of Grad-CAM's channel term α_c A_c, so the
                  contributions add up to the sum of the Grad-CAM map at this layer before its ReLU (the
                  decomposition of Interpretable Basis Decomposition, Zhou et al. ECCV 2018, over units);
  hirescam_terms  Σ_hw G_c ⊙ A_c: gradient × activation, HiResCAM's channel terms (Draelos & Carin 2020).
A unit's share is its contribution over the sum of the positive ones: its part of what pushes toward y.

Is that explanation faithful? The top-k units by contribution are ablated (set to zero, as Network Dissection and
Bau et al. PNAS 2020 ablate units) and the drop of p(y) is compared with the drop for k units picked by each
`ABLATION_BASELINES` entry: random units (seeded draws: the bar a ranking must beat) and the k most active units. The
ablated copies run as one batch, through the layers after the ablated one only where the model allows it (the
AblationCAM path), else through the model with a hook that swaps in the ablated output (`Ablator`).

`concept_task` is one task per model x image: one forward and one backward pass give every listed layer's terms.
Labels are joined later, from the run's dissections (pipeline/collect.py): the task knows only unit indices.
"""
from __future__ import annotations

import numpy as np
import torch

from report_builder.explanation.methods import checked_tail
from report_builder.explanation.registry import ABLATION_BASELINES, ATTRIBUTIONS, resolve
from report_builder.models.hooks import LayerRecorder
from report_builder.models.zoo import LoadedModel, ModelRef, get_layer, model_for

# Bump when a change alters what the task computes, so cached values are recomputed.
CODE_VERSION = 5  # 5: MobileNet- and VGG-style heads run the tail only; other models run the layers before once
ROWS_PER_PASS = 64  # ablated copies per forward pass unless concepts.batch_size says: bounded memory on a ViT


def gradcam_terms(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """α_c Σ_hw A_c with α_c = mean_hw G_c: the spatial sum of Grad-CAM's channel term."""
    return G.mean(dim=(1, 2)) * A.sum(dim=(1, 2))


def hirescam_terms(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Σ_hw G_c ⊙ A_c: gradient × activation, HiResCAM's channel term summed over space."""
    return (G * A).sum(dim=(1, 2))


def random_units(activation: np.ndarray, k: int, rng: np.random.Generator, draws: int) -> list[np.ndarray]:
    """`draws` sets of k distinct units, uniformly."""
    return [rng.choice(len(activation), size=k, replace=False) for _ in range(draws)]


def most_active(activation: np.ndarray, k: int, rng: np.random.Generator, draws: int) -> list[np.ndarray]:
    """The k units with the largest pooled activation on the image."""
    return [np.argsort(-activation, kind="stable")[:k]]


def ranking(contribution: np.ndarray) -> np.ndarray:
    """Units by contribution, largest first (ties by unit index)."""
    return np.argsort(-contribution, kind="stable")


def shares(contribution: np.ndarray) -> np.ndarray:
    """Each unit's contribution over the sum of the positive ones (0 everywhere when none is positive)."""
    positive = float(np.clip(contribution, 0, None).sum())
    return contribution / positive if positive > 0 else np.zeros_like(contribution)


def _channel_axis(raw: torch.Tensor, kind: str) -> int:
    return 1 if kind in ("nchw", "flat") else raw.dim() - 1


def _as_maps(model: LoadedModel, layer: str, raw: torch.Tensor) -> torch.Tensor:
    """N x C x h x w (a flat layer as 1 x 1 maps)."""
    layout = model.layout(layer)
    return raw[:, :, None, None] if layout.kind == "flat" else layout.maps(raw)


def layer_terms(model: LoadedModel, x: torch.Tensor, layers: list[str], target: int
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """One forward and one backward pass: per layer its raw output, its map A and gradient G (C x h x w, float32),
    and the logits."""
    modules = {layer: get_layer(model, layer, f"model {model.id} layer {layer}") for layer in layers}
    x = x.clone().requires_grad_(True)  # a graph to the layers even when the weights need no gradient
    with torch.enable_grad(), LayerRecorder(modules) as rec:
        logits = model.module(x)
        outs = [rec.latest[layer] for layer in layers]
        grads = torch.autograd.grad(logits[0, target], outs, allow_unused=True)
    raw = {layer: o.detach() for layer, o in zip(layers, outs)}
    maps = {layer: _as_maps(model, layer, raw[layer])[0].float() for layer in layers}
    grad = {layer: (torch.zeros_like(maps[layer]) if g is None else _as_maps(model, layer, g)[0].float())
            for layer, g in zip(layers, grads)}
    return raw, maps, grad, logits.detach()


class Ablator:
    """p(target) after zeroing sets of units of one layer, many sets per forward pass.

    Three ways to run the ablated copies, fastest first, each checked against the model before it is used:
    "tail": the layers after the ablated one, as a function of its output (`checked_tail`);
    "broadcast": the model on the one image, its layer's output swapped for the batch of ablated copies, so the
    layers before it run once and the rest on the batch (a residual add of the image's stream broadcasts);
    "model": the model on as many copies of the image as there are sets, each swapped in at the layer.
    """

    def __init__(self, model: LoadedModel, layer: str, x: torch.Tensor, raw: torch.Tensor, logits: torch.Tensor,
                 target: int):
        self.model, self.layer, self.x, self.raw, self.target = model, layer, x, raw, target
        self.module = get_layer(model, layer, f"model {model.id} layer {layer}")
        self.axis = _channel_axis(raw, model.layout(layer).kind)
        self.tail = checked_tail(model, layer, raw, logits)
        self.forward = "tail" if self.tail is not None else "broadcast" if self._broadcasts() else "model"

    def _swapped(self, x: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
        handle = self.module.register_forward_hook(lambda m, inputs, output: ablated)
        try:
            return self.model.module(x)
        finally:
            handle.remove()

    def _broadcasts(self) -> bool:
        """Whether the one image's pass with two different ablated copies swapped in gives, row by row, what each
        copy gives alone (a model that reshapes by a batch size read before the layer does not)."""
        channels = self.raw.shape[self.axis]
        if len(self.raw) != 1 or channels < 2:
            return False
        pair = self._ablated([np.array([0]), np.arange(channels // 2)])
        with torch.inference_mode():
            try:
                both = self._swapped(self.x, pair)
                alone = torch.cat([self._swapped(self.x, pair[i : i + 1]) for i in range(2)])
            except (RuntimeError, ValueError, IndexError, TypeError):
                return False
        return both.shape == alone.shape and bool(torch.allclose(both, alone, rtol=1e-4, atol=1e-4))

    def _ablated(self, unit_sets: list[np.ndarray]) -> torch.Tensor:
        ablated = self.raw.repeat(len(unit_sets), *([1] * (self.raw.dim() - 1)))
        for row, units in enumerate(unit_sets):
            index = [row] + [slice(None)] * (self.axis - 1) + [torch.as_tensor(units, dtype=torch.long)]
            ablated[tuple(index)] = 0
        return ablated

    def _logits(self, ablated: torch.Tensor) -> torch.Tensor:
        if self.tail is not None:
            return self.tail(ablated)
        if self.forward == "broadcast":
            return self._swapped(self.x, ablated)
        return self._swapped(self.x.expand(len(ablated), *self.x.shape[1:]), ablated)

    def probabilities(self, unit_sets: list[np.ndarray], rows: int = ROWS_PER_PASS) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for first in range(0, len(unit_sets), rows):
                ablated = self._ablated(unit_sets[first : first + rows])
                out.append(torch.softmax(self._logits(ablated).float(), dim=1)[:, self.target].cpu())
        return torch.cat(out).numpy().astype(np.float64)


def attribute_layer(model: LoadedModel, x: torch.Tensor, layer: str, raw: torch.Tensor, A: torch.Tensor,
                    G: torch.Tensor, logits: torch.Tensor, target: int, settings: dict, seed: int) -> dict:
    """One layer's contributions, its Grad-CAM map, the top units' maps and the ablation drops for every k."""
    # ranked as stored (float32): collect ranks the stored values again, and finds the shown units first
    contribution = resolve(ATTRIBUTIONS[settings["attribution"]].implementation)(A, G).cpu().numpy().astype(np.float32)
    activation = A.mean(dim=(1, 2)).cpu().numpy().astype(np.float64)  # the pooled value dissection labels
    order = ranking(contribution)
    channels = len(contribution)
    ks = sorted({min(int(k), channels) for k in settings["ks"]})
    shown = order[: min(int(settings["top_units"]), channels)]
    picked = torch.as_tensor(shown, dtype=torch.long)
    cam = torch.relu((G.mean(dim=(1, 2))[:, None, None] * A).sum(dim=0))
    # every unit set of every k in one list, so the ablated copies go through the model in few batches
    sets: list[np.ndarray] = []
    where: dict[tuple[str, int], slice] = {}
    for k in ks:
        rng = np.random.default_rng([seed, k])  # the same random units on every image: a paired comparison
        for name, pick in [("top", [order[:k]])] + [
                (b, resolve(entry.implementation)(activation, k, rng, int(settings["draws"])))
                for b, entry in ABLATION_BASELINES.items()]:
            where[(name, k)] = slice(len(sets), len(sets) + len(pick))
            sets.extend(pick)
    ablator = Ablator(model, layer, x, raw, logits, target)
    p = ablator.probabilities(sets, int(settings.get("batch_size", ROWS_PER_PASS)))
    before = float(torch.softmax(logits.float(), dim=1)[0, target])
    drops = {name: [(before - p[where[(name, k)]]).tolist() for k in ks] for name in ["top", *ABLATION_BASELINES]}
    return {
        "layer": layer,
        "units": channels,
        "contribution": contribution,
        "activation": activation.astype(np.float32),
        "shown": shown.astype(np.int64),
        # each shown unit's activation map, signed by its mean gradient: positive where it pushes toward the class
        # (a unit of a linear layer, an EfficientNet block's output, can help the class by being negative)
        "maps": (A[picked] * torch.sign(G[picked].mean(dim=(1, 2)))[:, None, None]).cpu().numpy().astype(np.float16),
        "cam": cam.cpu().numpy().astype(np.float32),
        # the Grad-CAM map of the shown units alone: where the top concept units point, for comparison with the CAMs
        "units_cam": torch.relu((G[picked].mean(dim=(1, 2))[:, None, None] * A[picked]).sum(dim=0)
                                ).cpu().numpy().astype(np.float32),
        "ks": ks,
        "drops": drops,  # name -> per k the drops of p(y): one for top and one-set baselines, `draws` for random
        "forward": ablator.forward,
    }


def concept_task(model: ModelRef, crop: np.ndarray, layers: list[str], settings: dict, seed: int, device: str,
                 predictions: np.ndarray) -> dict:
    """Concept attribution of the model's top-1 class on one image at each of `layers` (see the module docstring)."""
    m = model_for(model, device)
    target = int(np.argsort(-predictions[0], kind="stable")[0])
    x = m.preprocess.normalize(crop[None], torch.device(device))
    raw, maps, grads, logits = layer_terms(m, x, layers, target)
    out = [attribute_layer(m, x, layer, raw[layer], maps[layer], grads[layer], logits, target, settings, seed)
           for layer in layers]
    return {"target": target, "probability": float(torch.softmax(logits.float(), dim=1)[0, target]), "layers": out}


RESULT_SHAPE = {"target": int, "probability": float, "layers": list}
