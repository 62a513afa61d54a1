"""The report's sections, in the order a reader meets them: the one list that render, the contents and the tests
share. A section is shown when the run has what it reports (`shown`); its body is templates/partials/<id>.html,
and the findings that analysis writes name their section by this id. Adding a section = one entry here and its
partial template."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _always(results: dict) -> bool:
    return True


def _has(key: str) -> Callable[[dict], bool]:
    def shown(results: dict) -> bool:
        return bool(results.get(key))

    shown.__name__ = f"has_{key}"
    return shown


@dataclass(frozen=True)
class Section:
    id: str  # anchor, template name (partials/<id>.html) and the `section` of its findings
    title: str
    shown: Callable[[dict], bool] = _always


SECTIONS: tuple[Section, ...] = (
    Section("checks", "Checks", _has("checks")),  # first: the verdict a CI acts on, failed checks first
    Section("questions", "Assignment questions", _has("dissection")),
    Section("summary", "Summary"),
    Section("setup", "Setup"),
    Section("dissection", "Network dissection", _has("dissection")),
    Section("netdissect", "Network Dissection with pixel labels", _has("netdissect")),
    Section("versions", "Model versions", _has("versions")),
    Section("explanations", "Explanations side by side"),
    Section("predictions", "Predictions"),
    Section("timings", "Timings"),
    Section("agreement", "LIME vs Grad-CAM agreement"),
    Section("trust", "Which explanations can we trust?", _has("evaluation")),
    Section("concepts", "Which concepts drive the predictions?", _has("concepts")),
    Section("findings", "Findings"),
    Section("provenance", "Provenance"),
)
SECTION_IDS = tuple(s.id for s in SECTIONS)


def sections_of(results: dict) -> list[Section]:
    """The sections a run's report shows, in order."""
    return [s for s in SECTIONS if s.shown(results)]
