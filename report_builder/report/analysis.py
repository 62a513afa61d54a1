"""Results -> summaries and findings: the numbers, and the sentences that state them.

Every sentence is built from numbers in `results`; each finding carries those numbers too, so a
reader (or a test) can check the sentence against the tables.
"""
from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict

import numpy as np
import pandas as pd

from report_builder.evaluation import registry as metric_registry
from report_builder.explanation.registry import TITLES as METHOD_TITLES
from report_builder.label_quality import COMBINATION_LABELLER, COMBINATION_TERMS, sanity_passes
from report_builder.stats import bootstrap, compare_words, from_draws, paired, paired_draws, share


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else None


def _display(results: dict) -> dict[str, str]:
    return {m["id"]: m["display"] for m in results["models"]}


def agreement_summary(results: dict) -> list[dict]:
    """Per model and CAM method: mean IoU with LIME (top-n and at each threshold), best and worst image."""
    thresholds = [f"{t:g}" for t in results["agreement"]["thresholds"]]
    rows = pd.DataFrame(results["agreement"]["rows"])
    if rows.empty:
        return []
    times = timing_table(results)
    lime_seconds = times[times.method == "lime"].groupby("model", sort=False).seconds.agg(list)
    out = []
    for (model, method), group in rows.groupby(["model", "method_b"], sort=False):
        defined = group[group.iou.notna()]
        best = defined.loc[defined.iou.idxmax()] if len(defined) else None  # the first of equal IoUs, as max() gives
        worst = defined.loc[defined.iou.idxmin()] if len(defined) else None
        out.append({
            "model": model,
            "method_a": "lime",
            "method_b": method,
            "images": len(group),
            "images_defined": len(defined),
            "mean_iou": _mean(group.iou.tolist()),
            **_mean_interval(group.iou.tolist(), "mean_iou"),
            "mean_iou_at": {t: _mean(group[f"iou@{t}"].tolist()) for t in thresholds},
            "best_image": None if best is None else best.image,
            "best_iou": None if best is None else float(best.iou),
            "worst_image": None if worst is None else worst.image,
            "worst_iou": None if worst is None else float(worst.iou),
            "mean_lime_seconds": _mean(lime_seconds.get(model, [])),
        })
    return out


def _mean_interval(values: list, key: str) -> dict:
    """`<key>_low`, `<key>_high`: the 95 % bootstrap interval of the mean over images (None with no value)."""
    i = bootstrap([np.nan if v is None else v for v in values])
    return {f"{key}_low": None if i.n == 0 else i.low, f"{key}_high": None if i.n == 0 else i.high}


def _with_interval(row: dict, key: str, digits: int = 2) -> str:
    """'0.35 [0.21, 0.48]' from a summary row's value and its `_low`/`_high`."""
    if row.get(f"{key}_low") is None:
        return _f(row[key], digits)
    return f"{_f(row[key], digits)} [{_f(row[key + '_low'], digits)}, {_f(row[key + '_high'], digits)}]"


def _paired_agreement(results: dict, model: str, a: str, b: str):
    """Two CAM methods' IoUs with LIME, paired over the images both have."""
    by = {(r["image"], r["method_b"]): r["iou"] for r in results["agreement"]["rows"] if r["model"] == model}
    images = [im for im, m in by if m == a and (im, b) in by]
    nan = lambda v: np.nan if v is None else v  # noqa: E731
    return paired([nan(by[(im, a)]) for im in images], [nan(by[(im, b)]) for im in images])


def timing_table(results: dict) -> pd.DataFrame:
    """Every method's time on every image: model, image, method, seconds, cached."""
    return pd.DataFrame([{"model": e["model"], "image": e["image"], "method": method, "seconds": entry["seconds"],
                          "cached": bool(entry.get("cached"))}
                         for e in results["explanations"] for method, entry in e["methods"].items()],
                        columns=["model", "image", "method", "seconds", "cached"])


def timing_summary(results: dict) -> list[dict]:
    """Per model and method: mean, median, min and max wall time per image, and how many came from the cache."""
    table = timing_table(results)
    if table.empty:
        return []
    summary = table.groupby(["model", "method"], sort=False).agg(
        images=("seconds", "size"), mean_seconds=("seconds", statistics.fmean),
        median_seconds=("seconds", statistics.median), min_seconds=("seconds", "min"),
        max_seconds=("seconds", "max"), cached=("cached", "sum"))
    return [{k: _plain(v) for k, v in row.items()} for row in summary.reset_index().to_dict("records")]


def _plain(value):
    """NumPy scalars (from pandas) as Python numbers, so results.json and comparisons see plain values."""
    return value.item() if isinstance(value, np.generic) else value


def findings(results: dict) -> list[dict]:
    from report_builder.report import concepts

    out: list[dict] = []
    for fn in (dissection_findings, quality_findings, directions_findings, netdissect_findings, bases_findings,
               concepts.findings, versions_findings, evaluation_findings, _agreement_findings,
               _cam_ranking_findings, _speed_findings, sweep_findings, _prediction_findings, _confidence_findings,
               _lime_fit_findings):
        out.extend(fn(results))
    for f in out:
        f.setdefault("question", None)
        f.setdefault("timing", False)  # computed from wall-clock times: differs between runs (see rundir.TIMING_KEYS)
    return out


def _same_concept(label: str) -> str:
    """A label in a comparable form: lower case, '_' and '-' as spaces, Broden's '-c' style suffix dropped."""
    text = re.sub(r"-[a-z]$", "", label.strip().lower())
    return " ".join(re.split(r"[\s_-]+", text)).strip()


def method_agreement(results: dict) -> list[dict]:
    """Per model and layer dissected both ways: how often a NetDissect detector's label is CLIP-Dissect's too (a join
    of the two unit tables on model, layer and unit)."""
    if "dissection" not in results or "netdissect" not in results:
        return []
    clip = pd.DataFrame([{"model": m["model"], "layer": x["layer"], "unit": u["unit"], "clip": u["label"],
                          "similarity": u["similarity"], "scorer": u["scorer"],
                          "top": {_same_concept(t) for t in [u["label"]] + [a["label"] for a in u["alternatives"]]}}
                         for m in results["dissection"]["models"] for x in m["layers"] for u in x["labels"]],
                        columns=["model", "layer", "unit", "clip", "similarity", "scorer", "top"])
    detectors = pd.DataFrame([{"model": m["model"], "layer": x["layer"], "unit": u["unit"], "netdissect": u["label"],
                               "category": u["category"], "iou": u["iou"]}
                              for m in results["netdissect"]["models"] for x in m["layers"] for u in x["unit_labels"]
                              if u["detector"]], columns=["model", "layer", "unit", "netdissect", "category", "iou"])
    pairs = detectors.merge(clip, on=["model", "layer", "unit"], how="inner")
    # Bracket access throughout: "clip" and "top" are also DataFrame methods.
    mine = pairs["netdissect"].map(_same_concept)
    pairs["same"] = mine == pairs["clip"].map(_same_concept)
    pairs["in_top"] = [m in top for m, top in zip(mine, pairs["top"])]
    dissected = set(zip(clip.model, clip.layer))
    rows = []
    for m in results["netdissect"]["models"]:
        for x in m["layers"]:
            if (m["model"], x["layer"]) not in dissected:
                continue
            mine_ = pairs[(pairs.model == m["model"]) & (pairs.layer == x["layer"])].sort_values("iou", ascending=False,
                                                                                               kind="stable")
            examples = pd.concat([mine_[mine_["in_top"]], mine_[~mine_["in_top"]]]).head(6)
            rows.append({"model": m["model"], "layer": x["layer"], "units": x["units"], "detectors": len(mine_),
                         "same": int(mine_["same"].sum()), "in_top": int(mine_["in_top"].sum()),
                         "examples": [{k: _plain(v) for k, v in e.items()} for e in examples.drop(
                             columns=["model", "layer", "top"]).to_dict("records")]})
    return rows


