"""Held-out label quality, label stability, Linear Explanations' combinations and NeuronEval's sanity tests, against
hand-computed cases and planted ground truth."""
from __future__ import annotations

import html
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from report_builder.dissection import quality as q
from report_builder.dissection.clip_dissect import label_units
from report_builder.dissection.similarity import SIMILARITIES
from report_builder.label_quality import COMBINATION_LABELLER, sanity_passes
from report_builder.report import analysis

N, CONCEPTS = 300, 24
SETTINGS = {"holdout": 0.2, "resamples": 6, "terms": 3, "seed": 0}


@pytest.fixture(scope="module")
def planted():
    """Independent concept scores; unit u is concept TRUTH[u] plus a little noise; unit 3 is a known mixture."""
    rng = np.random.default_rng(0)
    P = rng.random((N, CONCEPTS)).astype(np.float32)
    truth = [4, 11, 17]
    A = np.stack([P[:, c] + 0.05 * rng.standard_normal(N) for c in truth]
                 + [0.6 * q._standardise(P[:, [2]])[0][:, 0] + 0.3 * q._standardise(P[:, [9]])[0][:, 0]
                    + 0.05 * rng.standard_normal(N)], axis=1).astype(np.float32)
    return P, A, truth


def test_split_is_seeded_disjoint_and_sized():
    first, held = q.split(100, 0.2, seed=3)
    assert len(held) == 20 and len(first) == 80 and not set(first) & set(held)
    assert sorted([*first, *held]) == list(range(100))
    assert np.array_equal(q.split(100, 0.2, 3)[1], held) and not np.array_equal(q.split(100, 0.2, 4)[1], held)
    assert len(q.split(5, 0.01, 0)[1]) == 2  # never fewer than 2 held-out images


def test_positives_follow_the_similarity_functions_top_k():
    assert q.positives("soft_wpmi", {"top_k": 20}, 72) == 20
    assert q.positives("soft_wpmi", {}, 72) == 36  # top_k 100 capped at half the held-out images
    assert q.positives("rank_reorder", {}, 200) == 10  # its top_fraction 0.05
    assert q.positives("cos_similarity", {}, 200) == 10


def test_scores_by_hand():
    # 6 held-out images; positives (k = 2) are the unit's images 0 and 1
    A = np.array([[6.0], [5.0], [4.0], [3.0], [2.0], [1.0]])
    C = np.array([[0.9], [0.1], [0.8], [0.2], [0.3], [0.0]])  # ranks images 0, 2, 4, 3, 1, 5
    s = q.label_scores(C, A, 2)
    # AP: positives at ranks 1 and 5: (1/1 + 2/5) / 2 = 0.7; the concept's top 2 are images 0 and 2: 1 hit
    assert s["auprc"][0] == pytest.approx(0.7)
    assert s["f1"][0] == pytest.approx(0.5) and s["iou"][0] == pytest.approx(1 / 3)
    assert s["pearson"][0] == pytest.approx(np.corrcoef(C[:, 0], A[:, 0])[0, 1])
    assert np.isnan(q.pearson(np.ones((4, 1)), np.arange(4.0)[:, None])[0])


def test_average_precision_matches_sklearn_on_continuous_scores():
    rng = np.random.default_rng(1)
    S, pos = rng.random((50, 7)), rng.random((50, 7)) < 0.3
    ours = q.average_precision(S, pos)
    assert np.allclose(ours, [average_precision_score(pos[:, j], S[:, j]) for j in range(7)])


