"""`make bench`: each optimised stage timed side by side with its baseline, in one run, on this machine.

Models have random weights (they cost the same as trained ones), so nothing is downloaded. Each row
gives our time, the baseline's, their ratio and, where it applies, how far the results differ.
Prints a table and writes output/bench/bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from report_builder.pipeline.cache import Cache
from report_builder.explanation.methods import (PACKAGE_CAMS, ExplainSettings, ablation_cam, forget_lime_segments,
                                                lime_explain, lime_package_explain, score_cam)
from report_builder.models.outputs import class_probabilities
from report_builder.spec.schema import CamSpec, ExplainSpec, LimeSpec, resolve_batch
from report_builder.bench.synthetic import photo, random_model
from report_builder.models.onednn import default_paths
from report_builder.models.zoo import LoadedModel


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def side_by_side(ours: Callable[[], object], base: Callable[[], object], device: torch.device, repeats: int):
    """Alternate ours and the baseline `repeats` times after one warm-up each; medians and the last results."""
    ours(), base()
    t_ours, t_base = [], []
    for _ in range(repeats):
        t, r_ours = timed(ours, device)
        t_ours.append(t)
        t, r_base = timed(base, device)
        t_base.append(t)
    return statistics.median(t_ours), statistics.median(t_base), r_ours, r_base


def row(item: str, ours: float, base: float, baseline: str, target: str = "", **extra) -> dict:
    return {"item": item, "ours_s": ours, "baseline_s": base, "baseline": baseline,
            "ratio": base / ours if ours > 0 else None, "target": target, **extra}


# ---------------------------------------------------------------- the items


def bench_lime(device: torch.device, samples: int) -> list[dict]:
    m = random_model("resnet18", device)
    crop = photo(m)
    s = ExplainSettings(ExplainSpec(lime=LimeSpec(num_samples=samples)), 0, device)  # our defaults
    batch = resolve_batch("auto", device.type)
    def fresh():  # a user's first call on the crop: segmented, not handed a segmentation made before
        forget_lime_segments()
        return lime_explain(m, crop, 0, s)

    t_ours, t_lime, ours, ref = side_by_side(fresh,
                                             lambda: lime_package_explain(m, crop, 0, s, batch_size=10), device, 1)
    images = np.repeat(crop[None], batch, axis=0)

    def bare():
        for _ in range(0, samples, batch):
            class_probabilities(m, images, device, batch_size=batch)

    t_bare, _ = timed(bare, device)
    same = bool(np.array_equal(ours["mask"], ref["mask"]))
    return [row(f"LIME, {samples} samples, ResNet18 (batch {batch})", t_ours, t_lime, "lime package, batch_size 10",
                "faster", masks_equal=same),
            row(f"LIME overhead: ours vs {samples} bare forward passes (batch {batch})", t_ours, t_bare,
                "forward passes only", "ours/bare <= 1.1", overhead=t_ours / t_bare)]


def explained(name: str, layer: str, device: torch.device) -> tuple[LoadedModel, np.ndarray, int]:
    """A model with `layer` as its target, the sample photo cropped for it, and its top-1 class there."""
    m = random_model(name, device)
    m.target_layer = layer
    crop = photo(m)
    return m, crop, int(class_probabilities(m, crop[None], device)[0].argmax())


def bench_ablation(device: torch.device) -> list[dict]:
    out = []
    for name, layer in (("resnet18", "layer4"), ("efficientnet_lite0", "blocks.6")):
        m, crop, target = explained(name, layer, device)
        s = ExplainSettings(ExplainSpec(cam=CamSpec(batch_size=32)), 0, device)
        t_ours, t_pkg, ours, ref = side_by_side(lambda: ablation_cam(m, crop, target, s),
                                                lambda: PACKAGE_CAMS["ablationcam"](m, crop, target, s), device, 2)
        out.append(row(f"AblationCAM, {name} {layer}", t_ours, t_pkg, "grad-cam AblationCAM", ">= 20x",
                       max_abs_diff=float(np.abs(ours["map"] - ref["map"]).max())))
    return out


def bench_scorecam(device: torch.device) -> list[dict]:
    """Our ScoreCAM (each distinct masked image once) against grad-cam's, on a random ResNet18 and the packaged,
    trained EfficientNet-Lite0: passes saved, time, and how far the maps differ."""
    out = []
    for name, layer in (("resnet18", "layer4"), ("efficientnet_lite0", "blocks.6")):
        m, crop, target = explained(name, layer, device)
        s = ExplainSettings(ExplainSpec(), 0, device)
        t_ours, t_pkg, ours, ref = side_by_side(lambda: score_cam(m, crop, target, s),
                                                lambda: PACKAGE_CAMS["scorecam"](m, crop, target, s), device, 1)
        out.append(row(f"ScoreCAM, {name} {layer}: {ours['passes']} passes, not {1 + ours['channels']}",
                       t_ours, t_pkg, "grad-cam ScoreCAM", "maps within 1e-5",
                       max_abs_diff=float(np.abs(ours["map"] - ref["map"]).max()),
                       passes=ours["passes"], baseline_passes=1 + ours["channels"]))
    return out


def bench_road_imputer(device: torch.device) -> list[dict]:
    """ROAD's noisy linear imputation at 224 px, half the image removed as one region (as a saliency map's top
    half is): ours (system assembled at once) against grad-cam's (lil_matrix), same noise seed."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    from report_builder.evaluation.metrics import LinearImputer

    img = torch.from_numpy(np.random.default_rng(0).random((3, 224, 224), dtype=np.float32))
    mask = torch.zeros(224, 224)
    mask[:, :112] = 1

    def seeded(imputer):
        def go():
            torch.manual_seed(0)
            return imputer(img, mask)
        return go

    t_ours, t_pkg, ours, ref = side_by_side(seeded(LinearImputer()), seeded(NoisyLinearImputer()), device, 5)
    return [row("ROAD imputation, 224 px, half removed", t_ours, t_pkg, "grad-cam NoisyLinearImputer", "faster",
                max_abs_diff=float((ours - ref).abs().max()))]