def netdissect_findings(results: dict) -> list[dict]:
    if "netdissect" not in results:
        return []
    nd = results["netdissect"]
    names = _display(results)
    out = []
    for m in nd["models"]:
        layers = m["layers"]
        parts = [f"{x['layer']} has {x['detectors']} detectors of {x['units']} units ({_pct(x['detectors'], x['units'])}) "
                 f"covering {x['unique']} unique concepts" for x in layers]
        best = max(layers, key=lambda x: x["unique"])
        text = (f"With pixel labels, {names[m['model']]}'s " + "; ".join(parts) +
                f". The most unique detectors are in {best['layer']} ({best['unique']}).")
        out.append({"id": f"netdissect-{m['model']}", "section": "netdissect", "text": text,
                    "numbers": {x["layer"]: {"detectors": x["detectors"], "unique": x["unique"]} for x in layers}})
        totals: dict[str, int] = defaultdict(int)
        for x in layers:
            for c, n in x["per_category"].items():
                totals[c] += n
        if sum(totals.values()):
            order = sorted(totals, key=lambda c: -totals[c])
            text = (f"By category, {names[m['model']]}'s detectors are " +
                    ", ".join(f"{totals[c]} {c}" for c in order) + " over all dissected layers.")
            out.append({"id": f"netdissect-categories-{m['model']}", "section": "netdissect", "text": text,
                        "numbers": dict(totals)})
        r = m.get("rotation")
        if r and r["alphas"][-1] > 0:
            base, full = r["unique"][0], r["unique"][-1]
            change = (full - base) / base if base else None
            drop = "—" if change is None else f"{abs(100 * change):.0f}% {'fewer' if change <= 0 else 'more'}"
            text = (f"Rotating {names[m['model']]}'s {r['layer']} by a random rotation (alpha {r['alphas'][-1]:g}) "
                    f"changes its unique detectors from {base} to {full} ({drop}) and its detectors from "
                    f"{r['detectors'][0]} to {r['detectors'][-1]}; Bau et al. saw about 80% fewer unique detectors "
                    "under a full rotation.")
            out.append({"id": f"rotation-{m['model']}", "section": "netdissect", "text": text,
                        "numbers": {"alphas": r["alphas"], "unique": r["unique"], "detectors": r["detectors"]}})
    by_model: dict[str, list[dict]] = defaultdict(list)
    for a in nd.get("agreement", []):
        by_model[a["model"]].append(a)
    for model, rows in by_model.items():
        detectors = sum(a["detectors"] for a in rows)
        if not detectors:
            continue
        same, in_top = sum(a["same"] for a in rows), sum(a["in_top"] for a in rows)
        text = (f"Of {names[model]}'s {detectors} NetDissect detectors, {same} have the same label under CLIP-Dissect "
                f"and {in_top} have it among CLIP-Dissect's four best concepts (" +
                "; ".join(f"{a['layer']}: {a['same']} and {a['in_top']} of {a['detectors']}" for a in rows) + ").")
        out.append({"id": f"methods-{model}", "section": "netdissect", "text": text,
                    "numbers": {"detectors": detectors, "same": same, "in_top": in_top}})
    return out


def directions_findings(results: dict) -> list[dict]:
    """Per model and layer with learned directions: distinct CLIP-Dissect labels among the units and among each
    method's directions, with how well and how sparsely the directions reconstruct the layer."""
    d = results.get("dissection", {})
    if not d.get("directions"):
        return []
    names = _display(results)
    units = {(m["model"], x["layer"]): x for m in d["summary"]["models"] for x in m["layers"]}
    by_layer: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for f in d["directions"]:
        by_layer[(f["model"], f["layer"])].append(f)
    out = []
    for (model, layer), fits in by_layer.items():
        u = units[(model, layer)]
        parts = [f"its {u['units']} units carry {u['unique']} distinct labels ({_pct(u['unique'], u['units'])})"]
        for f in fits:
            clipped = f["reports"].get("clipped")
            parts.append(f"the {f['components']} {f['title']} directions carry {f['unique']} ({_pct(f['unique'], f['components'])}; "
                         f"relative reconstruction error {f['reconstruction_error']:.2f}, "
                         f"{100 * f['sparsity']:.0f}% of codes active"
                         + (f", {100 * clipped:.0f}% of the activations' mass below 0 clipped before the fit"
                            if clipped else "") + ")")
        text = (f"Labelled the same way, {names[model]}'s {layer}: " + "; ".join(parts) + ". The bases differ in size, "
                "so the shares compare, not the counts; and among a few dozen directions a count of distinct labels "
                "moves by a few with the seed and the probe images, so only a large gap says one basis is more varied.")
        out.append({"id": f"directions-{model}-{layer}", "section": "dissection", "question": "directions", "text": text,
                    "numbers": {"units": {"units": u["units"], "unique": u["unique"]},
                                **{f["method"]: {k: f[k] for k in ("components", "unique", "reconstruction_error",
                                                                    "sparsity")} for f in fits}}})
    return out


def bases_findings(results: dict) -> list[dict]:
    """Network Dissection of the learned directions beside the units and the full random rotation: the share of
    each basis that are detectors, with Wilson's 95% interval; a basis is called more (or less) interpretable than
    the units only when the two intervals do not overlap."""
    if "netdissect" not in results:
        return []
    names = _display(results)
    out = []
    for m in results["netdissect"]["models"]:
        by_layer: dict[str, list[dict]] = defaultdict(list)
        for b in m.get("bases", []):
            by_layer[b["layer"]].append(b)
        for layer, rows in by_layer.items():
            learned = [b for b in rows if b["basis"] not in ("units", "rotation")]
            if not learned:
                continue
            shares = {b["basis"]: share(b["detectors"], b["size"]) for b in rows}
            parts = [f"{b['title']}: {b['detectors']} detectors of {b['size']} "
                     f"({100 * shares[b['basis']].value:.0f}% [{100 * shares[b['basis']].low:.0f}, "
                     f"{100 * shares[b['basis']].high:.0f}]), {b['unique']} unique concepts" for b in rows]
            units = shares["units"]
            apart = [(b, "more" if shares[b["basis"]].low > units.high else "less") for b in learned
                     if shares[b["basis"]].low > units.high or shares[b["basis"]].high < units.low]
            verdict = ("; ".join(f"{b['title']} directions are detectors {word} often than the units (the 95% intervals "
                                 "do not overlap)" for b, word in apart) if apart else
                       "no learned basis's share of detectors differs from the units' beyond the 95% intervals, so "
                       "these counts do not rank the bases")
            text = (f"With pixel labels, {names[m['model']]}'s {layer} in each basis: " + "; ".join(parts) + ". "
                    + verdict[0].upper() + verdict[1:] + ". With few labelled images a count moves by a few from one "
                    "basis to the next.")
            out.append({"id": f"bases-{m['model']}-{layer}", "section": "netdissect", "text": text,
                        "numbers": {b["basis"]: {"size": b["size"], "detectors": b["detectors"], "unique": b["unique"]}
                                    for b in rows}})
    return out


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "—"


def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "—"
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000" for a tiny negative


def _agreement_findings(results: dict) -> list[dict]:
    names = _display(results)
    out = []
    for s in results["agreement"]["summary"]:
        if s["method_b"] != "gradcam" or s["mean_iou"] is None:
            continue
        text = (
            f"On {names[s['model']]}, LIME and Grad-CAM agree most on {s['best_image']} (IoU {_f(s['best_iou'])}) "
            f"and least on {s['worst_image']} (IoU {_f(s['worst_iou'])}); the mean IoU over "
            f"{s['images_defined']} images is {_with_interval(s, 'mean_iou')}."
        )
        out.append({"id": f"agreement-{s['model']}", "section": "agreement", "question": "q6", "text": text,
                    "numbers": {k: s[k] for k in ("best_iou", "worst_iou", "mean_iou")}})
    return out


def _cam_ranking_findings(results: dict) -> list[dict]:
    names = _display(results)
    by_model: dict[str, list[dict]] = defaultdict(list)
    for s in results["agreement"]["summary"]:
        if s["mean_iou"] is not None:
            by_model[s["model"]].append(s)
    out = []
    for model, rows in by_model.items():
        if len(rows) < 2:
            continue
        rows = sorted(rows, key=lambda r: -r["mean_iou"])
        top, bottom = rows[0]["method_b"], rows[-1]["method_b"]
        c = _paired_agreement(results, model, top, bottom)
        if c.significant:
            text = (
                f"Among the CAM methods on {names[model]}, {METHOD_TITLES[top]} agrees best with LIME "
                f"(mean IoU {_with_interval(rows[0], 'mean_iou')}) and {METHOD_TITLES[bottom]} least "
                f"({_with_interval(rows[-1], 'mean_iou')}); paired over images, "
                + compare_words(c, 2, item="image") + ".")
        else:
            text = (
                f"Among the CAM methods on {names[model]}, the agreement with LIME is within noise: mean IoU from "
                f"{_with_interval(rows[-1], 'mean_iou')} ({METHOD_TITLES[bottom]}) to "
                f"{_with_interval(rows[0], 'mean_iou')} ({METHOD_TITLES[top]}); {METHOD_TITLES[top]} against "
                f"{METHOD_TITLES[bottom]}, paired over images: " + compare_words(c, 2, item="image") + ".")
        out.append({"id": f"cam-ranking-{model}", "section": "agreement", "question": "q5", "text": text,
                    "numbers": {**{r["method_b"]: r["mean_iou"] for r in rows}, "difference": c.as_dict()}})
    return out


