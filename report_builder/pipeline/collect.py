"""Task values -> results.json's sections and the run directory's files (overlays, maps, CSVs, galleries).

Bookkeeping only: the numbers come from the tasks, the agreement module and the analysis module.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from report_builder.evaluation import registry as metric_registry
from report_builder.explanation import agreement as agree
from report_builder.report import analysis
from report_builder.report import concepts as concept_analysis
from report_builder.report.concepts import CONCEPTS_CSV, CONCEPTS_CSV_COLUMNS
from report_builder.explanation import overlays
from report_builder.data.images import SampleImage, manifest_hash
from report_builder.explanation.methods import top_k
from report_builder.label_quality import METRICS as QUALITY_METRICS, QUALITY_CSV, combination_text
from report_builder.files import atomic_write, clean_nan, package_digest
from report_builder.pipeline.cache import stage_key
from report_builder.pipeline.progress import Progress
from report_builder.report.rundir import SCHEMA_VERSION, TIMING_KEYS
from report_builder.explanation.registry import CAM_NAMES, METHODS, TITLES
from report_builder.spec.schema import LoadedSpec
from report_builder.models.zoo import LoadedModel


def results(loaded: LoadedSpec, inputs, plan, outcome, work: Path, progress: Progress, device_type: str,
            executor: str, shares: dict | None, cache=None) -> dict:
    """Everything the report needs, with the files it refers to written under `work`; `executor` says where the
    tasks ran, and `shares` how worker processes shared the cores (None: one process): their timings depend on it.
    With `cache` (the run's), unit galleries drawn before from the same task results are taken from it."""
    spec = loaded.spec
    explanations, agreement_rows = [], []
    for m in inputs.models:
        for record, rows in explanation_records(m, inputs.images, spec, plan, outcome, work, progress):
            explanations.append(record)
            agreement_rows.extend(rows)
    out = {
        "schema_version": SCHEMA_VERSION,
        "run_name": loaded.run_name,
        "title": spec.title,
        "authors": list(spec.authors),
        "spec": loaded.written.model_dump(mode="json"),
        "spec_file": str(loaded.path),
        "methods": [{"id": k, "title": TITLES[k]} for k in spec.explain.methods],
        "not_applicable": plan.not_applicable,
        "explain_settings": spec.explain.for_device(device_type).model_dump(mode="json"),  # batch sizes resolved
        "models": [model_record(m) for m in inputs.models],
        "images": [image_record(im) for im in inputs.images],
        "explanations": explanations,
        "agreement": {"definition": agree.DEFINITION, "thresholds": list(spec.agreement.thresholds),
                      "rows": agreement_rows},
        "reproducibility": {
            "timing_keys": list(TIMING_KEYS),
            "note": "Two runs of the same spec on the same device give the same results.json except for these keys: "
                    "wall-clock timings, the cache's state, and the findings marked timing: true.",
        },
        "provenance": {
            "seed": spec.seed,
            "weights_sha256": {m.id: m.weights_hash for m in inputs.models},
            "images_sha256": manifest_hash(inputs.images),
            "tasks": len(plan.graph.tasks),
            "executor": executor,
            **({"workers": shares} if shares else {}),
        },
    }
    if spec.dissect is not None:
        out["dissection"] = dissection_section(spec, inputs, plan, outcome)
        write_dissection_csvs(work / "dissection", out["dissection"])
        out["dissection"]["summary"] = analysis.dissection_summary(out)
    if spec.netdissect is not None:
        out["netdissect"] = netdissect_section(spec, inputs, plan, outcome, work, cache)
        write_netdissect_csvs(work / "dissection", out["netdissect"])
        out["netdissect"]["agreement"] = analysis.method_agreement(out)
    if plan.concepts:  # after the dissections: their labels name the units
        out["concepts"], unit_rows = concepts_section(spec, inputs, plan, outcome, work, out)
        write_concepts_csv(work / CONCEPTS_CSV, unit_rows)
    if spec.evaluate is not None:
        out["evaluation"] = evaluation_section(spec, inputs, plan, outcome, work)
        write_evaluation_csv(work / "evaluation.csv", out["evaluation"])
    if plan.sweep_settings:
        out["lime_sweep"] = sweep_section(inputs, plan, outcome)
    out["versions"] = analysis.versions_summary(out)
    out["agreement"]["summary"] = analysis.agreement_summary(out)
    out["timings"] = analysis.timing_summary(out)
    if "evaluation" in out:
        out["evaluation"]["summary"] = analysis.evaluation_summary(out)
    if "lime_sweep" in out:
        out["lime_sweep"].update(analysis.sweep_summary(out))
    if "concepts" in out:
        out["concepts"].update(concept_analysis.summary(out))
    out["findings"] = analysis.findings(out)
    out = clean_nan(out)
    write_agreement_csv(work / "agreement.csv", out["agreement"]["rows"], spec.agreement.thresholds)
    return out


# ---------------------------------------------------------------- explanations


def explanation_records(m: LoadedModel, images: list[SampleImage], spec, plan, outcome, work: Path,
                        progress: Progress):
    """Per image: the record (predictions, each method's overlay and time), its maps file, and LIME-vs-CAM rows."""
    folder = work / "explanations" / m.id
    folder.mkdir(parents=True, exist_ok=True)
    for im in images:
        probs = outcome.values[plan.predict[(m.id, im.id)]][0]
        preds = top_k(probs, m.class_names, spec.explain.top_k)
        methods = [k for k in spec.explain.methods if (m.id, im.id, k) in plan.explain]  # those that apply to m
        values = {method: outcome.values[plan.explain[(m.id, im.id, method)]] for method in methods}
        computed = {method: plan.explain[(m.id, im.id, method)] in outcome.computed for method in methods}
        target = preds[0]["class_index"]
        record = {
            "model": m.id,
            "image": im.id,
            "target_class": target,
            "target_name": preds[0]["class_name"],
            "predictions": preds,
            "original": f"explanations/{m.id}/{im.id}_input.png",
            "maps": f"explanations/{m.id}/{im.id}.npz",
            "methods": {},
        }
        crop = m.preprocess.crop(im.image)
        overlays.save_input(crop, work / record["original"])
        arrays = {}
        for method, value in values.items():
            rel = f"explanations/{m.id}/{im.id}_{method}.png"
            entry = {"seconds": round(float(value["seconds"]), 4), "cached": not computed[method], "overlay": rel}
            if "implementation" in value:
                entry["implementation"] = value["implementation"]
            if METHODS[method].kind == "superpixels":
                overlays.save_lime(crop, value["mask"], value["segments"], work / rel)
                entry.update(score=value["score"], num_segments=value["num_segments"],
                             mask_pixels=int(value["mask"].sum()))
                arrays[f"{method}_mask"] = value["mask"]
            else:
                overlays.save_cam(crop, value["map"], work / rel)
            arrays[method] = value["map"]
            record["methods"][method] = entry
        arrays["probabilities"] = probs.astype(np.float32)  # the full softmax, for diffs between runs
        np.savez_compressed(work / record["maps"], **arrays)
        took = ", ".join(f"{TITLES[k]} {v['seconds']:.1f}s{'' if computed[k] else ' (cached)'}"
                         for k, v in values.items())
        progress.say(f"  {m.id} {im.id}: {preds[0]['class_name']} ({preds[0]['probability']:.2f}); {took}", detail=True)
        rows = []
        # each superpixel mask (LIME's) against every CAM's map
        for masked in (k for k in METHODS if k in values and METHODS[k].kind == "superpixels"):
            for method in (k for k in CAM_NAMES if k in values):
                numbers = agree.compare(values[masked]["mask"], values[method]["map"], spec.agreement.thresholds)
                rows.append({"image": im.id, "model": m.id, "method_a": masked, "method_b": method, **numbers})
        yield record, rows


# ---------------------------------------------------------------- evaluation


def evaluation_section(spec, inputs, plan, outcome, work: Path) -> dict:
    """Per model, image and method (and each chance map): the metrics; the deletion and insertion curves; the
    sanity check's similarities per step, with its maps in evaluation/<model>/<image>_sanity.npz."""
    ev = spec.evaluate
    per_map = [c.name for _, c in metric_registry.per_map()]
    per_step = [c.name for _, c in metric_registry.per_step()]
    rows, curves, sanity = [], [], []
    methods = list(spec.explain.methods) + metric_registry.chance_methods(ev.model_dump(mode="json"))
    for m in inputs.models:
        for im in inputs.images:
            for method in methods:
                if (m.id, im.id, method) not in plan.evaluation:  # the method does not apply to this model
                    continue
                v = outcome.values[plan.evaluation[(m.id, im.id, method)]]
                rows.append({"model": m.id, "image": im.id, "method": method,
                             **{k: v.get(k) for k in per_map}, "object": v.get("object")})
                if "deletion_curve" in v:
                    curves.append({"model": m.id, "image": im.id, "method": method,
                                   "deletion": [float(x) for x in v["deletion_curve"]],
                                   "insertion": [float(x) for x in v["insertion_curve"]]})
            maps = {}
            for method in spec.explain.methods:
                key = plan.sanity.get((m.id, im.id, method))
                if key is None:
                    continue
                v = outcome.values[key]
                maps[method] = v["maps"]
                sanity.append({"model": m.id, "image": im.id, "method": method, "layers": v["layers"],
                               "blocks": [int(b) for b in v["blocks"]], "total_blocks": int(v["total_blocks"]),
                               **{k: v[k] for k in per_step},
                               "runs": [{"seed": int(r["seed"]), **{k: r[k] for k in per_step}, "flat": bool(r["flat"])}
                                        for r in v["runs"]]})
            if maps:
                rel = f"evaluation/{m.id}/{im.id}_sanity.npz"
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(work / rel, **maps)
                for entry in sanity[-len(maps):]:
                    entry["maps"] = rel
    return {"settings": ev.model_dump(mode="json"), "methods": methods, "rows": rows, "curves": curves,
            "sanity": sanity}


def write_evaluation_csv(path: Path, evaluation: dict) -> None:
    """evaluation.csv: model, image, method, metric, value; the sanity check's similarities per randomised block."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "image", "method", "metric", "value"])
        for r in evaluation["rows"]:
            for metric, column in metric_registry.per_map():
                if r.get(column.name) is not None:
                    w.writerow([r["model"], r["image"], r["method"], metric.csv_metric(column), f"{r[column.name]:.6g}"])
        for s in evaluation["sanity"]:
            for step, layer in enumerate(s["layers"]):
                for metric, column in metric_registry.per_step():
                    value = s[column.name][step]
                    w.writerow([s["model"], s["image"], s["method"], metric.csv_metric(column, layer),
                                "" if value is None or value != value else f"{value:.6g}"])


def sweep_section(inputs, plan, outcome) -> dict:
    """Per model and LIME setting: each image's IoU with Grad-CAM and LIME's seconds."""
    settings = [{"index": k, "label": lime.describe(), "lime": lime.model_dump(mode="json", exclude={"sweep", "batch_size"})}
                for k, lime in enumerate(plan.sweep_settings)]
    rows = []
    for m in inputs.models:
        for k in range(len(plan.sweep_settings)):
            for im in inputs.images:
                v = outcome.values[plan.sweep[(m.id, im.id, k)]]
                rows.append({"model": m.id, "setting": k, "image": im.id, "iou": v["iou"],
                             "seconds": round(float(v["seconds"]), 4)})
    return {"settings": settings, "rows": rows}


# ---------------------------------------------------------------- concept attribution


def _labels_by_unit(out: dict) -> tuple[dict, dict]:
    """(model, layer) -> unit -> its CLIP-Dissect label row, and the same for its Network Dissection row."""
    clip = {(m["model"], x["layer"]): {u["unit"]: u for u in x["labels"]}
            for m in out.get("dissection", {}).get("models", []) for x in m["layers"]}
    nd = {(m["model"], x["layer"]): {u["unit"]: u for u in x["unit_labels"]}
          for m in out.get("netdissect", {}).get("models", []) for x in m["layers"]}
    return clip, nd


def _unit_row(unit: int, rank: int, value: dict, share: np.ndarray, clip: dict, nd: dict) -> dict:
    c, n = clip.get(unit), nd.get(unit)
    return {"unit": unit, "rank": rank, "contribution": float(value["contribution"][unit]), "share": float(share[unit]),
            "activation": float(value["activation"][unit]),
            "label": c["label"] if c else None, "scorer": c["scorer"] if c else None,
            "similarity": c["similarity"] if c else None,
            "netdissect_label": n["label"] if n else None, "netdissect_category": n["category"] if n else None,
            "iou": n["iou"] if n else None, "detector": bool(n["detector"]) if n else None}


def concepts_section(spec, inputs, plan, outcome, work: Path, out: dict) -> tuple[dict, list[dict]]:
    """Per model, image and concept layer: the section of results.json, and every unit's row (its contribution and
    share with its labels from the run's dissections, concept_attribution.csv's). The section has the top units (with their maps as small overlays), the top concepts (shares
    summed by label: CLIP-Dissect's where the run has it, else the Network Dissection detectors'), and the ablation
    drops against each baseline."""
    from report_builder.explanation.concepts import ranking, shares
    from report_builder.explanation.registry import ABLATION_BAR, ABLATION_BASELINES, ATTRIBUTIONS

    clip, nd = _labels_by_unit(out)
    source, label_key = ("clip-dissect", "label") if clip else ("netdissect", "netdissect_label")
    records, rows = [], []
    for m in inputs.models:
        for im in inputs.images:
            key = plan.concepts.get((m.id, im.id))
            if key is None:
                continue
            value = outcome.values[key]
            crop = m.preprocess.crop(im.image)
            maps = {k: outcome.values[plan.explain[(m.id, im.id, k)]]["map"] for k in spec.explain.methods
                    if (m.id, im.id, k) in plan.explain}
            for layer in value["layers"]:
                name = layer["layer"]
                lc, ln = clip.get((m.id, name), {}), nd.get((m.id, name), {})
                contribution = np.asarray(layer["contribution"], np.float64)
                share = shares(contribution)
                order = ranking(contribution)
                units = [_unit_row(int(u), r + 1, layer, share, lc, ln) for r, u in enumerate(order)]
                rows.extend({"model": m.id, "image": im.id, "layer": name, **u} for u in units)
                folder = f"concepts/{m.id}/{name}"
                cam_rel = f"{folder}/{im.id}_gradcam.jpg"
                overlays.save_unit_tile(crop, layer["cam"], work / cam_rel)
                top = []
                for row, heat in zip(units, layer["maps"]):  # the shown units are the first of the ranking
                    rel = f"{folder}/{im.id}_unit_{row['unit']:04d}.jpg"
                    overlays.save_unit_tile(crop, heat, work / rel)
                    top.append({**row, "map": rel})
                agreement = {method: top_pixels_iou(layer["units_cam"], saliency) for method, saliency in maps.items()}
                drops = layer["drops"]
                ablation = {"ks": list(layer["ks"]), "draws": len(drops[ABLATION_BAR][0]),
                            "top": [d[0] for d in drops["top"]],
                            "baselines": {b: [[float(x) for x in d] for d in drops[b]] for b in ABLATION_BASELINES}}
                records.append({
                    "model": m.id, "image": im.id, "layer": name, "units": int(layer["units"]),
                    "target_class": int(value["target"]), "target_name": m.class_names[int(value["target"])],
                    "probability": float(value["probability"]), "forward": layer["forward"], "gradcam": cam_rel,
                    "top": top, "concepts": concept_groups(units, label_key), "ablation": ablation,
                    "cam_agreement": agreement})
    settings = spec.concepts.model_dump(mode="json")
    return {"settings": settings, "top_pixels": TOP_PIXELS, "attribution": ATTRIBUTIONS[settings["attribution"]].title,
            "citation": ATTRIBUTIONS[settings["attribution"]].citation, "label_source": source,
            "baselines": [{"name": b.name, "title": b.title, "draws": b.draws, "bar": b.bar}
                          for b in ABLATION_BASELINES.values()],
            "records": records}, rows


TOP_PIXELS = 0.2  # the share of pixels each map marks when the concept units' map is compared with a CAM's


def top_pixels_iou(small: np.ndarray, full: np.ndarray, share: float = TOP_PIXELS) -> float | None:
    """IoU of the top `share` of pixels of two maps, the layer-resolution one upsampled bilinearly to the other's
    size; ties at the cut are all in, except a cut at the map's minimum (LIME's zero weights), which marks only the
    pixels above it. None when either map is flat (it marks no pixels above the rest)."""
    up = np.asarray(Image.fromarray(np.asarray(small, np.float32), mode="F").resize(full.shape[::-1], Image.BILINEAR))
    masks = []
    for x in (up, np.asarray(full, np.float32)):
        if float(x.max()) <= float(x.min()):
            return None
        cut = np.quantile(x, 1 - share)
        masks.append(x >= cut if cut > x.min() else x > cut)
    union = np.logical_or(*masks).sum()
    return float(np.logical_and(*masks).sum() / union)


def concept_groups(units: list[dict], key: str) -> list[dict]:
    """Shares summed by the label under `key` over the units that push toward the class (Network Dissection's,
    'netdissect_label': detectors only), largest first; the report lists the first few, the profiles average all."""
    groups: dict[str, dict] = {}
    for u in units:
        label = u[key]
        if u["share"] <= 0 or label is None or (key == "netdissect_label" and not u["detector"]):
            continue
        g = groups.setdefault(label, {"label": label, "share": 0.0, "units": []})
        g["share"] += u["share"]
        g["units"].append(u["unit"])
    ordered = sorted(groups.values(), key=lambda g: (-g["share"], g["label"]))
    return [{**g, "units": g["units"][:10]} for g in ordered]


def write_concepts_csv(path: Path, rows: list[dict]) -> None:
    """concept_attribution.csv: every unit's contribution and share per model, image and layer, with its labels."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CONCEPTS_CSV_COLUMNS)
        for r in rows:
            w.writerow(["" if r[c] is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c])
                        for c in CONCEPTS_CSV_COLUMNS])