def peak_gflops() -> tuple[float | None, str]:
    """This CPU's fp32 peak, cores x clock x FLOPs per cycle, and how it was computed. FLOPs per cycle assume two
    fused multiply-add units per core at the widest vector width the CPU reports (true of Intel since Haswell and
    AMD since Zen 2; an older or smaller core has less): AVX-512 64, AVX2 with FMA 32, AVX 16, else 8; AMD's Zen 4
    reports AVX-512 but executes it on 256-bit pipes, so 32 there."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, "no /proc/cpuinfo: peak unknown"
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    per_cycle, width = ((64, "AVX-512") if "avx512f" in flags else (32, "AVX2+FMA") if {"avx2", "fma"} <= flags
                        else (16, "AVX") if "avx" in flags else (8, "SSE"))
    first = dict((k.strip(), v.strip()) for k, v in (ln.split(":", 1) for ln in info.split("\n\n")[0].splitlines()
                                                      if ":" in ln))
    if per_cycle == 64 and first.get("vendor_id") == "AuthenticAMD" and first.get("cpu family") == "25":
        # Zen 4 (family 19h) decodes AVX-512 but runs it on its two 256-bit FMA pipes: AVX2's rate per cycle
        per_cycle, width = 32, "AVX-512 on 256-bit units (AMD Zen 4)"
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, mhz = set(), []
    for block in info.split("\n\n"):
        fields = dict(ln.split(":", 1) for ln in block.splitlines() if ":" in ln)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "processor" in fields and int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id", "0"), fields.get("core id", fields["processor"])))
            if "cpu MHz" in fields:
                mhz.append(float(fields["cpu MHz"]))
    try:  # the rated maximum where the kernel tells it; else the clock the CPU reports now
        ghz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
        clock = "max clock"
    except (OSError, ValueError):
        if not mhz:
            return None, "no clock reported: peak unknown"
        ghz, clock = max(mhz) / 1000, "reported clock"
    peak = len(cores) * ghz * per_cycle
    return peak, (f"{len(cores)} cores x {ghz:.2f} GHz ({clock}) x {per_cycle} FLOP/cycle ({width}, 2 FMA pipes) "
                  f"= {peak:.0f} GFLOP/s fp32")


def counted_flops(call: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    """FLOPs of call(x) (a multiply-add counts 2), by torch's own counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        call(x)
    return float(counter.get_total_flops())


def forward_flops(m: LoadedModel) -> float:
    """FLOPs of one image's forward pass."""
    size = m.preprocess.input_size
    return counted_flops(m.module, torch.zeros(1, 3, size, size, device=next(m.module.parameters()).device))