def _speed_findings(results: dict) -> list[dict]:
    """Which method is fastest, with the spread behind it. Timings change from run to run and with the machine's
    load, so these findings are marked `timing` and say when the order is within the noise."""
    per_method: dict[str, list[float]] = defaultdict(list)
    for e in results["explanations"]:
        for method, entry in e["methods"].items():
            if not entry.get("cached"):  # a cached result's time was measured in another run
                per_method[method].append(entry["seconds"])
    if not per_method:
        for e in results["explanations"]:
            for method, entry in e["methods"].items():
                per_method[method].append(entry["seconds"])
    if len(per_method) < 2:
        return []
    stats = {m: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)}
             for m, v in per_method.items()}
    order = sorted(stats, key=lambda m: stats[m]["median"])
    fastest, second, slowest = order[0], order[1], order[-1]

    def spread(m: str) -> str:
        s = stats[m]
        return f"{_f(s['median'])} s per image (median of {s['runs']}; {_f(s['min'])}–{_f(s['max'])} s)"

    overlap = stats[second]["min"] <= stats[fastest]["max"]
    if overlap:
        text = (f"{METHOD_TITLES[fastest]} and {METHOD_TITLES[second]} are about equally fast: {spread(fastest)} "
                f"against {spread(second)}; their ranges overlap, so their order can change from run to run.")
    else:
        text = f"{METHOD_TITLES[fastest]} is the fastest method: {spread(fastest)}."
    ratio = stats[slowest]["median"] / stats[fastest]["median"] if stats[fastest]["median"] > 0 else None
    if slowest not in (fastest, second) or not overlap:
        runner_up = order[-2]
        if stats[slowest]["min"] <= stats[runner_up]["max"] and runner_up not in (fastest, second):
            # the same rule as for the fastest pair: overlapping ranges do not rank
            text += (f" {METHOD_TITLES[slowest]} and {METHOD_TITLES[runner_up]} are the slowest: {spread(slowest)} "
                     f"against {spread(runner_up)}; their ranges overlap, so which is slower can change from run to "
                     "run" + (f"; the slower takes about {ratio:.0f} times the fastest." if ratio else "."))
        else:
            text += f" {METHOD_TITLES[slowest]} is the slowest: {spread(slowest)}"
            text += f", about {ratio:.0f} times the fastest." if ratio else "."
    text += _timed_where(results)
    lime = [(e["model"], e["methods"]["lime"]["seconds"]) for e in results["explanations"] if "lime" in e["methods"]]
    out = [{"id": "speed", "section": "timings", "question": "q5", "timing": True, "text": text,
            "numbers": {"median_seconds": {m: stats[m]["median"] for m in order}, "ratio": ratio,
                        "ranges_overlap": overlap}}]
    if lime:
        names = _display(results)
        per_model = defaultdict(list)
        for model, seconds in lime:
            per_model[model].append(seconds)
        text = "LIME took " + "; ".join(
            f"{_f(statistics.median(v), 1)} s per image on {names[m]} ({_f(min(v), 1)}–{_f(max(v), 1)} s)"
            for m, v in per_model.items()) + " (medians and ranges; wall-clock times vary between runs)."
        text += _timed_where(results)
        out.append({"id": "lime-time", "section": "agreement", "question": "q6", "timing": True, "text": text,
                    "numbers": {m: statistics.median(v) for m, v in per_model.items()}})
    return out


def _timed_where(results: dict) -> str:
    """Where the times were taken, when that was not this process with all its threads: a worker has a share of
    the cores, so each task takes longer than alone (and more of them run at once)."""
    shares = results.get("provenance", {}).get("workers")
    fresh = any(not entry.get("cached") for e in results["explanations"] for entry in e["methods"].values())
    if not shares or not fresh:  # cached times were taken by another run
        return ""
    processes = shares["processes"]
    return (f" Each explanation was timed in one of {processes} worker process{'es' if processes != 1 else ''} of "
            f"{_plural(shares['threads'], 'thread')} each, running side by side (with --workers 1 they are timed in "
            "one process with every thread).")


def _prediction_findings(results: dict) -> list[dict]:
    names = _display(results)
    models = [m["id"] for m in results["models"]]
    if len(models) < 2:
        return []
    top1: dict[str, dict[str, str]] = defaultdict(dict)
    for e in results["explanations"]:
        top1[e["image"]][e["model"]] = e["target_name"]
    images = [i for i, by in top1.items() if len(by) == len(models)]
    same = [i for i in images if len(set(top1[i].values())) == 1]
    differ = [i for i in images if i not in same]
    text = f"The {len(models)} models give the same top-1 class on {len(same)} of {len(images)} images"
    if differ:
        example = differ[0]
        detail = ", ".join(f"{names[m]}: {top1[example][m]}" for m in models)
        text += f"; on {example} they differ ({detail})."
    else:
        text += "."
    return [{"id": "top1-agreement", "section": "predictions", "text": text,
             "numbers": {"same": len(same), "images": len(images), "differ": differ}}]


def _confidence_findings(results: dict) -> list[dict]:
    names = _display(results)
    by_model: dict[str, list[dict]] = defaultdict(list)
    for e in results["explanations"]:
        by_model[e["model"]].append(e)
    out = []
    for model, rows in by_model.items():
        hi = max(rows, key=lambda e: e["predictions"][0]["probability"])
        lo = min(rows, key=lambda e: e["predictions"][0]["probability"])
        p_hi, p_lo = hi["predictions"][0]["probability"], lo["predictions"][0]["probability"]
        text = (
            f"{names[model]} is most confident on {hi['image']} ({hi['target_name']}, p = {_f(p_hi)}) and least on "
            f"{lo['image']} ({lo['target_name']}, p = {_f(p_lo)})."
        )
        out.append({"id": f"confidence-{model}", "section": "predictions", "text": text,
                    "numbers": {"max_p": p_hi, "min_p": p_lo}})
    return out


def _lime_fit_findings(results: dict) -> list[dict]:
    names = _display(results)
    by_model: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for e in results["explanations"]:
        if "lime" in e["methods"]:
            by_model[e["model"]].append((e["image"], e["methods"]["lime"]["score"]))
    out = []
    for model, rows in by_model.items():
        best = max(rows, key=lambda r: r[1])
        worst = min(rows, key=lambda r: r[1])
        mean = statistics.fmean(r[1] for r in rows)
        text = (
            f"LIME's linear surrogate on {names[model]} fits best on {best[0]} (R² {_f(best[1])}) and worst on "
            f"{worst[0]} (R² {_f(worst[1])}); mean R² {_f(mean)}. A low R² means the superpixel explanation "
            "captures little of the model's local behaviour."
        )
        out.append({"id": f"lime-fit-{model}", "section": "agreement", "text": text,
                    "numbers": {"best_r2": best[1], "worst_r2": worst[1], "mean_r2": mean}})
    return out


# ---------------------------------------------------------------- dissection (the assignment's four questions)


def dissection_summary(results: dict) -> dict:
    """Counts behind Q1-Q4: concepts per model and layer, overlaps between models, confident units."""
    d = results["dissection"]
    models = []
    for entry in d["models"]:
        all_labels = [u for layer in entry["layers"] for u in layer["labels"]]
        layers = []
        for layer in entry["layers"]:
            counts = Counter(u["label"] for u in layer["labels"])
            best = max(layer["labels"], key=lambda u: u["similarity"])
            sims = [u["similarity"] for u in layer["labels"]]
            layers.append({
                "layer": layer["layer"],
                "units": layer["units"],
                "unique": len(counts),
                "top": [{"concept": c, "units": n} for c, n in counts.most_common(10)],
                "over3": [{"concept": c, "units": n} for c, n in counts.most_common() if n > 3],
                "best": {"unit": best["unit"], "concept": best["label"], "similarity": best["similarity"]},
                "mean_similarity": statistics.fmean(sims),
                "median_similarity": statistics.median(sims),
                "scorers": dict(Counter(u["scorer"] for u in layer["labels"])),
            })
        counts = Counter(u["label"] for u in all_labels)
        confident = sorted(
            ({"layer": layer["layer"], **u} for layer in entry["layers"] for u in layer["labels"]),
            key=lambda u: -u["similarity"],
        )[:50]
        models.append({
            "model": entry["model"],
            "units": len(all_labels),
            "unique": len(counts),
            "top": [{"concept": c, "units": n} for c, n in counts.most_common(10)],
            "layers": layers,
            "confident": [{"layer": u["layer"], "unit": u["unit"], "concept": u["label"],
                           "similarity": u["similarity"]} for u in confident],
            "confident_concepts": [{"concept": c, "units": n}
                                   for c, n in Counter(u["label"] for u in confident).most_common(10)],
            "scorers": dict(Counter(u["scorer"] for u in all_labels)),
        })
    if d.get("quality"):
        _count_stable(d, models)
    return {"models": models, "comparisons": _comparisons(d), "quality": quality_summary(d)}


def _label_sets(entry: dict) -> tuple[Counter, dict[str, Counter]]:
    overall = Counter(u["label"] for layer in entry["layers"] for u in layer["labels"])
    per_layer = {layer["layer"]: Counter(u["label"] for u in layer["labels"]) for layer in entry["layers"]}
    return overall, per_layer