# ---------------------------------------------------------------- CLIP-Dissect


def dissection_section(spec, inputs, plan, outcome) -> dict:
    from report_builder.dissection.clip_dissect import similarity_params

    ds = spec.dissect
    out_models = []
    for m in inputs.models:
        if not m.spec.layers:
            continue
        layers = [outcome.values[plan.dissect[(m.id, layer)]] for layer in m.spec.layers]
        if plan.quality:
            layers = [with_quality(x, outcome.values[plan.quality[(m.id, x["layer"])]]) for x in layers]
        out_models.append({"model": m.id, "layers": layers})
    probe = inputs.probe
    extra = {}
    if ds.quality is not None and plan.label_sanity:
        extra["quality"] = {**ds.quality.model_dump(mode="json"), "metrics": list(QUALITY_METRICS),
                            "sanity": outcome.values[plan.label_sanity[0]]}
    if plan.directions:
        extra["directions"] = directions_records(plan, outcome)
    return {**extra,
        "similarity": ds.similarity,
        "similarity_params": similarity_params(spec.dissect, spec.seed),
        "pooling": ds.pooling,
        "probe": {"description": probe.description, "images": len(probe), "sha256": probe.manifest},
        "scorers": {s.label: s.description for s in inputs.scorers},
        "concepts": sum(len(s.concepts) for s in inputs.scorers),
        "models": out_models,
    }


