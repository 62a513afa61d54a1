"""The evaluation metrics: one entry each, holding everything the rest of the program needs to know about it.

A metric is one calculation switched on by one key of the spec's `evaluate:` (deletion, road, sanity,
localisation). It produces one or more columns: numbers with a name (the key in results.json's evaluation rows,
the column of open_run()'s table, the `metric` of evaluation.csv), a direction of better, the digits the report
prints and the range a run directory's checks allow. Its function is bound by the metric's name in
evaluation/metrics.py (CALCULATIONS; the sanity check, with its steps, is a task of its own), and its sentence in
report/analysis.py (SENTENCES). collect, the run directory's checks (rundir), the notebook API, the findings and the
trust section of the report loop over METRICS; tests/test_registries.py fails, naming the metric and the field,
when an entry is incomplete or a table disagrees with it.

Torch-free: the report side reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ARROWS = {"higher": "↑", "lower": "↓"}
MAX_CLASSES = 100_000.0  # a bound on 1 / (a top-1 probability): the normalised areas' range


@dataclass(frozen=True)
class Column:
    """One number a metric produces, per map (or per randomisation step, for a per-step metric)."""

    name: str  # results.json's key, open_run()'s column, evaluation.csv's metric (see Metric.csv_metric)
    title: str  # its heading in the report's table (with the arrow of `direction`)
    direction: Literal["higher", "lower"]  # which way is better
    digits: int  # decimals the report prints
    value_range: tuple[float, float]  # what a run directory's checks allow (float32 rounding aside)
    aggregate: Literal["mean", "hits"] = "mean"  # over images: the mean, or (a 0/1 hit) the count of hits

    @property
    def better(self) -> str:
        return f"{self.direction} is better"

    @property
    def heading(self) -> str:
        """The report table's heading: the title with the arrow of better; a count of hits ('k / n') has none."""
        return self.title if self.aggregate == "hits" else f"{self.title} {ARROWS[self.direction]}"

    @property
    def hits_key(self) -> str:
        """A hits column <x>_hit sums, per model and method, into <x>_hits of <x>_images (the images scored)."""
        return f"{self.name}s"

    @property
    def images_key(self) -> str:
        return f"{self.name.removesuffix('_hit')}_images"

    @property
    def low_key(self) -> str:
        """The evaluation summary's key (results.json, open_run().evaluation_summary) of the lower end of this
        column's 95 % interval over images: of the mean (stats.bootstrap), or, for a hits column, of the share
        hits / images (stats.share, Wilson's). One rule for both: <name>_low (deletion_auc_low, pointing_hit_low)."""
        return f"{self.name}_low"

    @property
    def high_key(self) -> str:
        """The upper end, as low_key: <name>_high."""
        return f"{self.name}_high"


@dataclass(frozen=True)
class Rule:
    """When a method fails the metric: its value of `column` (after the last step, for a per-step metric) `fails_if`
    the threshold."""

    column: str
    fails_if: Literal["≥", "≤"]
    threshold: float
    symbol: str = ""  # how the report writes the column in the rule (ρ)
    # Over several runs (images x seeds): the method fails when the 95 % Wilson interval of the share of runs that
    # fail lies wholly above `verdict_share`, passes when it lies wholly below; otherwise no verdict ("inconclusive").
    verdict_share: float = 0.5

    def fails(self, value: float) -> bool:
        return value >= self.threshold if self.fails_if == "≥" else value <= self.threshold

    def verdict(self, low: float, high: float) -> Literal["fails", "passes", "inconclusive"]:
        """The verdict over runs from the interval [low, high] of the share that fail."""
        return "fails" if low > self.verdict_share else "passes" if high < self.verdict_share else "inconclusive"

    @property
    def stated(self) -> str:
        """The rule in words, as every text states it: 'ρ ≥ 0.5'."""
        return f"{self.symbol or self.column} {self.fails_if} {self.shown}"

    @property
    def shown(self) -> str:
        """The threshold as the report writes it."""
        return f"{self.threshold:g}"


@dataclass(frozen=True)
class Metric:
    name: str  # the key of its function in metrics.CALCULATIONS and of its sentence in analysis.SENTENCES
    spec_key: str  # the key of `evaluate:` that switches it on and holds its settings
    columns: tuple[Column, ...]
    title: str  # its row in the report's table of methods
    description: str  # that row's text: Jinja, given s (its settings), better (column -> 'lower is better'), rule
    citation: str
    per_step: bool = False  # values per randomisation step (evaluation.sanity), not per map (evaluation.rows)
    rule: Rule | None = None  # pass or fail, where the metric has a threshold
    chance: tuple[str, ...] = ()  # the kinds of chance map (CHANCE) whose strongest is the bar a method must beat
    summary: tuple[str, ...] = ()  # the columns the findings compare (their mean over images, and against chance)

    def scores(self, kind: str | None) -> bool:
        """Whether the metric is computed on a map of this chance kind (None: an explanation's map): a chance map is
        scored only where it is a bar."""
        return kind is None or kind in self.chance

    def csv_metric(self, column: Column, layer: str | None = None) -> str:
        """evaluation.csv's `metric` for a value of `column`: its name; per step, '<metric>_<column>@<layer>'."""
        return f"{self.name}_{column.name}@{layer}" if self.per_step else column.name

    def steps_key(self, column: Column) -> str:
        """A per-step column's mean at each step in the evaluation summary (sanity_spearman)."""
        return f"{self.name}_{column.name}"

    @staticmethod
    def final_key(column: Column) -> str:
        """A per-step column's mean after the last step in the evaluation summary (spearman_final)."""
        return f"{column.name}_final"


