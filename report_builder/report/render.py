"""Renderer: a run directory -> figures (matplotlib PNG) -> report.html (Jinja2, self-contained) -> report.pdf.

It reads only the run directory, so re-rendering after a template change never touches a model.
Templates hold layout; this module holds the numbers they show.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import os
import shutil
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")
# Labels come from users (model names, concepts, image ids): a '$' in them must print as a '$', not start
# matplotlib's math mode (an odd number of them crashed the renderer).
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402
from jinja2 import Environment, FileSystemLoader, StrictUndefined, pass_environment, select_autoescape  # noqa: E402
from jinja2.exceptions import UndefinedError  # noqa: E402
from markupsafe import Markup  # noqa: E402

from report_builder.report import analysis  # noqa: E402
from report_builder.errors import UserError, raise_if_interrupted  # noqa: E402
from report_builder.files import (OWNER, atomic_write, check_output, output_error, package_digest,  # noqa: E402
                                  partial_folder, replace_ours)
from report_builder.report.sections import sections_of  # noqa: E402
from report_builder.evaluation import registry as metric_registry  # noqa: E402
from report_builder.report.rundir import RunFormatError, inside, load_results  # noqa: E402
from report_builder.explanation.registry import TITLES as METHOD_TITLES  # noqa: E402

TEMPLATES = Path(__file__).resolve().parent / "templates"  # package data: installed with the code
PALETTE = ["#3b6ea5", "#d1495b", "#edae49", "#00798c", "#66a182", "#8d6a9f"]
REPORT_FILES = ("report.html", "report.pdf", "units.html")


def render_run(run_dir: Path, results: dict | None = None, pdf: bool = True, cache=None) -> None:
    """Write figures/, report.html and report.pdf (unless `pdf` is false) into `run_dir`. With a `cache` (the
    run's `pipeline.cache.Cache`), figures drawn before from the same inputs are taken from it (`cached_figures`).

    With `results` given (a run being written, in its temporary folder) they are written in place. Without,
    results.json is read and checked, everything is rendered into a temporary folder inside the run, and
    only a complete rendering replaces the old one: a failure leaves the run as it was.
    """
    run_dir = Path(run_dir)
    if results is not None:
        _render_into(run_dir, run_dir, results, pdf, cache)
        return
    results = load_results(run_dir)
    check_output(run_dir, "run", option="render")  # only a folder whose marker lists what we wrote is written into
    stage = partial_folder(run_dir, "run")
    try:
        try:
            _render_into(stage, run_dir, results, pdf)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError, UndefinedError) as exc:
            raise RunFormatError(f"{run_dir / 'results.json'}: does not have the layout this report_builder writes "
                                 f"({type(exc).__name__}: {str(exc)[:200]}); re-run the spec, or render it with the "
                                 "version that wrote it") from None
        (stage / OWNER).unlink()
        raise_if_interrupted()  # a Ctrl-C that landed in a callback during rendering is not lost
        replace_ours(run_dir, stage, "run", scope=_is_report_file)
    except OSError as exc:
        raise output_error(exc, run_dir) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _is_report_file(rel: str) -> bool:
    """What rendering writes, and so what a re-render replaces: nothing else of the run is touched."""
    return rel in REPORT_FILES or rel.split("/")[0] == "figures"


def _render_into(out_dir: Path, run_dir: Path, results: dict, pdf: bool = True, cache=None) -> None:
    """Figures into out_dir/figures and the reports into out_dir, reading the run's files from run_dir: report.html
    (with its scripts), units.html (every dissected unit, searchable) and report.pdf (the same report, printed; a
    re-render without it leaves no older report.pdf behind, since what rendering wrote before is replaced)."""
    figures = (make_figures(out_dir, run_dir, results) if cache is None
               else cached_figures(out_dir, run_dir, results, cache))
    atomic_write(out_dir / "report.html", render_html(run_dir, results, figures, scripts=True).encode("utf-8"))
    if "dissection" in results or "netdissect" in results:
        atomic_write(out_dir / "units.html", render_units(run_dir, results).encode("utf-8"))
    if pdf:
        write_pdf(render_html(run_dir, results, figures, scripts=False), out_dir / "report.pdf", out_dir)


def write_pdf(html: str, path: Path, base: Path) -> None:
    from weasyprint import HTML

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        HTML(string=html, base_url=str(base)).write_pdf(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- figures


def make_figures(target: Path, run_dir: Path, results: dict) -> dict[str, list[dict]]:
    """Every figure as {path, caption}, grouped by the section that shows it, written to target/figures."""
    out_dir = target / "figures"
    out_dir.mkdir(exist_ok=True)
    figs: dict[str, list[dict]] = defaultdict(list)
    names = {m["id"]: m["display"] for m in results["models"]}
    methods = [m["id"] for m in results["methods"]]
    by_image: dict[str, list[dict]] = defaultdict(list)
    for e in results["explanations"]:
        by_image[e["image"]].append(e)
    for image in [im["id"] for im in results["images"]]:
        rows = by_image[image]
        path = out_dir / f"grid_{image}.jpg"  # photos: JPEG is a fifth of the PNG, and report.html inlines them
        _comparison_grid(run_dir, rows, methods, names, path)
        preds = "; ".join(f"{names[e['model']]}: {e['target_name']} ({e['predictions'][0]['probability']:.2f})" for e in rows)
        figs["comparison"].append({
            "path": path,
            "caption": f"{image}: the model's input, then each method's explanation of its top-1 class ({preds}).",
        })
    if results["timings"]:
        path = out_dir / "timings.png"
        _timing_chart(results, names, path)
        figs["timings"].append({"path": path, "caption": "Mean wall time per image of each method, per model "
                                                        "(log scale; whiskers span the fastest and slowest image)."})
    if "dissection" in results:
        figs.update(dissection_figures(out_dir, results, names))
    if "netdissect" in results:
        figs.update(netdissect_figures(out_dir, results, names))
    for g in results.get("versions", []):
        if g["layers"]:
            path = out_dir / f"versions_{g['group']}.png"
            fig, ax = plt.subplots(figsize=(6, 3))
            for j, x in enumerate(g["layers"]):
                ax.plot(g["versions"], x["unique"], marker="o", label=x["layer"], color=PALETTE[j % len(PALETTE)])
            ax.set_ylabel("unique concepts")
            ax.set_xlabel("version")
            ax.legend(frameon=False, fontsize=8)
            _save(fig, path, [ax])
            figs["versions"].append({"path": path, "caption": f"{g['display']}: unique concepts per layer across its "
                                                              "versions, in the order the spec lists them."})
    if "evaluation" in results:
        figs.update(trust_figures(out_dir, run_dir, results, names))
    if "lime_sweep" in results:
        figs.update(sweep_figures(out_dir, results, names))
    if results.get("concepts", {}).get("ablation"):
        figs.update(concept_figures(out_dir, results, names))
    gradcam_rows = [r for r in results["agreement"]["rows"] if r["method_b"] == "gradcam"]
    if gradcam_rows:
        path = out_dir / "agreement.png"
        _agreement_chart(results, gradcam_rows, names, path)
        figs["agreement"].append({"path": path, "caption": "IoU between the LIME mask and the top-n Grad-CAM mask, per "
                                                          "image and model; dashed lines mark each model's mean."})
    return figs


FIGURE_LIST = "figures.json"  # in a cached set of figures: each one's section, file name and fields


def cached_figures(target: Path, run_dir: Path, results: dict, cache) -> dict[str, list[dict]]:
    """`make_figures` through the cache. The figures are a function of the results less their provenance (times,
    cache counts) and their `cached` flags (which results came from the cache: a table says it, no figure does),
    of the run's data files and of this code with its plotting libraries, and all of those are in the key: a rerun
    whose results are the same copies the figures (about 7 s of the demo's warm rerun)."""
    from report_builder.pipeline.cache import conforms

    out_dir = target / "figures"
    key = figures_key(run_dir, results)
    stored = cache.load_files("figures", key)
    try:
        listed = json.loads(stored.pop(FIGURE_LIST, b"null")) if stored is not None else None
    except ValueError:
        listed = None
    if conforms(listed, [{"section": str, "name": str, "fields": dict}]) and sorted(
            f["name"] for f in listed) == sorted(stored):
        out_dir.mkdir(exist_ok=True)
        figs: dict[str, list[dict]] = defaultdict(list)
        for f in listed:
            atomic_write(out_dir / f["name"], stored[f["name"]])
            figs[f["section"]].append({**f["fields"], "path": out_dir / f["name"]})
        return figs
    figs = make_figures(target, run_dir, results)
    listed = [{"section": section, "name": f["path"].name, "fields": {k: v for k, v in f.items() if k != "path"}}
              for section, items in figs.items() for f in items]  # fields: the caption, the model, ...
    cache.save_files("figures", key, {**{f["name"]: (out_dir / f["name"]).read_bytes() for f in listed},
                                      FIGURE_LIST: json.dumps(listed).encode()})
    return figs


def figures_key(run_dir: Path, results: dict) -> str:
    """The cache key of what the figures are drawn from: results.json's content but its provenance, every data
    file of the run directory (not the report files, nor figures/), the package's source and the plotting
    libraries."""
    import PIL

    from report_builder.pipeline.cache import stage_key  # here: `render RUN_DIR` draws without a cache, and torch

    root, files = Path(run_dir), {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not (folder == str(root) and (d.startswith(".") or d == "figures")))
        for name in sorted(names):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if not (_is_report_file(rel) or rel in ("results.json", OWNER) or rel.startswith(".")):
                data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
                files[rel] = hashlib.blake2b(data, digest_size=32).hexdigest()
    return stage_key("figures", {"code": package_digest(), "matplotlib": matplotlib.__version__,
                                 "pil": PIL.__version__, "numpy": np.__version__, "results": _drawn_from(results),
                                 "files": files})


def _drawn_from(value, top: bool = True):
    """The results as the figures see them: without the provenance and without any `cached` flag."""
    if isinstance(value, dict):
        return {k: _drawn_from(v, False) for k, v in value.items()
                if k != "cached" and not (top and k == "provenance")}
    if isinstance(value, list):
        return [_drawn_from(v, False) for v in value]
    return value


def _save(fig, path: Path, plain_axes: list | None = None, dpi: int = 130) -> None:
    """Write a chart: top and right spines off on `plain_axes`, tight layout, PNG (JPEG for a .jpg path: figures
    of photos), figure closed."""
    for ax in plain_axes or []:
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    jpeg = path.suffix == ".jpg"
    fig.savefig(path, dpi=dpi, **({"pil_kwargs": {"quality": 88}} if jpeg else {}))
    plt.close(fig)


def dissection_figures(out_dir: Path, results: dict, names: dict) -> dict[str, list[dict]]:
    summary = results["dissection"]["summary"]
    models = summary["models"]
    figs: dict[str, list[dict]] = defaultdict(list)

    # Q1: the top-10 concepts of each model
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.4), squeeze=False)
    for i, m in enumerate(models):
        ax = axes[0][i]
        top = m["top"][::-1]
        ax.barh([t["concept"] for t in top], [t["units"] for t in top], color=PALETTE[i % len(PALETTE)])
        for y, t in enumerate(top):
            ax.text(t["units"], y, f" {t['units']}", va="center", fontsize=7)
        ax.set_title(names[m["model"]], fontsize=9)
        ax.set_xlabel("units")
        ax.tick_params(axis="y", labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    path = out_dir / "q1_top_concepts.png"
    _save(fig, path)
    figs["q1"].append({"path": path, "caption": "The ten concepts learned by the most units, per model, over all "
                                               "dissected layers."})

    # Q2: shared and model-specific concepts per layer
    for c in summary["comparisons"]:
        rows = [("all layers", c["overall"])] + [(x["layer"], x) for x in c["layers"]]
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
        labels = [r[0] for r in rows][::-1]
        only_a = [r[1]["only_a"] for r in rows][::-1]
        shared = [r[1]["shared"] for r in rows][::-1]
        only_b = [r[1]["only_b"] for r in rows][::-1]
        ax.barh(labels, only_a, color=PALETTE[0], label=f"only {names[c['a']]}")
        ax.barh(labels, shared, left=only_a, color="#9aa5b1", label="shared")
        ax.barh(labels, only_b, left=[x + y for x, y in zip(only_a, shared)], color=PALETTE[1],
                label=f"only {names[c['b']]}")
        ax.set_xlabel("unique concepts")
        ax.legend(frameon=False, fontsize=7, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
        ax.spines[["top", "right"]].set_visible(False)
        path = out_dir / f"q2_overlap_{c['a']}_{c['b']}.png"
        _save(fig, path)
        figs["q2"].append({"path": path, "caption": f"Concepts found only in {names[c['a']]}, in both models, and only "
                                                   f"in {names[c['b']]}, overall and per layer."})

    # Q4: concepts learned by more than 3 units in each layer
    for i, m in enumerate(models):
        layers = m["layers"]
        fig, axes = plt.subplots(1, len(layers), figsize=(2.5 * len(layers), 3.6), squeeze=False)
        for j, layer in enumerate(layers):
            ax = axes[0][j]
            items = layer["over3"][:15][::-1]
            ax.barh([t["concept"] for t in items], [t["units"] for t in items], color=PALETTE[i % len(PALETTE)])
            ax.set_title(layer["layer"], fontsize=9)
            ax.tick_params(axis="y", labelsize=6.5)
            ax.tick_params(axis="x", labelsize=7)
            ax.spines[["top", "right"]].set_visible(False)
            if not items:
                ax.text(0.5, 0.5, "no concept\nhas > 3 units", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        fig.suptitle(names[m["model"]], fontsize=10)
        path = out_dir / f"q4_layers_{m['model']}.png"
        _save(fig, path)
        figs["q4_layers"].append({"path": path, "caption": f"{names[m['model']]}: the concepts learned by more than 3 "
                                                          "units in each layer (at most 15 shown per layer)."})

    # Q4: distribution of similarity scores per layer
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 2.8), squeeze=False)
    by_model = {e["model"]: e for e in results["dissection"]["models"]}
    for i, m in enumerate(models):
        ax = axes[0][i]
        for j, layer in enumerate(by_model[m["model"]]["layers"]):
            ax.hist([u["similarity"] for u in layer["labels"]], bins=30, histtype="step", linewidth=1.4,
                    label=layer["layer"], color=PALETTE[j % len(PALETTE)])
        ax.set_title(names[m["model"]], fontsize=9)
        ax.set_xlabel(f"{results['dissection']['similarity']} similarity")
        ax.set_ylabel("units")
        ax.legend(frameon=False, fontsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    path = out_dir / "q4_similarity.png"
    _save(fig, path)
    figs["q4_similarity"].append({"path": path, "caption": "Distribution of the best concept's similarity score "
                                                          "of every unit, per layer."})
    return figs


CATEGORY_COLORS = {"color": "#d1495b", "object": "#3b6ea5", "part": "#66a182", "material": "#edae49",
                   "scene": "#8d6a9f", "texture": "#00798c"}


def netdissect_figures(out_dir: Path, results: dict, names: dict) -> dict[str, list[dict]]:
    nd = results["netdissect"]
    figs: dict[str, list[dict]] = defaultdict(list)
    categories = nd["categories"]

    # Detectors per category per layer, every model side by side (stacked by category).
    bars = [(names[m["model"]], x) for m in nd["models"] for x in m["layers"]][::-1]  # barh draws bottom-up
    fig, ax = plt.subplots(figsize=(7, 0.38 * len(bars) + 1.3))
    left = [0] * len(bars)
    labels = [f"{model} {x['layer']}" for model, x in bars]
    for c in categories:
        values = [x["per_category"].get(c, 0) for _, x in bars]
        ax.barh(labels, values, left=left, color=CATEGORY_COLORS.get(c, "#9aa5b1"), label=c)
        left = [a + b for a, b in zip(left, values)]
    for y, (total, (_, x)) in enumerate(zip(left, bars)):
        ax.text(total, y, f" {total} ({x['unique']} unique)", va="center", fontsize=7)
    ax.set_xlabel("detectors (units with best IoU > %g)" % nd["settings"]["iou_threshold"])
    ax.legend(frameon=False, fontsize=7, ncol=len(categories), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax.set_xlim(0, max(left + [1]) * 1.25)
    path = out_dir / "netdissect_categories.png"
    _save(fig, path, [ax])
    figs["netdissect"].append({"path": path, "caption": "Detectors per category in each dissected layer; the number "
                                                       "after each bar counts its detectors and their unique concepts."})

    # NetDissect's per-layer bar graph: units per detected concept, coloured by category.
    for m in nd["models"]:
        layers = m["layers"]
        fig, axes = plt.subplots(len(layers), 1, figsize=(7, 1.55 * len(layers) + 0.4), squeeze=False)
        for ax, x in zip(axes[:, 0], layers):
            counts: dict[tuple[str, str], int] = defaultdict(int)
            for u in x["unit_labels"]:
                if u["detector"]:
                    counts[(u["category"], u["label"])] += 1
            order = sorted(counts, key=lambda k: (categories.index(k[0]) if k[0] in categories else 99, -counts[k]))[:40]
            ax.bar(range(len(order)), [counts[k] for k in order], color=[CATEGORY_COLORS.get(k[0], "#9aa5b1") for k in order])
            ax.set_xticks(range(len(order)), [k[1] for k in order], rotation=60, ha="right", fontsize=6)
            ax.set_xlim(-0.6, max(len(order), 20) - 0.4)  # the same bar width whatever the number of concepts
            ax.set_ylabel(x["layer"], fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.spines[["top", "right"]].set_visible(False)
            if not order:
                ax.text(0.5, 0.5, "no detectors", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        fig.suptitle(f"{names[m['model']]}: units per detected concept", fontsize=9)
        path = out_dir / f"netdissect_concepts_{m['model']}.png"
        _save(fig, path)
        figs["netdissect_concepts"].append({"path": path, "caption": f"{names[m['model']]}: how many detectors each "
                                            "concept has, per layer, coloured by category (as NetDissect draws it)."})

    # The rotation test: unique detectors and detectors against alpha.
    curves = [m for m in nd["models"] if m.get("rotation")]
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(7, 2.8))
        for i, m in enumerate(curves):
            r = m["rotation"]
            color = PALETTE[i % len(PALETTE)]
            axes[0].plot(r["alphas"], r["unique"], marker="o", color=color, label=f"{names[m['model']]} {r['layer']}")
            axes[1].plot(r["alphas"], r["detectors"], marker="o", color=color)
        axes[0].set_ylabel("unique detectors")
        axes[1].set_ylabel("detectors")
        for ax in axes:
            ax.set_xlabel("rotation α (0 = original basis)")
            ax.set_ylim(bottom=0)
        axes[0].legend(frameon=False, fontsize=7)
        path = out_dir / "netdissect_rotation.png"
        _save(fig, path, list(axes))
        figs["netdissect_rotation"].append({"path": path, "caption": "Network Dissection after rotating the layer's "
                                            "channels by Qᵅ, a seeded random rotation Q taken α of the way "
                                            "from the identity."})

    # The bases side by side: per model and layer, detectors and unique concepts of each basis.
    panels = [(m, layer, [b for b in m["bases"] if b["layer"] == layer])
              for m in nd["models"] for layer in dict.fromkeys(b["layer"] for b in m.get("bases", []))]
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.9 * len(panels) + 0.4), squeeze=False)
        for ax, (m, layer, rows) in zip(axes[:, 0], panels):
            x = range(len(rows))
            ax.bar([i - 0.2 for i in x], [b["detectors"] for b in rows], 0.4, color=PALETTE[0], label="detectors")
            ax.bar([i + 0.2 for i in x], [b["unique"] for b in rows], 0.4, color=PALETTE[1], label="unique concepts")
            ax.set_xticks(list(x), [f"{b['title']}\n({b['size']})" for b in rows], fontsize=7)
            ax.set_ylabel(f"{names[m['model']]}\n{layer}", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.spines[["top", "right"]].set_visible(False)
        axes[0, 0].legend(frameon=False, fontsize=7)
        path = out_dir / "netdissect_bases.png"
        _save(fig, path, list(axes[:, 0]))
        figs["netdissect_bases"].append({"path": path, "caption": "Network Dissection in each basis of the layer: "
                                         "its units, a full random rotation, and the learned directions (in brackets, "
                                         "the basis's size)."})
    return figs


def _method_colors(methods: list[str]) -> dict[str, str]:
    colors = {m: PALETTE[i % len(PALETTE)] for i, m in
              enumerate(k for k in methods if metric_registry.chance_kind(k) is None)}
    greys = ("#9aa5b1", "#6b7785", "#c2c9d1", "#4a5561", "#aab3bd", "#808b97")
    colors.update({m: greys[i % len(greys)] for i, m in
                   enumerate(k for k in methods if metric_registry.chance_kind(k) is not None)})
    return colors


def trust_figures(out_dir: Path, run_dir: Path, results: dict, names: dict) -> dict[str, list[dict]]:
    """Per model: the mean deletion and insertion curves of each method; the maps as blocks are randomised."""
    ev = results["evaluation"]
    figs: dict[str, list[dict]] = defaultdict(list)
    colors = _method_colors(ev["methods"])
    for m in results["models"]:
        curves = [c for c in ev["curves"] if c["model"] == m["id"]]
        if curves:
            fig, axes = plt.subplots(1, 2, figsize=(7.2, 2.9), sharey=True)
            for method in ev["methods"]:
                mine = [c for c in curves if c["method"] == method]
                if not mine:
                    continue
                for ax, kind in zip(axes, ("deletion", "insertion")):
                    # each image's curve divided by its probability on the intact image (deletion's first point,
                    # insertion's last), as the normalised areas are, so that no image weighs by its confidence
                    y = np.mean([np.asarray(c[kind]) / (c[kind][0] if kind == "deletion" else c[kind][-1])
                                 for c in mine if (c[kind][0] if kind == "deletion" else c[kind][-1]) > 0], axis=0)
                    ax.plot(np.linspace(0, 1, len(y)), y, color=colors[method], label=_method_title(method),
                            linestyle="--" if metric_registry.chance_kind(method) else "-", linewidth=1.5)
            axes[0].set_title("deletion (lower is better)", fontsize=9)
            axes[1].set_title("insertion (higher is better)", fontsize=9)
            for ax in axes:
                ax.set_xlabel("fraction of pixels removed / revealed", fontsize=8)
            axes[0].set_ylabel("top-1 probability / intact image's", fontsize=8)
            axes[1].legend(frameon=False, fontsize=7)
            path = out_dir / f"trust_curves_{m['id']}.png"
            _save(fig, path, list(axes))
            figs["trust_curves"].append({"path": path, "model": m["id"], "caption": f"{m['display']}: the top-1 class's probability as "
                                         "pixels are removed or revealed in each map's order (a tied group at once), "
                                         "divided by its probability on the intact image and averaged over images; "
                                         "dashed: the chance maps."})
        sanity = [x for x in ev["sanity"] if x["model"] == m["id"]]
        if sanity:
            image = sanity[0]["image"]
            rows = [x for x in sanity if x["image"] == image]
            with np.load(inside(run_dir, rows[0]["maps"], "evaluation.sanity maps")) as z:
                maps = {k: z[k].astype(np.float32) for k in z.files}
            steps = len(rows[0]["layers"])
            fig, axes = plt.subplots(len(rows), steps + 1, figsize=(1.25 * (steps + 1), 1.35 * len(rows) + 0.4),
                                     squeeze=False)
            for r, row in enumerate(rows):
                for c in range(steps + 1):
                    ax = axes[r][c]
                    ax.imshow(maps[row["method"]][c], cmap="jet", vmin=0, vmax=1 if c == 0 else None)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if r == 0:
                        ax.set_title("original" if c == 0 else f"to {row['layers'][c - 1]}", fontsize=6.5)
                    if c == 0:
                        ax.set_ylabel(_method_title(row["method"]), fontsize=8)
                    else:
                        rho = row["spearman"][c - 1]
                        ax.set_xlabel("flat" if rho is None else f"ρ {rho:.2f}", fontsize=6.5)
            path = out_dir / f"trust_sanity_{m['id']}.png"
            _save(fig, path, dpi=110)
            figs["trust_sanity"].append({"path": path, "model": m["id"], "caption": f"{m['display']}, {image}: each method's map as the "
                                         "model's blocks are re-initialised from the output down (cumulatively, up to "
                                         "the block named); ρ is the Spearman rank correlation with the original."})
    return figs


def sweep_figures(out_dir: Path, results: dict, names: dict) -> dict[str, list[dict]]:
    """Mean IoU with Grad-CAM against mean LIME seconds per setting, the Pareto front joined, the best starred."""
    sw = results["lime_sweep"]
    models = [m["id"] for m in results["models"]]
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.0), squeeze=False)
    for ax, model in zip(axes[0], models):
        points = {e["setting"]: e for e in sw["summary"] if e["model"] == model}
        ax.scatter([e["mean_seconds"] for e in points.values()], [e["mean_iou"] or 0 for e in points.values()],
                   color="#9aa5b1", s=18, zorder=2)
        front = [points[k] for k in sw["pareto"][model]]
        ax.plot([e["mean_seconds"] for e in front], [e["mean_iou"] or 0 for e in front], color=PALETTE[0], marker="o",
                markersize=4, zorder=3, label="Pareto front")
        best = points[sw["best"][model]]
        ax.scatter([best["mean_seconds"]], [best["mean_iou"] or 0], marker="*", s=120, color=PALETTE[1], zorder=4,
                   label="best IoU")
        ax.set_xlabel("mean LIME seconds per image", fontsize=8)
        ax.set_ylabel("mean IoU with Grad-CAM", fontsize=8)
        ax.set_title(names[model], fontsize=9)
        ax.legend(frameon=False, fontsize=7)
    path = out_dir / "lime_sweep.png"
    _save(fig, path, list(axes[0]))
    return {"sweep": [{"path": path, "caption": "Each LIME setting of the sweep: its mean IoU with Grad-CAM against "
                                                "its mean time per image; the line joins the settings no other beats "
                                                "on both."}]}


def _method_title(method: str) -> str:
    if metric_registry.chance_kind(method) is not None:
        return metric_registry.chance_title(method)
    return METHOD_TITLES.get(method, method)


def concept_figures(out_dir: Path, results: dict, names: dict) -> dict[str, list[dict]]:
    """Per model: the drop of the top-1 probability against k, for the top-k concept units, the random bar (its
    mean and the middle 95% of its sets) and each other baseline, one panel per concept layer."""
    section = results["concepts"]
    figs: dict[str, list[dict]] = defaultdict(list)
    baselines = {b["name"]: b for b in section["baselines"]}
    for model in names:
        rows = [r for r in section["ablation"] if r["model"] == model]
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        if not layers:
            continue
        fig, axes = plt.subplots(1, len(layers), figsize=(min(7.2, 2.5 * len(layers) + 0.6), 2.5), squeeze=False,
                                 sharey=True)
        for ax, layer in zip(axes[0], layers):
            mine = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["k"])
            ks = [r["k"] for r in mine]
            for j, (name, b) in enumerate(baselines.items()):
                if b["draws"]:
                    ax.fill_between(ks, [r[f"{name}_low"] for r in mine], [r[f"{name}_high"] for r in mine],
                                    color=PALETTE[1], alpha=0.18, linewidth=0)
                ax.plot(ks, [r[name] for r in mine], color=PALETTE[1 + j], marker="o", markersize=3, linewidth=1.2,
                        linestyle="--", label=b["title"])
            ax.plot(ks, [r["top"] for r in mine], color=PALETTE[0], marker="o", markersize=3.5, linewidth=1.8,
                    label="top-k concept units")
            for r in mine:
                if r["verdict"] == "fails":
                    ax.plot([r["k"]], [r["top"]], marker="x", color="black", markersize=6)
            ax.set_xscale("log")
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            ax.set_title(layer, fontsize=9)
            ax.set_xlabel("k units ablated", fontsize=8)
        axes[0][0].set_ylabel("drop of top-1 probability", fontsize=8)
        axes[0][-1].legend(frameon=False, fontsize=6.5)
        path = out_dir / f"concepts_ablation_{model}.png"
        _save(fig, path, list(axes[0]))
        figs["concepts"].append({"path": path, "model": model, "caption": f"{names[model]}: the mean drop of the top-1 "
                                 "probability over the explained images when k units are set to zero; the band is "
                                 "the middle 95% of the random sets' mean drops, and × marks a k where the concept "
                                 "units do not beat random."})
    return figs


