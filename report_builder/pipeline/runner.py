"""Runner: reads a spec, builds the graph of tasks, hands it to an executor, writes the run directory.

It holds no algorithm of its own. Before any work, `preflight` loads and checks every input (images,
models and their layers, scorers, concept files, probe sets) and reports every problem at once. Then
`build_graph` turns the spec into tasks (see tasks.py): a prediction per model x image, an explanation
per model x image x method, concept scores per scorer x probe shard, activations per model x probe shard,
CLIP-Dissect per model x layer, and Network Dissection per model, sharded over the probe images and
merged, with a result per layer (and per rotation). An executor evaluates it; `collect` turns the values
into results.json and the run directory's files; the renderer writes the report last. The run directory
is written under a temporary name and moved into place only when whole.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from report_builder.dissection import activations
from report_builder.pipeline import collect
from report_builder.dissection import clip_dissect as dissect
from report_builder.dissection import direction_fits
from report_builder.dissection import quality
from report_builder.evaluation import metrics as evaluate
from report_builder.evaluation import registry as metric_registry
from report_builder.explanation import concepts as concept_attribution
from report_builder.explanation import methods as explain
from report_builder.dissection import netdissect
from report_builder.dissection.directions import DIRECTIONS
from report_builder.dissection.scorers import SCORERS, ScorerPlan, concept_scores_task, described, text_hash
from report_builder.pipeline.cache import Cache
from report_builder.data.images import SampleImage, load_images
from report_builder.errors import UserError
from report_builder.files import atomic_dir, atomic_write, check_cache_apart, check_output, write_json
from report_builder.data.probe import ProbeSet, pixels_task
from report_builder.pipeline.progress import Progress
from report_builder.explanation.registry import CAM_NAMES, METHODS, TITLES
from report_builder.spec.schema import LoadedSpec, resolve_batch
from report_builder.pipeline.tasks import Graph
from report_builder.pipeline.workers import executor_for
from report_builder.models.zoo import LoadedModel, check_code, default_target_layer, get_layer, load_model, remember

PACKAGES = ("report_builder", "torch", "torchvision", "timm", "grad-cam", "lime", "numpy", "scikit-image",
            "scikit-learn", "matplotlib", "jinja2", "weasyprint", "pillow", "pydantic", "pyyaml", "ray")
SHARD_IMAGES = 500  # probe images per task of the sharded stages: enough work per task, bounded memory
MERGE_FANIN = 4  # shard results merged this many at a time, so no merge holds every shard at once


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


# ---------------------------------------------------------------- preflight


@dataclass
class Inputs:
    """Everything a run reads, loaded and checked."""

    images: list[SampleImage]
    models: list[LoadedModel]
    probe: ProbeSet | None = None
    scorers: list[ScorerPlan] = field(default_factory=list)
    pixel_probe: object | None = None


def preflight(loaded: LoadedSpec, device: torch.device, progress: Progress, allow_code: bool = False,
              allow_code_from: Sequence[Path] = ()) -> Inputs:
    """Everything a run needs from disk, checked before any work: images decoded, models loaded with their layers,
    scorers loaded, concept files read, probe sets listed and hashed. Every problem is reported at once: offline,
    a user learns about all the files to fetch from one run, not one per run. First of all, before anything is
    imported, the Python code the spec names is announced and refused unless allowed (`check_code`)."""
    spec = loaded.spec
    check_code(spec, loaded.path.absolute().parent, allow_code, allow_code_from)
    problems: list[str] = []

    def attempt(fn, *args):
        try:
            return fn(*args)
        except UserError as exc:
            problems.append(str(exc))
            return None

    with progress.stage("load images"):
        images = attempt(load_images, spec.images) or []
        if images:
            progress.say(f"  {len(images)} images: {', '.join(im.id for im in images)}")
    models: list[LoadedModel] = []
    with progress.stage("load models"):
        for entry in spec.expanded_models():
            m = attempt(_load_model, entry, device)
            if m is not None:
                progress.say(f"  {m.id}: {m.origin}; target layer {m.target_layer}; weights {m.weights_hash[:12]}")
                models.append(m)
    for m in models:
        problems.extend(_target_problems(spec, m, device))
        problems.extend(_layer_problems(spec, m))
    inputs = Inputs(images, models)
    if spec.dissect is not None:
        from report_builder.data.probe import check_probe, load_probe

        with progress.stage("load scorers"):
            inputs.scorers = [s for i, sc in enumerate(spec.dissect.scorers)
                              if (s := attempt(_scorer_plan, spec, sc, i, device)) is not None]
        with progress.stage("load probe set"):
            before = len(problems)
            attempt(check_probe, spec.dissect.probe)
            if len(problems) == before == 0:  # hashing a big probe set is only worth it when the run can start
                inputs.probe = attempt(load_probe, spec.dissect.probe, spec.seed)
            if inputs.probe is not None:
                progress.say(f"  {len(inputs.probe)} probe images: {inputs.probe.description}")
    if spec.netdissect is not None:
        from report_builder.data.pixel_labels import check_pixel_probe, load_pixel_probe

        with progress.stage("load pixel-labelled probe set"):
            missing = check_pixel_probe(spec.netdissect)
            problems.extend(missing)
            if not missing and not problems:
                inputs.pixel_probe = attempt(load_pixel_probe, spec.netdissect, spec.seed)
            if inputs.pixel_probe is not None:
                progress.say(f"  {len(inputs.pixel_probe)} images: {inputs.pixel_probe.description}")
    if problems:
        raise UserError("\n".join(problems))
    return inputs


def _load_model(entry, device: torch.device) -> LoadedModel:
    m = load_model(entry.spec, entry.where, device)
    m.group, m.version = entry.group, entry.version
    for j, layer in enumerate(entry.spec.layers):
        get_layer(m, layer, f"{entry.where.split('.versions')[0]}.layers[{j}]")
    remember(m, device)
    return m


def _target_problems(spec, m: LoadedModel, device: torch.device) -> list[str]:
    """The CAM methods read a map off the target layer: one whose output is N x C (a classifier head, a layer after
    the pooling: the last nn.Linear of a ViT or a Swin) has none, so a run would fail on it."""
    cams = [k for k in spec.explain.methods if k in CAM_NAMES]
    if not cams or m.layout(m.target_layer).kind != "flat":
        return []
    try:
        suggestion = default_target_layer(m.module, m.preprocess.input_size, device)
    except UserError:
        suggestion = None
    return [f"{m.where.split('.versions')[0]}.target_layer: found {m.target_layer!r}, whose output in {m.id} is "
            f"N x C with no spatial map (the classifier head, or a layer after the pooling); the CAM methods "
            f"({', '.join(cams)}) need a feature layer with a map" + (f", e.g. {suggestion!r} (the default)" if suggestion else " before the pooling")]


def _layer_problems(spec, m: LoadedModel) -> list[str]:
    """What the dissections ask of each listed layer's output (its layout, measured when the model loaded): a
    class token for pooling 'cls', a spatial map for Network Dissection."""
    out = []
    for j, layer in enumerate(m.spec.layers):
        where, layout = f"{m.where.split('.versions')[0]}.layers[{j}]", m.layout(layer)
        if spec.dissect is not None and spec.dissect.pooling == "cls" and not (layout.kind == "tokens" and layout.prefix):
            out.append(f"dissect.pooling: found 'cls', but {where} ({layer}) of {m.id} has no class token; 'cls' "
                       "needs a ViT block's tokens: use 'avg' or 'max'")
        if spec.netdissect is not None and layout.kind == "flat":
            out.append(f"{where}: found {layer}, whose output of {m.id} has no spatial map (N x C); Network "
                       "Dissection needs a layer before the pooling")
    return out


def _scorer_plan(spec, scorer, i: int, device: torch.device) -> ScorerPlan:
    """The scorer's kind loads and checks what it reads (dissection/scorers/<kind>.py)."""
    return SCORERS[scorer.kind].plan(spec, scorer, f"dissect.scorers[{i}]", device)