def test_a_planted_mixture_is_recovered_with_its_weights(planted):
    P, A, _ = planted
    W = q.fit_combination(P, A, terms=3)
    terms = q.describe(W[3], [f"c{i}" for i in range(CONCEPTS)])
    assert [t["label"] for t in terms[:2]] == ["c2", "c9"]
    # the weights of the standardised concepts against the standardised unit: 0.6 and 0.3 over the unit's deviation
    scale = np.std(0.6 * q._standardise(P[:, [2]])[0] + 0.3 * q._standardise(P[:, [9]])[0])
    assert terms[0]["weight"] * scale == pytest.approx(0.6, abs=0.03)
    assert terms[1]["weight"] * scale == pytest.approx(0.3, abs=0.03)
    assert sum(t["weight"] for t in terms[2:]) < 0.05  # a third term, if any, is only noise
    assert (W >= 0).all() and ((W > 0).sum(axis=1) <= 3).all()
    # as a similarity function: the label is the heaviest concept, single units their own concept
    S = SIMILARITIES["linear_explanation"].function(torch.from_numpy(P), torch.from_numpy(A))
    labels = label_units(S, [f"c{i}" for i in range(CONCEPTS)], ["s"] * CONCEPTS)
    assert [u.label for u in labels] == ["c4", "c11", "c17", "c2"]
    assert labels[3].alternatives[0][0] == "c9"


def test_quality_task_scores_planted_units_above_a_random_label(planted):
    P, A, truth = planted
    out = q.quality_task("l", "soft_wpmi", {"top_k": 10}, SETTINGS, {"matrix": P, "concepts": [f"c{i}" for i in
                         range(CONCEPTS)]}, [{"l": A[:150]}, {"l": A[150:]}])
    assert (out["first_images"], out["heldout_images"], out["positives"], out["resamples"]) == (240, 60, 10, 6)
    rows = out["rows"]
    assert [r["heldout_label"] for r in rows[:3]] == [f"c{c}" for c in truth]
    for r in rows[:3]:
        assert r["pearson"] > 0.9 and r["auprc"] > 0.8 and r["iou"] > 0.6 and r["stability"] == 1.0
        assert r["random_pearson"] is None or r["random_pearson"] < 0.5
    # the mixture: the combination simulates it better than its single label
    assert rows[3]["combination_pearson"] > rows[3]["pearson"] + 0.05  # 0.6 / sqrt(0.45) = 0.89 for c2 alone
    assert [t["label"] for t in rows[3]["combination"][:2]] == ["c2", "c9"]
    assert len(out["resample_labels"]) == 6 and len(out["resample_labels"][0]) == 4
    again = q.quality_task("l", "soft_wpmi", {"top_k": 10}, SETTINGS, {"matrix": P, "concepts": [f"c{i}" for i in
                           range(CONCEPTS)]}, [{"l": A}])
    assert again["rows"] == rows and again["resample_labels"] == out["resample_labels"]  # seeded


def test_noise_units_are_unstable():
    rng = np.random.default_rng(2)
    P, A = rng.random((200, 40)).astype(np.float32), rng.random((200, 10)).astype(np.float32)
    out = q.quality_task("l", "soft_wpmi", {"top_k": 10}, {**SETTINGS, "resamples": 10}, {"matrix": P, "concepts":
                         [str(i) for i in range(40)]}, [{"l": A}])
    assert np.mean([r["stability"] for r in out["rows"]]) < 0.5


@pytest.mark.parametrize("similarity", ["soft_wpmi", "cos_similarity"])
def test_neuroneval_sanity_checks_pass_on_planted_units(planted, similarity):
    P, _, _ = planted
    rng = np.random.default_rng(5)
    P = np.concatenate([P, rng.random((N, 36)).astype(np.float32)], axis=1)  # 60 independent concepts
    # half the images held out, and for cos_similarity less noise: its positives are 5 % of the held-out images, and
    # the top 5 % of a uniform concept lie within 0.2 of its standard deviation, so noise of 0.5 reorders them
    out = q.sanity_task(similarity, {"top_k": 10} if similarity == "soft_wpmi" else {}, {**SETTINGS, "holdout": 0.5},
                        {"matrix": P, "concepts": [str(i) for i in range(60)]},
                        noise=q.PLANTED_NOISE if similarity == "soft_wpmi" else 0.1)
    assert out["units"] == q.PLANTED and out["recovered"] == q.PLANTED
    assert out["removed_changed"] == q.PLANTED
    for m, counts in out["metrics"].items():
        assert counts["removed_lower"] == q.PLANTED, m
        assert counts["added_raised"] == 0, m
    assert sanity_passes(out)