def concept_tiles(run_dir: Path, results: dict) -> list[dict]:
    """Per model and image, at the deepest concept layer: the Grad-CAM map there and each top unit's map, inlined,
    with the unit's labels and share."""
    root = Path(run_dir).resolve()
    section = results["concepts"]
    deepest: dict[str, str] = {}
    for r in section["records"]:
        deepest[r["model"]] = r["layer"]  # records run through the layers in order
    out = []
    for r in section["records"]:
        if r["layer"] != deepest[r["model"]]:
            continue
        out.append({**r, "gradcam_src": _data_uri(inside(run_dir, r["gradcam"], "concepts gradcam", root=root)),
                    "tiles": [{**u, "src": _data_uri(inside(run_dir, u["map"], "concepts unit map", root=root))}
                              for u in r["top"]]})
    return out


def galleries(run_dir: Path, results: dict) -> list[dict]:
    """Per model and layer, the `pdf_units` units with the best IoU, each with its gallery strip inlined (units.html
    has every unit)."""
    nd = results["netdissect"]
    limit = nd["settings"]["pdf_units"]
    out = []
    for m in nd["models"]:
        for x in m["layers"]:
            units = sorted(x["unit_labels"], key=lambda u: -u["iou"])[:limit]
            out.append({"model": m["model"], "layer": x["layer"], "total": len(x["unit_labels"]),
                        "units": [{**u, "src": _data_uri(inside(run_dir, u["gallery"], "netdissect gallery"))}
                                  for u in units]})
    return out


