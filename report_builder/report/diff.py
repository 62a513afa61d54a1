"""Diff two run directories: what changed between two runs, e.g. two versions of a model.

Reads only the run directories (results.json, the .npz maps, nothing else): no model is loaded.
What cannot be compared (another probe set, concept set or scorer, images missing from one run)
is named in a notice, never silently compared.
"""
from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from report_builder.evaluation import registry as metric_registry
from report_builder.explanation.agreement import iou, top_n_mask
from report_builder.errors import UserError
from report_builder.files import atomic_dir, clean_nan, write_json
from report_builder.report.rundir import RunFormatError, inside, load_results
from report_builder.stats import compare_words, paired

SCHEMA_VERSION = 1
GRADCAM_TOP_FRACTION = 0.2
MAP_DEFINITION = (
    f"Grad-CAM maps of the two runs are compared by the IoU of their top {int(GRADCAM_TOP_FRACTION * 100)}% pixels "
    "(both masks cover the same area, so the IoU measures where the maps point). A map of another size is "
    "resized bilinearly to run A's size first."
)


def flatten(value, prefix: str = "") -> dict[str, object]:
    """{'models': [{'id': 'a'}]} -> {'models[0].id': 'a'}: key paths as the spec errors write them."""
    out: dict[str, object] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        if not value:
            out[prefix] = []
    else:
        out[prefix] = value
    return out


def _changes(a: dict, b: dict) -> list[dict]:
    fa, fb = flatten(a), flatten(b)
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _run_facts(path: Path, r: dict) -> dict:
    p = r["provenance"]
    stages = {k: v for k, v in _mapping(p.get("stage_seconds")).items() if isinstance(v, (int, float))}
    return {"path": str(path), "run_name": r.get("run_name"), "title": r.get("title"), "started": p.get("started"),
            "device": p.get("device"), "stage_seconds": stages, "weights": _weights(r),
            "images_sha256": p.get("images_sha256")}


def _weights(r: dict) -> dict[str, str]:
    return {k: v for k, v in _mapping(r["provenance"].get("weights_sha256")).items() if isinstance(v, str)}


def load_run(path: Path) -> dict:
    return load_results(path)


