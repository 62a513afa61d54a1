"""The README's words for what the report states from the registries (one source: a test fails when they drift).

Its own module, not render's: it reads the spec's defaults, and the spec reads the report's checks, which read the
diff, which renders; render importing the spec would close that loop."""
from __future__ import annotations

import textwrap

from report_builder.evaluation import registry as metric_registry
from report_builder.report.render import _beats_chance, describe_text, html_text
from report_builder.spec.schema import EvaluateSpec


def readme_metrics() -> str:
    """The README's list of the trust metrics, each stated as the report's table of methods states it with the
    default settings (tests/test_registries.py checks the README against it)."""
    defaults = EvaluateSpec().model_dump(mode="json")
    items = [f"- **{m.title}**: {describe_text(m, defaults[m.spec_key])}" for m in metric_registry.METRICS]
    chance = html_text(str(_beats_chance(defaults)))
    items.append(f"- **Chance**: a method {chance}.")
    return "\n".join(textwrap.fill(i, 110, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
                     for i in items)