GRID_COLUMNS = 6  # panels per row of a comparison grid: more methods wrap onto further rows


def _comparison_grid(run_dir: Path, rows: list[dict], methods: list[str], names: dict, path: Path) -> None:
    """Per model, its input then each method's overlay, GRID_COLUMNS panels to a row (more methods wrap), every
    panel titled with its method and its time."""
    cols = min(GRID_COLUMNS, 1 + len(methods))
    lines = -(-(1 + len(methods)) // cols)  # rows of panels per model
    fig, axes = plt.subplots(len(rows) * lines, cols, figsize=(2.1 * cols, 2.45 * len(rows) * lines), squeeze=False)
    for r, e in enumerate(rows):
        panels = [("Input", e["original"], None)] + [(METHOD_TITLES.get(m, m), e["methods"][m]["overlay"] if m in
                                                      e["methods"] else None, e["methods"].get(m)) for m in methods]
        for k in range(lines * cols):
            ax = axes[r * lines + k // cols][k % cols]
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(panels):
                ax.axis("off")
                continue
            title, rel, entry = panels[k]
            ax.set_title(title, fontsize=9)
            if rel is None:  # the method does not apply to this model
                ax.text(0.5, 0.5, "does not apply\nto this model", ha="center", va="center", fontsize=8,
                        color="#616e7c", transform=ax.transAxes)
                continue
            ax.imshow(plt.imread(inside(run_dir, rel, f"explanations of {e['image']}")))
            if k == 0:
                ax.set_ylabel(names[e["model"]], fontsize=9)
            if entry:
                ax.set_xlabel(f"{entry['seconds']:.2f} s", fontsize=8)
    _save(fig, path, dpi=110)


def _timing_chart(results: dict, names: dict, path: Path) -> None:
    models = [m["id"] for m in results["models"]]
    methods = [m["id"] for m in results["methods"]]
    lookup = {(t["model"], t["method"]): t for t in results["timings"]}
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, model in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for j, method in enumerate(methods):
            t = lookup.get((model, method))
            if t:
                xs.append(j + (i - (len(models) - 1) / 2) * width)
                ys.append(t["mean_seconds"])
                lo.append(t["mean_seconds"] - t["min_seconds"])
                hi.append(t["max_seconds"] - t["mean_seconds"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=names[model], color=PALETTE[i % len(PALETTE)])
    ax.set_xticks(range(len(methods)), [METHOD_TITLES.get(m, m) for m in methods],
                  rotation=0 if len(methods) <= 5 else 40, ha="center" if len(methods) <= 5 else "right", fontsize=8)
    ax.set_yscale("log")
    # a log axis labels its ticks in math mode ($10^{1}$), which is off for users' text: plain numbers instead
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("seconds per image")
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path, [ax])


def _agreement_chart(results: dict, rows: list[dict], names: dict, path: Path) -> None:
    models = [m["id"] for m in results["models"]]
    images = [im["id"] for im in results["images"]]
    lookup = {(r["model"], r["image"]): r["iou"] for r in rows}
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, model in enumerate(models):
        vals = [lookup.get((model, im)) for im in images]
        xs = [k + (i - (len(models) - 1) / 2) * width for k in range(len(images))]
        color = PALETTE[i % len(PALETTE)]
        ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=names[model], color=color)
        defined = [v for v in vals if v is not None]
        if defined:
            ax.axhline(sum(defined) / len(defined), color=color, linestyle="--", linewidth=1)
    ax.set_xticks(range(len(images)), images, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU (LIME, Grad-CAM)")
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path, [ax])


# ---------------------------------------------------------------- HTML


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (int, float)):
        return analysis._f(value, digits)
    return str(value)


