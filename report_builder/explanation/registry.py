"""The explanation methods: one entry each, everything the rest of the program needs to know about a method.

Spec validation (which names `explain.methods` takes, its default, 'all'), the explain dispatch and the cache
key (explanation/methods.py), the graph (pipeline/runner.py), collect, the findings and the templates read
this table; nothing else names a method's class or its quirks. Torch-free: the implementation is a
"module:function" reference, imported only when the method runs (`resolve`).

Adding a grad-cam CAM is one `Method(name, title, cam_class=...)` line; a method of our own names its function
in `implementation` (an explainer f(model, crop, target, settings) -> {"map": HxW float32 in [0, 1],
"seconds": float, ...}, as explanation/methods.py's).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

# grad-cam's AblationCAM default batch. Its ablation values depend on the row within a batch when the
# activations can be negative (see methods.ablation_cam), so the batch is fixed: the same maps on any device.
ABLATION_BATCH = 32


@dataclass(frozen=True)
class Method:
    """One explanation method."""

    name: str  # its name in explain.methods, results.json and the run directory's files
    title: str  # how the report, the progress lines and the findings name it
    kind: Literal["cam", "superpixels"] = "cam"
    # cam: a saliency map from the target layer (the target layer must hold a map); superpixels: a map of
    # superpixel weights and a mask of the top superpixels, from perturbed inputs (LIME): the agreement section
    # compares each superpixels method's mask with every CAM's map.
    cam_class: str | None = None  # the class of pytorch_grad_cam it runs, or whose math `implementation` follows
    implementation: str | None = None  # "module:function" of our own explainer; None: grad-cam's `cam_class`
    needs_gradients: bool = True  # it backpropagates (grad-cam's `uses_gradients`)
    token_layouts: bool | str = True  # True: it explains token layers (ViT, Swin) too; else why it cannot
    all_layers: bool = False  # it reads every layer (FullGrad's bias gradients), not the target layer
    own_targets: bool = False  # it picks the classes it contrasts the target with (FinerCAM): told the target only
    second_derivatives: bool = False  # it differentiates twice (ShapleyCAM): the plain attention kernel is needed
    forward_only_batches: bool = False  # it runs masked inputs forward in batches of explain.cam.batch_size
    # its passes go through the model's outputs module (model.outputs), whose output block's inputs a sanity walk's
    # first step (that block alone randomised) reuses
    output_passes: bool = False
    ablation_batch: int | None = None  # grad-cam's ablation: this many ablated channels per batch, a fixed size
    key_settings: str | None = None  # the explain section (explain.<it>) whose values enter the cache key
    seeded: bool = False  # it draws at random: the spec's seed enters the cache key
    key_params: tuple[tuple[str, Any], ...] = ()  # constants of the implementation that enter the cache key
    default: int | None = None  # its place (1, 2, ...) in explain.methods' default, the assignment's four


OURS = "report_builder.explanation.methods"

# Every CAM method of grad-cam that explains a classifier, and LIME. grad-cam's RandomCAM is left out: the
# evaluation's seeded random map is the chance baseline.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("gradcam", "Grad-CAM", cam_class="GradCAM", default=1),
    Method("gradcamplusplus", "Grad-CAM++", cam_class="GradCAMPlusPlus"),
    Method("xgradcam", "XGrad-CAM", cam_class="XGradCAM"),
    Method("hirescam", "HiResCAM", cam_class="HiResCAM"),
    Method("gradcamelementwise", "Grad-CAM Element-Wise", cam_class="GradCAMElementWise"),
    Method("layercam", "LayerCAM", cam_class="LayerCAM"),
    Method("eigencam", "EigenCAM", cam_class="EigenCAM", needs_gradients=False),
    Method("eigengradcam", "EigenGrad-CAM", cam_class="EigenGradCAM"),
    Method("kpcacam", "KPCA-CAM", cam_class="KPCA_CAM", needs_gradients=False),
    Method("fem", "FEM", cam_class="FEM", needs_gradients=False),
    Method("shapleycam", "ShapleyCAM", cam_class="ShapleyCAM", second_derivatives=True,
           token_layouts="grad-cam's ShapleyCAM keeps the target layer's raw output for its second derivatives "
                         "and cannot reshape tokens to a grid"),
    Method("finercam", "Finer-CAM", cam_class="FinerCAM", own_targets=True),
    Method("fullgrad", "FullGrad", cam_class="FullGrad", all_layers=True,
           token_layouts="FullGrad sums every bias layer's gradient maps, and grad-cam reads them off "
                         "convolutional layers only; this model's layers hold tokens"),
    # grad-cam's math, each distinct masked image run once (equal to grad-cam's within float rounding)
    Method("scorecam", "ScoreCAM", cam_class="ScoreCAM", implementation=f"{OURS}:score_cam", needs_gradients=False,
           forward_only_batches=True, output_passes=True, key_params=(("distinct_masks_once", True),), default=3),
    # grad-cam's math, only the layers after the target re-run
    Method("ablationcam", "AblationCAM", cam_class="AblationCAM", implementation=f"{OURS}:ablation_cam",
           needs_gradients=False, ablation_batch=ABLATION_BATCH, key_params=(("batch_size", ABLATION_BATCH),),
           default=2),
    # the lime package's math, seeded, with the perturbed images built as whole batches
    Method("lime", "LIME", kind="superpixels", implementation=f"{OURS}:lime_explain", needs_gradients=False,
           key_settings="lime", seeded=True, output_passes=True, default=4),
)}

NAMES = tuple(METHODS)  # every method, in the registry's order ('all')
CAM_NAMES = tuple(k for k, m in METHODS.items() if m.kind == "cam")
TITLES = {k: m.title for k, m in METHODS.items()}
DEFAULT = tuple(sorted((k for k, m in METHODS.items() if m.default is not None), key=lambda k: METHODS[k].default))


def resolve(reference: str) -> Callable:
    """The function a "module:function" reference names, imported now."""
    module, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------- concept attribution (explanation/concepts.py)

CONCEPTS = "report_builder.explanation.concepts"


@dataclass(frozen=True)
class Attribution:
    """How much each unit of a dissected layer contributes to the explained class: `implementation` is a
    "module:function" f(A, G) -> C, from the layer's map A and its gradient G (both C x h x w)."""

    name: str  # its name in concepts.attribution
    title: str
    citation: str
    implementation: str


