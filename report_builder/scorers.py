"""Concept scorers: probe images x concepts similarity matrices.

- `clip`: open_clip image-text cosines (what CLIP-Dissect uses);
- `classifier`: another model's softmax probabilities over its own class names (offline stand-in);
- `colors`: the fraction of each image's pixels nearest to each Broden colour name (offline).
Scorers combine by concatenating their concepts; every concept remembers its scorer.
"""
from __future__ import annotations

import functools
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .cache import Cache
from .concepts import BRODEN_COLORS, clean, load_concepts
from .errors import UserError
from .probe import ProbeSet
from .spec import DissectSpec, ScorerSpec, resolve_path
from .zoo import load_model, weights_hash

CODE_VERSION = 2


@dataclass
class ConceptScores:
    concepts: list[str]
    scorers: list[str]  # per concept: the scorer that produced its column
    matrix: torch.Tensor  # images x concepts, float32 on the CPU
    descriptions: dict[str, str]  # scorer label -> what it is, in words


def _text_hash(words: list[str]) -> str:
    return hashlib.sha256("\n".join(words).encode()).hexdigest()


# ---------------------------------------------------------------- clip


def load_clip(spec: ScorerSpec, base_dir: Path, device: torch.device, where: str):
    import open_clip

    if spec.config:
        config = resolve_path(spec.config, base_dir)
        if not config.is_file():
            raise UserError(f"{where}.config: {config} does not exist")
        open_clip.add_model_config(config)
    if spec.model not in open_clip.list_models():
        raise UserError(f"{where}.model: found {spec.model!r}, expected an open_clip model name "
                        "(open_clip.list_models()) or a 'config' file defining it")
    if spec.path:
        source = resolve_path(spec.path, base_dir)
        if not source.is_file():
            raise UserError(f"{where}.path: CLIP checkpoint {source} does not exist")
        pretrained = str(source)
    else:
        pretrained = spec.pretrained
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=pretrained, device=device)
    except Exception as exc:  # noqa: BLE001 - hub, network and format errors all need the same advice
        url = ""
        try:
            url = open_clip.get_pretrained_url(spec.model, spec.pretrained or "") or ""
        except Exception:  # noqa: BLE001
            pass
        raise UserError(
            f"{where}: could not load CLIP {spec.model} / {pretrained} ({type(exc).__name__}: {str(exc)[:200]}).\n"
            f"  On a machine with a network, download the weights{f' ({url})' if url else ''} and set "
            f"{where}.path to the file."
        ) from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(spec.model)


def clip_scores(spec: ScorerSpec, concepts: list[str], probe: ProbeSet, base_dir: Path, device: torch.device,
                cache: Cache, batch_size: int, where: str) -> torch.Tensor:
    """Cosines between L2-normalised image and text embeddings, images x concepts."""
    model, preprocess, tokenizer = load_clip(spec, base_dir, device, where)
    wh = weights_hash(model)

    def images() -> np.ndarray:
        out = []
        with torch.inference_mode():
            for batch in probe.batches(batch_size):
                x = torch.stack([preprocess(im) for im in batch]).to(device)
                out.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out).numpy()

    def texts() -> np.ndarray:
        return encode_texts(model, tokenizer, [spec.prompt.format(c) for c in concepts], device).numpy()

    base = {"weights": wh, "code_version": CODE_VERSION}
    img, _ = cache.get_or_compute("clip-image", {**base, "probe": probe.manifest, "preprocess": repr(preprocess)}, images)
    txt, _ = cache.get_or_compute("clip-text", {**base, "concepts": _text_hash(concepts), "prompt": spec.prompt}, texts)
    return torch.from_numpy(img) @ torch.from_numpy(txt).T