# ---------------------------------------------------------------- the graph


@dataclass
class Plan:
    graph: Graph
    predict: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, image) -> key
    explain: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (model, image, method) -> key
    dissect: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, layer) -> key
    quality: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, layer) -> key: held-out, stability
    label_sanity: list[str] = field(default_factory=list)  # the labeller's sanity checks on planted units (0 or 1)
    netdissect: dict[tuple[str, str, float | str], str] = field(default_factory=dict)  # (model, layer, alpha|method)
    directions: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (model, layer, method) -> fit key
    direction_labels: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (model, layer, method) -> key
    evaluation: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (model, image, method|random) -> key
    sanity: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (model, image, method) -> key
    sweep: dict[tuple[str, str, int], str] = field(default_factory=dict)  # (model, image, setting) -> key
    concepts: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, image) -> key: concept attribution
    sweep_settings: list = field(default_factory=list)  # the LIME settings the sweep tries, in order
    not_applicable: list[dict] = field(default_factory=list)  # {model, method, reason}: methods a model cannot take

    @property
    def wanted(self) -> list[str]:
        return [*self.dissect.values(), *self.quality.values(), *self.label_sanity, *self.directions.values(),
                *self.direction_labels.values(), *self.netdissect.values(), *self.predict.values(), *self.explain.values(),
                *self.evaluation.values(), *self.sanity.values(), *self.sweep.values(), *self.concepts.values()]


