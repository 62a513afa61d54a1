"""The `clip` concept scorer: open_clip image-text cosines, both embeddings L2-normalised (what CLIP-Dissect uses).

Its plan loads the CLIP model once (preflight) and reads the concept lists; its tasks embed each probe shard's
images and the concepts' texts; its block of the concept scores is images @ texts.T.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from report_builder.data.concepts import load_concepts
from report_builder.data.probe import Pixels, ProbeSet, cut_batches
from report_builder.dissection.scorers import ScorerPlan, text_hash
from report_builder.errors import UserError
from report_builder.models.onednn import route_checked
from report_builder.models.zoo import weights_hash
from report_builder.network import cache_only, hub_offline
from report_builder.pipeline.progress import current
from report_builder.spec.schema import ScorerSpec

CODE_VERSION = 3


def load_clip(spec: ScorerSpec, device: torch.device, where: str):
    import open_clip

    if spec.config:
        config = Path(spec.config)
        if not config.is_file():
            raise UserError(f"{where}.config: {config} does not exist")
        open_clip.add_model_config(config)
    if spec.model not in open_clip.list_models():
        raise UserError(f"{where}.model: found {spec.model!r}, expected an open_clip model name "
                        "(open_clip.list_models()) or a 'config' file defining it")
    if spec.path:
        source = Path(spec.path)
        if not source.is_file():
            raise UserError(f"{where}.path: CLIP checkpoint {source} does not exist")
        pretrained = str(source)
    else:
        pretrained = spec.pretrained
    offline = hub_offline() if not spec.path and pretrained else None
    try:
        with cache_only(offline is not None):
            model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=pretrained,
                                                                         device=device)
    except Exception as exc:  # noqa: BLE001 - hub, network and format errors all need the same advice
        url = ""
        try:
            url = open_clip.get_pretrained_url(spec.model, spec.pretrained or "") or ""
        except Exception:  # noqa: BLE001
            pass
        why = (f"the weights are not in the local cache and {offline}" if offline else
               f"{type(exc).__name__}: {str(exc)[:200]}")
        raise UserError(
            f"{where}: could not load CLIP {spec.model} / {pretrained} ({why}).\n"
            f"  On a machine with a network, download the weights{f' ({url})' if url else ''} and set "
            f"{where}.path to the file."
        ) from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(spec.model)


@dataclass(frozen=True)
class ClipRef:
    """A CLIP scorer as plain data, for tasks: the spec entry and the weights hash the driver saw."""

    spec: ScorerSpec
    where: str
    weights_hash: str


# CLIP models loaded in this process (the driver's preflight fills it; a Ray worker loads each once).
_CLIPS: dict[tuple[str, str], tuple] = {}


def clip_for(ref_or_spec: ClipRef | ScorerSpec, device: torch.device | str, where: str = "dissect.scorers") -> tuple:
    """(model, preprocess, tokenizer, weights hash), loaded once per process and device."""
    spec = ref_or_spec.spec if isinstance(ref_or_spec, ClipRef) else ref_or_spec
    where = ref_or_spec.where if isinstance(ref_or_spec, ClipRef) else where
    key = (spec.model_dump_json(), str(device))
    if key not in _CLIPS:
        model, preprocess, tokenizer = load_clip(spec, torch.device(device), where)
        route_image_tower(model)
        _CLIPS.clear()  # one CLIP at a time: they are large
        _CLIPS[key] = (model, preprocess, tokenizer, weights_hash(model))
    found = _CLIPS[key]
    if isinstance(ref_or_spec, ClipRef) and found[3] != ref_or_spec.weights_hash:
        raise UserError(f"{where}: the CLIP weights changed while the run was going; run again")
    return found


def route_image_tower(model) -> bool:
    """On a CPU, the image tower's linear layers and attention through oneDNN (models/onednn.py: 1.3x here), kept
    only when one seeded image gives the same embedding both ways."""
    size = getattr(model.visual, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return route_checked(model.visual, lambda tower: tower(example.to(next(tower.parameters()).device)))


@dataclass(frozen=True, eq=False)
class ClipCrop:
    """The steps of a CLIP model's preprocessing that work on PIL images (resize, centre crop, mode), as a Crop,
    so that a probe shard is decoded once for CLIP and the dissected models (probe.pixels_task)."""

    steps: tuple

    def crop(self, image: Image.Image) -> np.ndarray:
        for step in self.steps:
            image = step(image)
        return np.array(image, dtype=np.uint8)

    @property
    def key(self) -> str:
        return "clip " + "; ".join(f"{type(s).__qualname__} {sorted((k, repr(v)) for k, v in vars(s).items())}"
                                   for s in self.steps)


def split_preprocess(preprocess) -> tuple[ClipCrop, Callable]:
    """open_clip's preprocessing -> (its PIL steps as a Crop, the rest: PIL image -> tensor). They are split where
    the image becomes a tensor; a preprocessing without such a step is all `rest`, after the plain decoded image."""
    steps = list(getattr(preprocess, "transforms", [preprocess]))
    split = next((i for i, s in enumerate(steps) if "ToTensor" in type(s).__name__), 0)
    rest = steps[split:]
    return ClipCrop(tuple(steps[:split])), lambda image: functools.reduce(lambda x, step: step(x), rest, image)


def clip_image_task(clip: ClipRef, pixels: dict[str, list[np.ndarray]], view: str, device: str,
                    batch_size: int) -> np.ndarray:
    """L2-normalised CLIP image embeddings of a probe shard, images x D: from `pixels[view]`, the images cut by
    probe.pixels_task with the driver's ClipCrop (its key is the driver's: a step's state may name addresses)."""
    model, preprocess, _, _ = clip_for(clip, device)
    return clip_image_embeddings(model, preprocess, pixels[view], device, batch_size)