def _overlap(a: Counter, b: Counter) -> dict:
    shared = set(a) & set(b)
    union = set(a) | set(b)
    return {
        "shared": len(shared),
        "only_a": len(set(a) - set(b)),
        "only_b": len(set(b) - set(a)),
        "jaccard": len(shared) / len(union) if union else None,
        "top_shared": [c for c, _ in sorted(((c, a[c] + b[c]) for c in shared), key=lambda x: (-x[1], x[0]))[:8]],
        "top_only_a": [c for c, _ in sorted(((c, a[c]) for c in set(a) - set(b)), key=lambda x: (-x[1], x[0]))[:8]],
        "top_only_b": [c for c, _ in sorted(((c, b[c]) for c in set(b) - set(a)), key=lambda x: (-x[1], x[0]))[:8]],
    }


def _comparisons(d: dict) -> list[dict]:
    """Q2 for every pair of dissected models: overall, and per layer for the layers both have."""
    out = []
    entries = d["models"]
    for i in range(len(entries)):
        for j in range(i + 1, len(entries)):
            a, b = entries[i], entries[j]
            oa, la = _label_sets(a)
            ob, lb = _label_sets(b)
            layers = [{"layer": name, **_overlap(la[name], lb[name])} for name in la if name in lb]
            out.append({"a": a["model"], "b": b["model"], "overall": _overlap(oa, ob), "layers": layers})
    return out


def dissection_findings(results: dict) -> list[dict]:
    if "dissection" not in results:
        return []
    names = _display(results)
    summary = results["dissection"]["summary"]
    out: list[dict] = []
    for m in summary["models"]:
        name = names[m["model"]]
        top = m["top"]
        rest = ", ".join(f"'{t['concept']}' ({t['units']}{_stable(t)})" for t in top[1:3])
        text = (f"In {name}, the concept learned by the most units is '{top[0]['concept']}' ({top[0]['units']} of "
                f"{m['units']} units, {100 * top[0]['units'] / m['units']:.1f}%{_stable(top[0])})"
                + (f", followed by {rest}." if rest else "."))
        out.append({"id": f"q1-{m['model']}", "section": "dissection", "question": "q1", "text": text,
                    "numbers": {"top": top[:3], "units": m["units"]}})
    for c in summary["comparisons"]:
        o = c["overall"]
        a, b = names[c["a"]], names[c["b"]]
        text = (f"{a} and {b} share {o['shared']} concepts (Jaccard {_f(o['jaccard'])}); {o['only_a']} concepts "
                f"appear only in {a}" + (f" (most frequent: {', '.join(o['top_only_a'][:3])})" if o["top_only_a"] else "")
                + f" and {o['only_b']} only in {b}"
                + (f" (most frequent: {', '.join(o['top_only_b'][:3])})." if o["top_only_b"] else "."))
        out.append({"id": f"q2-{c['a']}-{c['b']}", "section": "dissection", "question": "q2", "text": text,
                    "numbers": {k: o[k] for k in ("shared", "only_a", "only_b", "jaccard")}})
        if len(c["layers"]) > 1:
            hi = max(c["layers"], key=lambda x: x["jaccard"] or 0)
            lo = min(c["layers"], key=lambda x: x["jaccard"] or 0)
            text = (f"Layer by layer, {a} and {b} overlap most in {hi['layer']} (Jaccard {_f(hi['jaccard'])}, "
                    f"{hi['shared']} shared concepts) and least in {lo['layer']} (Jaccard {_f(lo['jaccard'])}).")
            out.append({"id": f"q2-layers-{c['a']}-{c['b']}", "section": "dissection", "question": "q2",
                        "text": text, "numbers": {"max": hi["jaccard"], "min": lo["jaccard"]}})
    for m in summary["models"]:
        name = names[m["model"]]
        per_layer = "; ".join(f"{x['layer']} {x['unique']} of {x['units']}" for x in m["layers"])
        richest = max(m["layers"], key=lambda x: x["unique"] / x["units"])
        text = (f"{name} learns {m['unique']} unique concepts over {m['units']} units ({per_layer}); relative to its "
                f"size, {richest['layer']} is the most diverse ({100 * richest['unique'] / richest['units']:.0f}% of its "
                "units have distinct concepts).")
        out.append({"id": f"q3-{m['model']}", "section": "dissection", "question": "q3", "text": text,
                    "numbers": {"unique": m["unique"], "units": m["units"],
                                "per_layer": {x["layer"]: x["unique"] for x in m["layers"]}}})
    if len(summary["models"]) >= 2:
        out.append(_unique_compare(results, summary["models"][0], summary["models"][1], names))
    for m in summary["models"]:
        name = names[m["model"]]
        layers = m["layers"]
        if len(layers) >= 2:
            first, last = layers[0], layers[-1]
            text = (f"Along the hierarchy of {name}, {first['layer']} is dominated by "
                    f"'{first['top'][0]['concept']}' ({first['top'][0]['units']} units{_stable(first['top'][0])}) and "
                    f"{last['layer']} by '{last['top'][0]['concept']}' ({last['top'][0]['units']} units"
                    f"{_stable(last['top'][0])}); the mean similarity goes from "
                    f"{_f(first['mean_similarity'])} to {_f(last['mean_similarity'])}.")
            out.append({"id": f"q4-hierarchy-{m['model']}", "section": "dissection", "question": "q4", "text": text,
                        "numbers": {"first": first["mean_similarity"], "last": last["mean_similarity"]}})
        by_layer = Counter(u["layer"] for u in m["confident"])
        layer, n = by_layer.most_common(1)[0]
        cc = m["confident_concepts"][0]
        text = (f"Of the {len(m['confident'])} most confident units of {name}, {n} are in {layer}, and their most "
                f"common concept is '{cc['concept']}' ({cc['units']} units{_stable(cc)}).")
        out.append({"id": f"q4-confident-{m['model']}", "section": "dissection", "question": "q4", "text": text,
                    "numbers": {"layer": layer, "count": n, "concept": cc}})
        if len(m["scorers"]) > 1:
            shares = ", ".join(f"{k} {100 * v / m['units']:.0f}%" for k, v in sorted(m["scorers"].items(), key=lambda x: -x[1]))
            out.append({"id": f"q4-scorers-{m['model']}", "section": "dissection", "question": "q4",
                        "text": f"The labels of {name} come from these scorers: {shares}.",
                        "numbers": m["scorers"]})
    return out


# ---------------------------------------------------------------- versions of one model


def versions_summary(results: dict) -> list[dict]:
    """Per spec entry with several versions: unique concepts and relabelled units per layer, top-1 changes,
    each version against the previous one."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for m in results["models"]:
        if m.get("group"):
            groups[m["group"]].append(m)
    dissected = {e["model"]: e for e in results.get("dissection", {}).get("models", [])}
    top1 = {(e["model"], e["image"]): e["target_name"] for e in results["explanations"]}
    images = [im["id"] for im in results["images"]]
    out = []
    for group, members in groups.items():
        ids = [m["id"] for m in members]
        layers = []
        if all(i in dissected for i in ids):
            for k, first in enumerate(dissected[ids[0]]["layers"]):
                per_version = [dissected[i]["layers"][k] for i in ids]
                labels = [[u["label"] for u in x["labels"]] for x in per_version]
                layers.append({
                    "layer": first["layer"],
                    "units": first["units"],
                    "unique": [len(set(lab)) for lab in labels],
                    "relabelled": [None] + [sum(a != b for a, b in zip(labels[v - 1], labels[v])) / len(labels[v])
                                            for v in range(1, len(labels))],
                })
        out.append({
            "group": group,
            "display": members[0]["display"].rsplit(" (", 1)[0],
            "versions": [m["version"] for m in members],
            "models": ids,
            "layers": layers,
            "images": len(images),
            "top1_changes": [None] + [sum(top1.get((ids[v], i)) != top1.get((ids[v - 1], i)) for i in images)
                                      for v in range(1, len(ids))],
        })
    return out


def versions_findings(results: dict) -> list[dict]:
    out = []
    for g in results.get("versions", []):
        first, last = g["versions"][0], g["versions"][-1]
        for x in g["layers"]:
            a, b = x["unique"][0], x["unique"][-1]
            trend = "rise" if b > a else "fall" if b < a else "stay"
            text = (f"Across the {len(g['versions'])} versions of {g['display']}, the unique concepts of {x['layer']} "
                    f"{trend} from {a} ({first}) to {b} ({last}) of {x['units']} units"
                    + (f"; {100 * x['relabelled'][-1]:.0f}% of its units change label between the last two versions."
                       if len(g["versions"]) > 1 else "."))
            out.append({"id": f"versions-{g['group']}-{x['layer']}", "section": "versions", "text": text,
                        "numbers": {"unique": x["unique"], "relabelled": x["relabelled"]}})
        changes = [c for c in g["top1_changes"] if c is not None]
        if changes:
            out.append({"id": f"versions-{g['group']}-top1", "section": "versions",
                        "text": f"From one version of {g['display']} to the next, the top-1 class changes on "
                                f"{', '.join(str(c) for c in changes)} of {g['images']} images.",
                        "numbers": {"top1_changes": changes}})
    return out


# ---------------------------------------------------------------- which explanations can we trust

# What data.images.ObjectLabels.region says when no mask label names the predicted class (tests/test_evaluate.py
# checks the two agree): the table counts those images.
ANY_OBJECT = "any labelled object"


def _title(method: str) -> str:
    if metric_registry.chance_kind(method) is not None:
        return f"the {metric_registry.chance_title(method)} map"
    return METHOD_TITLES.get(method, method)


def _hits(values: list[float]) -> float | int:
    """A sum of 0/1 hits; a chance map's hits are means over its draws, so their sum may be a fraction."""
    total = float(sum(values))
    return int(total) if total.is_integer() else round(total, 2)