def bench_forward_throughput(device: torch.device, images: int) -> list[dict]:
    """Achieved GFLOP/s of forward passes, against the processor's peak: as the explainers made them before
    (`module`: channels-last weights, inputs as `Preprocess.normalize` gives them, batch "auto") and as they make
    them now (`outputs`: BatchNorms folded into their convolutions), each side by side with the first; plus
    contiguous NCHW inputs (what channels-last is worth), the folded model at half and four times the batch, on one
    thread instead of all, in one-thread worker processes running side by side (as a run's executor uses the
    cores), and through torch.compile (its compile time measured apart, with the images it takes to
    pay that back)."""
    peak, how = peak_gflops() if device.type == "cpu" else (None, "GPU: peak not computed")
    print(f"  peak: {how}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="report_builder-inductor-") as inductor:
        return [_forward_row(name, device, images, peak, how, inductor)
                for name in ("resnet18", "efficientnet_lite0", "efficientnet_lite2")] + \
               [_clip_forward_row(device, max(images // 4, 2 * resolve_batch("auto", device.type)), peak, how,
                                  inductor)]  # a quarter of the images: ViT-B-16 costs 9x ResNet18's FLOPs


def _worker_forwards(name: str, images: int, batch: int, conn) -> None:
    """One worker process as a run's local executor makes it (one torch thread, the model loaded in the worker):
    builds `name`'s forward-only copy, then runs `images` forward passes in batches of `batch` whenever told to."""
    torch.set_num_threads(1)
    m = random_model(name, torch.device("cpu"))
    crops = np.repeat(photo(m)[None], images, axis=0)

    def go():
        with torch.inference_mode():
            for i in range(0, images, batch):
                m.outputs(m.preprocess.normalize(crops[i : i + batch], torch.device("cpu")))

    go()  # warm-up, before the parent starts timing
    conn.send("ready")
    while conn.recv() == "go":
        go()
        conn.send("done")


class ConcurrentWorkers:
    """`n` worker processes of one thread each, running their share of the images at the same time; calling it
    times one round. The run's graph executor works this way (`--workers auto`), and two one-thread processes
    share memory bandwidth and cache, so their rate is measured together, not as twice one thread's."""

    def __init__(self, name: str, n: int, images: int, batch: int):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as the executor's workers are
        self.pipes, self.procs = [], []
        self.shares = [images // n + (i < images % n) for i in range(n)]  # a round makes exactly `images` passes
        for share in self.shares:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_forwards, args=(name, share, batch, theirs), daemon=True)
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)
        for pipe in self.pipes:
            if pipe.recv() != "ready":
                raise RuntimeError(f"a forward-pass worker for {name} did not start")

    def __call__(self) -> None:
        for pipe in self.pipes:
            pipe.send("go")
        for pipe in self.pipes:
            pipe.recv()

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send("stop")
        for proc in self.procs:
            proc.join(timeout=30)


def _forward_row(name: str, device: torch.device, images: int, peak: float | None, how: str, inductor: str) -> dict:
    m = random_model(name, device)
    flops = forward_flops(m)
    batch = resolve_batch("auto", device.type)
    crops = np.repeat(photo(m)[None], images, axis=0)

    def run(module, b: int, contiguous: bool = False):
        def go():
            with torch.inference_mode():
                for i in range(0, images, b):
                    x = m.preprocess.normalize(crops[i : i + b], device)
                    module(x.contiguous() if contiguous else x)
        return go

    def rate(seconds: float) -> float:
        return images * flops / seconds / 1e9

    def one_thread(go):
        def single():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                go()
            finally:
                torch.set_num_threads(threads)
        return single

    before = run(m.module, batch)
    torch_paths = default_paths(m.outputs)  # folded, but 1x1 convolutions and linear layers where torch sends them
    variants = {"BatchNorm folded (used now)": run(m.outputs, batch),
                "folded, torch's default paths (not oneDNN)": run(torch_paths, batch),
                "contiguous NCHW input": run(m.module, batch, contiguous=True),
                f"folded, batch {batch // 2}": run(m.outputs, batch // 2),
                f"folded, batch {4 * batch}": run(m.outputs, 4 * batch),
                "folded, 1 thread": one_thread(run(m.outputs, batch)),
                "folded, 1 thread, torch's default paths": one_thread(run(torch_paths, batch))}
    # inductor traces torch's own ops (it cannot fake oneDNN's direct calls), and fuses its own kernels anyway
    fast, compile_s, why = compiled(torch_paths, m.preprocess.normalize(crops[:batch], device), inductor)
    if fast is not None:
        variants["folded, torch.compile"] = run(fast, batch)
    threads = torch.get_num_threads()
    pools = []
    if device.type == "cpu" and threads > 1:  # how a run uses the cores: one-thread worker processes
        for b in (batch, batch // 2):
            pools.append(ConcurrentWorkers(name, threads, images, b))
            variants[f"{threads} workers x 1 thread, batch {b}"] = pools[-1]
    try:
        times = {k: side_by_side(fn, before, device, 3)[:2] for k, fn in variants.items()}
    finally:
        for pool in pools:
            pool.close()
    t_new, t_old = times["BatchNorm folded (used now)"]
    t_before = statistics.median(t for _, t in times.values())
    share = (lambda t: f" ({100 * rate(t) / peak:.0f}%)") if peak else (lambda t: "")
    compile_note: dict = {"compile_s": compile_s, "compile_failed": why}
    if fast is not None:  # images after which the compiled model has made up for its compile time, if ever
        saved = (t_new - times["folded, torch.compile"][0]) / images
        compile_note["compile_pays_back_after_images"] = compile_s / saved if saved > 0 else None
    workers = [k for k in times if "workers x 1 thread" in k]
    if workers:  # the rate a run's worker processes get, at the better of the two batch sizes
        best = min(workers, key=lambda k: times[k][0])
        compile_note["in_workers"] = {"variant": best, "gflops": rate(times[best][0]),
                                      "share_of_peak": rate(times[best][0]) / peak if peak else None}
    return row(f"Forward, {name}: {rate(t_old):.0f}{share(t_old)} -> {rate(t_new):.0f}{share(t_new)} GFLOP/s",
               t_new, t_old, "unfolded, as before", "Lite >= 1.3x, ResNet18 no slower",
               gflops={f"before (batch {batch})": rate(t_before), **{k: rate(t) for k, (t, _) in times.items()}},
               gflop_per_image=flops / 1e9, peak_gflops=peak, peak_how=how,
               folded=m.outputs is not m.module, **compile_note)


def _clip_forward_row(device: torch.device, images: int, peak: float | None, how: str, inductor: str) -> dict:
    """CLIP ViT-B-16's image tower (random weights), as CLIP-Dissect's image embeddings run it: `encode_image` in
    batches of "auto", routed through oneDNN on a CPU (route_image_tower), against torch's default paths (MKL's
    sgemm, nn.MultiheadAttention's fused inference path). FLOPs are counted on torch's paths with the fused path
    off: FlopCounterMode sees neither inside the fused kernel (it would count 22.5 of 33.7 GFLOP per image) nor
    oneDNN's ops."""
    import open_clip
    from PIL import Image

    from report_builder.data.images import SAMPLES
    from report_builder.dissection.scorers.clip import route_image_tower

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None, device=device)
    model.eval()
    pixels = preprocess(Image.fromarray(SAMPLES["chelsea"][1]()))
    x_all = pixels[None].repeat(images, 1, 1, 1).to(device)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        flops = counted_flops(model.encode_image, x_all[:1])  # before routing: the counter does not see oneDNN's ops
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    torch_paths = default_paths(model)  # torch's own: MKL's sgemm for the projections, the fused attention kernel
    route_image_tower(model)  # as a run uses it (a no-op on a GPU)
    batch = resolve_batch("auto", device.type)

    def run(fn, b: int, fused: bool = True, threads: int | None = None):
        def go():
            saved = torch.get_num_threads()
            torch.backends.mha.set_fastpath_enabled(fused)
            if threads:
                torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    for i in range(0, images, b):
                        fn(x_all[i : i + b])
            finally:
                torch.set_num_threads(saved)
                torch.backends.mha.set_fastpath_enabled(fastpath)
        return go

    def rate(seconds: float) -> float:
        return images * flops / seconds / 1e9

    used = run(model.encode_image, batch)
    variants = {f"as used (batch {batch})": used,
                "torch's default paths (MKL projections, fused attention)": run(torch_paths.encode_image, batch),
                "torch's default paths, fused attention off": run(torch_paths.encode_image, batch, False),
                f"batch {batch // 2}": run(model.encode_image, batch // 2),
                f"batch {2 * batch}": run(model.encode_image, 2 * batch),
                "1 thread": run(model.encode_image, batch, threads=1),
                "1 thread, torch's default paths": run(torch_paths.encode_image, batch, threads=1)}
    fast, compile_s, why = compiled(torch_paths.encode_image, x_all[:batch], inductor)
    if fast is not None:
        variants["torch.compile"] = run(fast, batch)
    # each variant against the one in use, so every ratio comes from the same minutes of these shared cores
    times = {k: side_by_side(fn, used, device, 3)[:2] for k, fn in variants.items()}
    t_used = statistics.median(t for _, t in times.values())
    best = min(times, key=lambda k: times[k][0])
    share = (lambda t: f" ({100 * rate(t) / peak:.0f}%)") if peak else (lambda t: "")
    note = {"compile_s": compile_s, "compile_failed": why}
    return row(f"Forward, CLIP ViT-B-16 image tower: {rate(t_used):.0f}{share(t_used)} GFLOP/s as used; "
               f"fastest variant: {best}", times[best][0], t_used, "as used", ">= 65% of peak",
               gflops={k: rate(t) for k, (t, _) in times.items()}, gflops_as_used=rate(t_used),
               gflop_per_image=flops / 1e9, peak_gflops=peak, peak_how=how, **note)


def compiled(module: torch.nn.Module, example: torch.Tensor, cache_dir: str) -> tuple[object, float, str | None]:
    """torch.compile(module) and the seconds its first call takes (the compiling), or None and why it failed:
    a machine without a C++ compiler, for one. Inductor's files go to `cache_dir`, so each bench compiles afresh."""
    import torch._dynamo

    torch._dynamo.reset()
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    try:
        fast = torch.compile(module, dynamic=False)
        start = time.perf_counter()
        with torch.inference_mode():
            fast(example)
        return fast, time.perf_counter() - start, None
    except Exception as exc:  # noqa: BLE001 - any failure to compile means: measure without it
        return None, 0.0, f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


def bench_clip_text(device: torch.device, words: int) -> list[dict]:
    import open_clip

    from report_builder.data.concepts import words_20k
    from report_builder.dissection.scorers.clip import encode_texts

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, device=device).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    texts = words_20k()[:words]
    t_fast, fast = timed(lambda: encode_texts(model, tokenizer, texts, device), device)
    t_full, full = timed(lambda: encode_texts(model, tokenizer, texts, device, truncate=False), device)
    cache = Cache(Path(tempfile.mkdtemp()))
    parts = {"words": words}
    cache.get_or_compute("bench-text", parts, lambda: fast.numpy())
    t_cached, _ = timed(lambda: cache.get_or_compute("bench-text", parts, lambda: fast.numpy()), device)
    diff = float((fast - full).abs().max())
    return [row(f"CLIP ViT-B-16 text, {len(texts)} words: truncated context", t_fast, t_full, "full 77-token context",
                ">= 5x", max_abs_diff=diff),
            row(f"CLIP text, {len(texts)} words: cached rerun", t_cached, t_fast, "computing them", "about nothing")]


def bench_clip_images(device: torch.device, images: int) -> list[dict]:
    """Two dissected models sharing a probe set: the CLIP image embeddings are computed once (the cache key
    is the probe set's content, not the model), against once per model."""
    import open_clip
    from PIL import Image

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None, device=device)
    model.eval()
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), np.uint8)) for _ in range(images)]

    def embed() -> np.ndarray:
        with torch.inference_mode():
            out = [model.encode_image(torch.stack([preprocess(p) for p in pics[i : i + 8]]).to(device)).cpu()
                   for i in range(0, len(pics), 8)]
        return torch.cat(out).numpy()

    def two_models(cache: Cache) -> None:
        for _ in range(2):
            cache.get_or_compute("bench-clip-image", {"probe": "the same probe set"}, embed)

    t_shared, _ = timed(lambda: two_models(Cache(Path(tempfile.mkdtemp()))), device)
    t_each, _ = timed(lambda: two_models(Cache(enabled=False)), device)
    return [row(f"CLIP ViT-B-16 image embeddings, {images} probe images, 2 models", t_shared, t_each,
                "computed once per model", "computed once")]


