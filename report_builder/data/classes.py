"""Class-name lists: ImageNet's, Places365's, and a user's text file of class names.

Read by the model zoo (a model's class names) and by the concept word lists (the named sets 'imagenet' and
'places365'), so both find them here, below either.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from report_builder.errors import UserError
from report_builder.files import read_text


def imagenet_classes() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def places365_classes() -> list[str]:
    text = resources.files("report_builder").joinpath("data/places365_categories.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_class_file(path: Path, where: str) -> list[str]:
    names = [line.strip() for line in read_text(path, where, "class-name file").splitlines() if line.strip()]
    if not names:
        raise UserError(f"{where}: class-name file {path} is empty")
    long = next((n for n, name in enumerate(names, start=1) if len(name) > 200), None)
    if long:
        raise UserError(f"{where}: class-name file {path}, name {long}: {len(names[long - 1]):,} characters; "
                        "at most 200")
    return names
