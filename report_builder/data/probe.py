"""Probe sets for dissection: many images, loaded lazily, each with a stable id and a content hash.

Probe sets are plain data (paths, or pixels made in memory), so that a shard of one can travel to another
process or machine and be decoded there."""
from __future__ import annotations

import csv
import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence, Union

import numpy as np
from PIL import Image

from report_builder.data.images import IMAGE_SUFFIXES, SAMPLES, open_image, pixel_hash, walk_files
from report_builder.errors import UserError
from report_builder.files import read_text
from report_builder.pipeline.progress import current
from report_builder.spec.schema import ProbeSpec, resolve_path  # resolve_path: an image list's lines, from the list's folder


@dataclass(frozen=True, eq=False)
class ProbeItem:
    """One probe image: a file to decode, or pixels made in memory (crops of packaged photos)."""

    id: str
    sha256: str
    path: str | None = None
    pixels: np.ndarray | None = None
    where: str = "probe"  # the spec key, for messages

    def load(self) -> Image.Image:
        if self.path is not None:
            return open_image(Path(self.path), self.where)
        return Image.fromarray(self.pixels)


@dataclass(frozen=True, eq=False)
class ProbeSet:
    description: str
    items: tuple[ProbeItem, ...]

    def __len__(self) -> int:
        return len(self.items)

    def shards(self, size: int) -> list[ProbeSet]:
        """Consecutive pieces of at most `size` images, in order: the unit of work of sharded tasks."""
        return [ProbeSet(f"{self.description}, images {i}-{min(i + size, len(self)) - 1}", self.items[i : i + size])
                for i in range(0, len(self), size)] or [self]

    @property
    def manifest(self) -> str:
        """A hash of every image's id and content: the probe set's identity in cache keys."""
        h = hashlib.sha256()
        for item in self.items:
            h.update(f"{item.id}:{item.sha256}\n".encode())
        return h.hexdigest()

    def batches(self, size: int):
        for i in range(0, len(self.items), size):
            yield [item.load() for item in self.items[i : i + size]]


# ---------------------------------------------------------------- pixels shared by a shard's consumers
#
# Several stages read the same probe shard: each dissected model's activations, the CLIP image embeddings, a
# classifier scorer, the colour scorer. Each needs the images cut its own way (a Crop), and most of the cost is
# decoding the files. So one task per shard decodes every image once and cuts it every way asked, one list per
# distinct cut: models with the same preprocessing share a list. Cuts are exactly what each stage made for itself
# before, so results do not change.


class Crop(Protocol):
    """A probe image -> the uint8 H x W x 3 pixels one stage reads (e.g. zoo.Preprocess, Thumbnail)."""

    def crop(self, image: Image.Image) -> np.ndarray: ...

    @property
    def key(self) -> str: ...  # equal keys cut equally


Pixels = Union[ProbeSet, Sequence[np.ndarray]]  # a shard to decode, or its images cut already


@dataclass(frozen=True)
class Thumbnail:
    """The whole image scaled to fit in size x size, aspect kept (the colour scorer's view)."""

    size: int = 128

    def crop(self, image: Image.Image) -> np.ndarray:
        small = image.copy()
        small.thumbnail((self.size, self.size))
        return np.asarray(small)

    @property
    def key(self) -> str:
        return f"thumbnail {self.size}"