def build_graph(loaded: LoadedSpec, inputs: Inputs, device: torch.device, shard_images: int | None = None) -> Plan:
    """The spec as tasks over plain data (see the module docstring)."""
    spec = loaded.spec
    shard_images = shard_images or SHARD_IMAGES
    plan = Plan(Graph())
    dev = device.type
    if spec.dissect is not None:
        _dissect_tasks(plan, spec, inputs, dev, shard_images)
    if spec.netdissect is not None:
        _netdissect_tasks(plan, spec, inputs, dev, shard_images)
    _explain_tasks(plan, spec, inputs, device)
    return plan


def _explain_tasks(plan: Plan, spec, inputs: Inputs, device: torch.device) -> None:
    g, dev = plan.graph, device.type
    settings = explain.ExplainSettings(spec.explain.for_device(dev), spec.seed, device)
    sweep = settings.explain.lime.sweep
    plan.sweep_settings = sweep.combinations(settings.explain.lime) if sweep else []
    for m in inputs.models:
        skipped = {method: reason for method in spec.explain.methods if (reason := explain.not_applicable(method, m))}
        plan.not_applicable.extend({"model": m.id, "method": k, "reason": v} for k, v in skipped.items())
        methods = [k for k in spec.explain.methods if k not in skipped]
        for i, im in enumerate(inputs.images):
            crop = m.preprocess.crop(im.image)
            pk = g.add("predict", explain.predict_task, f"predict {m.id} {im.id}",
                       {"weights": m.weights_hash, "preprocess": m.preprocess.as_dict(), "image": im.sha256,
                        "device": dev, "code_version": explain.CODE_VERSION},
                       {"model": m.ref, "crops": crop[None], "device": dev}, model=True, shape=np.ndarray)
            plan.predict[(m.id, im.id)] = pk
            walks = sanity_walks(spec.evaluate, i)
            for method in methods:
                plan.explain[(m.id, im.id, method)] = _explain_key(
                    g, m, im, crop, pk, settings, method, keep_head_inputs=walks and METHODS[method].output_passes)
            if spec.evaluate is not None:
                _evaluate_tasks(plan, spec, m, i, im, crop, pk, settings, methods)
            if concept_layers(spec, m):
                plan.concepts[(m.id, im.id)] = _concept_key(g, spec, m, im, crop, pk, dev)
            # every setting of the sweep is compared with the one Grad-CAM map of the image
            gradcam = _explain_key(g, m, im, crop, pk, settings, "gradcam") if plan.sweep_settings else None
            for k, lime in enumerate(plan.sweep_settings):
                plan.sweep[(m.id, im.id, k)] = g.add(
                    "lime-sweep", evaluate.sweep_task, f"LIME sweep {m.id} {im.id} setting {k + 1}",
                    {"lime": lime.model_dump(mode="json", exclude={"sweep"}), "seed": spec.seed,
                     "code_version": [evaluate.CODE_VERSION, explain.CODE_VERSION]},
                    {"model": m.ref, "crop": crop, "lime": lime, "explain": settings.explain, "seed": spec.seed,
                     "device": dev}, {"gradcam": gradcam}, model=True, shape={"iou": (float, type(None)), "seconds": float})