def bench_shared_decoding(device: torch.device, images: int) -> list[dict]:
    """A dissection's readers of one probe shard (CLIP ViT-B-16 image embeddings, two ResNet18s' activations, the
    colour scorer) on ImageNet-sized JPEGs: each file decoded once and cut once per distinct preprocessing
    (probe.pixels_task, what a run does), against each reader decoding and cutting the files itself."""
    from PIL import Image

    from report_builder.data.probe import load_probe
    from report_builder.spec.schema import ProbeSpec

    with tempfile.TemporaryDirectory(prefix="report_builder-probe-") as folder:
        rng = np.random.default_rng(0)
        for i in range(images):  # smooth random pictures, 500 x 375 like ImageNet's, saved as photos are
            small = rng.integers(0, 255, (48, 64, 3), np.uint8)
            Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(Path(folder) / f"{i:04d}.jpg", quality=90)
        probe = load_probe(ProbeSpec(source="folder", path=folder), seed=0)
        return _shared_decoding_rows(device, probe)


def _shared_decoding_rows(device: torch.device, probe) -> list[dict]:
    import open_clip

    from report_builder.dissection.activations import record
    from report_builder.data.probe import pixels_task
    from report_builder.dissection.scorers.clip import clip_image_embeddings, split_preprocess
    from report_builder.dissection.scorers.colors import COLOR_VIEW, color_table

    images = len(probe)
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None, device=device)
    clip.eval()
    nets = [random_model("resnet18", device) for _ in range(2)]
    layers, batch = ["layer2", "layer3", "layer4"], resolve_batch("auto", device.type)
    clip_cut = split_preprocess(preprocess)[0]

    def readers(source) -> list:
        pick = (lambda crop: source[crop.key]) if isinstance(source, dict) else (lambda crop: source)
        out = [clip_image_embeddings(clip, preprocess, pick(clip_cut), str(device), batch)]
        out += [record(m, layers, pick(m.preprocess), "avg", device, batch, "bench")[l].numpy()
                for m in nets for l in layers]
        return out + [color_table(pick(COLOR_VIEW))]

    cuts = [clip_cut] + [m.preprocess for m in nets] + [COLOR_VIEW]  # 3 distinct: the ResNets share theirs
    t_shared, t_each, ours, base = side_by_side(lambda: readers(pixels_task(probe, cuts)), lambda: readers(probe),
                                                device, 1)
    t_decode, _ = timed(lambda: pixels_task(probe, cuts), device)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, base))
    return [row(f"Probe decoded once, {images} JPEGs: CLIP, 2 ResNet18, colours", t_shared, t_each,
                "each reader decodes the files", "faster", max_abs_diff=diff, decode_s=t_decode)]