def _seconds(value) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def _data_uri(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    kind = "jpeg" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "png"
    return f"data:image/{kind};base64,{data}"


def environment() -> Environment:
    if not TEMPLATES.is_dir():
        raise UserError(f"templates folder {TEMPLATES} is missing; reinstall report_builder from its repository")
    env = _environment()
    env.globals["evaluation_metrics"] = metric_registry.METRICS  # read at each render: the registry is the source
    return env


@functools.lru_cache(maxsize=1)
def _environment() -> Environment:
    """One environment per process, so its compiled templates are reused by every render (compiling them all takes
    about a second; the loader still notices an edited template)."""
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.do"],
    )
    env.filters["fmt"] = _fmt
    env.filters["seconds"] = _seconds
    env.filters["short"] = lambda h, n=12: (h or "")[:n]
    env.globals["describe"] = _describe
    env.globals["chance_kind"] = metric_registry.chance_kind
    env.globals["chance_title"] = metric_registry.chance_title
    env.globals["beats_chance"] = _beats_chance
    env.globals["label_fit"] = analysis.label_fit
    return env


@pass_environment
def _describe(env: Environment, metric: metric_registry.Metric, settings: dict) -> Markup:
    """A metric's row in the trust section: its description (Jinja text in the registry) given its settings, each
    column's direction of better and its rule; the settings' values are escaped as everywhere."""
    better = {c.name: c.better for c in metric.columns}
    return Markup(_compiled(env, metric.description).render(s=settings, better=better, rule=metric.rule))