def _maps(run_dir: Path, record: dict, classes: int) -> dict[str, np.ndarray]:
    """The saved maps of one explanation, with the arrays diff reads checked: `probabilities` (indexed with the
    target class) one per class of the model, from 0 to 1; the Grad-CAM map a finite 2-D array."""
    path = inside(run_dir, record["maps"], f"maps of {record['model']} on {record['image']}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise RunFormatError(f"{path}: cannot read the saved maps ({type(exc).__name__}: {exc})") from None
    p = arrays.get("probabilities")
    if p is not None and not (p.shape == (classes,) and p.dtype.kind == "f" and np.isfinite(p).all()
                              and 0 <= p.min() and p.max() <= 1 + 1e-6):
        raise RunFormatError(f"{path}: probabilities: found {_describe(p)}, expected {classes} probabilities from 0 "
                             f"to 1, one per class of {record['model']}")
    g = arrays.get("gradcam")
    if g is not None and not (g.ndim == 2 and g.size and g.dtype.kind in "fiu" and np.isfinite(g).all()):
        raise RunFormatError(f"{path}: gradcam: found {_describe(g)}, expected a finite 2-D map")
    return arrays


def _describe(a: np.ndarray) -> str:
    what = f"an array of shape {a.shape} ({a.dtype})"
    if a.dtype.kind in "fc" and a.size and not np.isfinite(a).all():
        return what + " with NaN or infinite values"
    if a.dtype.kind in "fiu" and a.size:
        return what + f" from {a.min():.3g} to {a.max():.3g}"
    return what


def _resize(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if m.shape == shape:
        return m
    return np.asarray(Image.fromarray(m.astype(np.float32)).resize(shape[::-1], Image.BILINEAR))


def compare_predictions_and_maps(dir_a: Path, dir_b: Path, ra: dict, rb: dict, ma: str, mb: str,
                                 notices: list[str]) -> tuple[dict, dict]:
    ea = {e["image"]: e for e in ra["explanations"] if e["model"] == ma}
    eb = {e["image"]: e for e in rb["explanations"] if e["model"] == mb}
    shared = [i for i in ea if i in eb]
    for side, only in (("A", sorted(set(ea) - set(eb))), ("B", sorted(set(eb) - set(ea)))):
        if only:
            notices.append(f"{ma if side == 'A' else mb}: images only in run {side}, not compared: {', '.join(only)}")
    imgs_a = {im["id"]: im["sha256"] for im in ra["images"]}
    imgs_b = {im["id"]: im["sha256"] for im in rb["images"]}
    differ = [i for i in shared if imgs_a.get(i) != imgs_b.get(i)]
    if differ:
        notices.append(f"images with the same id but other pixels in the two runs, not compared: {', '.join(differ)}")
        shared = [i for i in shared if i not in differ]
    classes_a = next(m["num_classes"] for m in ra["models"] if m["id"] == ma)
    classes_b = next(m["num_classes"] for m in rb["models"] if m["id"] == mb)
    rows, map_rows = [], []
    for image in shared:
        a, b = ea[image], eb[image]
        za, zb = _maps(dir_a, a, classes_a), _maps(dir_b, b, classes_b)
        cls = a["target_class"]
        pa = float(za["probabilities"][cls]) if "probabilities" in za else a["predictions"][0]["probability"]
        pb = float(zb["probabilities"][cls]) if "probabilities" in zb and len(zb["probabilities"]) > cls else None
        rows.append({"image": image, "a_top1": a["target_name"], "b_top1": b["target_name"],
                     "changed": a["target_class"] != b["target_class"] or a["target_name"] != b["target_name"],
                     "a_probability": a["predictions"][0]["probability"], "b_probability": b["predictions"][0]["probability"],
                     "a_class_probability_in_b": pb, "delta": None if pb is None else pb - pa})
        row = {"image": image, "gradcam_iou": None, "lime_gradcam_a": None, "lime_gradcam_b": None}
        if "gradcam" in za and "gradcam" in zb:
            ga = za["gradcam"]
            gb = _resize(zb["gradcam"], ga.shape)
            n = int(round(GRADCAM_TOP_FRACTION * ga.size))
            row["gradcam_iou"] = iou(top_n_mask(ga, n), top_n_mask(gb, n))
        for side, r, model in (("a", ra, ma), ("b", rb, mb)):
            for x in r["agreement"]["rows"]:
                if x["model"] == model and x["image"] == image and x["method_b"] == "gradcam":
                    row[f"lime_gradcam_{side}"] = x["iou"]
        if row["lime_gradcam_a"] is not None and row["lime_gradcam_b"] is not None:
            row["lime_gradcam_delta"] = row["lime_gradcam_b"] - row["lime_gradcam_a"]
        map_rows.append(row)
    defined = [r["gradcam_iou"] for r in map_rows if r["gradcam_iou"] is not None and r["gradcam_iou"] == r["gradcam_iou"]]
    predictions = {"images": len(rows), "top1_changed": sum(r["changed"] for r in rows), "rows": rows}
    maps = {"rows": map_rows, "mean_gradcam_iou": sum(defined) / len(defined) if defined else None}
    return predictions, maps


def dissection_comparable(ra: dict, rb: dict) -> list[str]:
    """Why two runs' dissections cannot be compared unit by unit (empty: they can)."""
    da, db = ra.get("dissection"), rb.get("dissection")
    if da is None or db is None:
        return ["a run has no dissection"] if (da or db) else []
    reasons = []
    if da["probe"]["sha256"] != db["probe"]["sha256"]:
        reasons.append(f"another probe set (A: {da['probe']['description']}; B: {db['probe']['description']})")
    if da["scorers"] != db["scorers"]:
        reasons.append("other concept scorers or concept sets")
    if da["concepts"] != db["concepts"]:
        reasons.append(f"another number of concepts (A: {da['concepts']}, B: {db['concepts']})")
    for key in ("similarity", "similarity_params", "pooling"):
        if da[key] != db[key]:
            reasons.append(f"another {key.replace('_', ' ')} (A: {da[key]}, B: {db[key]})")
    return reasons


def compare_dissection(ra: dict, rb: dict, ma: str, mb: str, notices: list[str]) -> dict | None:
    da, db = ra.get("dissection"), rb.get("dissection")
    if not da or not db:
        return None
    la = next((m for m in da["models"] if m["model"] == ma), None)
    lb = next((m for m in db["models"] if m["model"] == mb), None)
    if la is None or lb is None:
        return None
    reasons = dissection_comparable(ra, rb)
    if reasons:
        notices.append(f"dissection of {ma} not compared: {'; '.join(reasons)}")
        return {"compared": False, "reasons": reasons, "layers": []}
    layers_b = {x["layer"]: x for x in lb["layers"]}
    out = []
    for xa in la["layers"]:
        xb = layers_b.get(xa["layer"])
        if xb is None:
            notices.append(f"{ma}: layer {xa['layer']} is only dissected in run A")
            continue
        if xa["units"] != xb["units"]:
            notices.append(f"{ma}: layer {xa['layer']} has {xa['units']} units in A and {xb['units']} in B; not compared")
            continue
        labels_a = [u["label"] for u in xa["labels"]]
        labels_b = [u["label"] for u in xb["labels"]]
        changed = [{"unit": k, "a": a, "b": b} for k, (a, b) in enumerate(zip(labels_a, labels_b)) if a != b]
        ca, cb = Counter(labels_a), Counter(labels_b)
        rank_a = {c: i + 1 for i, (c, _) in enumerate(ca.most_common())}
        rank_b = {c: i + 1 for i, (c, _) in enumerate(cb.most_common())}
        top = [c for c, _ in ca.most_common(10)] + [c for c, _ in cb.most_common(10) if rank_a.get(c, 99) > 10]
        out.append({
            "layer": xa["layer"], "units": xa["units"], "changed": len(changed),
            "share": len(changed) / xa["units"], "changed_units": changed,
            "unique_a": len(ca), "unique_b": len(cb), "unique_delta": len(cb) - len(ca),
            "concept_jaccard": len(set(ca) & set(cb)) / len(set(ca) | set(cb)) if ca or cb else None,
            "gained": sorted(set(cb) - set(ca), key=lambda c: (-cb[c], c)),
            "lost": sorted(set(ca) - set(cb), key=lambda c: (-ca[c], c)),
            "top10": [{"concept": c, "rank_a": rank_a.get(c), "rank_b": rank_b.get(c), "units_a": ca.get(c, 0),
                       "units_b": cb.get(c, 0)} for c in top],
        })
    for name in layers_b:
        if name not in {x["layer"] for x in la["layers"]}:
            notices.append(f"{mb}: layer {name} is only dissected in run B")
    return {"compared": True, "reasons": [], "layers": out}


def shared_images(ra: dict, rb: dict) -> list[str]:
    """The images of both runs with the same pixels (the same id and SHA-256), in run A's order."""
    b = {im["id"]: im["sha256"] for im in rb["images"]}
    return [im["id"] for im in ra["images"] if b.get(im["id"]) == im["sha256"]]


def _verdict(rule: metric_registry.Rule, value) -> str | None:
    return None if value is None else "fails" if rule.fails(value) else "passes"


def compare_evaluation(ra: dict, rb: dict, ma: str, mb: str, notices: list[str]) -> dict | None:
    """Per method in both runs and per per-map column of the metrics registry: the mean over the shared images in
    A and in B, B − A with its paired bootstrap interval and Wilcoxon p, and which run is better by the column's
    direction (or 'within noise'); and each rule's verdict (the sanity check's) in A and in B."""
    ea, eb = ra.get("evaluation"), rb.get("evaluation")
    if not ea and not eb:
        return None
    if not ea or not eb:
        notices.append(f"evaluation of {ma} not compared: only run {'A' if ea else 'B'} evaluates its explanations")
        return {"compared": False, "reasons": ["only one run evaluates its explanations"], "rows": [], "verdicts": []}
    keys = sorted(k for k in set(ea["settings"]) | set(eb["settings"])
                  if k != "batch_size" and ea["settings"].get(k) != eb["settings"].get(k))  # a batch changes no number
    if keys:
        reason = f"other evaluate settings ({', '.join(f'evaluate.{k}' for k in keys)})"
        notices.append(f"evaluation of {ma} not compared: {reason}")
        return {"compared": False, "reasons": [reason], "rows": [], "verdicts": []}
    images = shared_images(ra, rb)
    methods = [m for m in ea["methods"] if m in eb["methods"]]
    rows = []
    for method in methods:
        va = {r["image"]: r for r in ea["rows"] if r["model"] == ma and r["method"] == method}
        vb = {r["image"]: r for r in eb["rows"] if r["model"] == mb and r["method"] == method}
        for _, column in metric_registry.per_map():
            both = [i for i in images if i in va and i in vb and va[i].get(column.name) is not None
                    and vb[i].get(column.name) is not None]
            if not both:
                continue
            a = [float(va[i][column.name]) for i in both]
            b = [float(vb[i][column.name]) for i in both]
            cmp = paired(b, a)  # B − A
            delta = cmp.difference.value
            better = "within noise" if not cmp.significant else \
                ("B" if (delta > 0) == (column.direction == "higher") else "A")
            rows.append({"method": method, "column": column.name, "title": column.title,
                         "direction": column.direction, "a": sum(a) / len(a), "b": sum(b) / len(b), "delta": delta,
                         "low": cmp.difference.low, "high": cmp.difference.high, "p_value": cmp.p_value,
                         "images": cmp.n, "better": better, "digits": column.digits})
    verdicts = []
    sa = {(e["model"], e["method"]): e for e in ea.get("summary", [])}
    sb = {(e["model"], e["method"]): e for e in eb.get("summary", [])}
    for metric in metric_registry.METRICS:
        if not metric.rule:
            continue
        column = metric_registry.column(metric.rule.column)
        key = metric.final_key(column) if metric.per_step else column.name
        for method in methods:
            a, b = sa.get((ma, method), {}).get(key), sb.get((mb, method), {}).get(key)
            if a is None and b is None:
                continue
            va, vb = _verdict(metric.rule, a), _verdict(metric.rule, b)
            verdicts.append({"metric": metric.name, "title": metric.title, "method": method, "column": column.name,
                             "a": a, "b": b, "verdict_a": va, "verdict_b": vb, "changed": va != vb,
                             "rule": f"{column.name} {metric.rule.fails_if} {metric.rule.shown} fails"})
    return {"compared": True, "reasons": [], "rows": rows, "verdicts": verdicts}


def compare_netdissect(ra: dict, rb: dict, ma: str, mb: str, notices: list[str]) -> dict | None:
    """Per layer dissected in both runs: Network Dissection's detectors and unique detector concepts, in all and per
    label category, in A and in B. Not compared when the pixel-labelled probe or the settings differ."""
    na, nb = ra.get("netdissect"), rb.get("netdissect")
    if not na or not nb:
        return None
    la = next((m for m in na["models"] if m["model"] == ma), None)
    lb = next((m for m in nb["models"] if m["model"] == mb), None)
    if la is None or lb is None:
        return None
    reasons = []
    if na["probe"]["sha256"] != nb["probe"]["sha256"]:
        reasons.append(f"another pixel-labelled probe (A: {na['probe']['description']}; B: "
                       f"{nb['probe']['description']})")
    for key in ("quantile", "threshold", "iou_threshold", "label_size", "colors"):
        if na["settings"].get(key) != nb["settings"].get(key):
            reasons.append(f"another netdissect.{key} (A: {na['settings'].get(key)}, B: {nb['settings'].get(key)})")
    if reasons:
        notices.append(f"Network Dissection of {ma} not compared: {'; '.join(reasons)}")
        return {"compared": False, "reasons": reasons, "layers": []}
    layers_b = {x["layer"]: x for x in lb["layers"]}
    out = []
    for xa in la["layers"]:
        xb = layers_b.get(xa["layer"])
        if xb is None:
            notices.append(f"{ma}: layer {xa['layer']} has Network Dissection only in run A")
            continue
        categories = [c for c in xa["per_category"] if c in xb["per_category"]]
        out.append({"layer": xa["layer"], "units_a": xa["units"], "units_b": xb["units"],
                    "detectors_a": xa["detectors"], "detectors_b": xb["detectors"],
                    "detectors_delta": xb["detectors"] - xa["detectors"],
                    "unique_a": xa["unique"], "unique_b": xb["unique"], "unique_delta": xb["unique"] - xa["unique"],
                    "categories": [{"category": c, "detectors_a": xa["per_category"][c],
                                    "detectors_b": xb["per_category"][c],
                                    "unique_a": xa["unique_per_category"][c], "unique_b": xb["unique_per_category"][c]}
                                   for c in categories]})
    return {"compared": True, "reasons": [], "layers": out}


def compare_sweep(ra: dict, rb: dict, ma: str, mb: str, notices: list[str]) -> dict | None:
    """The LIME sweep's best setting (the highest mean IoU with Grad-CAM) in A and in B, and each setting's mean IoU.
    Not compared when the runs tried other settings."""
    sa, sb = ra.get("lime_sweep"), rb.get("lime_sweep")
    if not sa or not sb or ma not in sa.get("best", {}) or mb not in sb.get("best", {}):
        return None
    labels_a = [s["label"] for s in sa["settings"]]
    labels_b = [s["label"] for s in sb["settings"]]
    if labels_a != labels_b:
        reason = "the two runs' LIME sweeps try other settings"
        notices.append(f"LIME sweep of {ma} not compared: {reason}")
        return {"compared": False, "reasons": [reason]}
    mean_a = {e["setting"]: e["mean_iou"] for e in sa["summary"] if e["model"] == ma}
    mean_b = {e["setting"]: e["mean_iou"] for e in sb["summary"] if e["model"] == mb}
    best_a, best_b = sa["best"][ma], sb["best"][mb]
    return {"compared": True, "reasons": [], "best_a": labels_a[best_a], "best_b": labels_b[best_b],
            "best_iou_a": mean_a.get(best_a), "best_iou_b": mean_b.get(best_b), "changed": best_a != best_b,
            "settings": [{"label": label, "iou_a": mean_a.get(k), "iou_b": mean_b.get(k)}
                         for k, label in enumerate(labels_a)]}


def compare_concepts(ra: dict, rb: dict, ma: str, mb: str, notices: list[str]) -> dict | None:
    """Concept attribution in A and in B: per layer and predicted class, the concepts of its profile that B gained
    or lost among the top ones, and per layer and k the ablation test's drop and verdict. Not compared when the runs
    rank units another way or take their labels from another dissection (the concepts would not mean the same)."""
    ca, cb = ra.get("concepts"), rb.get("concepts")
    if not ca or not cb or not any(r["model"] == ma for r in ca["records"]) \
            or not any(r["model"] == mb for r in cb["records"]):
        return None
    reasons = [f"the runs rank units by {ca['attribution']} and {cb['attribution']}"] \
        if ca["attribution"] != cb["attribution"] else []
    if ca["label_source"] != cb["label_source"]:
        reasons.append(f"the labels come from {ca['label_source']} in A and {cb['label_source']} in B")
    if reasons:
        notices.append(f"concept attribution of {ma} not compared: {'; '.join(reasons)}")
        return {"compared": False, "reasons": reasons}
    pa = {(p["layer"], p["class_name"]): p for p in ca["profiles"] if p["model"] == ma}
    pb = {(p["layer"], p["class_name"]): p for p in cb["profiles"] if p["model"] == mb}
    classes = []
    for key in [k for k in pa if k in pb]:
        a, b = {c["label"]: c["share"] for c in pa[key]["concepts"]}, {c["label"]: c["share"] for c in pb[key]["concepts"]}
        classes.append({"layer": key[0], "class_name": key[1], "images_a": pa[key]["images"],
                        "images_b": pb[key]["images"], "concepts_a": pa[key]["concepts"],
                        "concepts_b": pb[key]["concepts"], "gained": [c for c in b if c not in a],
                        "lost": [c for c in a if c not in b]})
    xa = {(r["layer"], r["k"]): r for r in ca["ablation"] if r["model"] == ma}
    xb = {(r["layer"], r["k"]): r for r in cb["ablation"] if r["model"] == mb}
    ablation = [{"layer": k[0], "k": k[1], "top_a": xa[k]["top"], "top_b": xb[k]["top"], "verdict_a": xa[k]["verdict"],
                 "verdict_b": xb[k]["verdict"], "changed": xa[k]["verdict"] != xb[k]["verdict"]}
                for k in xa if k in xb]
    return {"compared": True, "reasons": [], "classes": classes, "ablation": ablation,
            "only_a": sorted({k[1] for k in pa} - {k[1] for k in pb}),
            "only_b": sorted({k[1] for k in pb} - {k[1] for k in pa})}


def compare_pair(dir_a: Path, dir_b: Path, ra: dict, rb: dict, a: str, b: str, notices: list[str]) -> dict:
    """Everything diff compares for one model of run A against one of run B."""
    models_a = {m["id"]: m for m in ra["models"]}
    models_b = {m["id"]: m for m in rb["models"]}
    wa, wb = _weights(ra), _weights(rb)
    predictions, maps = compare_predictions_and_maps(dir_a, dir_b, ra, rb, a, b, notices)
    return {
        "a": a, "b": b, "display_a": models_a[a]["display"], "display_b": models_b[b]["display"],
        "weights_changed": wa.get(a) != wb.get(b), "weights_a": wa.get(a), "weights_b": wb.get(b),
        "predictions": predictions, "maps": maps,
        "dissection": compare_dissection(ra, rb, a, b, notices),
        "evaluation": compare_evaluation(ra, rb, a, b, notices),
        "netdissect": compare_netdissect(ra, rb, a, b, notices),
        "lime_sweep": compare_sweep(ra, rb, a, b, notices),
        "concepts": compare_concepts(ra, rb, a, b, notices),
    }


def version_pairs(run_dir: Path, results: dict) -> list[dict]:
    """In one run, each version of a model (models[i].versions) against the one before, compared as diff compares
    two runs; each pair carries the entry's id as its `group`."""
    out = []
    for g in results.get("versions", []):
        for a, b in zip(g["models"], g["models"][1:]):
            out.append({**compare_pair(Path(run_dir), Path(run_dir), results, results, a, b, []), "group": g["group"]})
    return out


def diff_runs(dir_a: Path, dir_b: Path, pairs: list[tuple[str, str]] | None = None) -> dict:
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    ra, rb = load_run(dir_a), load_run(dir_b)
    try:
        return _diff(dir_a, dir_b, ra, rb, pairs)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        raise RunFormatError(f"{dir_a} or {dir_b}: results.json does not have the layout this report_builder writes "
                             f"({type(exc).__name__}: {str(exc)[:200]}); re-run the specs") from None


def _diff(dir_a: Path, dir_b: Path, ra: dict, rb: dict, pairs: list[tuple[str, str]] | None) -> dict:
    ids_a = [m["id"] for m in ra["models"]]
    ids_b = [m["id"] for m in rb["models"]]
    if pairs:
        for a, b in pairs:
            if a not in ids_a:
                raise UserError(f"--pair {a}={b}: run A has no model {a!r} (it has {', '.join(ids_a)})")
            if b not in ids_b:
                raise UserError(f"--pair {a}={b}: run B has no model {b!r} (it has {', '.join(ids_b)})")
    else:
        pairs = [(m, m) for m in ids_a if m in ids_b]
    notices: list[str] = []
    if not pairs:
        notices.append(f"no model is in both runs (A: {', '.join(ids_a)}; B: {', '.join(ids_b)}); "
                       "name pairs with --pair A_ID=B_ID")
    out_pairs = [compare_pair(dir_a, dir_b, ra, rb, a, b, notices) for a, b in pairs]
    pa, pb = _mapping(ra["provenance"].get("packages")), _mapping(rb["provenance"].get("packages"))
    result = {
        "schema_version": SCHEMA_VERSION,
        "a": _run_facts(dir_a, ra),
        "b": _run_facts(dir_b, rb),
        "spec_changes": _changes(ra.get("spec", {}), rb.get("spec", {})),
        "package_changes": [{"package": k, "a": pa.get(k), "b": pb.get(k)} for k in sorted(set(pa) | set(pb))
                            if pa.get(k) != pb.get(k)],
        "pairs": out_pairs,
        "unmatched": {"a": [m for m in ids_a if m not in {p[0] for p in pairs}],
                      "b": [m for m in ids_b if m not in {p[1] for p in pairs}]},
        "notices": notices,
        "map_definition": MAP_DEFINITION,
    }
    result["findings"] = diff_findings(result)
    return result



def write_diff(dir_a: Path, dir_b: Path, out: Path, pairs: list[tuple[str, str]] | None = None) -> Path:
    """Compute the diff and write diff.json, report.html and report.pdf into `out`, atomically."""
    from report_builder.report.render import render_diff

    from report_builder.files import check_output

    check_output(Path(out), "diff", [dir_a, dir_b])
    result = clean_nan(diff_runs(dir_a, dir_b, pairs))
    with atomic_dir(Path(out), "diff", [dir_a, dir_b], first="diff.json") as work:
        write_json(work / "diff.json", result)
        render_diff(work, result)
    return Path(out)


def diff_findings(result: dict) -> list[str]:
    """The diff in sentences, each computed from the numbers above."""
    out = []
    if not result["spec_changes"] and all(not p["weights_changed"] for p in result["pairs"]):
        out.append("The two runs have the same spec and the same weights.")
    for p in result["pairs"]:
        name = p["display_a"] if p["a"] == p["b"] else f"{p['display_a']} → {p['display_b']}"
        pr = p["predictions"]
        if pr["images"]:
            deltas = [r["delta"] for r in pr["rows"] if r["delta"] is not None]
            biggest = max(pr["rows"], key=lambda r: abs(r["delta"] or 0))
            text = f"{name}: the top-1 class changes on {pr['top1_changed']} of {pr['images']} shared images"
            if deltas and biggest["delta"] is not None:
                text += (f"; the largest probability change of run A's top-1 class is {biggest['delta']:+.2f} "
                         f"on {biggest['image']} ({biggest['a_top1']})")
            out.append(text + ".")
        if p["maps"]["mean_gradcam_iou"] is not None:
            out.append(f"{name}: the two runs' Grad-CAM maps overlap with a mean IoU of {p['maps']['mean_gradcam_iou']:.2f} "
                       f"(1 = the same top {int(GRADCAM_TOP_FRACTION * 100)}% of pixels).")
        d = p["dissection"]
        if d and d["compared"]:
            for x in d["layers"]:
                text = (f"{name}, {x['layer']}: {x['changed']} of {x['units']} units ({100 * x['share']:.0f}%) change "
                        f"their label; unique concepts go from {x['unique_a']} to {x['unique_b']}")
                if x["gained"] or x["lost"]:
                    text += f" ({len(x['gained'])} gained, {len(x['lost'])} lost)"
                out.append(text + ".")
        out += _new_section_findings(name, p)
        out.extend(version_tests(name, p))
    return out


def _new_section_findings(name: str, p: dict) -> list[str]:
    """The evaluation, sanity verdicts, Network Dissection, concept attribution and LIME sweep of one pair, in
    sentences."""
    out = []
    ev = p.get("evaluation")
    if ev and ev["compared"]:
        moved = [x for x in ev["rows"] if x["better"] != "within noise"]
        if ev["rows"]:
            out.append(f"{name}: of {len(ev['rows'])} evaluation means (method × metric), "
                       + (f"{len(moved)} change beyond noise: " + "; ".join(
                           f"{x['method']} {x['title']} {x['a']:.3f} → {x['b']:.3f} ({x['better']} better, p = "
                           f"{x['p_value']:.2g} over {x['images']} images)" for x in moved[:6])
                          if moved else "none changes beyond noise (paired bootstrap and Wilcoxon over the shared "
                                        "images)") + ".")
        for v in ev["verdicts"]:
            if v["changed"]:
                out.append(f"{name}: {v['method']} {v['verdict_a'] or 'was not tested'} the {v['title'].lower()} in "
                           f"run A and {v['verdict_b'] or 'is not tested'} in run B ({v['rule']}).")
    nd = p.get("netdissect")
    if nd and nd["compared"]:
        for x in nd["layers"]:
            out.append(f"{name}, {x['layer']}: Network Dissection detectors go from {x['detectors_a']} to "
                       f"{x['detectors_b']}, their unique concepts from {x['unique_a']} to {x['unique_b']}.")
    cs = p.get("concepts")
    if cs and cs["compared"]:
        for x in cs["classes"]:
            if x["gained"] or x["lost"]:
                out.append(f"{name}, {x['layer']}: among the concepts that {x['class_name']} rests on most, run B "
                           f"gained {', '.join(x['gained']) or 'none'} and lost {', '.join(x['lost']) or 'none'} "
                           f"({x['images_a']} image(s) of that class in A, {x['images_b']} in B).")
        for x in cs["ablation"]:
            if x["changed"]:
                out.append(f"{name}, {x['layer']}: the top-{x['k']} concept units' ablation {x['verdict_a']} in run A "
                           f"(drop {x['top_a']:.2f}) and {x['verdict_b']} in run B (drop {x['top_b']:.2f}).")
    sw = p.get("lime_sweep")
    if sw and sw["compared"]:
        out.append(f"{name}: the LIME sweep's best setting is {sw['best_a']} in run A and {sw['best_b']} in run B"
                   + ("." if sw["changed"] else " (unchanged)."))
    return out


def version_tests(name: str, pair: dict) -> list[str]:
    """Run B against run A, paired over the shared images: the probability of run A's top-1 class, and LIME's IoU
    with Grad-CAM; 'within noise' unless the paired test says otherwise (report_builder/stats.py)."""
    out = []
    rows = [r for r in pair["predictions"]["rows"] if r["delta"] is not None]
    if len(rows) >= 2:
        b = [r["a_class_probability_in_b"] for r in rows]
        c = paired(b, [x - r["delta"] for x, r in zip(b, rows)])
        out.append(f"{name}: the probability of run A's top-1 class in run B against run A: "
                   + compare_words(c, 3) + ".")
    maps = [r for r in pair["maps"]["rows"] if r.get("lime_gradcam_delta") is not None]
    if len(maps) >= 2:
        c = paired([r["lime_gradcam_b"] for r in maps], [r["lime_gradcam_a"] for r in maps])
        out.append(f"{name}: LIME's IoU with Grad-CAM in run B against run A: " + compare_words(c, 2) + ".")
    return out