def evaluation_summary(results: dict) -> list[dict]:
    """Per model and method (the chance maps included): each per-map column of the metrics registry over the images
    (its mean; for a hit, the hits and the images scored: pointing_hits of pointing_images; object_fallback: the
    images where no mask label names the predicted class), each per-step column's mean at each step of the sanity
    check (sanity_spearman) and after the last one (spearman_final), and the sanity verdict over its runs (images x
    seeds: sanity_runs, sanity_fails with its Wilson interval, sanity_flat, the mean ρ and |ρ|, sanity_verdict).

    Every per-map column has its 95 % interval over images under the keys Column.low_key / high_key (<name>_low,
    <name>_high): for a mean, stats.bootstrap of the per-image values (deletion_auc_low); for a hits column, Wilson's
    interval (stats.share) of the share hits / images (pointing_hit_low of pointing_hits / pointing_images). Both are
    None where no image has a value."""
    ev = results["evaluation"]
    out = []
    for m in results["models"]:
        for method in ev["methods"]:
            rows = [r for r in ev["rows"] if r["model"] == m["id"] and r["method"] == method]
            sanity = [s for s in ev["sanity"] if s["model"] == m["id"] and s["method"] == method]
            entry = {"model": m["id"], "method": method, "images": len(rows)}
            for _, column in metric_registry.per_map():
                values = [r.get(column.name) for r in rows]
                if column.aggregate == "hits":
                    scored = [v for v in values if v is not None]
                    entry[column.hits_key] = _hits(scored) if scored else None
                    entry[column.images_key] = len(scored)
                    # of the hits as stored (a chance map's, rounded), so that a reader can recompute it
                    interval = share(entry[column.hits_key], len(scored)) if scored else None
                else:
                    interval = bootstrap([np.nan if v is None else v for v in values])
                    interval = interval if interval.n else None
                    # the mean the interval was drawn around (np.mean): low <= mean <= high holds exactly
                    entry[column.name] = None if interval is None else interval.value
                entry[column.low_key] = None if interval is None else interval.low
                entry[column.high_key] = None if interval is None else interval.high
            entry["object_fallback"] = sum(r.get("object") == ANY_OBJECT for r in rows)
            entry["sanity_images"] = len(sanity)
            if sanity:
                # the images that walked every step give the per-step means; every image gives the last step's
                steps = max(len(s["layers"]) for s in sanity)
                walked = [s for s in sanity if len(s["layers"]) == steps]
                entry["sanity_steps"], entry["sanity_walked"] = steps, len(walked)
                entry["sanity_layers"] = walked[0]["layers"]
                per_step = metric_registry.per_step()
                for metric, column in per_step:
                    entry[metric.steps_key(column)] = [_mean([s[column.name][k] for s in walked]) for k in range(steps)]
                    entry[metric.final_key(column)] = _mean([s[column.name][-1] for s in sanity])
                entry.update(_sanity_runs(sanity))
            out.append(entry)
    return out


def _sanity_runs(sanity: list[dict]) -> dict:
    """The rule of the sanity check over every run (image x seed): how many fail, the share's Wilson interval, how
    many maps went flat (they do not fail: nothing of the original survives), the mean ρ and |ρ|, the verdict."""
    rule = metric_registry.BY_NAME["sanity"].rule
    runs = [r for s in sanity for r in s.get("runs") or
            [{"seed": 0, rule.column: s[rule.column][-1], "flat": s[rule.column][-1] is None}]]
    rhos = [r[rule.column] for r in runs if not r["flat"] and r[rule.column] is not None]
    fails = sum(rule.fails(v) for v in rhos)
    failing = share(fails, len(runs))
    return {"sanity_runs": len(runs), "sanity_seeds": len({r["seed"] for r in runs}), "sanity_fails": fails,
            "sanity_fail_share": failing.as_dict(), "sanity_flat": sum(r["flat"] for r in runs),
            "spearman_runs": _mean(rhos), "abs_spearman_runs": _mean([abs(v) for v in rhos]),
            "sanity_verdict": rule.verdict(failing.low, failing.high)}


# ---- each metric's sentence: f(model, its display name, its summary rows, the per-image rows) -> a finding, or None
# when it has no numbers


def _best(rows: list[dict], key: str, name: str) -> dict:
    """The row with the best value of `key`, by the direction of the registry's column `name`."""
    pick = min if metric_registry.column(name).direction == "lower" else max
    return pick(rows, key=lambda r: r[key])


def _split(rows: list[dict]) -> tuple[list[dict], dict | None]:
    """The methods' rows and the (per-pixel) random map's."""
    return ([r for r in rows if metric_registry.chance_kind(r["method"]) is None],
            next((r for r in rows if r["method"] == "random"), None))


def _stated(row: dict, column: metric_registry.Column) -> str:
    """A summary row's mean of `column` with its 95 % interval over images: '0.148 [0.101, 0.190]'; a hits column's
    hits of images with the Wilson interval of the share: '3 of 5 [23 %, 88 %]'."""
    low, high = row.get(column.low_key), row.get(column.high_key)
    if column.aggregate == "hits":
        text = f"{row[column.hits_key]} of {row[column.images_key]}"
        return text if low is None else f"{text} [{100 * low:.0f} %, {100 * high:.0f} %]"
    text = _f(row[column.name], column.digits)
    return text if low is None else f"{text} [{_f(low, column.digits)}, {_f(high, column.digits)}]"


def _over(images: list[dict], model: str, row: dict, column: metric_registry.Column) -> str:
    """'over 5 images': how many images the row's mean of `column` is over."""
    n = len(_per_image(images, model, row["method"], column.name))
    return f"over {n} image{'s' if n != 1 else ''}"


def _per_image(images: list[dict], model: str, method: str, column: str) -> dict[str, float]:
    return {r["image"]: r.get(column) for r in images if r["model"] == model and r["method"] == method
            and r.get(column) is not None}


def _paired(images: list[dict], model: str, a: str, b: str, column: str):
    """a against b on the images both were scored on (stats.paired), or None when none were."""
    x, y = _per_image(images, model, a, column), _per_image(images, model, b, column)
    shared = [k for k in x if k in y]
    return paired([x[k] for k in shared], [y[k] for k in shared]) if shared else None


def chance_bars(metric: metric_registry.Metric, model: str, rows: list[dict], images: list[dict]) -> dict[str, dict]:
    """Per column the metric's findings compare: the strongest chance map of the metric's kinds (the best mean over
    images) and, per method, its comparison with it, image by image: 'beats', 'within noise' or 'worse', with the
    stats.paired numbers. The registry's BEATS_CHANCE states the rule."""
    methods = [r for r in rows if metric_registry.chance_kind(r["method"]) is None]
    out = {}
    for column in metric_registry.summary_columns(metric):
        key = column.hits_key if column.aggregate == "hits" else column.name
        bars = [r for r in rows if metric_registry.chance_kind(r["method"]) in metric.chance and r.get(key) is not None]
        if not bars:
            continue
        strongest = _best(bars, key, column.name)
        verdicts = {}
        for r in methods:
            c = _paired(images, model, r["method"], strongest["method"], column.name)
            if c is None:
                continue
            better = c.difference.value < 0 if column.direction == "lower" else c.difference.value > 0
            verdicts[r["method"]] = {**c.as_dict(), "verdict": ("beats" if better else "worse") if c.significant
                                     else "within noise",
                                     "words": compare_words(c, column.digits)}
        out[column.name] = {"strongest": strongest["method"], "value": strongest[key],
                            "low": strongest.get(column.low_key), "high": strongest.get(column.high_key),
                            "stated": _stated(strongest, column), "methods": verdicts,
                            "bars": {r["method"]: r[key] for r in bars}}
    return out


