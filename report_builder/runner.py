"""Runner: reads a spec, calls the stages in order, shows progress, writes the run directory.

It holds no algorithm of its own. The run directory is written under a temporary name and
renamed into place at the end, so a failed run leaves no half-written `output/<run>` behind.
"""
from __future__ import annotations

import csv
import datetime as dt
import inspect
import os
import platform
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from . import agreement as agree
from . import analysis, overlays
from .cache import Cache, stage_key
from .data import SampleImage, load_images, manifest_hash
from .errors import UserError
from .files import atomic_dir, check_output, clean_nan, write_json
from .explain import EXPLAINERS, Settings, cache_parts, predict, top_k
from .spec import CAM_METHODS, METHOD_TITLES, LoadedSpec, resolve_batch
from .rundir import SCHEMA_VERSION, TIMING_KEYS
from .zoo import LoadedModel, get_layer, load_model
PACKAGES = ("report_builder", "torch", "torchvision", "timm", "grad-cam", "lime", "numpy", "scikit-image",
            "scikit-learn", "matplotlib", "jinja2", "weasyprint", "pillow", "pydantic", "pyyaml")


class Progress:
    """One line per step on stderr, with elapsed time; stage durations kept for provenance."""

    def __init__(self, stream=None):
        self.stream = stream  # None: whatever sys.stderr is when a line is written
        self.durations: dict[str, float] = {}
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {text}", file=self.stream or sys.stderr, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"{name} ...")
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.durations[name] = self.durations.get(name, 0.0) + seconds
        self.say(f"{name} done in {seconds:.1f} s")


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device: found 'cuda', but no CUDA device is available here; use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def run(loaded: LoadedSpec, out_dir: Path, cache: Cache | None = None, progress: Progress | None = None) -> Path:
    """Run a spec end to end; return the finished run directory."""
    from .render import render_run

    progress = progress or Progress()
    cache = cache or Cache()
    cache.warn_to = lambda text: progress.say(f"warning: {text}")
    out_dir = Path(out_dir)
    check_output(out_dir, "run")  # before any work: a folder that is not ours is refused at once
    with atomic_dir(out_dir, "run") as work:
        results = _compute(loaded, work, cache, progress)
        results["provenance"]["stage_seconds"] = {k: round(v, 3) for k, v in progress.durations.items()}
        with progress.stage("render report"):
            render_run(work, results)
        # The report shows the compute stages; results.json also keeps the rendering time.
        results["provenance"]["stage_seconds"]["render report"] = round(progress.durations["render report"], 3)
        results["provenance"]["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_json(work / "results.json", results)
    progress.say(f"wrote {out_dir}/report.html and report.pdf (cache: {cache.hits} hits, {cache.misses} computed)")
    return out_dir


def _compute(loaded: LoadedSpec, work: Path, cache: Cache, progress: Progress) -> dict:
    spec = loaded.spec
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    device = pick_device(spec.device)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    progress.say(f"spec {loaded.path} -> {work.name.split('.partial')[0].lstrip('.')} on {device_description(device)}")

    images, models = preflight(loaded, device, progress)
    dissection = None
    if spec.dissect is not None:
        dissection = dissect_models(loaded, models, device, cache, progress)
        _write_dissection_csvs(work / "dissection", dissection)
    netdissection = None
    if spec.netdissect is not None:
        netdissection = netdissect_models(loaded, models, device, cache, work, progress)
        _write_netdissect_csvs(work / "dissection", netdissection)

    explain = spec.explain.model_copy(update={
        "cam": spec.explain.cam.model_copy(update={"batch_size": resolve_batch(spec.explain.cam.batch_size, device.type)}),
        "lime": spec.explain.lime.model_copy(update={"batch_size": resolve_batch(spec.explain.lime.batch_size, device.type)}),
    })
    settings = Settings(explain, spec.seed, device)
    explanations, agreement_rows = [], []
    with progress.stage("explain"):
        for m in models:
            for row in explain_model(m, images, settings, spec.agreement.thresholds, cache, work, progress):
                explanations.append(row["record"])
                agreement_rows.extend(row["agreement"])

    results = {
        "schema_version": SCHEMA_VERSION,
        "run_name": loaded.run_name,
        "title": spec.title,
        "authors": list(spec.authors),
        "spec": spec.model_dump(mode="json"),
        "spec_file": str(loaded.path),
        "methods": [{"id": k, "title": METHOD_TITLES[k]} for k in spec.explain.methods],
        "explain_settings": explain.model_dump(mode="json"),  # with batch sizes resolved for the device
        "models": [_model_record(m) for m in models],
        "images": [_image_record(im) for im in images],
        "explanations": explanations,
        "agreement": {
            "definition": agree.DEFINITION,
            "thresholds": list(spec.agreement.thresholds),
            "rows": agreement_rows,
        },
        "reproducibility": {
            "timing_keys": list(TIMING_KEYS),
            "note": "Two runs of the same spec on the same device give the same results.json except for these keys: "
                    "wall-clock timings, the cache's state, and the findings marked timing: true.",
        },
        "provenance": {
            "started": started,
            "device": device_description(device),
            "device_type": device.type,
            "seed": spec.seed,
            "packages": package_versions(),
            "platform": platform.platform(),
            "weights_sha256": {m.id: m.weights_hash for m in models},
            "images_sha256": manifest_hash(images),
            "cache": {"hits": cache.hits, "computed": cache.misses, "root": str(cache.root)},
        },
    }
    if dissection is not None:
        results["dissection"] = dissection
        results["dissection"]["summary"] = analysis.dissection_summary(results)
    if netdissection is not None:
        results["netdissect"] = netdissection
        results["netdissect"]["agreement"] = analysis.method_agreement(results)
    results["versions"] = analysis.versions_summary(results)
    results["agreement"]["summary"] = analysis.agreement_summary(results)
    results["timings"] = analysis.timing_summary(results)
    results["findings"] = analysis.findings(results)
    results = clean_nan(results)
    _write_agreement_csv(work / "agreement.csv", results["agreement"]["rows"], spec.agreement.thresholds)
    return results


def preflight(loaded: LoadedSpec, device: torch.device, progress: Progress) -> tuple[list[SampleImage], list[LoadedModel]]:
    """Everything a run needs from disk, checked before any work: images decoded, models loaded with their layers,
    probe sets and concept files found. Every problem is reported at once: offline, a user learns about all the
    files to fetch from one run, not one per run."""
    spec = loaded.spec
    problems: list[str] = []
    images: list[SampleImage] = []
    with progress.stage("load images"):
        try:
            images = load_images(spec.images, loaded.base_dir)
            progress.say(f"  {len(images)} images: {', '.join(im.id for im in images)}")
        except UserError as exc:
            problems.append(str(exc))
    models: list[LoadedModel] = []
    with progress.stage("load models"):
        for entry in spec.expanded_models():
            mspec, where = entry.spec, entry.where
            try:
                m = load_model(mspec, loaded.base_dir, where, device)
                m.group, m.version = entry.group, entry.version
                for j, layer in enumerate(mspec.layers):
                    get_layer(m, layer, f"{where.split('.versions')[0]}.layers[{j}]")
            except UserError as exc:
                problems.append(str(exc))
                continue
            progress.say(f"  {m.id}: {m.origin}; target layer {m.target_layer}; weights {m.weights_hash[:12]}")
            models.append(m)
    if spec.dissect is not None:
        from .concepts import load_concepts
        from .probe import check_probe

        try:
            check_probe(spec.dissect.probe, loaded.base_dir)
        except UserError as exc:
            problems.append(str(exc))
        if any(s.kind == "clip" for s in spec.dissect.scorers):
            try:
                load_concepts(spec.dissect.concepts, loaded.base_dir)
            except UserError as exc:
                problems.append(str(exc))
    if spec.netdissect is not None:
        from .pixel_labels import check_pixel_probe

        problems.extend(check_pixel_probe(spec.netdissect, loaded.base_dir))
    if problems:
        raise UserError("\n".join(problems))
    return images, models


def explain_model(m: LoadedModel, images: list[SampleImage], settings: Settings, thresholds: tuple[float, ...],
                  cache: Cache, work: Path, progress: Progress) -> Iterator[dict]:
    """Predictions, every method's map, overlays and LIME-vs-CAM agreement, one image at a time."""
    methods = settings.explain.methods
    crops = np.stack([m.preprocess.crop(im.image) for im in images])
    probs = predict(m, crops, settings.device)
    bad = [im.id for im, p in zip(images, probs) if not np.isfinite(p).all()]
    if bad:
        raise UserError(f"model {m.id}: its outputs are not finite (NaN or infinity) on {', '.join(bad[:5])}; "
                        "its weights or its inputs make it overflow, so nothing can be explained")
    folder = work / "explanations" / m.id
    folder.mkdir(parents=True, exist_ok=True)
    for n, (im, crop, p) in enumerate(zip(images, crops, probs), start=1):
        preds = top_k(p, m.class_names, settings.explain.top_k)
        target = preds[0]["class_index"]
        results: dict[str, dict] = {}
        for method in methods:
            parts = cache_parts(method, m, im.sha256, target, settings)
            value, cached = cache.get_or_compute(
                "explain", parts, lambda method=method: EXPLAINERS[method](m, crop, target, settings)
            )
            value["cached"] = cached
            results[method] = value
        took = ", ".join(
            f"{METHOD_TITLES[k]} {v['seconds']:.1f}s{' (cached)' if v['cached'] else ''}" for k, v in results.items()
        )
        progress.say(f"  {m.id} [{n}/{len(images)}] {im.id}: {preds[0]['class_name']} ({preds[0]['probability']:.2f}); {took}")

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
        overlays.save_input(crop, work / record["original"])
        arrays = {}
        for method, value in results.items():
            rel = f"explanations/{m.id}/{im.id}_{method}.png"
            entry = {"seconds": round(float(value["seconds"]), 4), "cached": value["cached"], "overlay": rel}
            if method == "lime":
                overlays.save_lime(crop, value["mask"], value["segments"], work / rel)
                entry.update(score=value["score"], num_segments=value["num_segments"],
                             mask_pixels=int(value["mask"].sum()))
                arrays["lime_mask"] = value["mask"]
            else:
                overlays.save_cam(crop, value["map"], work / rel)
            arrays[method] = value["map"]
            record["methods"][method] = entry
        arrays["probabilities"] = p.astype(np.float32)  # the full softmax, for diffs between runs
        np.savez_compressed(work / record["maps"], **arrays)

        rows = []
        if "lime" in results:
            for method in (k for k in CAM_METHODS if k in results):
                numbers = agree.compare(results["lime"]["mask"], results[method]["map"], thresholds)
                rows.append({"image": im.id, "model": m.id, "method_a": "lime", "method_b": method, **numbers})
        yield {"record": record, "agreement": rows}


def dissect_models(loaded: LoadedSpec, models: list[LoadedModel], device: torch.device, cache: Cache,
                   progress: Progress) -> dict:
    """CLIP-Dissect every listed layer of every model: one concept score matrix, one activation pass per model."""
    from .activations import activations
    from .dissect import SIMILARITY, label_units
    from .probe import load_probe
    from .scorers import score_concepts

    spec = loaded.spec
    ds = spec.dissect.model_copy(update={"batch_size": resolve_batch(spec.dissect.batch_size, device.type)})
    fn = SIMILARITY[ds.similarity]
    params = dict(ds.similarity_params)
    accepted = set(inspect.signature(fn).parameters) - {"P", "A"}
    if "seed" in accepted:
        params.setdefault("seed", spec.seed)
    for key in params:
        if key not in accepted:
            raise UserError(f"dissect.similarity_params.{key}: unknown parameter of {ds.similarity}; "
                            f"expected one of {', '.join(sorted(accepted))}")
    with progress.stage("load probe set"):
        probe = load_probe(ds.probe, loaded.base_dir, spec.seed)
        progress.say(f"  {len(probe)} probe images: {probe.description}")
    with progress.stage("score concepts"):
        scores = score_concepts(ds, probe, loaded.base_dir, device, cache, progress.say)
    out_models = []
    with progress.stage("dissect"):
        for m in models:
            if not m.spec.layers:
                continue
            acts = activations(m, list(m.spec.layers), probe, ds.pooling, device, ds.batch_size, cache,
                               f"model {m.id}", progress.say)
            layers = []
            for layer, A in acts.items():
                S = fn(scores.matrix, A, **params)
                labels = label_units(S, scores.concepts, scores.scorers)
                layers.append({"layer": layer, "units": A.shape[1], "labels": [
                    {"unit": u.unit, "label": u.label, "similarity": u.similarity, "scorer": u.scorer,
                     "alternatives": [{"label": a, "similarity": v, "scorer": sc} for a, v, sc in u.alternatives]}
                    for u in labels]})
                progress.say(f"  {m.id} {layer}: {A.shape[1]} units, {len({u.label for u in labels})} unique concepts")
            out_models.append({"model": m.id, "layers": layers})
    return {
        "similarity": ds.similarity,
        "similarity_params": params,
        "pooling": ds.pooling,
        "probe": {"description": probe.description, "images": len(probe), "sha256": probe.manifest},
        "scorers": scores.descriptions,
        "concepts": len(scores.concepts),
        "models": out_models,
    }


def netdissect_models(loaded: LoadedSpec, models: list[LoadedModel], device: torch.device, cache: Cache, work: Path,
                      progress: Progress) -> dict:
    """Network Dissection of every listed layer, the rotation test on one layer per model, and unit galleries."""
    from . import netdissect as nd
    from .pixel_labels import load_pixel_probe

    spec = loaded.spec
    ns = spec.netdissect
    settings = nd.Settings(ns.quantile, ns.threshold, ns.iou_threshold, ns.top_images, spec.seed)
    batch_size = resolve_batch(ns.batch_size, device.type)
    with progress.stage("load pixel-labelled probe set"):
        probe = load_pixel_probe(ns, loaded.base_dir, spec.seed)
        progress.say(f"  {len(probe)} images: {probe.description}")
    categories = probe.category_names
    alphas = [a for a in (ns.rotation.alphas if ns.rotation else ()) if a > 0]
    out_models = []
    label_area = None
    with progress.stage("network dissection"):
        for m in models:
            if not m.spec.layers:
                continue
            rotated = (ns.rotation.layer or m.spec.layers[-1]) if ns.rotation else None
            jobs = [(layer, 0.0) for layer in m.spec.layers] + [(rotated, a) for a in alphas]
            keys = {job: {"weights": m.weights_hash, "layer": job[0], "input": m.preprocess.as_dict(),
                          "probe": probe.manifest, "settings": settings.as_dict(), "alpha": job[1],
                          "code_version": nd.CODE_VERSION} for job in jobs}
            done = {job: cache.load("netdissect", stage_key("netdissect", keys[job])) for job in jobs}
            todo = [job for job in jobs if done[job] is None]
            if todo:
                layers = list(dict.fromkeys(layer for layer, _ in todo))
                maps = nd.record_maps(m, layers, probe, device, batch_size, "models", progress.say)
                for layer, alpha in todo:
                    rotation = None
                    if alpha:
                        channels = maps[layer].shape[1]
                        rotation = nd.partial_rotation(nd.random_rotation(channels, spec.seed), alpha)
                    done[(layer, alpha)] = nd.dissect_layer(maps[layer], probe, settings, rotation, device)
                    cache.save("netdissect", stage_key("netdissect", keys[(layer, alpha)]), done[(layer, alpha)])
                    what = f"rotated alpha={alpha:g}" if alpha else "dissected"
                    progress.say(f"  {m.id} {layer}: {what}")
                del maps
            thumbs: dict[int, Image.Image] = {}
            layers_out = []
            counted = {}
            for layer in m.spec.layers:
                result = done[(layer, 0.0)]
                rows = nd.unit_rows(result, probe, ns.iou_threshold)
                _write_gallery(work, m.id, layer, rows, result, probe, thumbs)
                counts = counted[layer] = nd.layer_counts(rows, categories)
                layers_out.append({"layer": layer, "threshold_method": result["threshold_method"], **counts,
                                   "unit_labels": rows})
                progress.say(f"  {m.id} {layer}: {counts['detectors']} detectors, {counts['unique']} unique concepts")
            rotation_out = None
            if rotated:
                points = [counted[rotated]] + [nd.layer_counts(nd.unit_rows(done[(rotated, a)], probe, ns.iou_threshold),
                                                               categories) for a in alphas]
                rotation_out = {"layer": rotated, "seed": spec.seed, "alphas": [0.0] + alphas,
                                "detectors": [p["detectors"] for p in points], "unique": [p["unique"] for p in points],
                                "per_category": [p["per_category"] for p in points]}
            out_models.append({"model": m.id, "layers": layers_out, "rotation": rotation_out})
            label_area = done[(m.spec.layers[0], 0.0)]["label_area"]  # the same for every model and layer
    return {
        "settings": {**settings.as_dict(), "colors": ns.colors, "label_size": ns.label_size,
                     "pdf_units": ns.pdf_units, "rotation": ns.rotation.model_dump() if ns.rotation else None},
        "probe": {"description": probe.description, "images": len(probe), "sha256": probe.manifest,
                  "sources": list(probe.sources), "categories": _category_stats(probe, label_area)},
        "categories": categories,
        "models": out_models,
    }


def _category_stats(probe, label_area) -> list[dict]:
    """Per category: images with labels of it, and concepts that occur at least once."""
    out = []
    for c in probe.category_names:
        ids = [i for i, cat in enumerate(probe.categories) if cat == c]
        present = [i for i in ids if label_area is None or label_area[i] > 0]
        out.append({"category": c, "images": sum(c in item.categories for item in probe.items),
                    "concepts": len(present), "examples": [probe.names[i] for i in present[:8]]})
    return out


def _write_gallery(work: Path, model_id: str, layer: str, rows: list[dict], result: dict, probe,
                   thumbs: dict) -> None:
    """netdissect/<model>/<layer>/unit_<k>.jpg: each unit's top images with its mask; paths go into the rows."""
    folder = work / "netdissect" / model_id / layer
    folder.mkdir(parents=True, exist_ok=True)
    for row, top, maps in zip(rows, result["top_images"], result["top_maps"]):
        images = []
        for i in top:
            if int(i) not in thumbs:
                thumbs[int(i)] = probe.items[int(i)].image().convert("RGB").resize((80, 80), Image.BILINEAR)
            images.append(thumbs[int(i)])
        rel = f"netdissect/{model_id}/{layer}/unit_{row['unit']:04d}.jpg"
        overlays.unit_strip(images, maps, row["threshold"]).save(work / rel, quality=75)
        row["gallery"] = rel
        row["top_images"] = [probe.items[int(i)].id for i in top]


def _write_netdissect_csvs(folder: Path, netdissection: dict) -> None:
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


def _write_dissection_csvs(folder: Path, dissection: dict) -> None:
    """dissection/<model>.csv: CLIP-Dissect's first columns (layer, unit, description, similarity), then more."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in dissection["models"]:
        with open(folder / f"{entry['model']}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer", "unit", "description", "similarity", "alt_1", "alt_1_similarity", "alt_2",
                        "alt_2_similarity", "alt_3", "alt_3_similarity", "scorer"])
            for layer in entry["layers"]:
                for u in layer["labels"]:
                    alts = [x for a in u["alternatives"] for x in (a["label"], f"{a['similarity']:.6g}")]
                    alts += [""] * (6 - len(alts))
                    w.writerow([layer["layer"], u["unit"], u["label"], f"{u['similarity']:.6g}", *alts, u["scorer"]])


def _model_record(m: LoadedModel) -> dict:
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


def _image_record(im: SampleImage) -> dict:
    return {"id": im.id, "source": im.source, "width": im.size[0], "height": im.size[1], "sha256": im.sha256}


def _write_agreement_csv(path: Path, rows: list[dict], thresholds: tuple[float, ...]) -> None:
    columns = ["image", "model", "method_a", "method_b", "iou", *[f"iou@{t:g}" for t in thresholds],
               "lime_pixels", "flat_cam"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