def directions_records(plan, outcome) -> list[dict]:
    """Per model, layer and method: the fit's numbers (what its registry entry reports) and each direction's label."""
    from report_builder.dissection.directions import DIRECTIONS

    out = []
    for (model, layer, method), key in plan.directions.items():
        fit, entry = outcome.values[key], DIRECTIONS[method]
        labels = outcome.values[plan.direction_labels[(model, layer, method)]]["labels"]
        out.append({"model": model, "layer": layer, "method": method, "title": entry.title,
                    "citation": entry.citation, "fits": entry.fits, "components": int(fit["components"]),
                    "components_asked": int(fit["components_asked"]),
                    **{k: float(fit[k]) for k in ("reconstruction_error", "variance_explained", "sparsity")},
                    "reports": {k: _plain_number(fit[k]) for k, _ in entry.reports},
                    "report_meanings": dict(entry.reports),
                    "unique": len({u["label"] for u in labels}), "labels": labels})
    return out


def _plain_number(value):
    return int(value) if isinstance(value, (int, np.integer)) else float(value)


def with_quality(layer: dict, quality: dict) -> dict:
    """A layer's labels with their held-out scores, combination and stability beside them (by unit), and the
    layer's split and resamples."""
    by_unit = {r["unit"]: r for r in quality["rows"]}
    labels = [{**u, **{k: v for k, v in by_unit[u["unit"]].items() if k != "unit"}} for u in layer["labels"]]
    return {**layer, "labels": labels, "quality": {k: quality[k] for k in
                                                   ("first_images", "heldout_images", "positives", "resamples",
                                                    "resample_labels")}}