def _chance_clause(bars: dict, column: metric_registry.Column, what: str) -> str:
    """'Against the strongest chance map on deletion (the smooth noise (4 × 4 cells) map, 0.412): Grad-CAM beats it
    (lower by ...); ScoreCAM and LIME are within noise of it (p ≥ 0.5 over 2 images).' The methods within noise
    share one clause (their numbers are in the table), so a sentence over few images stays readable."""
    if column.name not in bars:
        return ""
    b = bars[column.name]
    parts, tied = [], []
    for method, v in b["methods"].items():
        if v["verdict"] == "within noise":
            tied.append((method, v))
        else:
            verb = "beats it: " if v["verdict"] == "beats" else "does worse than it: "
            parts.append(f"{_title(method)} {verb}{v['words']}")
    if tied:
        names = [_title(m) for m, _ in tied]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        n = max(v["n"] for _, v in tied)
        p = min(v["p_value"] for _, v in tied)
        parts.append(f"{listed} {'is' if len(names) == 1 else 'are'} within noise of it "
                     f"(paired over images: p ≥ {p:.2g} over {n} image{'s' if n != 1 else ''})")
    return (f" Against the strongest chance map on {what} ({_title(b['strongest'])}, {b['stated']}): "
            + "; ".join(parts) + "." if parts else "")


def _ranking(images: list[dict], model: str, scored: list[dict], column: metric_registry.Column) -> tuple[str, bool]:
    """The best method on `column` against the next one: the clause, and whether it is ahead beyond noise (a
    finding ranks the methods only then)."""
    ordered = sorted(scored, key=lambda r: r[column.name], reverse=column.direction == "higher")
    if len(ordered) < 2:
        return "", True
    c = _paired(images, model, ordered[0]["method"], ordered[1]["method"], column.name)
    if c is None:
        return "", False
    return f"; against {_title(ordered[1]['method'])}, the next, it is {compare_words(c, column.digits)}", c.significant


def _faithfulness_finding(model: str, name: str, rows: list[dict], images: list[dict]) -> dict | None:
    methods, _ = _split(rows)
    metric = metric_registry.BY_NAME["deletion"]
    deletion, insertion = metric_registry.summary_columns(metric)  # the normalised areas (registry: summary)
    scored = [r for r in methods if r[deletion.name] is not None]
    if not scored:
        return None
    d, i = _best(scored, deletion.name, deletion.name), _best(scored, insertion.name, insertion.name)
    d_next, d_ahead = _ranking(images, model, scored, deletion)
    i_next, i_ahead = _ranking(images, model, scored, insertion)
    d_claim = (f"removing the pixels {_title(d['method'])} ranks first lowers the top-1 probability fastest" if d_ahead
               else f"no method lowers the top-1 probability beyond noise faster than the others: the lowest mean is "
                    f"{_title(d['method'])}'s")
    i_claim = (f"Revealing {_title(i['method'])}'s first raises it fastest" if i_ahead
               else f"Revealing the pixels, no method raises it beyond noise faster: the highest mean is "
                    f"{_title(i['method'])}'s")
    text = (f"On {name}, by the areas divided by the intact image's probability (mean over images), {d_claim} "
            f"({deletion.title} {_stated(d, deletion)} {_over(images, model, d, deletion)}, {deletion.better})"
            f"{d_next}. {i_claim} ({insertion.title} {_stated(i, insertion)} {_over(images, model, i, insertion)}, "
            f"{insertion.better}){i_next}.")
    bars = chance_bars(metric, model, rows, images)
    text += _chance_clause(bars, deletion, "deletion") + _chance_clause(bars, insertion, "insertion")
    return {"id": f"faithfulness-{model}", "section": "trust", "question": "q5", "text": text,
            "numbers": {r["method"]: {k: r[k] for c in metric.columns for k in (c.name, c.low_key, c.high_key)}
                        for r in rows},
            "chance": bars}


def _road_finding(model: str, name: str, rows: list[dict], images: list[dict]) -> dict | None:
    methods, _ = _split(rows)
    metric = metric_registry.BY_NAME["road"]
    column = metric_registry.column("road")
    road = [r for r in methods if r[column.name] is not None]
    if not road:
        return None
    best = _best(road, column.name, column.name)
    others = ", ".join(f"{_title(r['method'])} {_stated(r, column)}" for r in road if r is not best)
    following, ahead = _ranking(images, model, road, column)
    claim = (f"{_title(best['method'])} ranks pixels best" if ahead
             else f"no method ranks pixels better than the others beyond noise; the highest is {_title(best['method'])}")
    text = (f"By ROAD on {name}, {claim} ({_stated(best, column)} "
            f"{_over(images, model, best, column)}{'; ' + others if others else ''}){following}.")
    bars = chance_bars(metric, model, rows, images)
    text += _chance_clause(bars, column, "ROAD")
    return {"id": f"road-{model}", "section": "trust", "question": "q5", "text": text,
            "numbers": {r["method"]: r[column.name] for r in rows}, "chance": bars}


def _plural(n: int, noun: str) -> str:
    """'1 image', '4 images'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _sanity_finding(model: str, name: str, rows: list[dict], images: list[dict]) -> dict | None:
    methods, _ = _split(rows)
    rule = metric_registry.BY_NAME["sanity"].rule
    digits = metric_registry.column(rule.column).digits
    sane = [r for r in methods if r.get("sanity_runs")]
    if not sane:
        return None
    parts = []
    for r in sane:
        share = r["sanity_fail_share"]
        flat = f", {r['sanity_flat']} flat" if r["sanity_flat"] else ""
        parts.append(f"{_title(r['method'])} fails on {r['sanity_fails']} of {r['sanity_runs']} runs "
                     f"({100 * share['value']:.0f} % [{100 * share['low']:.0f}, {100 * share['high']:.0f}]{flat}; "
                     f"mean ρ {_f(r['spearman_runs'], digits)}, |ρ| {_f(r['abs_spearman_runs'], digits)})")
    first = sane[0]
    runs = first["sanity_runs"]
    walked = first.get("sanity_walked", first["sanity_images"])  # older run directories: every image walked
    steps = first.get("sanity_steps", len(first.get("sanity_layers") or [None]))
    walk = (f"; the cascade from the output block walks {_plural(steps, 'step')} on {_plural(walked, 'image')}"
            f"{'' if walked == first['sanity_images'] else ', the others are re-initialised at once'}")
    text = (f"With every block of {name} re-initialised ({_plural(first['sanity_images'], 'image')} × "
            f"{_plural(first['sanity_seeds'], 'seed')}{walk}), a run fails when its map still resembles the original "
            f"({rule.stated}): " + "; ".join(parts) + ". ")
    verdicts = {v: [r for r in sane if r["sanity_verdict"] == v] for v in ("fails", "passes", "inconclusive")}
    said = []
    if verdicts["passes"]:
        said.append(f"{', '.join(_title(r['method']) for r in verdicts['passes'])} "
                    f"{'passes' if len(verdicts['passes']) == 1 else 'pass'} the sanity check")
    if verdicts["fails"]:
        said.append(f"{', '.join(_title(r['method']) for r in verdicts['fails'])} "
                    f"{'fails' if len(verdicts['fails']) == 1 else 'fail'} the sanity check")
    if verdicts["inconclusive"]:
        said.append(f"{', '.join(_title(r['method']) for r in verdicts['inconclusive'])}: inconclusive on {runs} runs")
    text += (f"A verdict is written only when the 95 % Wilson interval of the share failing lies wholly above or "
             f"below {rule.verdict_share:g}: " + "; ".join(said) + ".")
    return {"id": f"sanity-{model}", "section": "trust", "question": "q5", "text": text,
            "numbers": {r["method"]: {"fails": r["sanity_fails"], "runs": r["sanity_runs"],
                                      "share": r["sanity_fail_share"], "verdict": r["sanity_verdict"],
                                      "spearman": r["spearman_runs"], "abs_spearman": r["abs_spearman_runs"]}
                        for r in sane}}


def _pointing_finding(model: str, name: str, rows: list[dict], images: list[dict]) -> dict | None:
    methods, _ = _split(rows)
    metric = metric_registry.BY_NAME["localisation"]
    hit, near, energy = metric.columns
    pointed = [r for r in methods if r[hit.images_key]]
    if not pointed:
        return None
    n = pointed[0][hit.images_key]
    fallback = pointed[0]["object_fallback"]
    text = (f"On the {n} image(s) of {name} with object labels, the maps' maximum falls on the object or near it: "
            + ", ".join(f"{_title(r['method'])} {_stated(r, hit)} ({r[near.hits_key]} of them off the "
                        f"object; energy {_stated(r, energy)})" for r in pointed) + "."
            + (f" On {fallback} of them no mask label names the predicted class, so every labelled object counts."
               if fallback else ""))
    bars = chance_bars(metric, model, rows, images)
    text += _chance_clause(bars, hit, "the pointing game") + _chance_clause(bars, energy, "energy")
    return {"id": f"pointing-{model}", "section": "trust", "text": text,
            "numbers": {r["method"]: [r[hit.hits_key], r[energy.name]] for r in pointed}, "chance": bars}


# Each metric's sentence, by the metric's name in the registry (tests/test_registries.py checks they agree).
SENTENCES = {"deletion": _faithfulness_finding, "road": _road_finding, "sanity": _sanity_finding,
             "localisation": _pointing_finding}


def evaluation_findings(results: dict) -> list[dict]:
    """Per model, each metric's sentence, in the registry's order."""
    if "evaluation" not in results:
        return []
    names = _display(results)
    images = results["evaluation"].get("rows", [])
    by_model: dict[str, list[dict]] = defaultdict(list)
    for e in results["evaluation"]["summary"]:
        by_model[e["model"]].append(e)
    out = []
    for model, rows in by_model.items():
        for metric in metric_registry.METRICS:
            finding = SENTENCES[metric.name](model, names[model], rows, images)
            if finding is not None:
                out.append(finding)
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: higher IoU (first) at no more time (second), or less time at
    no lower IoU. Sorted by time."""
    front = []
    for i, (iou_i, t_i) in enumerate(points):
        dominated = any((iou_j >= iou_i and t_j <= t_i) and (iou_j > iou_i or t_j < t_i)
                        for j, (iou_j, t_j) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][1], -points[i][0]))