@functools.lru_cache(maxsize=None)
def _compiled(env: Environment, text: str):
    return env.from_string(text)


def _beats_chance(settings: dict) -> Markup:
    """The rule of 'beats chance' (the registry's BEATS_CHANCE) for this run's chance maps."""
    maps = metric_registry.chance_methods(settings)
    bars = "; ".join(f"{m.title}: " + ", ".join(metric_registry.chance_title(c) for c in maps
                                                        if metric_registry.chance_kind(c) in m.chance)
                     for m in metric_registry.METRICS if m.chance and settings.get(m.spec_key) is not None)
    draws = (settings.get("chance") or {}).get("draws", 1)
    return Markup(environment().from_string(metric_registry.BEATS_CHANCE).render(bars=bars, draws=draws))


def describe_text(metric: metric_registry.Metric, settings: dict) -> str:
    """A metric's description as plain text (tags dropped, entities read): the README states these words."""
    return html_text(str(_describe(environment(), metric, settings)))


def html_text(markup: str) -> str:
    import html
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def render_html(run_dir: Path, results: dict, figures: dict[str, list[dict]], scripts: bool = True) -> str:
    """report.html; with `scripts`, the small helpers that make its tables searchable and sortable and follow the
    reader in the contents (the PDF is rendered without them)."""
    env = environment()
    names = {m["id"]: m["display"] for m in results["models"]}
    inlined: dict[str, list[dict]] = defaultdict(list)
    for section, items in figures.items():
        inlined[section] = [{**{k: v for k, v in f.items() if k != "path"}, "src": _data_uri(f["path"])} for f in items]
    findings_by_section: dict[str, list[dict]] = defaultdict(list)
    for f in results["findings"]:
        findings_by_section[f["section"]].append(f)
    css = (TEMPLATES / "report.css").read_text()
    cams = [m["id"] for m in results["methods"] if m["id"] != "lime"]
    sections = [(section.id, section.title) for section in sections_of(results)]
    numbers = {sid: i + 1 for i, (sid, _) in enumerate(sections)}
    return env.get_template("report.html").render(
        r=results,
        sections=sections,
        numbers=numbers,
        names=names,
        figures=inlined,
        findings_by_section=findings_by_section,
        method_titles=METHOD_TITLES,
        css=css,
        thresholds=[f"{t:g}" for t in results["agreement"]["thresholds"]],
        cams=cams,
        ablation_fallback=sorted({names[e["model"]] for e in results["explanations"]
                                  if e["methods"].get("ablationcam", {}).get("implementation") == "grad-cam"}),
        agreement_table=agreement_table(results),
        galleries=galleries(run_dir, results) if "netdissect" in results else [],
        concept_tiles=concept_tiles(run_dir, results) if "concepts" in results else [],
        units_page="dissection" in results or "netdissect" in results,
        js=(TEMPLATES / "report.js").read_text() if scripts else None,
        screen_css=(TEMPLATES / "screen.css").read_text() if scripts else None,  # the browser's, not the PDF's
    )