def sanity_walks(evaluate, i: int) -> bool:
    """Whether the sanity check of image i walks every step: one of the first `sanity.walk` checked images."""
    return evaluate is not None and evaluate.sanity is not None and i < min(evaluate.sanity.images,
                                                                          evaluate.sanity.walk)


def concept_layers(spec, m) -> list[str]:
    """The layers of `m` whose units concept attribution weighs: the dissected ones `concepts.layers` names (all
    by default); none without `concepts:` or without a dissection."""
    if spec.concepts is None or (spec.dissect is None and spec.netdissect is None):
        return []
    return [x for x in m.spec.layers if spec.concepts.layers is None or x in spec.concepts.layers]


def _concept_key(g: Graph, spec, m, im, crop, pk: str, dev: str) -> str:
    """Concept attribution of the top-1 class on one image, every concept layer from one backward pass."""
    layers = concept_layers(spec, m)
    settings = spec.concepts.model_dump(mode="json", exclude={"layers"})
    return g.add("concepts", concept_attribution.concept_task, f"concepts {m.id} {im.id}",
                 {"weights": m.weights_hash, "preprocess": m.preprocess.as_dict(), "image": im.sha256, "layers": layers,
                  "settings": settings, "seed": spec.seed, "device": dev,
                  "code_version": concept_attribution.CODE_VERSION},
                 {"model": m.ref, "crop": crop, "layers": layers, "settings": settings, "seed": spec.seed,
                  "device": dev}, {"predictions": pk}, model=True, shape=concept_attribution.RESULT_SHAPE)


def _explain_key(g: Graph, m, im, crop, pk: str, settings, method: str, keep_head_inputs: bool = False) -> str:
    """The key of an explanation task (added if the spec did not ask for the method: the sweep needs Grad-CAM);
    `keep_head_inputs` for an image whose sanity check walks (models.blocks.keeping_head_inputs)."""
    identity = explain.identity(method, m, im.sha256, settings)
    return g.add("explain", explain.explain_task, f"explain {m.id} {im.id} {TITLES[method]}",
                 {**identity, "keep_head_inputs": True} if keep_head_inputs else identity,
                 {"model": m.ref, "crop": crop, "index": 0, "method": method, "explain": settings.explain,
                  "seed": settings.seed, "device": settings.device.type, "keep_head_inputs": keep_head_inputs},
                 {"predictions": pk}, model=True, shape=explain.RESULT_SHAPE)