def write_dissection_csvs(folder: Path, dissection: dict) -> None:
    """dissection/<model>.csv: CLIP-Dissect's first columns (layer, unit, description, similarity), then more."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in dissection["models"]:
        with open(folder / f"{entry['model']}.csv", "w", newline="") as f:
            w = csv.writer(f)
            quality = "quality" in dissection
            w.writerow(["layer", "unit", "description", "similarity", "alt_1", "alt_1_similarity", "alt_2",
                        "alt_2_similarity", "alt_3", "alt_3_similarity", "scorer", *(QUALITY_CSV if quality else ())])
            for layer in entry["layers"]:
                for u in layer["labels"]:
                    alts = [x for a in u["alternatives"] for x in (a["label"], f"{a['similarity']:.6g}")]
                    alts += [""] * (6 - len(alts))
                    more = [_cell(u, c) for c in QUALITY_CSV] if quality else []
                    w.writerow([layer["layer"], u["unit"], u["label"], f"{u['similarity']:.6g}", *alts, u["scorer"],
                                *more])


def _cell(unit: dict, column: str) -> str:
    value = unit.get(column)
    if column == "combination":
        return combination_text(value or [])
    if value is None:
        return ""
    return value if isinstance(value, str) else f"{value:.6g}"


# ---------------------------------------------------------------- Network Dissection


def netdissect_section(spec, inputs, plan, outcome, work: Path, cache=None) -> dict:
    """Per model and layer: unit rows, counts, galleries; the rotation curve; the probe's categories."""
    from report_builder.dissection import netdissect as nd

    ns = spec.netdissect
    probe = inputs.pixel_probe
    settings = nd.NetDissectSettings(ns.quantile, ns.threshold, ns.iou_threshold, ns.top_images, spec.seed)
    categories = probe.category_names
    alphas = [a for a in (ns.rotation.alphas if ns.rotation else ()) if a > 0]
    out_models = []
    label_area = None
    thumbs: dict[int, Image.Image] = {}
    for m in inputs.models:
        if not m.spec.layers:
            continue
        rotated = (ns.rotation.layer or m.spec.layers[-1]) if ns.rotation else None
        layers_out, counted = [], {}
        for layer in m.spec.layers:
            key = plan.netdissect[(m.id, layer, 0.0)]
            result = outcome.values[key]
            rows = nd.unit_rows(result, probe, ns.iou_threshold)
            write_gallery(work, m.id, layer, rows, result, probe, thumbs, cache, key)
            counts = counted[layer] = nd.layer_counts(rows, categories)
            layers_out.append({"layer": layer, "threshold_method": result["threshold_method"], **counts,
                               "unit_labels": rows})
            label_area = result["label_area"]  # the same for every model and layer
        rotation_out = None
        if rotated:
            points = [counted[rotated]] + [
                nd.layer_counts(nd.unit_rows(outcome.values[plan.netdissect[(m.id, rotated, a)]], probe,
                                             ns.iou_threshold), categories) for a in alphas]
            rotation_out = {"layer": rotated, "seed": spec.seed, "alphas": [0.0] + alphas,
                            "detectors": [p["detectors"] for p in points], "unique": [p["unique"] for p in points],
                            "per_category": [p["per_category"] for p in points]}
        directions = [{"layer": layer, "method": basis, **nd.layer_counts(rows, categories), "unit_labels": rows}
                      for (mid, layer, basis), key in plan.netdissect.items() if mid == m.id and isinstance(basis, str)
                      for rows in [nd.unit_rows(outcome.values[key], probe, ns.iou_threshold)]]
        out_models.append({"model": m.id, "layers": layers_out, "rotation": rotation_out, "directions": directions,
                           "bases": bases(counted, rotation_out, directions)})
    return {
        "settings": {**settings.as_dict(), "colors": ns.colors, "label_size": ns.label_size,
                     "pdf_units": ns.pdf_units, "rotation": ns.rotation.model_dump() if ns.rotation else None},
        "probe": {"description": probe.description, "images": len(probe), "sha256": probe.manifest,
                  "sources": list(probe.sources), "categories": category_stats(probe, label_area)},
        "categories": categories,
        "models": out_models,
    }


