"""Which concepts drive the predictions: the numbers and sentences of the report's concepts section.

From results.json's `concepts` (written by pipeline/collect.py from explanation/concepts.py's tasks):
- the ablation test per model, layer and k: the mean drop of the top-1 probability when the top-k units by
  contribution are zeroed, with its bootstrap interval over images, against k random units and the k most active
  units. The random bar is a Monte Carlo test: each of the `draws` random sets is the same on every image, so each
  gives a mean drop over the images; p = (1 + #sets whose mean drop ≥ the top-k's) / (draws + 1). A concept
  explanation beats random when p ≤ ALPHA; otherwise it fails, and the report says so.
- the concept profile per model, layer and predicted class: each concept's share of the positive contribution,
  averaged over the images predicted as that class.
Torch-free: the report side and diff read it.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from report_builder.stats import ALPHA, Comparison, Interval, bootstrap, compare_words, paired

CONCEPTS_CSV = "concept_attribution.csv"
CONCEPTS_CSV_COLUMNS = ("model", "image", "layer", "unit", "rank", "contribution", "share", "activation", "label",
                        "scorer", "similarity", "netdissect_label", "netdissect_category", "iou", "detector")
SENTENCE_K = 5  # the k the findings state (the nearest listed k when 5 is not)
PROFILE_CONCEPTS = 5


def empirical_p(value: float, draws) -> float:
    """One-sided Monte Carlo p-value that `value` is no larger than the draws: (1 + #draws ≥ value) / (draws + 1);
    a draw equal to the value (within rounding) counts against it."""
    draws = np.asarray(draws, dtype=np.float64)
    return float((1 + np.sum(draws >= value - 1e-12)) / (len(draws) + 1))


def _sentence_k(ks: list[int]) -> int:
    return min(ks, key=lambda k: (abs(k - SENTENCE_K), k))


def ablation_summary(section: dict) -> list[dict]:
    """Per model, layer and k: the drops' means over images, the random bar's test and the verdict."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in section["records"]:
        groups[(r["model"], r["layer"])].append(r)
    bar = next(b["name"] for b in section["baselines"] if b["bar"])
    single = [b["name"] for b in section["baselines"] if not b["draws"]]
    out = []
    for (model, layer), records in groups.items():
        ks = records[0]["ablation"]["ks"]
        for i, k in enumerate(ks):
            top = np.array([r["ablation"]["top"][i] for r in records], dtype=np.float64)
            draws = np.array([r["ablation"]["baselines"][bar][i] for r in records], dtype=np.float64)  # images x draws
            per_set = draws.mean(axis=0)  # each random set's mean drop over the images
            mean_top = float(top.mean())
            p = empirical_p(mean_top, per_set)
            per_image_p = [empirical_p(t, d) for t, d in zip(top, draws)]
            interval = bootstrap(top)
            row = {"model": model, "layer": layer, "k": k, "units": records[0]["units"], "images": len(records),
                   "top": mean_top, "top_low": interval.low, "top_high": interval.high,
                   bar: float(per_set.mean()), f"{bar}_low": float(np.quantile(per_set, 0.025)),
                   f"{bar}_high": float(np.quantile(per_set, 0.975)), "draws": int(draws.shape[1]),
                   "p_value": p, "images_beating": int(sum(q <= ALPHA for q in per_image_p)),
                   "verdict": "beats random" if p <= ALPHA and mean_top > per_set.mean() else "fails"}
            for name in single:
                values = [r["ablation"]["baselines"][name][i][0] for r in records]
                row[name] = float(np.mean(values))
                row[f"vs_{name}"] = paired(top, values).as_dict()
            out.append(row)
    return out


def _share_values(records: list[dict], label: str) -> list[float]:
    """The concept's share on each record (0 where the record lacks it)."""
    return [next((c["share"] for c in r["concepts"] if c["label"] == label), 0.0) for r in records]


def mean_shares(records: list[dict], limit: int) -> list[dict]:
    """The `limit` concepts with the largest share averaged over the records (0 where a record lacks one), each with
    the 95 % bootstrap interval of that mean over the records and the number of records it appears in."""
    total: dict[str, float] = defaultdict(float)
    present: dict[str, int] = defaultdict(int)
    for r in records:
        for c in r["concepts"]:
            total[c["label"]] += c["share"]
            present[c["label"]] += 1
    ranked = sorted(total, key=lambda label: (-total[label], label))[:limit]
    out = []
    for label in ranked:
        interval = bootstrap(_share_values(records, label))
        out.append({"label": label, "share": total[label] / len(records), "low": interval.low, "high": interval.high,
                    "images": present[label]})
    return out


def profiles(section: dict) -> list[dict]:
    """Per model, layer and predicted class: the concepts with the largest mean share over its images."""
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in section["records"]:
        groups[(r["model"], r["layer"], r["target_class"])].append(r)
    out = []
    for (model, layer, cls), records in groups.items():
        out.append({"model": model, "layer": layer, "class_index": cls, "class_name": records[0]["target_name"],
                    "images": len(records), "image_ids": [r["image"] for r in records],
                    "concepts": mean_shares(records, PROFILE_CONCEPTS)})
    return sorted(out, key=lambda p: (p["model"], p["layer"], -p["images"], p["class_name"]))


def cam_agreement(section: dict) -> list[dict]:
    """Per model, concept layer and explanation method: the IoU of the top pixels of the top units' own Grad-CAM
    map with the method's map, its mean over images and 95 % bootstrap interval."""
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in section["records"]:
        for method, iou in r.get("cam_agreement", {}).items():
            if iou is not None:
                values[(r["model"], r["layer"], method)].append(iou)
    out = []
    for (model, layer, method), v in values.items():
        interval = bootstrap(v)
        out.append({"model": model, "layer": layer, "method": method, "iou": interval.value, "low": interval.low,
                    "high": interval.high, "images": len(v), "values": v})
    return out


def summary(results: dict) -> dict:
    section = results["concepts"]
    return {"ablation": ablation_summary(section), "profiles": profiles(section), "agreement": cam_agreement(section)}


def _p_words(r: dict) -> str:
    """'p = 0.032, the smallest 30 sets allow' when no random set reached the top-k units' drop."""
    smallest = 1 / (r["draws"] + 1)
    return f"p = {r['p_value']:.2g}" + (f", the smallest {r['draws']} sets allow" if r["p_value"] <= smallest + 1e-12 else "")


def _ablation_finding(section: dict, name: str, model: str, layers: dict[str, list[dict]]) -> dict:
    """One sentence per model: the top-k units' drop at each layer against random sets, the verdict per layer, the
    most-active baseline; k is the listed k nearest SENTENCE_K, and the k where the verdict differs are named."""
    k = _sentence_k([e["k"] for entries in layers.values() for e in entries])
    rows = {layer: next((e for e in entries if e["k"] == k), None) for layer, entries in layers.items()}
    rows = {layer: r for layer, r in rows.items() if r is not None}
    n = max(r["images"] for r in rows.values())
    draws = next(iter(rows.values()))["draws"]
    drops = "; ".join(f"{r['top']:.2f} [{r['top_low']:.2f}, {r['top_high']:.2f}] at {layer}" for layer, r in rows.items())
    randoms = ", ".join(f"{r['random']:.2f}" for r in rows.values())
    text = (f"Ablating {name}'s top-{k} concept units (ranked by {section['attribution']}) lowered the top-1 "
            f"probability by {drops} (mean over {n} image{'s' if n != 1 else ''}), against {randoms} for {k} "
            f"random units ({draws} sets each).")
    beats = [layer for layer, r in rows.items() if r["verdict"] == "beats random"]
    fails = [layer for layer, r in rows.items() if r["verdict"] != "beats random"]
    if beats:
        where = "at every layer" if not fails else f"at {', '.join(beats)}"
        ps = {_p_words(rows[layer]) for layer in beats}
        alone = ", ".join(str(rows[layer]["images_beating"]) for layer in beats)
        if len(ps) == 1:
            stated = f"{ps.pop()}{' at each' if len(beats) > 1 else ''}"
        else:
            stated = "; ".join(f"{layer}: {_p_words(rows[layer])}" for layer in beats)
        text += (f" The concept explanation beats random ablation {where} ({stated}; on its own, {alone} of {n} "
                 f"images beat their random sets).")
    if fails:
        text += (" It fails at " + ", ".join(f"{layer} ({_p_words(rows[layer])})" for layer in fails)
                 + ", where it does not beat random ablation.")
    other_k = sorted({(e["k"], layer) for layer, entries in layers.items() for e in entries
                      if e["k"] != k and (e["verdict"] == "beats random") != (rows[layer]["verdict"] == "beats random")})
    if other_k:
        text += " With other k the verdict differs: " + ", ".join(
            f"k = {kk} at {layer} {'beats random' if rows[layer]['verdict'] != 'beats random' else 'fails'}"
            for kk, layer in other_k) + "."
    single = [b["name"] for b in section["baselines"] if not b["draws"]]
    for baseline in single:
        title = next(b["title"] for b in section["baselines"] if b["name"] == baseline).replace("k ", f"{k} ", 1)
        comparisons = {layer: Comparison(Interval(c["difference"], c["low"], c["high"], c["n"]), c["p_value"], c["n"])
                       for layer, r in rows.items() for c in [r[f"vs_{baseline}"]]}
        drops = ", ".join(f"{r[baseline]:.2f}" for r in rows.values())
        if not any(c.significant for c in comparisons.values()):
            low = min(c.p_value for c in comparisons.values())
            text += (f" Against {title} (drops {drops}), the contribution ranking's drop is within noise at "
                     f"{'every layer' if len(rows) > 1 else next(iter(rows))} (p ≥ {low:.2g} over {n} images).")
        else:
            text += f" Against {title} (drops {drops}): " + "; ".join(
                f"{layer}, {compare_words(c, digits=2)}" for layer, c in comparisons.items()) + "."
    return {"id": f"concepts-ablation-{model}", "section": "concepts", "text": text}


def _names(results: dict) -> dict[str, str]:
    return {m["id"]: m["display"] for m in results["models"]}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def findings(results: dict) -> list[dict]:
    section = results.get("concepts")
    if not section or not section.get("ablation"):
        return []
    names = _names(results)
    out = []
    rows = section["ablation"]
    by_layer: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_layer[(r["model"], r["layer"])].append(r)
    for model in dict.fromkeys(m for m, _ in by_layer):
        out.append(_ablation_finding(section, names[model], model,
                                     {layer: entries for (m, layer), entries in by_layer.items() if m == model}))
    out.extend(_agreement_findings(results, names))
    for model in dict.fromkeys(r["model"] for r in section["records"]):
        layers = [x for (m, x) in by_layer if m == model]
        layer = layers[-1]  # the deepest concept layer: nearest the decision
        records = [r for r in section["records"] if r["model"] == model and r["layer"] == layer]
        top = mean_shares(records, 3)
        if not top:
            continue
        source = "CLIP-Dissect" if section["label_source"] == "clip-dissect" else "Network Dissection"
        listed = ", ".join(f"{c['label']} ({_pct(c['share'])} [{_pct(c['low'])}, {_pct(c['high'])}])" for c in top)
        n = len(records)
        text = (f"Over its {n} explained image{'s' if n != 1 else ''}, {names[model]}'s predictions rest most on the "
                f"{source} concepts {listed} at {layer} (each concept's share of the units' positive contribution, "
                "its mean over the images with its 95% bootstrap interval; the labels' own quality is in the "
                "dissection section).")
        if len(top) >= 2:
            first, second = top[0]["label"], top[1]["label"]
            c = paired(_share_values(records, first), _share_values(records, second))
            text += (f" {first} leads {second} beyond noise: {compare_words(c, digits=2)}." if c.significant else
                     f" {first} and {second} are within noise of each other (difference {c.difference.format(2)}, "
                     f"p = {c.p_value:.2g} over {c.n} image{'s' if c.n != 1 else ''}), so their order is no ranking.")
        out.append({"id": f"concepts-profile-{model}", "section": "concepts", "text": text})
    return out


def _agreement_findings(results: dict, names: dict[str, str]) -> list[dict]:
    """Q5's concept view: per model, at its deepest concept layer, how far each method's map overlaps the map of
    the top concept units; the closest method is named only when it is closer than the next beyond noise."""
    from report_builder.explanation.registry import TITLES

    section = results["concepts"]
    out = []
    shown = section["settings"]["top_units"]
    share = section.get("top_pixels", 0.2)
    for model in dict.fromkeys(r["model"] for r in section.get("agreement", [])):
        rows = [r for r in section["agreement"] if r["model"] == model]
        layer = rows[-1]["layer"]
        rows = sorted((r for r in rows if r["layer"] == layer), key=lambda r: -r["iou"])
        listed = "; ".join(f"{TITLES.get(r['method'], r['method'])} {r['iou']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"
                           for r in rows)
        n = max(r["images"] for r in rows)
        text = (f"Where {names[model]}'s top-{shown} concept units at {layer} point (the Grad-CAM map of those units "
                f"alone) overlaps each method's map by IoU of their top {100 * share:.0f}% of pixels, over {n} "
                f"image{'s' if n != 1 else ''}: {listed}.")
        if len(rows) >= 2 and len(rows[0]["values"]) == len(rows[1]["values"]):
            c = paired(rows[0]["values"], rows[1]["values"])
            first, second = TITLES.get(rows[0]["method"], rows[0]["method"]), TITLES.get(rows[1]["method"], rows[1]["method"])
            if c.significant:
                text += f" {first} agrees with them most; its IoU against {second}'s: {compare_words(c, digits=2)}."
            else:
                text += (f" The two closest, {first} and {second}, are within noise of each other (difference "
                         f"{c.difference.format(2)}, p = {c.p_value:.2g} over {c.n} image{'s' if c.n != 1 else ''}).")
        out.append({"id": f"concepts-agreement-{model}", "section": "concepts", "question": "q5", "text": text})
    return out