def bench_activations(device: torch.device, images: int) -> list[dict]:
    from report_builder.dissection.activations import record
    from report_builder.data.probe import ProbeSet, ProbeItem
    from PIL import Image

    m = random_model("resnet18", device)
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), np.uint8)) for _ in range(images)]
    probe = ProbeSet("random", tuple(ProbeItem(f"r{i}", str(i), pixels=np.asarray(p)) for i, p in enumerate(pics)))
    layers = ["layer2", "layer3", "layer4"]
    t_one, t_each, one, each = side_by_side(
        lambda: record(m, layers, probe, "avg", device, 32, "bench"),
        lambda: {l: record(m, [l], probe, "avg", device, 32, "bench")[l] for l in layers}, device, 1)
    diff = max(float((one[l] - each[l]).abs().max()) for l in layers)
    return [row(f"Activations, ResNet18 layer2-4, {images} images", t_one, t_each, "one pass per layer",
                "faster", max_abs_diff=diff)]


def bench_soft_wpmi(units: int, concepts: int, images: int) -> list[dict]:
    from report_builder.dissection.clip_dissect import soft_wpmi

    g = torch.Generator().manual_seed(0)
    P = 0.2 + 0.05 * torch.rand(images, concepts, generator=g)
    A = torch.randn(images, units, generator=g)

    def per_unit_loop():  # the reference code's shape: one unit at a time
        Pt = torch.softmax(10 * P, dim=1)
        inds = torch.topk(A, k=100, dim=0).indices
        p_r = (0.998 - torch.arange(100) / 100 * (0.998 - 0.97)).unsqueeze(1)
        rows = [torch.log(1 + p_r * (Pt[inds[:, k]] - 1) + 1e-7).sum(0, keepdim=True) for k in range(units)]
        lpck = torch.cat(rows)
        return lpck - (torch.logsumexp(lpck, 0, keepdim=True) - np.log(units))

    t_vec, t_loop, vec, loop = side_by_side(lambda: soft_wpmi(P, A), per_unit_loop, torch.device("cpu"), 1)
    return [row(f"soft_wpmi, {units} units x {concepts} concepts x {images} images", t_vec, t_loop,
                "per-unit loop", "faster", max_abs_diff=float((vec - loop).abs().max()))]