def test_sanity_checks_fail_on_a_concept_set_with_twins(planted):
    """The checks can fail: when every concept has an identical twin, removing a unit's true concept leaves its twin,
    which scores the same: the label changes, the score does not drop."""
    P, _, _ = planted
    twins = np.concatenate([P, P], axis=1)
    out = q.sanity_task("cos_similarity", {}, {**SETTINGS, "holdout": 0.5},
                        {"matrix": twins, "concepts": [str(i) for i in range(2 * CONCEPTS)]}, noise=0.1)
    assert out["recovered"] > 0 and out["removed_changed"] == out["recovered"]
    # (a twin that is itself another unit's true concept goes too: those units do lose score)
    assert out["metrics"]["pearson"]["removed_lower"] < out["recovered"] and not sanity_passes(out)


def _dissection(vocabularies: dict[str, tuple[int, list[int]]], resamples: int = 20) -> dict:
    """A results dict with one layer of 40 units per model: (unique labels, unique labels on each resample)."""
    models, entries = [], []
    sanity = {"units": 2, "recovered": 2, "removed_changed": 2, "noise": 0.5, "unrelated": 2, "heldout_images": 20,
              "positives": 5, "metrics": {m: {"removed_lower": 2, "added_raised": 0} for m in q.METRICS}}
    for name, (unique, draws) in vocabularies.items():
        labels = [{"unit": u, "label": f"c{u % unique}", "similarity": 1.0, "scorer": "s", "alternatives": [],
                   "stability": 1.0 if u % 2 else 0.5, **{m: 0.5 for m in q.METRICS},
                   **{f"random_{m}": 0.0 for m in q.METRICS}, "combination_pearson": 0.7} for u in range(40)]
        quality = {"first_images": 80, "heldout_images": 20, "positives": 5, "resamples": resamples,
                   "resample_labels": [[f"c{u % k}" for u in range(40)] for k in draws]}
        entries.append({"model": name, "layers": [{"layer": "l", "units": 40, "labels": labels, "quality": quality}]})
        models.append({"id": name, "display": name.upper()})
    d = {"models": entries, "probe": {"images": 100}, "scorers": {"s": "s"}, "similarity": "soft_wpmi",
         "similarity_params": {},
         "quality": {"holdout": 0.2, "resamples": resamples, "stable": 0.8, "terms": 3, "metrics": list(q.METRICS),
                     "sanity": sanity}}
    results = {"models": models, "dissection": d}
    d["summary"] = analysis.dissection_summary(results)
    return results


def _dissection_findings(results: dict) -> list[dict]:
    return analysis.dissection_findings(results) + analysis.quality_findings(results)


def test_two_vocabularies_are_ranked_only_when_the_resamples_agree():
    clear = _dissection({"a": (30, [29, 30, 28, 31] * 5), "b": (20, [19, 20, 21, 18] * 5)})
    text = next(f for f in _dissection_findings(clear) if f["id"] == "q3-compare")["text"]
    assert text.startswith("Overall, A has the more varied vocabulary") and "more by 10" in text
    assert "p < 0.05 over 100 probe images" in text and "over 20 bootstrap resamples" in text
    noisy = _dissection({"a": (30, [25, 35, 20, 31] * 5), "b": (28, [33, 22, 30, 27] * 5)})
    text = next(f for f in _dissection_findings(noisy) if f["id"] == "q3-compare")["text"]
    assert "within noise" in text and "more varied" not in text
    qs = clear["dissection"]["summary"]["quality"]
    assert qs["models"][0]["stable"] == 20 and qs["models"][0]["unique"]["low"] == 28
    assert qs["sanity_passes"]
    q1 = next(f for f in _dissection_findings(clear) if f["id"] == "q1-a")["text"]
    assert "stable)" in q1  # Q1's counts say how many of the units are stable


