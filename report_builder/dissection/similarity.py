"""Similarity functions: one entry each, everything the rest of the program needs to know about a function that
turns a probe set's concept scores P (images x concepts) and a layer's activations A (images x units) into
S (units x concepts, higher = a better description of the unit).

`dissect.similarity` takes this table's names, and `dissect.similarity_params` the parameters an entry lists, in
their ranges (spec/schema.py); CLIP-Dissect runs the entry's function (dissection/clip_dissect.py). Torch-free:
the function is a "module:function" reference, imported only when it runs (`function`). The defaults live
with the functions (their signatures); tests/test_registries.py checks every entry against its function's
signature: each parameter listed is a keyword of the function with a default inside its range, and each keyword
of the function is listed.

Adding a similarity function is the function f(P, A, **params) -> S (e.g. in dissection/clip_dissect.py) and one
`Similarity(...)` entry here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

MAX_SEED = 2**32 - 1  # NumPy's seed range, as the spec's `seed`


@dataclass(frozen=True)
class Param:
    """A parameter's range: from `low` to `high`, whole numbers only when `whole`."""

    low: float
    high: float
    whole: bool = False


@dataclass(frozen=True)
class Similarity:
    """One similarity function."""

    name: str  # its name in dissect.similarity
    title: str  # how a text names it
    implementation: str  # "module:function": f(P, A, **params) -> S
    params: dict[str, Param]  # every keyword parameter of the function, with its range

    @property
    def function(self) -> Callable[..., Any]:
        """The function itself (imports its module, and with it torch, now)."""
        module, name = self.implementation.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def seeded(self) -> bool:
        """It draws at random: the run's seed is its `seed` unless the spec gives one."""
        return "seed" in self.params


CLIP_DISSECT = "report_builder.dissection.clip_dissect"
QUALITY = "report_builder.dissection.quality"

SIMILARITIES: dict[str, Similarity] = {s.name: s for s in (
    Similarity("soft_wpmi", "soft weighted pointwise mutual information (CLIP-Dissect's default)",
               f"{CLIP_DISSECT}:soft_wpmi",
               {"top_k": Param(1, 100_000, True), "a": Param(1e-6, 1e4), "lam": Param(0.0, 100.0),
                "p_start": Param(1e-6, 1.0), "p_end": Param(1e-6, 1.0)}),
    Similarity("wpmi", "weighted pointwise mutual information", f"{CLIP_DISSECT}:wpmi",
               {"top_k": Param(1, 100_000, True), "a": Param(1e-6, 1e4), "lam": Param(0.0, 100.0)}),
    Similarity("cos_similarity", "cosine similarity", f"{CLIP_DISSECT}:cos_similarity", {}),
    Similarity("cos_similarity_cubed", "cosine similarity of the centred, cubed columns",
               f"{CLIP_DISSECT}:cos_similarity_cubed", {"min_norm": Param(1e-12, 1e6)}),
    Similarity("rank_reorder", "rank reordering", f"{CLIP_DISSECT}:rank_reorder",
               {"top_fraction": Param(1e-6, 1.0), "p": Param(0.01, 100.0), "scale_p": Param(0.0, 100.0),
                "seed": Param(0, MAX_SEED, True)}),
    Similarity("linear_explanation", "Linear Explanations' label-only combination (the heaviest concept)",
               f"{QUALITY}:linear_explanation", {"terms": Param(1, 20, True)}),
)}
