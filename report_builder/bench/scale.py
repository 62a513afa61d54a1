"""`make bench` scale rows: full-size runs, measured as a user would run them (a subprocess, a fresh cache).

- The assignment-like run (two ResNet18s, layer2-4, CLIP ViT-B-16 over words-20k, 1,000 probe images, 4 methods
  on 4 images: the assignment explains 10, and each costs the same, so 4 keep the bench near half an hour on 2
  cores), with random weights in the real formats: wall time per stage, peak resident memory, and the
  time of the forward (and, for Grad-CAM, backward) passes it needs, measured in the same bench run; the ratio
  of the two is what our code costs beyond the model calls.
- The same run with `--executor ray` on this machine, against the local one, and the number of tasks.
- The size of report.html for a run of 2 models x 896 units (ResNet18 layer2-4), dissected both ways with unit
  galleries: against everything inlined in one file (report.html + units.html), as reports were before.
- Network Dissection on a synthetic Broden-format probe of 1,000 and of 10,000 images: images per second and
  peak resident memory (streaming: the second should not need more memory than the first).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from report_builder.bench.synthetic import write_assignment_checkpoints, write_broden, write_probe_folder

ASSIGNMENT = """
title: "Full-size bench run"
models:
  - {{id: r18_imagenet, source: torchvision, name: resnet18, weights: IMAGENET1K_V1, layers: [layer2, layer3, layer4]}}
  - {{id: r18_places, source: places365, name: resnet18, layers: [layer2, layer3, layer4]}}
images: {{source: samples, limit: {images}}}
explain: {{methods: [gradcam, ablationcam, scorecam, lime], lime: {{num_samples: {samples}}}}}
dissect:
  probe: {{source: folder, path: {probe}}}
  concepts: [{concepts}]
  scorers: [{{kind: clip, model: ViT-B-16, path: {clip}}}]
"""

NETDISSECT = """
title: "Network Dissection bench run"
models:
  - {{id: r18, source: torchvision, name: resnet18, weights: IMAGENET1K_V1, layers: [layer3, layer4]}}
images: {{source: samples, names: [coffee]}}
explain: {{methods: [gradcam]}}
netdissect:
  probe: {{source: broden, path: {broden}}}
  colors: false
  rotation: null
  pdf_units: 2
"""

REPORT_SIZE = """
title: "Report size bench run"
models:
  - {{id: r18_imagenet, source: torchvision, name: resnet18, weights: IMAGENET1K_V1, layers: [layer2, layer3, layer4]}}
  - {{id: r18_places, source: places365, name: resnet18, layers: [layer2, layer3, layer4]}}
images: {{source: samples, names: [chelsea]}}
explain: {{methods: [gradcam]}}
dissect:
  probe: {{source: broden, path: {broden}}}
  scorers: [colors]
netdissect:
  probe: {{source: broden, path: {broden}}}
  rotation: null