# What "beats chance" means, for every metric with chance maps: its per-image value against the per-image value of
# the strongest chance map (the best mean over images among the metric's kinds), compared pairwise with
# stats.paired; better only when the difference is significant, else "within noise of chance".
BEATS_CHANCE = ("beats chance on a metric when it is better than the strongest of that metric's chance maps "
                "({{ bars }}; {{ draws }} seeded draw(s) of each noise map, one of the centre prior), image by image: "
                "the mean difference's 95 % bootstrap interval excludes 0 and the Wilcoxon signed-rank p &lt; 0.05; "
                "otherwise it is within noise of chance")

METRICS: tuple[Metric, ...] = (
    Metric(
        name="deletion",
        spec_key="deletion",
        columns=(Column("deletion_auc", "Deletion AUC", "lower", 3, (0.0, 1.0)),
                 Column("insertion_auc", "Insertion AUC", "higher", 3, (0.0, 1.0)),
                 # divided by p, the top-1 probability on the intact image: at most 1 / p <= the number of classes
                 Column("deletion_norm", "Deletion AUC / p", "lower", 3, (0.0, MAX_CLASSES)),
                 Column("insertion_norm", "Insertion AUC / p", "higher", 3, (0.0, MAX_CLASSES))),
        title="Deletion, insertion",
        description="Petsiuk et al. (RISE, 2018): the pixels are removed (or revealed) in the map's order in "
                    "{{ s.steps }} steps, a removed pixel showing {{ {'blur': 'a blurred copy of the image', "
                    "'mean': \"the image's mean colour\", 'zero': 'black'}[s.baseline] }}; the area under the top-1 "
                    "probability's curve. Pixels the map ties are removed together: at a step that would cut a tie, "
                    "the curve is read off the straight line between the tie removed not at all and removed whole, "
                    "so no order inside a tie (row by row, say) enters the score, for every method alike. "
                    "<em>AUC / p</em>: the same area divided by the probability p on the intact image (deletion's first "
                    "point, insertion's last), so that no image weighs by its confidence; the findings average this "
                    "form, and the curves are drawn in it. Deletion: {{ better.deletion_auc }}; insertion: "
                    "{{ better.insertion_auc }}.",
        citation="V. Petsiuk, A. Das, K. Saenko. RISE: Randomized Input Sampling for Explanation of Black-box Models. "
                 "BMVC 2018",
        chance=("pixel", "smooth"),
        summary=("deletion_norm", "insertion_norm"),
    ),
    Metric(
        name="road",
        spec_key="road",
        columns=(Column("road", "ROAD", "higher", 3, (-1.0, 1.0)),),
        title="ROAD",
        description="Rong et al. (2022), through grad-cam's <code>ROADCombined</code>: (MoRF drop − LeRF drop) / 2 "
                    "in the top-1 probability, where a drop is the intact image's probability minus the imputed "
                    "one's, MoRF removes the most relevant pixels and LeRF the least, the pixels imputed by noisy "
                    "linear interpolation, averaged over percentiles {{ s.percentiles|join(\", \") }}. "
                    "{{ better.road|capitalize }}.",
        citation="Y. Rong, T. Leemann, V. Borisov, G. Kasneci, E. Kasneci. A Consistent and Efficient Evaluation "
                 "Strategy for Attribution Methods. ICML 2022",
        chance=("pixel", "smooth"),
        summary=("road",),
    ),
    Metric(
        name="sanity",
        spec_key="sanity",
        columns=(Column("spearman", "Randomised ρ", "lower", 2, (-1.0, 1.0)),
                 Column("ssim", "SSIM", "lower", 2, (-1.0, 1.0))),
        title="Sanity check",
        description="Adebayo et al. (2018), cascading randomisation: the model's blocks are re-initialised from the "
                    "output down in {{ s.steps }} steps and the map for the same class is made again, on the first "
                    "{{ s.images }} image(s), with {{ s.seeds }} randomisation seed(s): the first seed on the first "
                    "{{ [s.get('walk', s.images), s.images]|min }} image(s) walks every step (the figure and the "
                    "per-step numbers); every other run re-initialises the same blocks at once and makes the last "
                    "step's map only, the map a walk ends with. ρ is the Spearman rank correlation with the "
                    "original map after the last step (every block random), |ρ| its size; a run fails when "
                    "{{ rule.stated }}. A map gone flat is reported as flat (no ρ, no SSIM: a constant has no ranks, "
                    "and SSIM against it rewards a sparse map). Over the runs (images × seeds), a method fails when "
                    "the 95 % Wilson interval of the share of runs that fail lies above {{ rule.verdict_share }}, "
                    "passes when it lies below, and is otherwise inconclusive.",
        citation="J. Adebayo, J. Gilmer, M. Muelly, I. Goodfellow, M. Hardt, B. Kim. Sanity Checks for Saliency Maps. "
                 "NeurIPS 2018",
        per_step=True,
        rule=Rule("spearman", "≥", 0.5, symbol="ρ"),
        summary=("spearman",),
    ),
    Metric(
        name="localisation",
        spec_key="localisation",
        columns=(Column("pointing_hit", "Pointing game", "higher", 0, (0.0, 1.0), aggregate="hits"),
                 Column("pointing_near_hit", "Of which off the object", "lower", 0, (0.0, 1.0), aggregate="hits"),
                 Column("energy", "Energy", "higher", 2, (0.0, 1.0))),
        title="Localisation",
        description="On images with object labels: the pointing game (Zhang et al., 2016): a hit when the map's "
                    "maximum lies within {{ s.tolerance }} pixels of the object of the explained class (when pixels "
                    "tie for the maximum, the share of them that do: no order among them counts), or of any "
                    "labelled object when no label names that class (the table counts "
                    "those images); hits within the {{ s.tolerance }} pixels but off the object itself are counted "
                    "apart; and energy (the share of the map's mass on the object). Hits are summed over images; a "
                    "chance map's are the mean over its draws.",
        citation="J. Zhang, S. A. Bargal, Z. Lin, J. Brandt, X. Shen, S. Sclaroff. Top-down Neural Attention by "
                 "Excitation Backprop. ECCV 2016 (the pointing game); H. Wang et al. Score-CAM: Score-Weighted Visual "
                 "Explanations for Convolutional Neural Networks. CVPR Workshops 2020 (energy)",
        chance=("pixel", "smooth", "centre"),
        summary=("pointing_hit", "energy"),
    ),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}