def render_units(run_dir: Path, results: dict) -> str:
    """units.html: one searchable, sortable table per model of every dissected unit, with its CLIP-Dissect label
    and its Network Dissection label and gallery strip (images decoded lazily)."""
    names = {m["id"]: m["display"] for m in results["models"]}
    root = Path(run_dir).resolve()
    rows: dict[tuple[str, str, int], dict] = {}
    for m in results.get("dissection", {}).get("models", []):
        for x in m["layers"]:
            for u in x["labels"]:
                rows[(m["model"], x["layer"], u["unit"])] = {
                    "layer": x["layer"], "unit": u["unit"], "clip": u["label"], "similarity": u["similarity"],
                    "alternatives": [a["label"] for a in u["alternatives"]]}
    for m in results.get("netdissect", {}).get("models", []):
        for x in m["layers"]:
            for u in x["unit_labels"]:
                row = rows.setdefault((m["model"], x["layer"], u["unit"]), {"layer": x["layer"], "unit": u["unit"]})
                row.update(nd=u["label"], category=u["category"], iou=u["iou"], detector=u["detector"],
                           src=_data_uri(inside(run_dir, u["gallery"], "netdissect gallery", root=root)))
    tables = []
    for model in names:
        mine = [row for (mo, _, _), row in rows.items() if mo == model]
        if mine:
            tables.append({"model": model, "rows": mine})
    return environment().get_template("units.html").render(
        r=results, names=names, tables=tables, has_clip="dissection" in results, has_nd="netdissect" in results,
        css=(TEMPLATES / "report.css").read_text(), js=(TEMPLATES / "report.js").read_text(),
        screen_css=(TEMPLATES / "screen.css").read_text())


