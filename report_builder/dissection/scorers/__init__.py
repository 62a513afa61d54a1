"""Concept scorers: probe images x concepts similarity matrices, one file per kind, bound here into one table.

- `clip` (clip.py): open_clip image-text cosines (what CLIP-Dissect uses);
- `classifier` (classifier.py): another model's softmax probabilities over its own class names (offline stand-in);
- `colors` (colors.py): the fraction of each image's pixels nearest to each Broden colour name (offline).
Scorers combine by concatenating their concepts; every concept remembers its scorer.

Each kind's file defines three functions, which the pipeline calls through its entry:
- `plan(spec, scorer, where, device) -> ScorerPlan`: preflight loads and checks what the scorer reads (a model, a
  concept list) and says what it is;
- `tasks(graph, plan, shards, pixel_keys, device, batch_size) -> {part: key or [key per shard]}`: the graph's
  tasks of the scorer; the part 'images' is its image-side values, one task per probe shard (images x D each);
- `combine(scorer, images, parts) -> images x concepts`: its block of the concept-score matrix, from its
  images (every shard's, concatenated), its other parts, and `scorer` (the described plan: kind, label, concepts,
  and its plan's `extra`).

Spec validation (which kinds `dissect.scorers[i].kind` takes, the keys each needs and reads), preflight and the
graph (pipeline/runner.py) loop over `SCORERS`. Torch-free: an entry names its file, imported only when the
scorer is planned or run. Adding a kind is one file and one `Scorer(...)` entry.
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from typing import Any

HERE = "report_builder.dissection.scorers"


@dataclass(frozen=True)
class Scorer:
    """One kind of concept scorer."""

    name: str  # its `kind` in dissect.scorers
    title: str  # in words
    module: str  # its file, which defines plan, tasks and combine
    allows: frozenset[str] = frozenset()  # the keys of a scorer entry it reads, besides 'kind'
    needs: dict[str, str] = field(default_factory=dict)  # the keys it needs -> what they are, for the message

    def _function(self, name: str) -> Any:
        return getattr(importlib.import_module(self.module), name)

    @property
    def plan(self) -> Any:
        return self._function("plan")

    @property
    def tasks(self) -> Any:
        return self._function("tasks")

    @property
    def combine(self) -> Any:
        return self._function("combine")


SCORERS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("clip", "open_clip image-text cosines, both embeddings L2-normalised", f"{HERE}.clip",
           allows=frozenset({"model", "pretrained", "path", "config", "prompt"})),
    Scorer("classifier", "a zoo model's softmax probabilities over its own class names (an offline stand-in for CLIP)",
           f"{HERE}.classifier", allows=frozenset({"classifier"}), needs={"classifier": "a model entry"}),
    Scorer("colors", "the fraction of each image's pixels nearest (in CIE Lab) to each of the 11 Broden colour "
           "names (an offline stand-in for CLIP)", f"{HERE}.colors"),
)}


@dataclass
class ScorerPlan:
    """One concept scorer, as the graph needs it: what it is, its concepts, and how to load it (plain data)."""

    kind: str
    label: str
    description: str
    concepts: list[str]
    view: Any  # the Crop it cuts the probe images with (data/probe.py)
    ref: Any = None  # what its tasks load (a ClipRef, a ModelRef), or None
    extra: dict = field(default_factory=dict)  # what its `combine` needs besides its parts (classifier: 'groups')


def text_hash(words: list[str]) -> str:
    return hashlib.sha256("\n".join(words).encode()).hexdigest()


def described(plan: ScorerPlan, parts: list[str]) -> dict:
    """A plan as the concept-score task reads it: kind, label, concepts, its part names, and its `extra`."""
    return {"kind": plan.kind, "label": plan.label, "concepts": plan.concepts, "parts": parts, **plan.extra}


def concept_scores_task(scorers: list[dict], **parts: Any) -> dict:
    """Every scorer's images x concepts block side by side: {concepts, scorers (per concept), matrix}.

    `scorers[i]` says what scorer i is (`described`); `parts` holds its parts as `<part>_<i>`: its image-side values
    per probe shard (`images_i`) and whatever else its tasks made (CLIP: its text embeddings, `text_i`)."""
    import numpy as np

    concepts: list[str] = []
    owners: list[str] = []
    blocks: list[np.ndarray] = []
    for i, s in enumerate(scorers):
        own = {name: parts[f"{name}_{i}"] for name in s["parts"]}
        images = np.concatenate(own.pop("images"))
        matrix = SCORERS[s["kind"]].combine(s, images, own)
        concepts.extend(s["concepts"])
        owners.extend([s["label"]] * len(s["concepts"]))
        blocks.append(matrix.astype(np.float32))
    return {"concepts": concepts, "scorers": owners, "matrix": np.concatenate(blocks, axis=1)}