def bench_netdissect(device: torch.device, images: int) -> list[dict]:
    """The exact streaming quantile against np.quantile over every value; the matmul tally against a
    per-unit loop that counts labels under each mask with np.bincount, as NetDissect-Lite does."""
    from report_builder.dissection import netdissect as nd
    from report_builder.data.pixel_labels import Labels

    rng = np.random.default_rng(0)
    units, size, labels_n = 320, 7, 40
    maps = rng.standard_normal((images, units, size, size)).astype(np.float32)
    total = images * size * size
    t_q, t_np, ours, ref = side_by_side(
        lambda: nd.quantile_thresholds(nd.chunks(maps, device=device), total, 0.995, "exact")[0].numpy(),
        lambda: np.quantile(maps.transpose(1, 0, 2, 3).reshape(units, -1), 0.995, axis=1), device, 3)
    out = [row(f"NetDissect threshold, {units} units x {images} images x {size}x{size}, q=0.995", t_q, t_np,
               "np.quantile over all values", "no slower", max_abs_diff=float(np.abs(ours - ref).max()))]

    tally_images = min(images, 60)
    labs = [Labels((112, 112), rng.integers(0, labels_n, (1, 112, 112)).astype(np.int32), categories=frozenset({"object"}))
            for _ in range(tally_images)]
    small = maps[:tally_images]
    thresholds = torch.from_numpy(np.quantile(small.transpose(1, 0, 2, 3).reshape(units, -1), 0.995, axis=1)).float()

    def ours_tally():
        return nd.tally(nd.chunks(small, device=device), thresholds, labs, labels_n, ["object"]).intersection.numpy()

    def per_unit():
        inter = np.zeros((units, labels_n))
        for a, lab in zip(small, labs):
            for k in range(units):
                mask = nd.unit_masks(torch.from_numpy(a[k : k + 1]), thresholds[k : k + 1], lab.size)[0].numpy()
                inter[k] += np.bincount(lab.pixel[0][mask], minlength=labels_n)
        inter[:, 0] = 0
        return inter

    t_t, t_loop, got, want = side_by_side(ours_tally, per_unit, device, 1)
    got[:, 0] = 0
    out.append(row(f"NetDissect IoU tally, {units} units x {tally_images} images, labels 112x112", t_t, t_loop,
                   "per-unit loop with np.bincount", "faster", max_abs_diff=float(np.abs(got - want).max())))
    return out


def bench_mixed_precision(device: torch.device, words: int, images: int) -> list[dict]:
    """GPU only: bf16 autocast against fp32 for CLIP text and activations, with the largest difference."""
    import open_clip

    from report_builder.dissection.activations import record
    from report_builder.data.concepts import words_20k
    from report_builder.data.probe import ProbeItem, ProbeSet
    from report_builder.dissection.scorers.clip import encode_texts
    from PIL import Image

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None, device=device).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    texts = words_20k()[:words]

    def text_bf16():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return encode_texts(clip, tokenizer, texts, device)

    t_half, t_full, half, full = side_by_side(text_bf16, lambda: encode_texts(clip, tokenizer, texts, device), device, 2)
    rows = [row(f"CLIP text, {words} words, bf16 autocast", t_half, t_full, "fp32", "within 1e-2",
                max_abs_diff=float((half - full).abs().max()))]
    m = random_model("resnet18", device)
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), np.uint8)) for _ in range(images)]
    probe = ProbeSet("random", tuple(ProbeItem(f"r{i}", str(i), pixels=np.asarray(p)) for i, p in enumerate(pics)))
    layers = ["layer2", "layer3", "layer4"]

    def acts_bf16():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return record(m, layers, probe, "avg", device, 64, "bench")

    t_half, t_full, half, full = side_by_side(acts_bf16, lambda: record(m, layers, probe, "avg", device, 64, "bench"),
                                              device, 2)
    scale = max(float(full[l].abs().max()) for l in layers)
    diff = max(float((half[l] - full[l]).abs().max()) for l in layers) / scale
    rows.append(row(f"Activations, ResNet18 layer2-4, {images} images, bf16 autocast", t_half, t_full, "fp32",
                    "within 2% of the largest activation", max_abs_diff=diff))
    return rows


def bench_demo(out: Path) -> list[dict]:
    """The demo as `make report` runs it (worker processes: --workers auto), cold against the same in one process
    (--workers 1), each with an empty cache; then a warm rerun, which only renders."""
    runs = {label: cli_run(Path("specs/demo.yaml"), out / f"demo-{label.replace(' ', '-')}",
                           out / f"demo-cache-{workers}", workers, cold=label != "warm")
            for label, workers in (("one process", "1"), ("cold", "auto"), ("warm", "auto"))}
    for label, r in runs.items():
        print(f"  demo spec, {label} ({r['executor']}): {r['wall']:.1f} s, peak memory {r['peak'] / 2**30:.2f} GiB",
              file=sys.stderr, flush=True)
    cold, one = runs["cold"], runs["one process"]
    return [row(f"Whole demo spec, cold: {cold['executor']}", cold["wall"], one["wall"], "cold, one process",
                "<= 240 s", stages={k: v for k, v in cold["stages"].items() if v >= 1},
                stages_before={k: v for k, v in one["stages"].items() if v >= 1}, wall_s=cold["wall"],
                baseline_wall_s=one["wall"], peak_rss_gib=cold["peak"] / 2**30,
                baseline_peak_rss_gib=one["peak"] / 2**30),
            row("Whole demo spec: warm cache (rendering only)", runs["warm"]["wall"], cold["wall"], "cold cache",
                "warm < 30 s")]