def _evaluate_tasks(plan: Plan, spec, m, i: int, im, crop, pk: str, settings, methods: list[str]) -> None:
    """Faithfulness and localisation of every method's map (and of each chance map); the sanity check on the first
    `sanity.images` images."""
    g, ev, dev = plan.graph, spec.evaluate, settings.device.type
    ident = {"evaluate": ev.model_dump(mode="json", exclude={"sanity", "chance"}), "seed": spec.seed,
             "objects": im.objects.sha256 if im.objects else None, "code_version": evaluate.CODE_VERSION}
    args = {"model": m.ref, "crop": crop, "objects": im.objects, "evaluate": ev, "seed": spec.seed, "device": dev,
            "image_sha": im.sha256}
    for method in methods:
        plan.evaluation[(m.id, im.id, method)] = g.add(
            "evaluate", evaluate.evaluate_task, f"evaluate {m.id} {im.id} {TITLES[method]}", ident, args,
            {"predictions": pk, "explanation": plan.explain[(m.id, im.id, method)]}, model=True,
            shape=evaluate.RESULT_SHAPE)
        if ev.sanity is not None and i < ev.sanity.images:
            walk = sanity_walks(ev, i)  # the others make the last step only (its map is the same as a walk's)
            plan.sanity[(m.id, im.id, method)] = g.add(
                "sanity", evaluate.sanity_task, f"sanity {m.id} {im.id} {TITLES[method]}",
                {"sanity": ev.sanity.model_dump(mode="json", exclude={"images", "walk"}), "walk": walk,
                 "code_version": evaluate.CODE_VERSION},
                {"model": m.ref, "crop": crop, "method": method, "explain": settings.explain, "evaluate": ev,
                 "seed": spec.seed, "device": dev, "walk": walk}, {"explanation": plan.explain[(m.id, im.id, method)]},
                model=True, shape=evaluate.SANITY_SHAPE)
    for chance in metric_registry.chance_methods(ev.model_dump(mode="json")):  # the chance maps, each with its draws
        plan.evaluation[(m.id, im.id, chance)] = g.add(
            "evaluate", evaluate.evaluate_task, f"evaluate {m.id} {im.id} {metric_registry.chance_title(chance)}",
            {**ident, "random": True if chance == "random" else chance, "chance": ev.chance.model_dump(mode="json")},
            {**args, "chance": chance},
            {"predictions": pk}, model=True, shape=evaluate.RESULT_SHAPE)