def agreement_table(results: dict) -> list[dict]:
    """One row per image and model: IoU of LIME with each CAM, the Grad-CAM thresholds, LIME's R²."""
    rows: dict[tuple[str, str], dict] = {}
    for a in results["agreement"]["rows"]:
        row = rows.setdefault((a["image"], a["model"]), {"image": a["image"], "model": a["model"],
                                                         "lime_pixels": a["lime_pixels"], "iou": {}, "at": {}})
        row["iou"][a["method_b"]] = a["iou"]
        if a["method_b"] == "gradcam":
            row["at"] = {k.split("@")[1]: v for k, v in a.items() if k.startswith("iou@")}
    for e in results["explanations"]:
        if (e["image"], e["model"]) in rows:
            rows[(e["image"], e["model"])]["r2"] = e["methods"]["lime"]["score"]
    return list(rows.values())


# ---------------------------------------------------------------- diff report


def render_diff(out_dir: Path, diff: dict) -> None:
    """report.html and report.pdf of a diff (diff.json's content), with one chart of relabelled units."""
    figures: dict[str, list[dict]] = defaultdict(list)
    rows = [(f"{p['a']} {x['layer']}", x["share"]) for p in diff["pairs"] if p["dissection"] and p["dissection"]["compared"]
            for x in p["dissection"]["layers"]]
    if rows:
        fig_dir = out_dir / "figures"
        fig_dir.mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.0))
        ax.barh([r[0] for r in rows][::-1], [100 * r[1] for r in rows][::-1], color=PALETTE[0])
        ax.set_xlabel("units whose label changed (%)")
        ax.set_xlim(0, 100)
        ax.spines[["top", "right"]].set_visible(False)
        path = fig_dir / "relabelled.png"
        _save(fig, path)
        figures["dissection"].append({"src": _data_uri(path), "caption": "Share of units whose CLIP-Dissect label "
                                                                         "differs between run A and run B, per layer."})
    env = environment()
    css = (TEMPLATES / "report.css").read_text()
    page = env.get_template("diff.html")
    html = page.render(d=diff, css=css, figures=figures, js=None, screen_css=(TEMPLATES / "screen.css").read_text())
    atomic_write(out_dir / "report.html", html.encode("utf-8"))
    write_pdf(page.render(d=diff, css=css, figures=figures, js=None, screen_css=None), out_dir / "report.pdf", out_dir)