"""


def run_measured(args: list[str], env: dict, log: Path) -> tuple[float, int]:
    """Run `python -m report_builder ARGS` as a user would; (wall seconds, peak resident bytes of the process)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "report_builder", *args], env=env, stdout=f, stderr=f)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bench run failed; see {log}:\n{log.read_text()[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def _stages(run: Path) -> dict[str, float]:
    return json.loads((run / "results.json").read_text())["provenance"]["stage_seconds"]


def bare_forwards(n_probe: int, words: list[str], images: int, samples: int) -> tuple[float, dict]:
    """The seconds the full-size run's model calls take alone, from per-call costs measured here at the run's
    batch sizes (8 on a CPU): CLIP images and text, ResNet18 activations, predictions, LIME's and ScoreCAM's
    forward passes, Grad-CAM's forward and backward, AblationCAM's tail passes (its own cost)."""
    import open_clip

    from report_builder.dissection.scorers.clip import encode_texts

    device = torch.device("cpu")
    resnet8, grad = resnet18_call_costs(8, 4)
    clip = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    pixels = torch.randn(8, 3, 224, 224)
    with torch.inference_mode():
        clip_image = _per_call(lambda: clip.encode_image(pixels), 2) / 8
    sample = list(np.random.default_rng(0).choice(words, size=min(2000, len(words)), replace=False))
    start = time.perf_counter()
    encode_texts(clip, tokenizer, sample, device)
    clip_text = (time.perf_counter() - start) / len(sample)
    ablation = _ablation_seconds()
    parts = {
        "CLIP images": n_probe * clip_image,
        "CLIP text": len(words) * clip_text,
        "activations": 2 * n_probe * resnet8,
        "predictions": 2 * images * resnet8,
        "LIME forwards": 2 * images * samples * resnet8,
        "ScoreCAM forwards": 2 * images * 513 * resnet8,
        "Grad-CAM forward+backward": 2 * images * grad,
        "AblationCAM tail passes": 2 * images * ablation,
    }
    return sum(parts.values()), parts


def _per_call(fn, repeats: int) -> float:
    """Seconds per call of fn, after one call to warm it."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def resnet18_call_costs(forward_repeats: int, grad_repeats: int) -> tuple[float, float]:
    """A random ResNet18's forward pass per image in a batch of 8 (channels-last, as the run's), and one image's
    forward and backward (Grad-CAM's), at the current thread count."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        forward = _per_call(lambda: net(x), forward_repeats) / 8
    one = x[:1].clone().requires_grad_(True)
    return forward, _per_call(lambda: net(one)[0, 0].backward(), grad_repeats)


def _ablation_seconds() -> float:
    from report_builder.bench.synthetic import photo, random_model
    from report_builder.explanation.methods import ExplainSettings, ablation_cam
    from report_builder.spec.schema import ExplainSpec

    m = random_model("resnet18", torch.device("cpu"))
    m.target_layer = "layer4"
    crop = photo(m)
    s = ExplainSettings(ExplainSpec(), 0, torch.device("cpu"))
    ablation_cam(m, crop, 0, s)
    start = time.perf_counter()
    ablation_cam(m, crop, 0, s)
    return time.perf_counter() - start


def bench_full_size(out: Path, quick: bool, row) -> list[dict]:
    from report_builder.data.concepts import words_20k

    root = Path(tempfile.mkdtemp(prefix="report_builder-scale-", dir=out)).absolute()
    hub = root / "torch"
    paths = write_assignment_checkpoints(hub / "hub")
    n_probe, images, samples = (60, 2, 100) if quick else (1000, 4, 1000)
    probe = write_probe_folder(root / "probe", n_probe)
    words = words_20k()
    concepts = "words-20k"
    if quick:
        words = words[:500]
        (root / "words.txt").write_text("\n".join(words))
        concepts = str(root / "words.txt")
    spec = root / "full.yaml"
    spec.write_text(ASSIGNMENT.format(images=images, samples=samples, probe=probe, concepts=concepts,
                                      clip=paths["clip"]))
    env = {**os.environ, "TORCH_HOME": str(hub)}
    rows = []
    runs = {}
    for executor in ("local", "ray"):
        print(f"[cpu] full-size run, {executor} executor ...", file=sys.stderr, flush=True)
        run = root / f"run-{executor}"
        wall, peak = run_measured(["-q", "run", str(spec), "--out", str(run), "--cache-dir", str(root / f"cache-{executor}"),
                                   "--executor", executor], env, root / f"{executor}.log")
        runs[executor] = {"wall": wall, "peak": peak, "stages": _stages(run),
                          "tasks": json.loads((run / "results.json").read_text())["provenance"]["tasks"]}
    print("[cpu] bare forward passes of the full-size run ...", file=sys.stderr, flush=True)
    bare, parts = bare_forwards(n_probe, words, images, samples)
    local, ray = runs["local"], runs["ray"]
    size = f"{n_probe} probe images x {len(words)} concepts, 2 ResNet18 x 3 layers, {images} images x 4 methods"
    rows.append(row(f"Full-size run, local: compute vs its bare model calls ({size})", local["stages"]["compute"], bare,
                    "forward/backward passes alone", "overhead <= 1.15", overhead=local["stages"]["compute"] / bare,
                    wall_s=local["wall"], peak_rss_gib=local["peak"] / 2**30, stages=local["stages"],
                    bare_parts=parts, tasks=local["tasks"]))
    rows.append(row(f"Full-size run, --executor ray on this machine ({ray['tasks']} tasks)", ray["stages"]["compute"],
                    local["stages"]["compute"], "the local executor", "ray/local <= 1.2",
                    overhead=ray["stages"]["compute"] / local["stages"]["compute"], wall_s=ray["wall"],
                    baseline_wall_s=local["wall"], peak_rss_gib=ray["peak"] / 2**30, stages=ray["stages"]))
    return rows


def bench_netdissect_scale(out: Path, quick: bool, row) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="report_builder-broden-", dir=out)).absolute()
    hub = root / "torch"
    write_assignment_checkpoints(hub / "hub")
    env = {**os.environ, "TORCH_HOME": str(hub)}
    measured = []
    for n in ((100, 500) if quick else (1000, 10000)):
        print(f"[cpu] Network Dissection, synthetic Broden probe of {n} images ...", file=sys.stderr, flush=True)
        broden = write_broden(root / f"broden-{n}", n)
        spec = root / f"nd-{n}.yaml"
        spec.write_text(NETDISSECT.format(broden=broden))
        run = root / f"run-{n}"
        wall, peak = run_measured(["-q", "run", str(spec), "--out", str(run), "--cache-dir", str(root / f"cache-{n}")],
                                  env, root / f"nd-{n}.log")
        stages = _stages(run)
        seconds = sum(v for k, v in stages.items() if k.startswith("netdissect"))
        measured.append((n, seconds, peak, wall))
    (n1, s1, p1, _), (n2, s2, p2, w2) = measured
    return [row(f"NetDissect, synthetic Broden, {n2} images (ResNet18 layer3+4, 2 passes)", s2, s1 * n2 / n1,
                f"{n1} images' rate x {n2 // n1}", "images/s no lower at 10x",
                images_per_s=n2 / s2, baseline_images_per_s=n1 / s1, peak_rss_gib=p2 / 2**30,
                baseline_peak_rss_gib=p1 / 2**30, wall_s=w2)]


