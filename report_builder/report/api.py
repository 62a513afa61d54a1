"""A run in a notebook: `open_run(path)` hands back its tables as pandas DataFrames, and `run(spec)` runs a study.

Everything is read from the run directory alone (results.json, checked as render and diff check it, and the .npz
maps), read-only and only when asked for: a table is built the first time it is used.

    from report_builder import open_run
    r = open_run("output/demo")
    r.units.groupby("model").label.value_counts().groupby(level=0).head(10)   # Q1, per model
    r.maps("lite0", "chelsea", "gradcam")                                    # the raw map, a NumPy array
"""
from __future__ import annotations

import functools
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from report_builder.label_quality import METRICS as QUALITY_METRICS, QUALITY_CSV, combination_text
from report_builder.errors import UserError
from report_builder.evaluation import registry as metric_registry
from report_builder.report import analysis
from report_builder.report.rundir import RunFormatError, check_id, inside, load_results

ALTERNATIVES = 3
CHECK_COLUMNS = ["name", "metric", "group", "model", "method", "layer", "image", "category", "value", "values", "at_least",
                 "at_most", "each", "passed", "message"]  # next-best concepts per unit, as in dissection/<model>.csv
DIRECTION_COLUMNS = ["model", "layer", "method", "direction", "label", "similarity", "scorer", "netdissect_label",
                     "netdissect_category", "iou", "detector"]
ALL_LAYERS = "all"  # dissection_summary's layer for a model's row over all its layers
# dissection_summary's paired comparisons over a layer's units, as analysis.quality_summary names them
COMPARISONS = ("label_vs_random", "combination_vs_label")
DIRECTION_FIT_COLUMNS = ["model", "layer", "method", "components", "components_asked", "reconstruction_error",
                         "variance_explained", "sparsity", "unique"]