def clip_image_embeddings(model, preprocess, pixels: Pixels, device: str, batch_size: int) -> np.ndarray:
    crop, rest = split_preprocess(preprocess)
    out = []
    with torch.inference_mode():
        for batch in current().track(cut_batches(pixels, crop, batch_size), "CLIP images",
                                     -(-len(pixels) // batch_size), "batches"):
            x = torch.stack([rest(Image.fromarray(a)) for a in batch]).to(device)
            out.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def clip_text_task(clip: ClipRef, concepts: list[str], device: str) -> np.ndarray:
    """L2-normalised CLIP text embeddings of the concepts (through the spec's prompt), concepts x D."""
    model, _, tokenizer, _ = clip_for(clip, device)
    return encode_texts(model, tokenizer, [clip.spec.prompt.format(c) for c in concepts], torch.device(device)).numpy()


def clip_scores(spec: ScorerSpec, concepts: list[str], probe: ProbeSet, device: torch.device, batch_size: int,
                where: str) -> torch.Tensor:
    """Cosines between L2-normalised image and text embeddings, images x concepts (both tasks, in this process)."""
    model, preprocess, _, weights = clip_for(spec, device, where)
    ref = ClipRef(spec, where, weights)
    img = clip_image_embeddings(model, preprocess, probe, str(device), batch_size)
    txt = clip_text_task(ref, concepts, str(device))
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
    chunks = []
    with torch.inference_mode():
        for i in current().track(range(0, len(texts), batch_size), "CLIP text", unit="batches"):
            batch = tokens[order[i : i + batch_size]].to(device)
            emb = encode_text_truncated(model, batch) if truncate else model.encode_text(batch)
            chunks.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    out = torch.cat(chunks)
    result = torch.empty_like(out)
    result[order] = out
    return result


# ---------------------------------------------------------------- the registry's three functions


def plan(spec, scorer: ScorerSpec, where: str, device: torch.device) -> ScorerPlan:
    words = load_concepts(spec.dissect.concepts)
    _, preprocess, _, wh = clip_for(scorer, device, where)
    return ScorerPlan("clip", f"CLIP {scorer.model}",
                      f"open_clip {scorer.model} ({scorer.path or scorer.pretrained}), prompt {scorer.prompt!r}, "
                      f"{len(words)} concepts from {', '.join(Path(c).name for c in spec.dissect.concepts)}",
                      words, split_preprocess(preprocess)[0], ref=ClipRef(scorer, where, wh))


def tasks(g, sc: ScorerPlan, shards, pixel_keys: list[str], dev: str, batch: int) -> dict:
    """A CLIP image-embedding task per probe shard, and one text-embedding task for the concepts."""
    ident = {"weights": sc.ref.weights_hash, "code_version": CODE_VERSION}
    images = [g.add("clip-image", clip_image_task, f"CLIP images {j}", {**ident, "probe": s.manifest},
                    {"clip": sc.ref, "view": sc.view.key, "device": dev, "batch_size": batch}, {"pixels": pk},
                    model=True, shape=np.ndarray)
              for j, (s, pk) in enumerate(zip(shards, pixel_keys))]
    text = g.add("clip-text", clip_text_task, f"CLIP text, {len(sc.concepts)} concepts",
                 {**ident, "concepts": text_hash(sc.concepts), "prompt": sc.ref.spec.prompt},
                 {"clip": sc.ref, "concepts": sc.concepts, "device": dev}, model=True, shape=np.ndarray)
    return {"images": images, "text": text}


def combine(scorer: dict, images: np.ndarray, parts: dict) -> np.ndarray:
    """Cosines: both embeddings are L2-normalised."""
    return images @ parts["text"].T