def _planted_run(planted, similarity: str, params: dict) -> tuple[dict, list[dict], str]:
    """The planted units dissected by `similarity` as a run does it (the dissection, quality and sanity tasks, the
    layer as collect merges it, the summary and findings), and the dissection section of its report as text."""
    from collections import defaultdict

    from report_builder.dissection.clip_dissect import clip_dissect_task
    from report_builder.pipeline.collect import with_quality
    from report_builder.report import render

    P, A, _ = planted
    concepts = [f"c{i}" for i in range(CONCEPTS)]
    scores, activations = {"matrix": P, "concepts": concepts, "scorers": ["s"] * CONCEPTS}, [{"l": A}]
    layer = with_quality(clip_dissect_task("l", similarity, params, scores, activations),
                         q.quality_task("l", similarity, params, SETTINGS, scores, activations))
    d = {"similarity": similarity, "similarity_params": params, "pooling": "avg",
         "probe": {"description": "planted", "images": N, "sha256": "0"}, "scorers": {"s": "planted scores"},
         "concepts": CONCEPTS, "models": [{"model": "m", "layers": [layer]}],
         "quality": {"holdout": SETTINGS["holdout"], "resamples": SETTINGS["resamples"], "stable": 0.8,
                     "terms": SETTINGS["terms"], "metrics": list(q.METRICS),
                     "sanity": q.sanity_task(similarity, params, SETTINGS, scores)}}
    results = {"models": [{"id": "m", "display": "Model M"}], "dissection": d}
    d["summary"] = analysis.dissection_summary(results)
    results["findings"] = analysis.dissection_findings(results) + analysis.quality_findings(results)
    page = render.environment().get_template("partials/dissection.html").render(
        r=results, numbers={"dissection": 5}, names={"m": "Model M"}, figures=defaultdict(list))
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
    return results, layer["labels"], text


def test_linear_explanations_labels_are_reported_as_their_own_combinations_heaviest_concept(planted):
    """With dissect.similarity linear_explanation, the label is the heaviest concept of the very fit that the
    combination column shows: the report names the similarity for the label and says the two are one fit (the whole
    combination against its heaviest concept), not a CLIP-Dissect label against Linear Explanations."""
    results, labels, text = _planted_run(planted, COMBINATION_LABELLER, {})
    assert all(u["heldout_label"] == u["combination"][0]["label"] for u in labels)  # what the report claims
    found = {f["id"]: f["text"] for f in results["findings"]}
    assert ("Chosen on 240 probe images by linear_explanation (each the heaviest concept of its unit's combination) "
            "and scored on 60 held-out ones") in found["labels-heldout-m"]
    combination = found["labels-combination-m"]
    assert "each label is the heaviest concept of the unit's combination of at most 3 concepts, so label and " \
           "combination are one fit" in combination
    assert combination.endswith("(the whole combination against its heaviest concept alone).")
    assert "against single label" not in combination
    assert "the label is chosen on the other 240 by linear_explanation , and it is the heaviest concept of the " \
           "combination, which is that same fit" in text
    assert "Pearson, label random whole combination AUPRC" in text
    assert "its most activating images" not in text  # CLIP-Dissect's rule is not this labeller's
    assert "weight in that combination (a unit that no concept fits gets its best correlation minus 2)" in text
    for finding in found.values():
        assert finding in text  # every finding shown, none lost to the template

    # the labeller's own fit shorter than the combination: the same greedy fit, stopped earlier, not "one fit"
    results, _, text = _planted_run(planted, COMBINATION_LABELLER, {"terms": 1})
    combination = {f["id"]: f["text"] for f in results["findings"]}["labels-combination-m"]
    assert "the same greedy fit as the combination, run to at most 1 concept instead of 3" in combination
    assert combination.endswith("(combination against label).") and "one fit" not in combination
    assert "Pearson, label random combination AUPRC" in text and "one method" not in text

    # any other similarity: two methods, as before
    results, _, text = _planted_run(planted, "soft_wpmi", {"top_k": 10})
    found = {f["id"]: f["text"] for f in results["findings"]}
    assert "probe images by soft_wpmi and scored" in found["labels-heldout-m"]
    assert found["labels-combination-m"].endswith("(combination against single label).")
    assert "chosen on the other 240 by soft_wpmi ; the random concept" in text and "its most activating images" in text