def bench_report_size(out: Path, quick: bool, row) -> list[dict]:
    """report.html of 2 models x 896 units with both dissections and galleries; the baseline is one file holding
    everything (report.html + units.html), as before units.html. The issue's bound is 8 MB."""
    root = Path(tempfile.mkdtemp(prefix="report_builder-size-", dir=out)).absolute()
    hub = root / "torch"
    write_assignment_checkpoints(hub / "hub")
    broden = write_broden(root / "broden", 40 if quick else 100)
    spec = root / "size.yaml"
    spec.write_text(REPORT_SIZE.format(broden=broden))
    print("[cpu] report size, 2 models x 896 units ...", file=sys.stderr, flush=True)
    run = root / "run"
    run_measured(["-q", "run", str(spec), "--out", str(run), "--cache-dir", str(root / "cache")],
                 {**os.environ, "TORCH_HOME": str(hub)}, root / "size.log")
    report, units = ((run / name).stat().st_size / 1e6 for name in ("report.html", "units.html"))
    return [row("report.html, 2 ResNet18 x 896 units, both dissections", report, report + units,
                "report + units.html in one file", "< 8 MB", unit="MB", units_html_mb=units)]


def bench_full_assignment(out: Path, quick: bool, row) -> list[dict]:
    """specs/assignment4.yaml itself, cold, with random weights in the real formats and a synthetic probe folder in
    place of the two things it downloads or reads from disk: every stage (explanations of 10 images, the
    evaluation's deletion, ROAD and chance maps, the sanity check, the concepts) as the spec sets it. Each stage's
    compute seconds (summed over the worker processes, each on one thread) against the same stage's model calls
    timed alone on one thread, counted from the spec: the ratio is what our code costs beyond its passes."""
    import yaml

    from report_builder.data.concepts import words_20k

    root = Path(tempfile.mkdtemp(prefix="report_builder-assignment-", dir=out)).absolute()
    hub = root / "torch"
    paths = write_assignment_checkpoints(hub / "hub")
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "specs" / "assignment4.yaml").read_text())
    n_probe = 60 if quick else raw["dissect"]["probe"]["limit"]
    raw["dissect"]["probe"] = {"source": "folder", "path": str(write_probe_folder(root / "probe", n_probe))}
    raw["dissect"]["scorers"] = [{"kind": "clip", "model": "ViT-B-16", "path": str(paths["clip"])}]
    if quick:  # a smoke test of the row: 2 images, 100 LIME samples, 500 words, a 2-image sanity check
        (root / "words.txt").write_text("\n".join(words_20k()[:500]))
        raw["dissect"]["concepts"] = [str(root / "words.txt")]
        raw["images"]["limit"] = 2
        raw["explain"]["lime"]["num_samples"] = 100
        raw["evaluate"] = {"sanity": {"images": 2, "steps": 2, "seeds": 2}}
    spec = root / "assignment4.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    print("[cpu] the full assignment spec, cold ...", file=sys.stderr, flush=True)
    run = root / "run"
    wall, peak = run_measured(["run", str(spec), "--out", str(run), "--cache-dir", str(root / "cache")],
                              {**os.environ, "TORCH_HOME": str(hub)}, root / "assignment.log")
    results = json.loads((run / "results.json").read_text())
    stages = results["provenance"]["stage_seconds"]
    print("[cpu] the full assignment's model calls alone, one thread ...", file=sys.stderr, flush=True)
    floors, counts = assignment_floors(results, run)
    rows = []
    for stage, floor in floors.items():
        rows.append(row(f"Full assignment, {stage} ({counts[stage]})", stages[stage], floor,
                        "its model calls alone, one thread", "overhead <= 1.2", overhead=stages[stage] / floor))
    rows.append(row("Full assignment, cold, wall clock (2 worker processes x 1 thread)", wall, 1200,
                    "the speed issue's 20 minutes", "<= 1200 s", peak_rss_gib=peak / 2**30, stages=stages,
                    executor=results["provenance"]["executor"]))
    return rows