def bases(counted: dict, rotation: dict | None, directions: list[dict]) -> list[dict]:
    """Per layer with learned directions: its units, the full random rotation (the largest alpha) where that layer is
    rotated, and each learned basis, with detectors and unique concepts side by side. A layer that is only rotated
    has none: the rotation's own table compares it with the units."""
    from report_builder.dissection.directions import DIRECTIONS

    layers = list(dict.fromkeys(d["layer"] for d in directions))
    out = []
    for layer in layers:
        rows = [("units", "units", counted[layer])]
        if rotation and rotation["layer"] == layer and rotation["alphas"][-1] > 0:
            rows.append(("rotation", f"random rotation (α={rotation['alphas'][-1]:g})",
                         {"units": counted[layer]["units"], "detectors": rotation["detectors"][-1],
                          "unique": rotation["unique"][-1]}))
        rows += [(d["method"], DIRECTIONS[d["method"]].title, d) for d in directions if d["layer"] == layer]
        out += [{"layer": layer, "basis": basis, "title": title, "size": c["units"], "detectors": c["detectors"],
                 "unique": c["unique"]} for basis, title, c in rows]
    return out


def category_stats(probe, label_area) -> list[dict]:
    """Per category: images with labels of it, and concepts that occur at least once."""
    out = []
    for c in probe.category_names:
        ids = [i for i, cat in enumerate(probe.categories) if cat == c]
        present = [i for i in ids if label_area is None or label_area[i] > 0]
        out.append({"category": c, "images": sum(c in item.categories for item in probe.items),
                    "concepts": len(present), "examples": [probe.names[i] for i in present[:8]]})
    return out