def sweep_summary(results: dict) -> dict:
    """Per model and LIME setting: mean IoU with Grad-CAM and mean seconds; the Pareto front of (IoU, time); the best
    setting (the highest mean IoU, the faster on a tie) with its leaderboard line."""
    sw = results["lime_sweep"]
    summary, fronts, best = [], {}, {}
    for m in results["models"]:
        points = []
        for setting in sw["settings"]:
            rows = [r for r in sw["rows"] if r["model"] == m["id"] and r["setting"] == setting["index"]]
            entry = {"model": m["id"], "setting": setting["index"], "label": setting["label"],
                     "mean_iou": _mean([r["iou"] for r in rows]), "mean_seconds": _mean([r["seconds"] for r in rows]),
                     "images": len(rows)}
            summary.append(entry)
            points.append((entry["mean_iou"] if entry["mean_iou"] is not None else -1.0, entry["mean_seconds"]))
        fronts[m["id"]] = pareto_front(points)
        top = max(range(len(points)), key=lambda k: (points[k][0], -points[k][1]))
        best[m["id"]] = top
    return {"summary": summary, "pareto": fronts, "best": best}


def sweep_findings(results: dict) -> list[dict]:
    if "lime_sweep" not in results:
        return []
    names = _display(results)
    sw = results["lime_sweep"]
    out = []
    for model, k in sw["best"].items():
        entry = next(e for e in sw["summary"] if e["model"] == model and e["setting"] == k)
        front = [next(e for e in sw["summary"] if e["model"] == model and e["setting"] == j) for j in sw["pareto"][model]]
        text = (f"Of the {len(sw['settings'])} LIME settings tried on {names[model]}, {entry['label']} agrees best with "
                f"Grad-CAM: leaderboard line mean IoU {_f(entry['mean_iou'], 3)}, {_f(entry['mean_seconds'], 2)} s per "
                f"image over {entry['images']} images. The Pareto front of IoU against time holds "
                + "; ".join(f"{e['label']} ({_f(e['mean_iou'], 3)}, {_f(e['mean_seconds'], 2)} s)" for e in front)
                + ". Times vary between runs and machines.")
        out.append({"id": f"sweep-{model}", "section": "agreement", "question": "q6", "timing": True, "text": text,
                    "numbers": {"best": k, "mean_iou": entry["mean_iou"], "mean_seconds": entry["mean_seconds"],
                                "pareto": sw["pareto"][model]}})
    return out


# ---------------------------------------------------------------- how sure the labels are (dissection.quality)


def _quartiles(values: list[float | None]) -> dict | None:
    x = [v for v in values if v is not None and v == v]
    if not x:
        return None
    q1, median, q3 = np.quantile(x, [0.25, 0.5, 0.75])
    return {"q1": float(q1), "median": float(median), "q3": float(q3), "n": len(x)}


def _unique_draws(layers: list[dict]) -> list[int]:
    """The unique labels of these layers together on each bootstrap resample of the probe images (every layer saw
    the same resamples)."""
    counts = []
    for b in range(min(x["quality"]["resamples"] for x in layers)):
        counts.append(len({c for x in layers for c in x["quality"]["resample_labels"][b]}))
    return counts


def quality_summary(d: dict) -> dict | None:
    """Per model and layer: the held-out scores' quartiles for the labels, a random label and the combinations, the
    paired differences over units, the share of stable labels, unique-concept counts with their bootstrap interval;
    per pair of models the paired difference of their unique counts and shares."""
    q = d.get("quality")
    if not q:
        return None
    metrics, stable_at, images = q["metrics"], q["stable"], d["probe"]["images"]
    models = []
    for entry in d["models"]:
        layers = []
        for x in entry["layers"]:
            labels = x["labels"]
            values = {m: [u.get(m) for u in labels] for m in metrics}
            chance = {m: [u.get(f"random_{m}") for u in labels] for m in metrics}
            combined = [u.get("combination_pearson") for u in labels]
            stable = sum(1 for u in labels if u.get("stability") is not None and u["stability"] >= stable_at)
            unique = len({u["label"] for u in labels})
            draws = _unique_draws([x])
            nan = lambda v: float("nan") if v is None else v  # noqa: E731 - paired drops NaN pairs
            layers.append({
                "layer": x["layer"], "units": x["units"], **{k: x["quality"][k] for k in
                                                             ("first_images", "heldout_images", "positives")},
                "scores": {m: _quartiles(values[m]) for m in metrics},
                "random": {m: _quartiles(chance[m]) for m in metrics},
                "combination": _quartiles(combined),
                "label_vs_random": paired([nan(v) for v in values["pearson"]],
                                                [nan(v) for v in chance["pearson"]]).as_dict(),
                "combination_vs_label": paired([nan(v) for v in combined],
                                                     [nan(v) for v in values["pearson"]]).as_dict(),
                "stable": stable, "stable_share": share(stable, len(labels)).as_dict(),
                "unique": from_draws(unique, draws, images).as_dict(),
                "unique_share": from_draws(unique / x["units"], [c / x["units"] for c in draws],
                                                 images).as_dict(),
            })
        all_labels = [u for x in entry["layers"] for u in x["labels"]]
        units = len(all_labels)
        unique = len({u["label"] for u in all_labels})
        draws = _unique_draws(entry["layers"])
        stable = sum(x["stable"] for x in layers)
        models.append({"model": entry["model"], "units": units, "stable": stable,
                       "stable_share": share(stable, units).as_dict(),
                       "unique": from_draws(unique, draws, images).as_dict(),
                       "unique_share": from_draws(unique / units, [c / units for c in draws], images).as_dict(),
                       "unique_draws": draws, "layers": layers})
    pairs = []
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            a, b = models[i], models[j]
            if len(a["unique_draws"]) != len(b["unique_draws"]):
                continue
            pairs.append({"a": a["model"], "b": b["model"], "unique": paired_draws(
                a["unique"]["value"], b["unique"]["value"], a["unique_draws"], b["unique_draws"], images).as_dict(),
                "unique_share": paired_draws(
                    a["unique_share"]["value"], b["unique_share"]["value"],
                    [c / a["units"] for c in a["unique_draws"]], [c / b["units"] for c in b["unique_draws"]],
                    images).as_dict()})
    return {"resamples": q["resamples"], "stable_at": stable_at, "images": images, "models": models,
            "comparisons": pairs, "sanity": q["sanity"], "sanity_passes": sanity_passes(q["sanity"])}


def label_fit(d: dict) -> dict:
    """How the labels relate to the combinations beside them: the run's similarity; the combinations' terms
    (dissect.quality.terms, None without it); `label_terms`, when the similarity is Linear Explanations' own labeller,
    the terms of the fit whose heaviest concept each label is (None for any other similarity); and `same`, whether
    that fit is the combination itself (the same greedy fit on the same images: the terms agree)."""
    similarity = d["similarity"]
    label_terms = (int(d["similarity_params"].get("terms", COMBINATION_TERMS))
                   if similarity == COMBINATION_LABELLER else None)
    terms = (d.get("quality") or {}).get("terms")
    return {"similarity": similarity, "terms": terms, "label_terms": label_terms,
            "same": label_terms is not None and label_terms == terms}


def _labeller(fit: dict) -> str:
    """'soft_wpmi', or for Linear Explanations' own labeller what its label is."""
    if fit["label_terms"] is None:
        return fit["similarity"]
    of = "its unit's combination" if fit["same"] else f"a fit of at most {_plural(fit['label_terms'], 'concept')}"
    return f"{fit['similarity']} (each the heaviest concept of {of})"