def pixels_task(probe: ProbeSet, crops: list[Crop]) -> dict[str, list[np.ndarray]]:
    """Each image of a probe shard decoded once and cut every way asked: {crop key: one array per image}."""
    cuts = list({c.key: c for c in crops}.values())
    out: dict[str, list[np.ndarray]] = {c.key: [] for c in cuts}
    for batch in current().track(probe.batches(64), "decoding", -(-len(probe) // 64), "batches"):
        for image in batch:
            for c in cuts:
                out[c.key].append(c.crop(image))
    return out


def cut_batches(pixels: Pixels, crop: Crop, size: int) -> Iterator[list[np.ndarray]]:
    """Batches of `size` images cut by `crop`: decoded here, one batch at a time, from a ProbeSet, or taken from
    a list that pixels_task cut already (with the same crop)."""
    if isinstance(pixels, ProbeSet):
        for batch in pixels.batches(size):
            yield [crop.crop(image) for image in batch]
    else:
        for i in range(0, len(pixels), size):
            yield list(pixels[i : i + size])


def _file_item(path: Path, root: Path, where: str) -> ProbeItem:
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise UserError(f"{where}: cannot read probe image {path}: {exc}") from None
    return ProbeItem(str(path.relative_to(root)) if path.is_relative_to(root) else str(path), digest, path=str(path),
                     where=where)


def _folder(path: Path, where: str) -> list[Path]:
    if not path.is_dir():
        raise UserError(f"{where}.path: probe folder {path} does not exist")
    return [p for p in walk_files(path, f"{where}.path") if p.suffix.lower() in IMAGE_SUFFIXES]


def _broden(path: Path, where: str) -> list[Path]:
    """A Broden-style dataset: `index.csv` whose `image` column names files under `images/`."""
    index = path / "index.csv"
    if not index.is_file():
        raise UserError(f"{where}.path: {path} is not a Broden-style folder (no index.csv)")
    try:
        reader = csv.DictReader(io.StringIO(read_text(index, f"{where}.path", "index file"), newline=""))
        if "image" not in (reader.fieldnames or []):
            raise UserError(f"{where}.path: {index} has no 'image' column")
        names = [row["image"] for row in reader if row.get("image")]
    except csv.Error as exc:
        raise UserError(f"{where}.path: {index} is not a valid CSV file ({exc})") from None
    files = [inside_folder(path / "images", n, f"{where}.path", index) for n in names]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{where}.path: {len(missing)} images listed in {index} are missing, e.g. {missing[0]}")
    return files


def inside_folder(root: Path, name: str, where: str, listed_in: Path) -> Path:
    """A file named in a dataset's index, which must stay inside the dataset's folder."""
    path = root / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{where}: {listed_in} names {name!r}, which is outside {root}; refused")
    return path


def _listing(path: Path, where: str) -> list[Path]:
    lines = [ln.strip() for ln in read_text(path, f"{where}.path", "image list").splitlines()]
    files = [resolve_path(ln, path.parent) for ln in lines if ln and not ln.startswith("#")]
    for f in files:
        if not f.is_file():
            raise UserError(f"{where}.path: {path} lists {f}, which does not exist")
    return files


def random_crop(w: int, h: int, rng: random.Random) -> tuple[tuple[int, int, int, int], bool]:
    """A random crop box (10-100% of the area, aspect 3:4 to 4:3) and whether to flip it."""
    for _ in range(20):
        area = rng.uniform(0.1, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return (left, top, left + cw, top + ch), rng.random() < 0.5


def augment(image: Image.Image, rng: random.Random, out_size: int = 256) -> Image.Image:
    """A random crop and flip (see random_crop), resized to out_size x out_size."""
    box, flip = random_crop(*image.size, rng)
    out = image.crop(box).resize((out_size, out_size), Image.BICUBIC)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def _augmented(per_image: int, seed: int) -> list[ProbeItem]:
    items = []
    for name, (_, load) in SAMPLES.items():
        base = Image.fromarray(np.asarray(load(), dtype=np.uint8)).convert("RGB")
        for k in range(per_image):
            img = augment(base, random.Random(f"{seed}:{name}:{k}"))
            items.append(ProbeItem(f"{name}#{k}", pixel_hash(img), pixels=np.asarray(img)))
    return items


def check_probe(spec: ProbeSpec, where: str = "dissect.probe") -> None:
    """Cheap existence check, so a missing probe set is reported before any model work."""
    if spec.source == "samples-augmented":
        return
    path = Path(spec.path or "")
    exists = path.is_file() if spec.source == "list" else path.is_dir()
    if not exists:
        kind = {"folder": "probe folder", "broden": "Broden dataset folder", "list": "image list"}[spec.source]
        raise UserError(f"{where}.path: {kind} {path} does not exist; put the probe images there or change the path")


def load_probe(spec: ProbeSpec, seed: int, where: str = "dissect.probe") -> ProbeSet:
    if spec.source == "samples-augmented":
        items = _augmented(spec.per_image, seed)
        description = f"{len(SAMPLES)} packaged photos x {spec.per_image} seeded crops and flips"
    else:
        path = Path(spec.path or "")
        files = {"folder": _folder, "broden": _broden, "list": _listing}[spec.source](path, where)
        if not files:
            raise UserError(f"{where}.path: {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        root = path / "images" if spec.source == "broden" else (path if path.is_dir() else path.parent)
        items = [_file_item(f, root, where) for f in files]
        description = f"{spec.source} {path}"
    if spec.limit and spec.limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), spec.limit))
        items = [items[i] for i in keep]
        description += f", seeded subset of {spec.limit}"
    return ProbeSet(description, tuple(items))