class Run:
    """One run directory, read-only. Tables are pandas DataFrames; `spec` and `provenance` are dicts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._results = load_results(self.path)

    def __repr__(self) -> str:
        r = self._results
        return (f"<report_builder run {r['run_name']!r} at {self.path}: {len(r['models'])} model(s), "
                f"{len(r['images'])} image(s), methods {', '.join(m['id'] for m in r['methods'])}>")

    # ---------------------------------------------------------------- plain data

    @property
    def results(self) -> dict:
        """results.json as a dict (every number in the report)."""
        return self._results

    @property
    def spec(self) -> dict:
        return self._results["spec"]

    @property
    def provenance(self) -> dict:
        return self._results["provenance"]

    @property
    def findings(self) -> list[str]:
        return [f["text"] for f in self._results["findings"]]

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    @property
    def units_path(self) -> Path:
        return self.path / "units.html"

    # ---------------------------------------------------------------- tables

    @functools.cached_property
    def models(self) -> pd.DataFrame:
        return pd.DataFrame([{k: v for k, v in m.items() if k != "preprocess"} for m in self._results["models"]])

    @functools.cached_property
    def images(self) -> pd.DataFrame:
        return pd.DataFrame(self._results["images"])

    @functools.cached_property
    def units(self) -> pd.DataFrame:
        """CLIP-Dissect: one row per dissected unit (model, layer, unit, label, similarity, the next-best concepts
        alt_1..alt_3 with their similarities, scorer); with `dissect.quality`, also the label chosen on the first
        part of the probe (heldout_label) and its held-out pearson, auprc, f1, iou, a random label's (random_*),
        the Linear-Explanations combination ('0.62 dog + 0.31 grass') and its held-out pearson, and the label's
        stability over bootstrap resamples; empty without a dissection."""
        rows = []
        for m in self._results.get("dissection", {}).get("models", []):
            for x in m["layers"]:
                for u in x["labels"]:
                    row = {"model": m["model"], "layer": x["layer"], "unit": u["unit"], "label": u["label"],
                           "similarity": u["similarity"], "scorer": u["scorer"]}
                    for k in range(ALTERNATIVES):
                        alt = u["alternatives"][k] if k < len(u["alternatives"]) else {}
                        row[f"alt_{k + 1}"] = alt.get("label")
                        row[f"alt_{k + 1}_similarity"] = alt.get("similarity")
                    for c in QUALITY_CSV:
                        row[c] = combination_text(u["combination"]) if c == "combination" and "combination" in u \
                            else u.get(c)
                    rows.append(row)
        quality = list(QUALITY_CSV) if "quality" in self._results.get("dissection", {}) else []
        return _frame(rows, ["model", "layer", "unit", "label", "similarity", "scorer",
                             *[f"alt_{k}{s}" for k in range(1, ALTERNATIVES + 1) for s in ("", "_similarity")],
                             *quality])

    @functools.cached_property
    def netdissect(self) -> pd.DataFrame:
        """Network Dissection: one row per unit (model, layer, unit, category, label, iou, detector, threshold)."""
        rows = [{"model": m["model"], "layer": x["layer"], "unit": u["unit"], "category": u["category"],
                 "label": u["label"], "iou": u["iou"], "detector": u["detector"], "threshold": u["threshold"]}
                for m in self._results.get("netdissect", {}).get("models", []) for x in m["layers"]
                for u in x["unit_labels"]]
        return _frame(rows, ["model", "layer", "unit", "category", "label", "iou", "detector", "threshold"])

    @functools.cached_property
    def directions(self) -> pd.DataFrame:
        """Learned directions (dissect.directions): one row per direction (model, layer, method, direction), its
        CLIP-Dissect label, similarity and scorer, and where the run had pixel labels its Network Dissection label,
        category, IoU and whether it is a detector (empty otherwise); empty without directions."""
        pixel = {(m["model"], d["layer"], d["method"]): d["unit_labels"]
                 for m in self._results.get("netdissect", {}).get("models", []) for d in m.get("directions", [])}
        rows = []
        for d in self._results.get("dissection", {}).get("directions", []):
            nd = pixel.get((d["model"], d["layer"], d["method"]))
            for u in d["labels"]:
                p = nd[u["direction"]] if nd else {}
                rows.append({"model": d["model"], "layer": d["layer"], "method": d["method"],
                             "direction": u["direction"], "label": u["label"], "similarity": u["similarity"],
                             "scorer": u["scorer"], "netdissect_label": p.get("label"),
                             "netdissect_category": p.get("category"), "iou": p.get("iou"),
                             "detector": p.get("detector")})
        return _frame(rows, DIRECTION_COLUMNS)

    @functools.cached_property
    def direction_fits(self) -> pd.DataFrame:
        """One row per fit of the learned directions (model, layer, method): components (and how many were asked
        for), relative reconstruction error, variance explained, sparsity (the mean share of active codes), unique
        concepts among its labels, then what the method reports of its own (NMF: clipped, iterations; SAE: dead,
        loss)."""
        rows = [{k: d[k] for k in DIRECTION_FIT_COLUMNS} | d["reports"]
                for d in self._results.get("dissection", {}).get("directions", [])]
        return _frame(rows, DIRECTION_FIT_COLUMNS)

    @functools.cached_property
    def predictions(self) -> pd.DataFrame:
        """Top-k predictions: model, image, rank, class, class_index, probability."""
        rows = [{"model": e["model"], "image": e["image"], "rank": p["rank"], "class": p["class_name"],
                 "class_index": p["class_index"], "probability": p["probability"]}
                for e in self._results["explanations"] for p in e["predictions"]]
        return _frame(rows, ["model", "image", "rank", "class", "class_index", "probability"])

    @functools.cached_property
    def timings(self) -> pd.DataFrame:
        """Each method's wall time per image (cached: measured when the result was first computed)."""
        rows = [{"model": e["model"], "image": e["image"], "method": method, "seconds": v["seconds"],
                 "cached": bool(v.get("cached"))}
                for e in self._results["explanations"] for method, v in e["methods"].items()]
        return _frame(rows, ["model", "image", "method", "seconds", "cached"])

    @functools.cached_property
    def agreement(self) -> pd.DataFrame:
        """LIME against each CAM: the IoU of their masks (top-n) and at each threshold, as agreement.csv."""
        return _frame(self._results["agreement"]["rows"], ["image", "model", "method_a", "method_b", "iou"])

    @functools.cached_property
    def evaluation(self) -> pd.DataFrame:
        """Faithfulness and localisation per model, image and method (the chance maps included): a column per
        metric of the registry (evaluation/registry.py); empty when the run had no `evaluate:`."""
        rows = self._results.get("evaluation", {}).get("rows", [])
        return _frame(rows, evaluation_columns())

    @functools.cached_property
    def evaluation_summary(self) -> pd.DataFrame:
        """The evaluation over images, as the report's trust table: one row per model and method (the chance maps
        included), per registry column its mean (a hits column: its hits and the images scored) and the ends of its
        95 % interval over images, `<column>_low` and `<column>_high` (a mean's: bootstrap; a share of hits': Wilson);
        then the images the localisation fell back to any labelled object on, and the sanity check's value after its
        last step per method. Empty when the run had no `evaluate:`."""
        columns = evaluation_summary_columns()
        rows = [{k: e.get(k) for k in columns} for e in self._results.get("evaluation", {}).get("summary", [])]
        return _frame(rows, columns)

    @functools.cached_property
    def dissection_summary(self) -> pd.DataFrame:
        """How sure the dissection's counts are (dissect.quality), as the report states them: one row per model and
        layer, then one per model whose layer is 'all' (its units over every dissected layer). Columns: units; unique
        concepts and their share of the units, each with the ends of its 95 % bootstrap interval over the probe
        images, `<column>_low` and `<column>_high`; stable labels and their share with Wilson's interval; the median
        held-out score over units of the labels (`<metric>_median`: pearson, auprc, f1, iou), of the random labels
        (`random_<metric>_median`) and of the combinations (`combination_pearson_median`); the paired comparisons
        over units label_vs_random (label minus random label, pearson) and combination_vs_label (combination minus
        label): the mean difference, `_low`, `_high`, `_p_value` (Wilcoxon), `_n` (units compared) and
        `_significant`. The report measures held-out scores and comparisons per layer only, so on an 'all' row
        those columns are empty. Empty when the run measured no held-out quality."""
        columns = dissection_summary_columns()
        d = self._results.get("dissection", {})
        rows = []
        try:
            summary = analysis.quality_summary(d) if d else None  # the report's numbers, by the report's code
            for m in summary["models"] if summary else []:
                rows += [{"model": m["model"], "layer": x["layer"], **_counts(x), **_heldout(x)} for x in m["layers"]]
                rows.append({"model": m["model"], "layer": ALL_LAYERS, **_counts(m)})
        except (KeyError, TypeError, IndexError, ValueError) as exc:  # results.json's quality mapping is unchecked
            raise RunFormatError(f"{self.path / 'results.json'}: its dissection's quality does not have the layout "
                                 f"this report_builder writes ({type(exc).__name__}: {str(exc)[:200]})") from None
        return _frame(rows, columns)

    @functools.cached_property
    def sanity(self) -> pd.DataFrame:
        """The sanity check: per model, image, method and randomisation step, the similarity to the original map. An
        image that did not walk the steps (after `sanity.walk`) has its last step only, numbered as the walk's last."""
        per_step = [c.name for _, c in metric_registry.per_step()]
        sanity = self._results.get("evaluation", {}).get("sanity", [])
        steps: dict[tuple[str, str], int] = {}
        for s in sanity:
            key = (s["model"], s["method"])
            steps[key] = max(steps.get(key, 0), len(s["layers"]))
        rows = [{"model": s["model"], "image": s["image"], "method": s["method"],
                 "step": steps[(s["model"], s["method"])] - len(s["layers"]) + k + 1, "layer": layer,
                 **{name: s[name][k] for name in per_step}}
                for s in sanity for k, layer in enumerate(s["layers"])]
        return _frame(rows, sanity_columns())

    @functools.cached_property
    def checks(self) -> pd.DataFrame:
        """The spec's checks after the run, failed first: one row per tested group (name, metric, the scope, the
        measured value, how many values it averages, the thresholds, passed, message); empty without checks."""
        return _frame(self._results.get("checks", []), CHECK_COLUMNS)

    @functools.cached_property
    def concept_attribution(self) -> pd.DataFrame:
        """Concept attribution: one row per model, explained image, concept layer and unit (every unit, from
        concept_attribution.csv): its rank and contribution to the predicted class, its share of the positive
        contribution, its pooled activation, and its labels from the run's dissections (CLIP-Dissect's label, scorer
        and similarity; Network Dissection's label, category, IoU and detector flag). Empty when the run had none.

            r.concept_attribution.query("rank <= 5").groupby(["model", "label"]).share.sum()
        """
        from report_builder.report.concepts import CONCEPTS_CSV, CONCEPTS_CSV_COLUMNS

        if "concepts" not in self._results:
            return _frame([], list(CONCEPTS_CSV_COLUMNS))
        path = inside(self.path, CONCEPTS_CSV, "concept attribution")
        frame = pd.read_csv(path, dtype={"model": str, "image": str, "layer": str, "label": str,
                                         "netdissect_label": str}, keep_default_na=False, na_values=[""])
        frame["detector"] = frame["detector"].map({True: True, False: False, "True": True, "False": False})
        return _frame(frame.to_dict("records"), list(CONCEPTS_CSV_COLUMNS))

    @functools.cached_property
    def concept_ablation(self) -> pd.DataFrame:
        """The concept explanations' ablation test: per model, layer and k, the mean drop of the top-1 probability
        when the top-k units are set to zero (with its 95 % interval over images), each baseline's (random: the
        mean over its sets and the middle 95 % of the sets' means), the Monte Carlo p-value against random and the
        verdict ('beats random' or 'fails')."""
        rows = [{k: v for k, v in r.items() if not k.startswith("vs_")}
                for r in self._results.get("concepts", {}).get("ablation", [])]
        return _frame(rows, ["model", "layer", "k", "units", "images", "top", "top_low", "top_high", "random",
                             "random_low", "random_high", "draws", "p_value", "images_beating", "verdict"])

    @functools.cached_property
    def concept_profiles(self) -> pd.DataFrame:
        """Per model, concept layer and predicted class: each of its top concepts with its mean share over the
        images predicted as that class, and on how many of them it appears."""
        rows = [{"model": p["model"], "layer": p["layer"], "class": p["class_name"], "images": p["images"],
                 "concept": c["label"], "share": c["share"], "appears_on": c["images"]}
                for p in self._results.get("concepts", {}).get("profiles", []) for c in p["concepts"]]
        return _frame(rows, ["model", "layer", "class", "images", "concept", "share", "appears_on"])

    # ---------------------------------------------------------------- maps

    def maps(self, model: str, image: str, method: str) -> np.ndarray:
        """The raw map of `method` (H x W, float32 in [0, 1]) at the model's input resolution; 'lime_mask' gives
        LIME's boolean mask, 'probabilities' the model's full softmax on the image."""
        source = self.path / "results.json"
        check_id(model, "model", source)
        check_id(image, "image", source)
        record = next((e for e in self._results["explanations"] if e["model"] == model and e["image"] == image), None)
        if record is None:
            raise UserError(f"{self.path}: no explanation of image {image!r} by model {model!r}; images: "
                            f"{', '.join(sorted({e['image'] for e in self._results['explanations']}))}")
        path = inside(self.path, record["maps"], f"maps of {model} on {image}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if method not in z.files:
                    raise UserError(f"{path}: no map {method!r}; it holds {', '.join(z.files)}")
                return z[method]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise RunFormatError(f"{path}: cannot read the saved maps ({type(exc).__name__}: {exc})") from None


def evaluation_columns() -> list[str]:
    """open_run().evaluation's columns: the metrics registry's per-map columns between the keys and the object."""
    return ["model", "image", "method", *(c.name for _, c in metric_registry.per_map()), "object"]


def evaluation_summary_columns() -> list[str]:
    """open_run().evaluation_summary's columns: per registry column its value(s) and then its interval's ends."""
    values = []
    for _, c in metric_registry.per_map():
        values += [c.hits_key, c.images_key] if c.aggregate == "hits" else [c.name]
        values += [c.low_key, c.high_key]
    finals = [m.final_key(c) for m, c in metric_registry.per_step()]
    return ["model", "method", "images", *values, "object_fallback", *finals, "sanity_runs", "sanity_fails",
            "sanity_verdict"]


def dissection_summary_columns() -> list[str]:
    """open_run().dissection_summary's columns: the counts with their intervals' ends, the held-out medians, then
    each paired comparison's difference, ends, p-value, units compared and verdict."""
    counts = [f"{name}{end}" for name in ("unique", "unique_share") for end in ("", "_low", "_high")]
    medians = [f"{who}{m}_median" for who in ("", "random_") for m in QUALITY_METRICS]
    compared = [f"{name}{part}" for name in COMPARISONS
                for part in ("", "_low", "_high", "_p_value", "_n", "_significant")]
    return ["model", "layer", "units", *counts, "stable", "stable_share", "stable_share_low", "stable_share_high",
            *medians, "combination_pearson_median", *compared]


def _ends(name: str, interval: dict) -> dict:
    """An interval's dict (stats.Interval.as_dict) as `<name>`, `<name>_low`, `<name>_high`."""
    return {name: interval["value"], f"{name}_low": interval["low"], f"{name}_high": interval["high"]}


def _counts(x: dict) -> dict:
    """A layer's or a model's counts from analysis.quality_summary (both have the same keys)."""
    return {"units": x["units"], **_ends("unique", x["unique"]), "unique": int(x["unique"]["value"]),
            **_ends("unique_share", x["unique_share"]), "stable": x["stable"],
            **_ends("stable_share", x["stable_share"])}


def _heldout(x: dict) -> dict:
    """A layer's held-out medians and paired comparisons from analysis.quality_summary (quartiles are None when no
    unit had a score)."""
    median = lambda q: None if q is None else q["median"]  # noqa: E731
    row = {f"{m}_median": median(x["scores"][m]) for m in QUALITY_METRICS}
    row |= {f"random_{m}_median": median(x["random"][m]) for m in QUALITY_METRICS}
    row["combination_pearson_median"] = median(x["combination"])
    for name in COMPARISONS:
        c = x[name]  # stats.Comparison.as_dict: the difference first, then its ends and test
        row |= {name: c["difference"], **{f"{name}_{k}": c[k] for k in ("low", "high", "p_value", "n", "significant")}}
    return row


def sanity_columns() -> list[str]:
    """open_run().sanity's columns: the registry's per-step columns after the step and its layer."""
    return ["model", "image", "method", "step", "layer", *(c.name for _, c in metric_registry.per_step())]


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    """A DataFrame with at least `columns`, in that order, then any others (empty tables keep their columns)."""
    frame = pd.DataFrame(rows)
    extra = [c for c in frame.columns if c not in columns]
    return frame.reindex(columns=columns + extra)


def open_run(path: str | Path) -> Run:
    """A run directory as pandas tables (see Run). Raises UserError for a folder that is not a run of ours."""
    return Run(path)


def run(spec: str | Path | dict[str, Any], out: str | Path | None = None, *, no_cache: bool = False,
        cache_dir: str | Path | None = None, executor: str = "local", quiet: bool = False, allow_code: bool = False,
        allow_code_from: tuple[str | Path, ...] | list[str | Path] = (), pdf: bool = True) -> Run:
    """Run a study and open it: `spec` is a spec file, or a dict written as the YAML would be (checked as a file
    is; its paths are taken from the current folder, and without run_name the run is called 'notebook'). The run
    directory is `out`, else output/<run_name>. A spec that names Python code (source: python) runs it only with
    `allow_code=True` (a factory file in the spec's folder, or an installed module) or when the file lies under a
    folder of `allow_code_from`, as --allow-code and --allow-code-from do. `pdf=False` writes no report.pdf (as
    --no-pdf): the HTML report alone renders in a fraction of the time."""
    from report_builder.pipeline.cache import Cache
    from report_builder.pipeline.progress import Progress
    from report_builder.pipeline.runner import run as run_spec
    from report_builder.spec.schema import load_spec, spec_from_mapping

    if isinstance(spec, (str, Path)):
        loaded = load_spec(spec)
    else:
        loaded = spec_from_mapping(spec, Path.cwd() / "notebook", "the spec dict")
    target = Path(out) if out is not None else Path("output") / loaded.run_name
    run_spec(loaded, target, cache=Cache(Path(cache_dir) if cache_dir else None, enabled=not no_cache),
             progress=Progress(quiet=quiet), executor=executor, allow_code=allow_code,
             allow_code_from=[Path(d) for d in allow_code_from], pdf=pdf)
    return open_run(target)