def _combination_text(fit: dict, name: str, first_images: int, versus: str) -> str:
    """The finding on the combinations: against labels of another method, or, when the labeller is Linear
    Explanations' own, against that same fit's heaviest concept (one method, not two)."""
    if fit["label_terms"] is None:
        return (f"Linear Explanations' combinations of at most {_plural(fit['terms'], 'concept')}, fitted on the same "
                f"{first_images} images, simulate the units of {name} on the same held-out images with a median "
                f"Pearson of {versus} (combination against single label).")
    if fit["same"]:
        whose = (f"each label is the heaviest concept of the unit's combination of at most {_plural(fit['terms'], 'concept')}, "
                 "so label and combination are one fit")
        against = "the whole combination against its heaviest concept alone"
    else:  # the greedy fit adds a concept per step: the label's fit is the combination's, stopped at another length
        whose = (f"each label is the heaviest concept of the same greedy fit as the combination, run to at most "
                 f"{_plural(fit['label_terms'], 'concept')} instead of {fit['terms']}")
        against = "combination against label"
    return (f"The labels of {name} are Linear Explanations' own ({fit['similarity']}): {whose}. Fitted on the same "
            f"{first_images} images, the combination simulates the units on the same held-out images with a median "
            f"Pearson of {versus} ({against}).")


def _interval(x: dict, digits: int = 2, pct: bool = False) -> str:
    """'0.35 [0.21, 0.48]' (or '35% [21%, 48%]') from an Interval's dict."""
    if pct:
        return f"{100 * x['value']:.0f}% [{100 * x['low']:.0f}%, {100 * x['high']:.0f}%]"
    return f"{x['value']:.{digits}f} [{x['low']:.{digits}f}, {x['high']:.{digits}f}]"


def _difference(c: dict, digits: int, item: str, higher: str = "higher", lower: str = "lower",
                resamples: int | None = None) -> str:
    """The clause of a comparison's dict, as stats.compare_words says it; a bootstrap p of 0 is below the
    resolution of its `resamples`."""
    p = f"p < {1 / resamples:.2g}" if resamples and c["p_value"] == 0 else f"p = {c['p_value']:.2g}"
    over = f"{p} over {c['n']} {item}{'s' if c['n'] != 1 else ''}"
    d = f"{c['difference']:.{digits}f} [{c['low']:.{digits}f}, {c['high']:.{digits}f}]"
    if not c["significant"]:
        return f"within noise (difference {d}, {over})"
    return f"{higher if c['difference'] > 0 else lower} by {d}, {over}"


def quality_findings(results: dict) -> list[dict]:
    """The labels' held-out quality against a random label, the combinations against the single labels, the share
    of stable labels, per model; the models' unique-concept counts compared."""
    qs = results.get("dissection", {}).get("summary", {}).get("quality")
    if not qs:
        return []
    names = _display(results)
    fit = label_fit(results["dissection"])
    out = []
    for m in qs["models"]:
        name = names[m["model"]]
        layers = m["layers"]
        x0 = layers[0]
        per_layer = "; ".join(
            f"{x['layer']} {_f(x['scores']['pearson']['median'] if x['scores']['pearson'] else None)} against "
            f"{_f(x['random']['pearson']['median'] if x['random']['pearson'] else None)}" for x in layers)
        beats = "; ".join(f"{x['layer']} " + _difference(x["label_vs_random"], 2, "unit") for x in layers)
        text = (f"Chosen on {x0['first_images']} probe images by {_labeller(fit)} and scored on "
                f"{x0['heldout_images']} held-out ones, the labels of {name} predict their units with a median "
                f"Pearson correlation (the simulation score) of {per_layer} for a random concept of the same set. "
                f"Label against random, per unit: {beats}.")
        out.append({"id": f"labels-heldout-{m['model']}", "section": "dissection", "question": "labels", "text": text,
                    "numbers": {x["layer"]: {"pearson": x["scores"]["pearson"], "random": x["random"]["pearson"],
                                             "difference": x["label_vs_random"]} for x in layers}})
        versus = "; ".join(
            f"{x['layer']} {_f(x['combination']['median'] if x['combination'] else None)} against "
            f"{_f(x['scores']['pearson']['median'] if x['scores']['pearson'] else None)}, "
            + _difference(x["combination_vs_label"], 2, "unit") for x in layers)
        text = _combination_text(fit, name, x0["first_images"], versus)
        out.append({"id": f"labels-combination-{m['model']}", "section": "dissection", "question": "labels",
                    "text": text, "numbers": {x["layer"]: {"combination": x["combination"],
                                                           "difference": x["combination_vs_label"]} for x in layers}})
        per_layer = ", ".join(f"{x['layer']} {x['stable']} of {x['units']}" for x in layers)
        text = (f"{m['stable']} of {name}'s {m['units']} units ({_interval(m['stable_share'], pct=True)}) keep their "
                f"label in at least {100 * qs['stable_at']:.0f}% of {qs['resamples']} bootstrap resamples of the "
                f"{qs['images']} probe images ({per_layer}).")
        out.append({"id": f"labels-stable-{m['model']}", "section": "dissection", "question": "labels", "text": text,
                    "numbers": {"stable": m["stable"], "units": m["units"], "share": m["stable_share"]}})
    return out


def _count_stable(d: dict, models: list[dict]) -> None:
    """Beside every unit count of Q1-Q4's concept lists, how many of those units keep their label in at least
    `stable` of the resamples."""
    at = d["quality"]["stable"]

    def stable(labels: list[dict], concept: str) -> int:
        return sum(1 for u in labels if u["label"] == concept and (u.get("stability") or 0) >= at)

    for entry, m in zip(d["models"], models):
        everything = [u for x in entry["layers"] for u in x["labels"]]
        for t in m["top"]:
            t["stable"] = stable(everything, t["concept"])
        chosen = {(c["layer"], c["unit"]) for c in m["confident"]}
        confident = [u for x in entry["layers"] for u in x["labels"] if (x["layer"], u["unit"]) in chosen]
        for t in m["confident_concepts"]:
            t["stable"] = stable(confident, t["concept"])
        for x, ml in zip(entry["layers"], m["layers"]):
            for t in ml["top"] + ml["over3"]:
                t["stable"] = stable(x["labels"], t["concept"])


def _stable(t: dict) -> str:
    """'; 12 stable' after a unit count, when the run measured stability."""
    return f", {t['stable']} stable" if "stable" in t else ""


def _quality_models(results: dict) -> dict[str, dict]:
    qs = results.get("dissection", {}).get("summary", {}).get("quality") or {}
    return {m["model"]: m for m in qs.get("models", [])}


def _unique_compare(results: dict, a: dict, b: dict, names: dict) -> dict:
    """Q3's comparison of two models' vocabularies: ranked only when the paired bootstrap over probe images says the
    difference is not noise."""
    qs = results["dissection"]["summary"].get("quality") or {}
    pair = next((c for c in qs.get("comparisons", []) if {c["a"], c["b"]} == {a["model"], b["model"]}), None)
    na, nb = names[a["model"]], names[b["model"]]
    if pair is None:  # no resamples: the counts alone, unranked
        return {"id": "q3-compare", "section": "dissection", "question": "q3",
                "text": f"Overall, {na} has {a['unique']} unique concepts and {nb} {b['unique']}; without resamples of "
                        "the probe images (dissect.quality) the report does not say whether they differ.",
                "numbers": {a["model"]: a["unique"], b["model"]: b["unique"]}}
    c = pair["unique"] if pair["a"] == a["model"] else {**pair["unique"], "difference": -pair["unique"]["difference"],
                                                         "low": -pair["unique"]["high"], "high": -pair["unique"]["low"]}
    s = pair["unique_share"] if pair["a"] == a["model"] else {
        **pair["unique_share"], "difference": -pair["unique_share"]["difference"],
        "low": -pair["unique_share"]["high"], "high": -pair["unique_share"]["low"]}
    qa, qb = _quality_models(results)[a["model"]], _quality_models(results)[b["model"]]
    counts = (f"{_interval(qa['unique'], 0)} unique concepts for {na} against {_interval(qb['unique'], 0)} for {nb} "
              f"(95% intervals over {qs['resamples']} bootstrap resamples of the {qs['images']} probe images)")
    if c["significant"]:
        more = na if c["difference"] > 0 else nb
    B = qs["resamples"]
    if c["significant"]:
        more = na if c["difference"] > 0 else nb
        text = (f"Overall, {more} has the more varied vocabulary: {counts}; {na} against {nb}: "
                + _difference(c, 0, "probe image", "more", "fewer", B)
                + "; as a share of units, " + _difference(s, 3, "probe image", resamples=B) + ".")
    else:
        text = (f"Overall, the two vocabularies are within noise of each other: {counts}; {na} against {nb}: "
                + _difference(c, 0, "probe image", resamples=B) + "; as a share of units, "
                + _difference(s, 3, "probe image", resamples=B) + ".")
    return {"id": "q3-compare", "section": "dissection", "question": "q3", "text": text,
            "numbers": {a["model"]: a["unique"], b["model"]: b["unique"], "difference": c, "share_difference": s}}