def assignment_floors(results: dict, run: Path | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """Per stage, the seconds of the model calls it cannot avoid, from per-call costs timed here on one thread (as
    each worker runs), counted from the run's own settings: ResNet18 forward passes in batches of 8 (LIME's samples,
    ScoreCAM's 512 masked images and the intact one, deletion and insertion's steps and each task's baseline, ROAD's
    imputed images), Grad-CAM's forward and backward, AblationCAM's tail, and for the sanity check the explanations
    it makes, less the passes a walk's first step reuses. The evaluation's floor adds ROAD's sparse solves (the
    imputation the metric is made of), timed alone too. Deletion and insertion's passes are counted from the run's
    own maps when its directory `run` is given (a step that cuts a tied group of pixels needs both of the group's
    ends: metrics.deletion_passes), and as steps - 1 per curve, a map without ties, when it is not."""
    from report_builder.evaluation.metrics import LinearImputer, chance_maps
    from report_builder.spec.schema import EvaluateSpec, ExplainSpec

    evaluate = EvaluateSpec.model_validate(results["spec"]["evaluate"])
    explain = ExplainSpec.model_validate(results["spec"]["explain"])
    n_models, n_images = len(results["models"]), len(results["images"])
    methods, samples = list(explain.methods), explain.lime.num_samples
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        forward, grad = resnet18_call_costs(4, 3)
        ablation = _ablation_seconds()
        # ROAD removes the top (MoRF) and the bottom (LeRF) p % of a map's pixels: connected regions, whose sparse
        # systems take longer to solve than scattered pixels do, so a smooth chance map's are timed
        img, smooth = torch.rand(3, 224, 224), chance_maps("random-smooth4", (224, 224), 0, "0" * 64, 1)[0]

        def solve(removed: np.ndarray) -> float:
            return _per_call(lambda: LinearImputer()(img, torch.from_numpy(~removed).float()), 2)

        per_map_solves = sum(solve(smooth >= np.percentile(smooth, 100 - p)) + solve(smooth <= np.percentile(smooth, p))
                             for p in evaluate.road.percentiles)
    finally:
        torch.set_num_threads(threads)
    per_method = {"lime": samples * forward, "scorecam": 513 * forward, "gradcam": grad, "ablationcam": ablation}
    explanation = sum(per_method[m] for m in methods)
    chance = evaluate.chance
    tasks = len(methods) + 1 + len(chance.smooth)  # evaluation tasks per model and image: each method, each chance map
    maps = len(methods) + chance.draws * (1 + len(chance.smooth))  # per model and image; the centre is free
    # deletion's and insertion's steps between their ends (the intact crop comes from the prediction task, the
    # baseline is run once per task), and ROAD's imputed images
    per_map = 2 * (evaluate.deletion.steps - 1) + 2 * len(evaluate.road.percentiles)
    n_maps = n_models * n_images * maps
    passes = n_maps * per_map if run is None else deletion_and_road_passes(results, run, evaluate)
    sanity = evaluate.sanity
    checked = min(sanity.images, n_images)
    walked = min(sanity.walk, checked)
    made = walked * sanity.steps + (checked - walked) + checked * (sanity.seeds - 1)  # per model and method
    # a walk's first step randomises only the output block: LIME and ScoreCAM run that block alone on the inputs
    # their explanation kept (ScoreCAM's one pass for the target layer remains)
    reused = {"lime": 0.0, "scorecam": forward} if sanity.steps >= 2 else {}
    sanity_seconds = sum(made * per_method[m] - (walked * (per_method[m] - reused[m]) if m in reused else 0)
                         for m in methods)
    road_solves = n_maps * per_map_solves
    floors = {"explain": n_models * n_images * explanation,
              "evaluate": (passes + n_models * n_images * tasks) * forward + road_solves,
              "sanity": n_models * sanity_seconds}
    counts = {"explain": f"{n_models} models x {n_images} images x {len(methods)} methods",
              "evaluate": f"{n_maps} maps x {passes / n_maps:.0f} passes, {n_models * n_images * tasks} baselines, and ROAD's "
                          f"{road_solves:.0f} s of sparse solves",
              "sanity": f"{n_models * made * len(methods)} explanations, of which "
                        f"{n_models * walked * len([m for m in methods if m in reused])} run the output block alone"}
    return floors, counts


def deletion_and_road_passes(results: dict, run: Path, evaluate) -> int:
    """The forward passes the run's deletion, insertion and ROAD made over every map each scored (Metric.scores):
    each method's map from the run's explanations, each chance map drawn again from its seed (the map the run
    scored)."""
    from report_builder.evaluation import registry
    from report_builder.evaluation.metrics import chance_maps, deletion_passes

    deletion, road = (next(m for m in registry.METRICS if m.name == name) for name in ("deletion", "road"))
    chances = registry.chance_methods(results["spec"]["evaluate"])
    seed, draws, road_passes = results["spec"]["seed"], evaluate.chance.draws, 2 * len(evaluate.road.percentiles)
    total = 0
    for model in results["models"]:
        for image in results["images"]:
            with np.load(run / "explanations" / model["id"] / f"{image['id']}.npz") as saved:
                maps = [(None, saved[m["id"]]) for m in results["methods"]]
            shape = maps[0][1].shape
            maps += [(registry.chance_kind(c), d) for c in chances
                     for d in chance_maps(c, shape, seed, image["sha256"], draws)]
            total += sum((deletion_passes(m, evaluate.deletion.steps) if deletion.scores(kind) else 0)
                         + (road_passes if road.scores(kind) else 0) for kind, m in maps)
    return total
