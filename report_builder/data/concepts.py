"""Concept word lists: named sets and text files, cleaned and de-duplicated."""
from __future__ import annotations

import re
from pathlib import Path

from report_builder.errors import UserError
from report_builder.files import read_text

# The 11 colour names of the Broden dataset.
BRODEN_COLORS = ("black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red", "white", "yellow")

# The 47 texture categories of the Describable Textures Dataset (Cimpoi et al., 2014).
DTD_TEXTURES = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
    "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved", "honeycombed",
    "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley", "perforated", "pitted",
    "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained",
    "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged",
)


def clean(name: str) -> str:
    """'arena/hockey' -> 'arena hockey', 'tiger_cat' -> 'tiger cat'; lower case, single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[_/]+", " ", name)).strip().lower()


def dedupe(names: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for n in names:
        if n and n not in seen:
            seen.add(n)
            out.append(n)
    return out


def words_20k() -> list[str]:
    """The 20,000 most frequent English words (wordfreq), without function words and one- or two-letter
    tokens, which name no visual concept."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    from wordfreq import top_n_list

    return [w for w in top_n_list("en", 20000) if w.isalpha() and len(w) > 2 and w not in ENGLISH_STOP_WORDS]


def _named(name: str) -> list[str]:
    from report_builder.data.classes import imagenet_classes, places365_classes

    return {
        "words-20k": words_20k,
        "imagenet": imagenet_classes,
        "places365": places365_classes,
        "broden-colors": lambda: list(BRODEN_COLORS),
        "dtd-textures": lambda: list(DTD_TEXTURES),
    }[name]()


MAX_CONCEPT_LENGTH = 100  # characters; CLIP reads at most 77 tokens, and labels must fit a chart
MAX_CONCEPTS = 200_000


def read_concept_file(path: Path, where: str) -> list[str]:
    """One concept per line; blank lines and lines starting with '#' are skipped."""
    lines = read_text(path, where, "concept file").splitlines()
    words = []
    for n, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        if len(line) > MAX_CONCEPT_LENGTH:
            raise UserError(f"{where}: concept file {path}, line {n}: a concept of {len(line):,} characters; "
                            f"concepts are at most {MAX_CONCEPT_LENGTH}")
        words.append(line)
    if not words:
        raise UserError(f"{where}: concept file {path} is empty")
    if len(words) > MAX_CONCEPTS:
        raise UserError(f"{where}: concept file {path} has {len(words):,} concepts; at most {MAX_CONCEPTS:,}")
    return words


def load_concepts(sets: tuple[str, ...], where: str = "dissect.concepts") -> list[str]:
    """Every named set and text file, cleaned, combined in order, duplicates dropped."""
    names: list[str] = []
    for i, entry in enumerate(sets):
        if entry.endswith(".txt"):
            words = read_concept_file(Path(entry), f"{where}[{i}]")
        else:
            words = _named(entry)
        names.extend(clean(w) for w in words)
    return dedupe(names)