def bench_demo_against(out: Path, rev: str) -> list[dict]:
    """The cold demo with this code and with commit `rev`'s (its code and its specs/demo.yaml, checked out into a
    temporary git worktree that is removed afterwards), one after the other, each with an empty cache of its own;
    with both runs' stage times."""
    import shutil

    rows, seconds, stages = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="report-builder-bench-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for label, root in ((rev, tree), ("this code", Path.cwd())):
                run_dir = out.resolve() / f"demo-{'before' if root == tree else 'now'}"
                cache = Path(tmp) / f"cache-{'before' if root == tree else 'now'}"
                shutil.rmtree(run_dir, ignore_errors=True)
                env = {**os.environ, "PYTHONPATH": str(root)}
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "report_builder", "--quiet", "run", str(root / "specs/demo.yaml"),
                                "--out", str(run_dir), "--cache-dir", str(cache)], check=True, env=env, cwd=root,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                seconds[label] = time.perf_counter() - start
                stages[label] = json.loads((run_dir / "results.json").read_text())["provenance"]["stage_seconds"]
                print(f"  demo spec, cold, {label}: {seconds[label]:.1f} s", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows.append(row(f"Whole demo spec, cold: this code vs {rev}", seconds["this code"], seconds[rev],
                    f"{rev}, cold", ">= 1.3x", stages={k: v for k, v in stages["this code"].items() if v >= 1},
                    stages_before={k: v for k, v in stages[rev].items() if v >= 1}))
    return rows


def tree_rss(pid: int) -> int:
    """Bytes resident in process `pid` and all its descendants now (Linux /proc; 0 elsewhere): a run with worker
    processes holds memory in each of them."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            pages = int((entry / "statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
        rss[int(entry.name)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def cli_run(spec: Path, run_dir: Path, cache: Path, workers: str, cold: bool = True) -> dict:
    """`run` as a user starts it, with --workers `workers` (cold: the run folder and the cache emptied first): its
    wall seconds, the peak memory of its process tree (sampled every 0.2 s), its stage seconds and its executor;
    `dir` is the run directory."""
    import shutil

    for folder in (run_dir, cache) if cold else (run_dir,):
        shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "report_builder", "--quiet", "run", str(spec), "--out", str(run_dir),
           "--cache-dir", str(cache), "--workers", workers]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    provenance = json.loads((run_dir / "results.json").read_text())["provenance"]
    return {"wall": wall, "peak": peak, "stages": provenance["stage_seconds"], "executor": provenance["executor"],
            "dir": run_dir}


def explain_only_spec(folder: Path) -> Path:
    """The demo spec with only its explanations (no dissection, evaluation or concepts): the executor row's work."""
    import yaml

    spec = yaml.safe_load(Path("specs/demo.yaml").read_text())
    for key in ("dissect", "netdissect", "evaluate"):
        spec.pop(key, None)
    spec["concepts"] = None
    for m in spec["models"]:
        m.pop("layers", None)
    path = folder / "demo-explain.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def bench_executor(out: Path) -> list[dict]:
    """The demo's explanations, cold, in one process with every thread against worker processes of one thread each
    (--workers 1 and --workers N, N = torch's threads), one after the other; wall time of the compute stage, the
    whole run, the process tree's peak memory, and the largest difference between the two runs' maps."""
    spec = explain_only_spec(out)
    threads = torch.get_num_threads()
    label = "the demo's 40 explanations"
    runs = {}
    for workers in (1, threads):
        r = runs[workers] = cli_run(spec, out / f"executor-{workers}", out / f"executor-cache-{workers}", str(workers))
        print(f"  {label}, {workers} worker(s): compute {r['stages']['compute']:.1f} s, wall {r['wall']:.1f} s, "
              f"peak memory {r['peak'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    one, many = runs[1], runs[threads]
    diff = 0.0
    for a in sorted(one["dir"].glob("explanations/**/*.npz")):
        with np.load(a) as x, np.load(many["dir"] / a.relative_to(one["dir"])) as y:
            diff = max([diff] + [float(np.abs(x[k].astype(np.float64) - y[k]).max()) for k in x.files
                                 if x[k].dtype.kind == "f" and x[k].size])
    return [row(f"Executor, {label}: {threads} workers x 1 thread", many["stages"]["compute"],
                one["stages"]["compute"], f"1 process x {threads} threads", "faster than one process",
                max_abs_diff=diff, wall_s=many["wall"], baseline_wall_s=one["wall"],
                peak_rss_gib=many["peak"] / 2**30, baseline_peak_rss_gib=one["peak"] / 2**30)]


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m report_builder.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("output/bench"))
    p.add_argument("--quick", action="store_true", help="smaller sizes, and no whole-demo run (a smoke test)")
    p.add_argument("--only", choices=("items", "forward", "scale", "assignment", "demo", "executor"), action="append",
                   help="run only these sections (repeatable): the optimised items, the forward passes against the "
                        "processor's peak, the full-size scale runs, the full assignment spec (25-60 minutes), the demo, "
                        "the executor (one process against worker processes)")
    p.add_argument("--demo-against", metavar="COMMIT",
                   help="also time the cold demo with COMMIT's code (a git worktree), side by side with this code's")
    args = p.parse_args(argv)
    sections = set(args.only or ("items", "forward", "scale", "assignment", "demo", "executor"))
    if args.demo_against:  # checked now, not after an hour of other items
        found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.demo_against}^{{commit}}"],
                               capture_output=True, text=True)
        if found.returncode != 0:
            print(f"error: --demo-against: {args.demo_against!r} is not a commit of this repository", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    q = args.quick
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads; "
          f"GPU: {info['gpu'] or 'none (GPU items skipped)'}", flush=True)
    rows: list[dict] = []

    def record(new: list[dict], device: str) -> None:  # each row kept and printed as soon as it is measured
        for r in new:
            r["device"] = device
            rows.append(r)
            print(_line(r), flush=True)

    for device in devices if "items" in sections else ():
        cuda = device.type == "cuda"
        steps = [
            ("LIME", lambda: bench_lime(device, 100 if q else 1000)),
            ("AblationCAM", lambda: bench_ablation(device)),
            ("ScoreCAM", lambda: bench_scorecam(device)),
            ("ROAD imputer", lambda: bench_road_imputer(device)),
            # 20,000 words through ViT-B-16's full context take most of an hour on 2 CPU cores
            ("CLIP text", lambda: bench_clip_text(device, 20000 if cuda else (100 if q else 1000))),
            ("CLIP images", lambda: bench_clip_images(device, 16 if q else 64)),
            ("activations", lambda: bench_activations(device, 32 if q else 200)),
            ("shared decoding", lambda: bench_shared_decoding(device, 16 if q else 64)),
            ("NetDissect", lambda: bench_netdissect(device, 100 if q else 2000)),
        ]
        if cuda:
            steps.append(("mixed precision", lambda: bench_mixed_precision(device, 20000, 1000)))
        else:
            steps.append(("soft_wpmi", lambda: bench_soft_wpmi(896, 2000 if q else 20000, 1000)))
        for name, step in steps:
            print(f"[{device.type}] {name} ...", file=sys.stderr, flush=True)
            record(step(), device.type)
    for device in devices if "forward" in sections else ():
        print(f"[{device.type}] forward throughput ...", file=sys.stderr, flush=True)
        record(bench_forward_throughput(device, 16 if q else 64), device.type)
    if "scale" in sections:
        from report_builder.bench.scale import bench_full_size, bench_netdissect_scale, bench_report_size

        for step in (bench_report_size, bench_full_size, bench_netdissect_scale):
            record(step(args.out, q, row), "cpu")
    if "assignment" in sections:
        from report_builder.bench.scale import bench_full_assignment

        record(bench_full_assignment(args.out, q, row), "cpu")
    if not q and "demo" in sections:
        print("[cpu] whole demo spec, cold then warm ...", file=sys.stderr, flush=True)
        record(bench_demo(args.out) + (bench_demo_against(args.out, args.demo_against) if args.demo_against else []),
               "cpu")
    if not q and "executor" in sections:
        print("[cpu] executor: one process against worker processes ...", file=sys.stderr, flush=True)
        record(bench_executor(args.out), "cpu")
    if len(devices) == 1:
        print("GPU items skipped: no CUDA device on this machine.")
    (args.out / "bench.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    print(f"wrote {args.out / 'bench.json'}")
    return 0


def _line(r: dict) -> str:
    extra = ""
    if "max_abs_diff" in r:
        extra += f"  max |diff| {r['max_abs_diff']:.1e}"
    if "overhead" in r:
        extra += f"  overhead {r['overhead']:.2f}"
    if "masks_equal" in r:
        extra += f"  masks equal: {r['masks_equal']}"
    if "peak_rss_gib" in r:
        extra += f"  peak RSS {r['peak_rss_gib']:.2f} GiB"
    if "baseline_peak_rss_gib" in r and "images_per_s" not in r:
        extra += (f"\n       wall {r['wall_s']:.1f} s against {r['baseline_wall_s']:.1f} s; peak memory of the process "
                  f"tree {r['peak_rss_gib']:.2f} GiB against {r['baseline_peak_rss_gib']:.2f} GiB")
    if "images_per_s" in r:
        extra += f"  {r['images_per_s']:.1f} images/s (at 1/10 the size: {r['baseline_images_per_s']:.1f}, " \
                 f"peak RSS {r['baseline_peak_rss_gib']:.2f} GiB)"
    unit = r.get("unit", "s")  # seconds, unless the row measures something else (a file's size)
    line = (f"{r['device']:4} {r['item'][:62]:62} ours {r['ours_s']:8.2f} {unit}  {r['baseline'][:30]:30} "
            f"{r['baseline_s']:8.2f} {unit}  x{r['ratio']:.1f}  (target {r['target']}){extra}")
    for name in ("stages", "stages_before", "bare_parts"):
        if name in r:
            line += f"\n       {name.replace('_', ' ')}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r[name].items())
    if "gflops" in r:
        line += "\n       GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in r["gflops"].items())
        line += f"\n       peak: {r['peak_how']}"
    if "in_workers" in r:
        w = r["in_workers"]
        share = f" ({100 * w['share_of_peak']:.0f}% of the peak)" if w["share_of_peak"] else ""
        line += f"\n       in worker processes, as a run uses the cores ({w['variant']}): {w['gflops']:.0f} GFLOP/s{share}"
    if r.get("compile_failed"):
        line += f"\n       torch.compile failed, measured without it: {r['compile_failed']}"
    elif "compile_s" in r:
        back = r.get("compile_pays_back_after_images")
        line += (f"\n       torch.compile: {r['compile_s']:.1f} s to compile, "
                 + (f"paid back after {back:,.0f} images" if back else "never paid back (no faster)"))
    if "decode_s" in r:
        line += f"\n       decoding and cutting the images once, for all readers: {r['decode_s']:.1f} s"
    return line