ATTRIBUTIONS: dict[str, Attribution] = {a.name: a for a in (
    # their sum over units is the sum of the Grad-CAM map at the layer before its ReLU (IBD's decomposition)
    Attribution("gradcam_terms", "Grad-CAM channel terms (mean gradient × activation)",
                "Selvaraju et al., ICCV 2017; Zhou et al., ECCV 2018", f"{CONCEPTS}:gradcam_terms"),
    Attribution("hirescam_terms", "HiResCAM channel terms (gradient ⊙ activation)", "Draelos & Carin, 2020",
                f"{CONCEPTS}:hirescam_terms"),
)}


@dataclass(frozen=True)
class AblationBaseline:
    """Another way to pick the k units to ablate, against which a concept explanation's top-k units are measured:
    `implementation` is f(activation (C), k, rng, draws) -> a list of unit index arrays."""

    name: str  # its key in results.json's ablation drops
    title: str  # as the report's table and the findings name it
    draws: bool  # several seeded draws (a distribution to test against), or one set
    implementation: str
    bar: bool = False  # a concept explanation that does not beat this one fails


ABLATION_BASELINES: dict[str, AblationBaseline] = {b.name: b for b in (
    AblationBaseline("random", "k random units", draws=True, implementation=f"{CONCEPTS}:random_units", bar=True),
    AblationBaseline("activation", "the k most active units", draws=False, implementation=f"{CONCEPTS}:most_active"),
)}
ABLATION_BAR = next(name for name, b in ABLATION_BASELINES.items() if b.bar)