def write_gallery(work: Path, model_id: str, layer: str, rows: list[dict], result: dict, probe, thumbs: dict,
                  cache=None, task_key: str | None = None) -> None:
    """netdissect/<model>/<layer>/unit_<k>.jpg: each unit's top images with its mask; paths go into the rows.
    The strips are a function of the task's result (its key says what made it), the probe images and this code:
    with a cache, a rerun copies them (1,304 strips, about 2 s of the demo's warm rerun)."""
    folder = work / "netdissect" / model_id / layer
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"unit_{row['unit']:04d}.jpg" for row in rows]
    for row, top, name in zip(rows, result["top_images"], names):
        row["gallery"] = f"netdissect/{model_id}/{layer}/{name}"
        row["top_images"] = [probe.items[int(i)].id for i in top]
    key = stage_key("galleries", {"task": task_key, "probe": probe.manifest, "code": package_digest(),
                                  "pil": Image.__version__, "rows": [[r["unit"], r["threshold"]] for r in rows]}
                    ) if cache is not None and task_key else None
    stored = None if key is None else cache.load_files("galleries", key)
    if stored is not None and sorted(stored) == sorted(names):
        for name in names:
            atomic_write(folder / name, stored[name])
        return
    for row, top, maps, name in zip(rows, result["top_images"], result["top_maps"], names):
        images = []
        for i in top:
            if int(i) not in thumbs:
                thumbs[int(i)] = probe.items[int(i)].image.load().convert("RGB").resize((80, 80), Image.BILINEAR)
            images.append(thumbs[int(i)])
        overlays.unit_strip(images, maps, row["threshold"]).save(folder / name, quality=75)
    if key is not None:
        cache.save_files("galleries", key, {name: (folder / name).read_bytes() for name in names})


