"""The labels' quality as a run directory holds it (torch-free, shared by dissection/quality.py, which computes it,
and the report side, which reads it): the held-out metrics' names, the columns dissection/<model>.csv adds, a unit's
combination in words, and whether the labeller's sanity checks passed."""
from __future__ import annotations

METRICS = ("pearson", "auprc", "f1", "iou")
# the columns dissection/<model>.csv adds after CLIP-Dissect's when the labels' quality was measured
QUALITY_CSV = ("heldout_label", *METRICS, "random_label", *(f"random_{m}" for m in METRICS), "combination",
               "combination_pearson", "stability")
# Linear Explanations' label-only variant as the run's similarity function (dissection/quality.py:
# linear_explanation) labels each unit by the heaviest concept of the same greedy fit that the unit's combination is:
# the report must then present the label and the combination as one fit, its heaviest concept against its whole
COMBINATION_LABELLER = "linear_explanation"
COMBINATION_TERMS = 3  # at most this many concepts in a fit, by default: the labeller's `terms` and dissect.quality's


def combination_text(terms: list[dict]) -> str:
    """'0.62 dog + 0.31 grass': a unit's combination, heaviest first."""
    return " + ".join(f"{t['weight']:.2f} {t['label']}" for t in terms)


def sanity_passes(result: dict) -> bool:
    """Both tests pass for every metric: each recovered unit's label changed and its score dropped when its true
    concept went (and some unit was recovered), and no score rose when the unrelated concepts came."""
    n = result["recovered"]
    return n > 0 and result["removed_changed"] == n and all(
        m["removed_lower"] == n and m["added_raised"] == 0 for m in result["metrics"].values())