def whole_batches(images: int, batch: int) -> int:
    """A shard size that is a whole number of batches: every image then goes through the model in the same
    batch, beside the same images, as without shards, so the floating-point results are the same too."""
    return max(1, -(-images // batch)) * batch


def _reduce(g: Graph, stage: str, fn, keys: list[str], label: str, args: dict | None = None) -> str:
    """Merge shard results MERGE_FANIN at a time, in order, until one is left."""
    level = 0
    while len(keys) > 1:
        keys = [g.add(stage, fn, f"{label} merge {level}.{i // MERGE_FANIN}", {"level": level}, args,
                      {"parts": keys[i : i + MERGE_FANIN]}, cache=False)
                for i in range(0, len(keys), MERGE_FANIN)]
        level += 1
    return keys[0]


def _dissect_tasks(plan: Plan, spec, inputs: Inputs, dev: str, shard_images: int) -> None:
    g = plan.graph
    ds = spec.dissect
    batch = resolve_batch(ds.batch_size, dev)
    shards = inputs.probe.shards(whole_batches(shard_images, batch))
    dissected = [m for m in inputs.models if m.spec.layers]
    # One task per shard decodes its images once, cut for every reader (transient: decoding is redone rather
    # than stored). Its key is the shard's content alone, so a reader's cache key does not change with the others.
    views = [sc.view for sc in inputs.scorers] + [m.preprocess for m in dissected]
    pixel_keys = [g.add("probe-pixels", pixels_task, f"decoding probe images {j}", {"probe": s.manifest},
                        {"crops": views},
                        {"probe": g.value("probe", f"probe images {j}", {"probe": s.manifest}, s)}, cache=False)
                  for j, s in enumerate(shards)]
    parts: dict[str, str | list[str]] = {}
    scorers: list[dict] = []
    for i, sc in enumerate(inputs.scorers):  # each kind adds its tasks (dissection/scorers/<kind>.py)
        own = SCORERS[sc.kind].tasks(g, sc, shards, pixel_keys, dev, batch)
        parts.update({f"{name}_{i}": key for name, key in own.items()})
        scorers.append(described(sc, list(own)))
    scores = g.add("concept-scores", concept_scores_task, "concept scores",
                   {"scorers": [(d["kind"], d["label"], text_hash(d["concepts"])) for d in scorers]},
                   {"scorers": scorers}, parts, cache=False)
    params = dissect.similarity_params(spec.dissect, spec.seed)
    qs = {**ds.quality.model_dump(mode="json"), "seed": spec.seed} if ds.quality is not None else None
    for m in dissected:
        layers = list(m.spec.layers)
        acts = [g.add("activations", activations.activations_task, f"activations {m.id} {j}",
                      activations.identity(m, layers, s, ds.pooling),
                      {"model": m.ref, "layers": layers, "pooling": ds.pooling, "device": dev, "batch_size": batch},
                      {"pixels": pk}, model=True, shape=dict)
                for j, (s, pk) in enumerate(zip(shards, pixel_keys))]
        for layer in layers:
            plan.dissect[(m.id, layer)] = g.add(
                "clip-dissect", dissect.clip_dissect_task, f"CLIP-Dissect {m.id} {layer}",
                {"layer": layer, "similarity": ds.similarity, "params": params, "code_version": dissect.CODE_VERSION},
                {"layer": layer, "similarity": ds.similarity, "params": params},
                {"scores": scores, "activations": acts}, shape=dissect.RESULT_SHAPE)
            if ds.quality is not None:  # the same activations and concept scores again: no forward pass of its own
                plan.quality[(m.id, layer)] = g.add(
                    "label-quality", quality.quality_task, f"label quality {m.id} {layer}",
                    {"layer": layer, "similarity": ds.similarity, "params": params, "settings": qs,
                     "code_version": quality.CODE_VERSION},
                    {"layer": layer, "similarity": ds.similarity, "params": params, "settings": qs},
                    {"scores": scores, "activations": acts}, shape=quality.QUALITY_SHAPE)
        if ds.directions is not None:
            _direction_tasks(plan, spec, m, acts, scores, params)
    if ds.quality is not None and dissected:
        plan.label_sanity.append(g.add(
            "label-sanity", quality.sanity_task, "label sanity checks",
            {"similarity": ds.similarity, "params": params, "settings": qs, "code_version": quality.CODE_VERSION},
            {"similarity": ds.similarity, "params": params, "settings": qs}, {"scores": scores},
            shape=quality.SANITY_SHAPE))


def direction_layers(spec, m) -> list[str]:
    """The layers of model m whose learned directions are fitted: those the spec lists, else its last listed one."""
    d = spec.dissect.directions if spec.dissect is not None else None
    if d is None or not m.spec.layers:
        return []
    return list(d.layers or m.spec.layers[-1:])


def _direction_tasks(plan: Plan, spec, m, acts: list[str], scores: str, params: dict) -> None:
    """Per layer and method, a fit on the activation shards the units' labels read (no forward pass of its own),
    then its directions labelled like units: the same concept scores, similarity function and parameters."""
    g, d = plan.graph, spec.dissect.directions
    for layer in direction_layers(spec, m):
        for method in d.methods:
            settings = d.settings(method)
            fit = plan.directions[(m.id, layer, method)] = g.add(
                "direction-fit", direction_fits.fit_task, f"{DIRECTIONS[method].title} {m.id} {layer}",
                {"layer": layer, "method": method, "components": d.components, "settings": settings,
                 "seed": spec.seed, "code_version": direction_fits.CODE_VERSION},
                {"layer": layer, "method": method, "components": d.components, "seed": spec.seed,
                 "settings": settings}, {"activations": acts}, shape=direction_fits.FIT_SHAPE)
            plan.direction_labels[(m.id, layer, method)] = g.add(
                "direction-labels", direction_fits.label_task, f"labels of {DIRECTIONS[method].title} {m.id} {layer}",
                {"similarity": spec.dissect.similarity, "params": params, "code_version": dissect.CODE_VERSION},
                {"similarity": spec.dissect.similarity, "params": params},
                {"fit": fit, "scores": scores, "activations": acts}, shape=direction_fits.LABEL_SHAPE)


def _netdissect_tasks(plan: Plan, spec, inputs: Inputs, dev: str, shard_images: int) -> None:
    g = plan.graph
    ns = spec.netdissect
    probe = inputs.pixel_probe
    settings = netdissect.NetDissectSettings(ns.quantile, ns.threshold, ns.iou_threshold, ns.top_images, spec.seed)
    batch = resolve_batch(ns.batch_size, dev)
    shards = probe.shards(whole_batches(shard_images, batch))
    firsts = [sum(len(s) for s in shards[:i]) for i in range(len(shards))]
    probe_keys = [g.value("pixel-probe", f"labelled images {i}", {"probe": s.manifest, "first": f}, s)
                  for i, (s, f) in enumerate(zip(shards, firsts))]
    alphas = [a for a in (ns.rotation.alphas if ns.rotation else ()) if a > 0]
    label_category = netdissect.label_categories(probe)
    for m in inputs.models:
        if not m.spec.layers:
            continue
        rotated = (ns.rotation.layer or m.spec.layers[-1]) if ns.rotation else None
        # the learned directions' maps are the layer's maps projected by each fit: jobs of the same passes
        learned = [(layer, method) for (mid, layer, method) in plan.directions if mid == m.id]
        jobs = [(layer, 0.0) for layer in m.spec.layers] + [(rotated, a) for a in alphas] + learned
        fits = {"directions": [plan.directions[(m.id, *job)] for job in learned]} if learned else {}
        ident = {"weights": m.weights_hash, "jobs": jobs, "preprocess": m.preprocess.as_dict(),
                 "settings": settings.as_dict(), "labels": probe.manifest, "code_version": netdissect.CODE_VERSION}
        common = {"model": m.ref, "jobs": jobs, "settings": settings, "device": dev, "batch_size": batch}
        if len(shards) == 1:  # one task, one forward pass over the probe set (the maps fit in memory)
            both = g.add("netdissect-passes", netdissect.whole_probe_task, f"NetDissect {m.id}",
                         {**ident, "shard": probe.manifest}, common, {"probe": probe_keys[0], **fits}, model=True,
                         shape=dict)
            finish_deps = {"both": both}
        else:
            finish_deps = _netdissect_shards(g, m, ident, common, shards, firsts, probe_keys, len(probe), ns.top_images,
                                             fits)
        for layer, basis in jobs:
            name = netdissect.job_name(layer, basis)
            plan.netdissect[(m.id, layer, basis)] = g.add(
                "netdissect", netdissect.finish_task, f"NetDissect {m.id} {layer}" + netdissect.job_title(basis),
                {"job": name, "code_version": netdissect.CODE_VERSION},
                {"name": name, "probe_names": probe.names, "label_category": label_category},
                finish_deps, shape=netdissect.RESULT_SHAPE)


def _netdissect_shards(g: Graph, m, ident: dict, common: dict, shards, firsts, probe_keys, total: int,
                       top: int, fits: dict) -> dict:
    """Two passes over the probe shards: thresholds (merged), then the tallies (merged)."""
    pass1 = [g.add("netdissect-thresholds", netdissect.shard_thresholds_task, f"NetDissect {m.id} pass 1, {i}",
                   {**ident, "shard": s.manifest, "first": f, "total": total},
                   {**common, "first_image": f, "total_images": total}, {"probe": pk, **fits}, cache=False, model=True)
             for i, (s, f, pk) in enumerate(zip(shards, firsts, probe_keys))]
    merged = _reduce(g, "netdissect-thresholds", netdissect.merge_thresholds_task, pass1, f"NetDissect {m.id}")
    thresholds = g.add("netdissect-thresholds", netdissect.thresholds_task, f"NetDissect {m.id} thresholds",
                       {"code_version": netdissect.CODE_VERSION}, {}, {"states": merged}, shape=dict)
    pass2 = [g.add("netdissect-tally", netdissect.shard_tally_task, f"NetDissect {m.id} pass 2, {i}",
                   {**ident, "shard": s.manifest, "first": f}, {**common, "first_image": f},
                   {"probe": pk, "thresholds": thresholds, **fits}, model=True, shape=dict)
             for i, (s, f, pk) in enumerate(zip(shards, firsts, probe_keys))]
    tally = _reduce(g, "netdissect-tally", netdissect.merge_tally_task, pass2, f"NetDissect {m.id}", {"top": top})
    return {"tally_": tally, "thresholds": thresholds}


# ---------------------------------------------------------------- the run


def run(loaded: LoadedSpec, out_dir: Path, cache: Cache | None = None, progress: Progress | None = None,
        executor: str = "local", ray_address: str | None = None, allow_code: bool = False,
        allow_code_from: Sequence[Path] = (), workers: int | str = 1, pdf: bool = True) -> Path:
    """Run a spec end to end; return the finished run directory. The Python code a spec names runs only when
    allowed (see `preflight`). With `pdf` false, the report is report.html only (no report.pdf)."""
    from report_builder.report.render import render_run

    progress = progress or Progress()
    cache = cache or Cache()
    cache.warn_to = lambda text: progress.say(f"warning: {text}")
    out_dir = Path(out_dir)
    check_output(out_dir, "run")  # before any work: a folder that is not ours is refused at once
    if cache.enabled:
        check_cache_apart(cache.root, out_dir)
    cache.remove_stale_temporaries()
    spec = loaded.spec
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    device = pick_device(spec.device)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    progress.say(f"spec {loaded.path} -> {out_dir} on {device_description(device)}")
    inputs = preflight(loaded, device, progress, allow_code, allow_code_from)
    plan = build_graph(loaded, inputs, device)
    if workers == "auto":
        from report_builder.pipeline.workers import auto_workers

        workers = auto_workers(device.type, torch.get_num_threads()) if executor == "local" else 1
    with executor_for(executor, ray_address, gpu=device.type == "cuda", workers=int(workers)) as ex:
        where = ex.describe()
        progress.say(f"{len(plan.graph.tasks)} tasks, executor {where}")
        with progress.stage("compute"):
            outcome = ex.run(plan.graph, plan.wanted, cache, progress)
    drawn = cache if cache.enabled else None  # where galleries and figures drawn before are kept
    with atomic_dir(out_dir, "run", first="results.json") as work:
        with progress.stage("write results"):
            results = collect.results(loaded, inputs, plan, outcome, work, progress, device.type, where, ex.shares,
                                      drawn)
        results["provenance"].update(started=started, device=device_description(device), device_type=device.type,
                                     packages=package_versions(), platform=platform.platform(),
                                     cache={"hits": cache.hits, "computed": cache.misses, "root": str(cache.root),
                                            "tasks_computed": len(outcome.computed)})
        results["provenance"]["stage_seconds"] = {k: round(v, 3) for k, v in
                                                  {**progress.durations, **outcome.seconds}.items()}
        if spec.checks:  # before rendering: the report opens with them
            from report_builder.report import checks

            results["checks"] = checks.evaluate([c.model_dump() for c in spec.checks], checks.CheckSource(results, work))
            atomic_write(work / checks.CHECKS_XML, checks.junit(results["checks"]))
        with progress.stage("render report"):
            render_run(work, results, pdf=pdf, cache=drawn)
        # The report shows the compute stages; results.json also keeps the rendering time.
        results["provenance"]["stage_seconds"]["render report"] = round(progress.durations["render report"], 3)
        results["provenance"]["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_json(work / "results.json", results)
    progress.say(f"wrote {out_dir}/report.html{' and report.pdf' if pdf else ''} "
                 f"(cache: {cache.hits} hits, {cache.misses} computed)")
    return out_dir