def write_netdissect_csvs(folder: Path, netdissection: dict) -> None:
    """dissection/<model>-netdissect.csv: unit, layer, category, label, iou, then detector and threshold."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in netdissection["models"]:
        with open(folder / f"{entry['model']}-netdissect.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["unit", "layer", "category", "label", "iou", "detector", "threshold"])
            for layer in entry["layers"]:
                for u in layer["unit_labels"]:
                    w.writerow([u["unit"], layer["layer"], u["category"], u["label"], f"{u['iou']:.6g}",
                                int(u["detector"]), f"{u['threshold']:.6g}"])


# ---------------------------------------------------------------- models, images, agreement


def model_record(m: LoadedModel) -> dict:
    return {
        "id": m.id,
        "display": m.spec.display,
        "source": m.spec.source,
        "name": m.spec.name,
        "origin": m.origin,
        "target_layer": m.target_layer,
        "num_classes": len(m.class_names),
        "preprocess": m.preprocess.as_dict(),
        "weights_sha256": m.weights_hash,
        "parameters": int(sum(p.numel() for p in m.module.parameters())),
        "group": m.group,
        "version": m.version,
    }


def image_record(im: SampleImage) -> dict:
    return {"id": im.id, "source": im.source, "width": im.size[0], "height": im.size[1], "sha256": im.sha256}


def write_agreement_csv(path: Path, rows: list[dict], thresholds: tuple[float, ...]) -> None:
    columns = ["image", "model", "method_a", "method_b", "iou", *[f"iou@{t:g}" for t in thresholds],
               "lime_pixels", "flat_cam"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
