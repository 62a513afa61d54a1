"""Synthetic inputs for full-size runs without a network: seeded probe images, a Broden-format dataset, and
random weights written in the real checkpoint formats (torchvision, CSAIL Places365, open_clip).

Random weights cost exactly what trained ones cost, so timings and memory measured on these are those of
the real assignment; only the labels they produce are meaningless.
"""
from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from report_builder.models.zoo import LoadedModel, load_model
from report_builder.spec.schema import ModelSpec

OBJECTS = ("sky", "tree", "road", "car", "person", "building", "grass", "water", "wall", "floor", "dog", "chair")
MATERIALS = ("wood", "metal", "glass", "fabric")


def _picture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random picture: coarse colour noise upsampled, with a little fine noise (compresses like a photo)."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.int16)
    return np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)


def write_probe_folder(folder: Path, n: int, seed: int = 0, size: int = 256) -> Path:
    """n seeded JPEG pictures in `folder` (the probe set of a folder source)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(_picture(rng, size)).save(folder / f"probe_{i:05d}.jpg", quality=90)
    return folder


def write_broden(root: Path, n: int, seed: int = 0, size: int = 224, label_size: int = 112) -> Path:
    """A Broden-format dataset of n seeded images: `images/`, `index.csv`, `label.csv`.

    Each image has an object label PNG (rectangles of 2-4 objects over a background object, the label number
    stored as red + 256 * green, as Broden stores it) and, on every third image, a material label PNG; the
    rectangles are drawn on the picture too, each object in its own colour, so a unit can learn them."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [(o, "object") for o in OBJECTS] + [(m, "material") for m in MATERIALS]
    numbers = {name: 300 + i for i, (name, _) in enumerate(names)}  # above 255, so green carries bits too
    colours = {name: rng.integers(0, 256, 3) for name, _ in names}
    with open(root / "label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for name, category in names:
            w.writerow([numbers[name], name, f"{category}(1)", 1, 0.1, ""])
    rows = []
    scale = size // label_size
    for i in range(n):
        picture = _picture(rng, size)
        objects = np.full((label_size, label_size), numbers[OBJECTS[rng.integers(len(OBJECTS))]], np.int32)
        for _ in range(rng.integers(2, 5)):
            name = OBJECTS[rng.integers(len(OBJECTS))]
            y, x = rng.integers(0, label_size - 16, 2)
            h, w_ = rng.integers(12, 48, 2)
            objects[y : y + h, x : x + w_] = numbers[name]
            picture[y * scale : (y + h) * scale, x * scale : (x + w_) * scale] = colours[name]
        name = f"synthetic/{i:05d}.jpg"
        (root / "images" / "synthetic").mkdir(exist_ok=True)
        Image.fromarray(picture).save(root / "images" / name, quality=90)
        cells = {"object": _label_png(root, f"synthetic/{i:05d}_object.png", objects), "material": ""}
        if i % 3 == 0:
            material = np.zeros_like(objects)
            material[: label_size // 2] = numbers[MATERIALS[rng.integers(len(MATERIALS))]]
            cells["material"] = _label_png(root, f"synthetic/{i:05d}_material.png", material)
        rows.append({"image": name, "split": "train", "ih": size, "iw": size, "sh": label_size, "sw": label_size,
                     **cells})
    with open(root / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "split", "ih", "iw", "sh", "sw", "object", "material"])
        w.writeheader()
        w.writerows(rows)
    return root


def _label_png(root: Path, name: str, numbers: np.ndarray) -> str:
    rgb = np.zeros((*numbers.shape, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = numbers % 256, numbers // 256
    Image.fromarray(rgb).save(root / "images" / name)
    return name


def write_assignment_checkpoints(hub: Path, seed: int = 0) -> dict[str, Path]:
    """Random weights in the real formats, where the loaders look for them: torchvision's ResNet18 ImageNet file
    and the CSAIL Places365 ResNet18 (a {'state_dict': ...} with 'module.' prefixes) in torch's hub checkpoint
    folder `hub`/checkpoints, and an open_clip ViT-B-16 state_dict beside them."""
    import open_clip
    import torch
    import torchvision

    folder = hub / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    imagenet = folder / Path(weights.url).name
    torch.save(torchvision.models.resnet18().state_dict(), imagenet)
    places = folder / "resnet18_places365.pth.tar"
    state = {f"module.{k}": v for k, v in torchvision.models.resnet18(num_classes=365).state_dict().items()}
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state}, places)
    clip = folder / "open_clip_vit_b_16_random.pt"
    torch.save(open_clip.create_model("ViT-B-16", pretrained=None).state_dict(), clip)
    return {"imagenet": imagenet, "places365": places, "clip": clip}


# ---------------------------------------------------------------- models and a photo for the bench rows


def random_model(name: str, device: torch.device) -> LoadedModel:
    """A torchvision or packaged architecture with random weights, through the zoo's checkpoint path."""
    import timm
    import torchvision

    torch.manual_seed(0)
    if name.startswith("efficientnet_lite"):
        return load_model(ModelSpec(id=name, source="packaged", name=name), "bench", device)
    net = torchvision.models.get_model(name) if name in torchvision.models.list_models() else timm.create_model(name)
    path = Path(tempfile.mkdtemp()) / f"{name}.pt"
    torch.save(net.state_dict(), path)
    return load_model(ModelSpec(id=name, source="checkpoint", name=name, path=str(path)), "bench", device)


def photo(model: LoadedModel) -> np.ndarray:
    from report_builder.data.images import SAMPLES
    from PIL import Image

    return model.preprocess.crop(Image.fromarray(SAMPLES["chelsea"][1]()))