def encode_text_truncated(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `encode_text`, run on the first L token positions only, L = the longest text in the batch.

    CLIP's text transformer is causal and pools the end-of-text token (the largest token id), so the
    padding after it never reaches the output: the result equals the full 77-token pass, at a
    fraction of its cost. Models whose text tower is not of that kind use `encode_text` as is.
    """
    causal = getattr(model, "attn_mask", None) is not None and getattr(model, "text_pool_type", None) == "argmax"
    if not causal or not hasattr(model, "token_embedding"):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


def encode_texts(model, tokenizer, texts: list[str], device: torch.device, batch_size: int = 256,
                 truncate: bool = True) -> torch.Tensor:
    """L2-normalised text embeddings, N x D on the CPU. Texts are batched by token length (then put back in
    order), so each batch is truncated to its own longest text."""
    tokens = tokenizer(texts)
    order = torch.argsort(tokens.argmax(dim=-1), stable=True) if truncate else torch.arange(len(texts))
    out = torch.empty(0)
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokens[order[i : i + batch_size]].to(device)
            emb = encode_text_truncated(model, batch) if truncate else model.encode_text(batch)
            chunks.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    out = torch.cat(chunks)
    result = torch.empty_like(out)
    result[order] = out
    return result


# ---------------------------------------------------------------- classifier


def classifier_scores(spec: ScorerSpec, probe: ProbeSet, base_dir: Path, device: torch.device, cache: Cache,
                      batch_size: int, where: str) -> tuple[list[str], torch.Tensor, str]:
    """Softmax probabilities of a zoo model over its class names; classes that share a cleaned name are summed."""
    from .explain import predict

    model = load_model(spec.classifier, base_dir, f"{where}.classifier", device)

    def compute() -> np.ndarray:
        out = []
        for batch in probe.batches(batch_size):
            crops = np.stack([model.preprocess.crop(im) for im in batch])
            out.append(predict(model, crops, device, batch_size))
        return np.concatenate(out).astype(np.float32)

    parts = {"weights": model.weights_hash, "probe": probe.manifest, "preprocess": model.preprocess.as_dict(),
             "code_version": CODE_VERSION}
    probs, _ = cache.get_or_compute("classifier-scores", parts, compute)
    names = OrderedDict()
    for i, name in enumerate(model.class_names):
        names.setdefault(clean(name), []).append(i)
    probs_t = torch.from_numpy(probs)
    matrix = torch.stack([probs_t[:, idx].sum(dim=1) for idx in names.values()], dim=1)
    return list(names), matrix, f"{model.spec.display} class probabilities ({model.origin})"


# ---------------------------------------------------------------- colours

# Prototype sRGB values of the 11 colour names; a pixel takes the name of the nearest prototype in CIE Lab.
COLOR_PROTOTYPES = {
    "black": (0, 0, 0), "blue": (0, 0, 255), "brown": (139, 69, 19), "green": (0, 128, 0),
    "grey": (128, 128, 128), "orange": (255, 165, 0), "pink": (255, 192, 203), "purple": (128, 0, 128),
    "red": (255, 0, 0), "white": (255, 255, 255), "yellow": (255, 255, 0),
}


@functools.cache
def _prototypes_lab() -> np.ndarray:
    """The colour prototypes in CIE Lab, computed once rather than for every probe image."""
    from skimage.color import rgb2lab

    rgb = np.array([COLOR_PROTOTYPES[c] for c in BRODEN_COLORS], np.uint8).reshape(-1, 1, 3)
    return rgb2lab(rgb).reshape(-1, 3)


def name_colors(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> HxW index into BRODEN_COLORS: each pixel named by the nearest prototype in CIE Lab."""
    from skimage.color import rgb2lab

    lab = rgb2lab(image.reshape(-1, 1, 3)).reshape(-1, 3)
    nearest = np.argmin(((lab[:, None, :] - _prototypes_lab()[None]) ** 2).sum(-1), axis=1)
    return nearest.reshape(image.shape[:2])


def color_fractions(image: np.ndarray) -> np.ndarray:
    """The fraction of pixels named by each Broden colour, in BRODEN_COLORS order."""
    nearest = name_colors(image).ravel()
    return np.bincount(nearest, minlength=len(BRODEN_COLORS)) / nearest.size


def colors_scores(probe: ProbeSet, cache: Cache) -> torch.Tensor:
    def compute() -> np.ndarray:
        rows = []
        for batch in probe.batches(64):
            for im in batch:
                small = im.copy()
                small.thumbnail((128, 128))
                rows.append(color_fractions(np.asarray(small)))
        return np.stack(rows).astype(np.float32)

    values, _ = cache.get_or_compute("color-scores", {"probe": probe.manifest, "code_version": CODE_VERSION}, compute)
    return torch.from_numpy(values)


# ---------------------------------------------------------------- all scorers


def score_concepts(spec: DissectSpec, probe: ProbeSet, base_dir: Path, device: torch.device, cache: Cache,
                   say: Callable[[str], None] = lambda s: None) -> ConceptScores:
    concepts: list[str] = []
    owners: list[str] = []
    blocks: list[torch.Tensor] = []
    descriptions: dict[str, str] = {}
    for i, scorer in enumerate(spec.scorers):
        where = f"dissect.scorers[{i}]"
        if scorer.kind == "clip":
            words = load_concepts(spec.concepts, base_dir)
            label = f"CLIP {scorer.model}"
            matrix = clip_scores(scorer, words, probe, base_dir, device, cache, spec.batch_size, where)
            descriptions[label] = (f"open_clip {scorer.model} ({scorer.path or scorer.pretrained}), prompt "
                                   f"{json.dumps(scorer.prompt)}, {len(words)} concepts from {', '.join(spec.concepts)}")
        elif scorer.kind == "classifier":
            words, matrix, text = classifier_scores(scorer, probe, base_dir, device, cache, spec.batch_size, where)
            label = f"classifier {scorer.classifier.display}"
            descriptions[label] = text + " — an offline stand-in for CLIP"
        else:
            words, matrix = list(BRODEN_COLORS), colors_scores(probe, cache)
            label = "pixel colours"
            descriptions[label] = ("fraction of pixels nearest (in CIE Lab) to each of the 11 Broden colour names — "
                                   "an offline stand-in for CLIP")
        say(f"  scorer {label}: {len(words)} concepts")
        concepts.extend(words)
        owners.extend([label] * len(words))
        blocks.append(matrix.float())
    return ConceptScores(concepts, owners, torch.cat(blocks, dim=1), descriptions)