def per_map() -> list[tuple[Metric, Column]]:
    """The columns of evaluation.rows (one value per map), in order: collect, rundir and open_run's evaluation."""
    return [(m, c) for m in METRICS if not m.per_step for c in m.columns]


def per_step() -> list[tuple[Metric, Column]]:
    """The columns of evaluation.sanity (one value per randomisation step), in order."""
    return [(m, c) for m in METRICS if m.per_step for c in m.columns]


def column(name: str) -> Column:
    """The column called `name` (deletion_auc, spearman, ...)."""
    return next(c for m in METRICS for c in m.columns if c.name == name)


def summary_columns(metric: Metric) -> list[Column]:
    """The columns a metric's finding compares (and tests against chance)."""
    return [column(n) for n in metric.summary]


# ---------------------------------------------------------------- the chance maps

@dataclass(frozen=True)
class Chance:
    """A kind of chance map: its method id in the run (one id per smooth-noise size), its title and what it is."""

    kind: str
    title: str
    description: str


CHANCE: dict[str, Chance] = {c.kind: c for c in (
    Chance("pixel", "per-pixel noise", "one uniform value per pixel"),
    Chance("smooth", "smooth noise", "a coarse grid of uniform values upsampled bilinearly, so whole regions rank "
                                     "together"),
    Chance("centre", "centre prior", "a Gaussian bump on the image's centre, sigma a quarter of the side"),
)}
# evaluate's sections that are no metric's own: the settings of the chance maps every metric compares with
SHARED_SECTIONS = ("chance",)


def chance_methods(settings: dict) -> list[str]:
    """The chance maps' method ids for evaluate's settings (as results.json keeps them): 'random' (per-pixel
    noise), 'random-smooth<cells>' per size, 'random-centre'; none when random_baseline is off."""
    if not settings.get("random_baseline"):
        return []
    chance = settings.get("chance") or {}
    return (["random"] + [f"random-smooth{n}" for n in chance.get("smooth", ())]
            + (["random-centre"] if chance.get("centre", True) else []))


def chance_kind(method: str) -> str | None:
    """The kind of a chance map's method id (pixel, smooth, centre); None for an explanation method."""
    if method == "random":
        return "pixel"
    if method == "random-centre":
        return "centre"
    if method.startswith("random-smooth") and method.removeprefix("random-smooth").isdigit():
        return "smooth"
    return None


def smooth_cells(method: str) -> int:
    return int(method.removeprefix("random-smooth"))


def chance_title(method: str) -> str:
    """'per-pixel noise', 'smooth noise (4 × 4 cells)', 'centre prior'."""
    kind = chance_kind(method)
    title = CHANCE[kind].title
    return f"{title} ({smooth_cells(method)} × {smooth_cells(method)} cells)" if kind == "smooth" else title
