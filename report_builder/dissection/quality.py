"""How good and how stable a dissection's labels are, from the activations and concept scores already computed (no
forward pass of its own).

Held-out quality (after Linear Explanations, Oikarinen & Weng, ICML 2024, and NeuronEval, ICML 2025): the probe set
is split, seeded, into a first part and a held-out part. Every unit is labelled on the first part by the run's
similarity function; on the held-out part the label is scored by how well its concept's scores predict the unit:
  - pearson: the correlation over held-out images of the concept's scores with the unit's activations (the
    simulation score of Linear Explanations);
  - auprc, f1, iou: the unit's k top-activating held-out images are the positives (k the similarity function's
    top_k, at most half the held-out images); auprc is the average precision of the concept's scores ranking them,
    f1 and iou compare them with the concept's own k top-scoring held-out images (so precision = recall = f1).
The bar to beat is the same scores of a random concept of the same set, one drawn per unit (seeded).

Stability: the probe images are resampled with replacement B times (seeded; the same resamples for every layer and
model, so two models' counts can be compared draw by draw), every unit relabelled on each, and each unit's
stability is the share of resamples that give its full-probe label.

Linear Explanations' label-only variant (`linear_explanation`, also a similarity function): a unit is a sparse
non-negative combination of concepts, fitted on the first part and scored on the held-out part by the same Pearson
simulation score, beside the single label's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from report_builder.dissection.similarity import SIMILARITIES
from report_builder.label_quality import COMBINATION_TERMS, METRICS

if TYPE_CHECKING:
    import torch

# Torch is imported only where a function needs it (the spec and the graph import this module).
CODE_VERSION = 1
TOP_FRACTION = 0.05  # the positives' share for a similarity function with neither top_k nor top_fraction


def split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first part and the held-out part of n probe images (a seeded permutation; each part sorted); the held-out
    part has round(holdout * n) images, at least 2 and leaving at least 2."""
    held = min(n - 2, max(2, round(holdout * n)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def positives(similarity: str, params: dict, n_held: int) -> int:
    """k, the unit's top-activating held-out images taken as its positives: the similarity function's top_k (or its
    top_fraction of the images), at most half the held-out images so that the negatives are not a handful."""
    defaults = _defaults(similarity)
    merged = {**defaults, **params}
    if "top_k" in merged:
        k = int(merged["top_k"])
    else:
        k = round(float(merged.get("top_fraction", TOP_FRACTION)) * n_held)
    return int(max(1, min(k, n_held // 2)))


def _defaults(similarity: str) -> dict:
    import inspect

    sig = inspect.signature(SIMILARITIES[similarity].function)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def _top_mask(X: np.ndarray, k: int) -> np.ndarray:
    """images x columns: True on each column's k largest values (ties broken by position, as a stable sort)."""
    order = np.argsort(-X, axis=0, kind="stable")[:k]
    mask = np.zeros(X.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=0)
    return mask


def pearson(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Column-wise Pearson correlation of two images x n arrays; NaN where a column is constant."""
    x = X - X.mean(axis=0)
    y = Y - Y.mean(axis=0)
    den = np.sqrt((x * x).sum(axis=0) * (y * y).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x * y).sum(axis=0) / den
    return np.where(den > 0, r, np.nan)


def average_precision(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Column-wise average precision: the mean, over the positives, of the precision at each positive's rank when
    the images are ranked by score (descending, ties by position)."""
    order = np.argsort(-scores, axis=0, kind="stable")
    hits = np.take_along_axis(positive, order, axis=0).astype(np.float64)
    ranks = np.arange(1, len(scores) + 1, dtype=np.float64)[:, None]
    precision = np.cumsum(hits, axis=0) / ranks
    count = hits.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (precision * hits).sum(axis=0) / count, np.nan)


def label_scores(C: np.ndarray, A: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """How well each unit's concept scores C[:, u] (held-out images x units) predict its activations A[:, u]."""
    pos = _top_mask(A, k)
    pred = _top_mask(C, k)
    tp = (pos & pred).sum(axis=0).astype(np.float64)
    return {"pearson": pearson(C, A), "auprc": average_precision(C, pos), "f1": tp / k, "iou": tp / (2 * k - tp)}


def choose(P: np.ndarray, A: np.ndarray, similarity: str, params: dict) -> np.ndarray:
    """Each unit's best concept (an index) under the similarity function, on these images."""
    import torch

    S = SIMILARITIES[similarity].function(torch.from_numpy(np.ascontiguousarray(P)),
                                          torch.from_numpy(np.ascontiguousarray(A)), **params)
    return torch.argmax(S, dim=1).numpy()


# ---------------------------------------------------------------- Linear Explanations, label-only


def _standardise(X: np.ndarray, mean=None, sd=None):
    mean = X.mean(axis=0) if mean is None else mean
    sd = X.std(axis=0) if sd is None else sd
    safe = np.where(sd > 0, sd, 1.0)
    return np.where(sd > 0, (X - mean) / safe, 0.0), mean, sd


def fit_combination(P: np.ndarray, A: np.ndarray, terms: int = COMBINATION_TERMS) -> np.ndarray:
    """units x concepts non-negative weights, at most `terms` non-zero per unit: the unit's standardised activations
    as a combination of the standardised concept scores. Greedy: add the concept best correlated with what is left
    unexplained, refit all chosen weights by non-negative least squares, stop when no concept is positively
    correlated with the rest or when `terms` are chosen."""
    from scipy.optimize import nnls

    Z, _, _ = _standardise(P.astype(np.float64))
    Y, _, _ = _standardise(A.astype(np.float64))
    n, units = Y.shape
    W = np.zeros((units, P.shape[1]))
    chosen: list[list[int]] = [[] for _ in range(units)]
    R = Y.copy()
    active = np.ones(units, dtype=bool)
    for _ in range(terms):
        if not active.any():
            break
        corr = Z.T @ R[:, active] / n  # concepts x active units
        for col, u in enumerate(np.flatnonzero(active)):
            c = corr[:, col]
            c[chosen[u]] = -np.inf
            j = int(np.argmax(c))
            if not c[j] > 1e-9:
                active[u] = False
                continue
            chosen[u].append(j)
            w, _ = nnls(Z[:, chosen[u]], Y[:, u])
            chosen[u] = [c_ for c_, x in zip(chosen[u], w) if x > 0]
            W[u] = 0.0
            W[u, chosen[u]] = w[w > 0]
            R[:, u] = Y[:, u] - Z[:, chosen[u]] @ w[w > 0]
    return W


def simulate(W: np.ndarray, P_first: np.ndarray, P_held: np.ndarray) -> np.ndarray:
    """The fitted combinations' predictions on held-out images (held-out x units), the concept scores standardised
    with the first part's means and deviations."""
    _, mean, sd = _standardise(P_first.astype(np.float64))
    Z, _, _ = _standardise(P_held.astype(np.float64), mean, sd)
    return Z @ W.T


def linear_explanation(P: torch.Tensor, A: torch.Tensor, terms: int = COMBINATION_TERMS) -> torch.Tensor:
    """Linear Explanations' label-only variant (Oikarinen & Weng, ICML 2024) as a similarity function.

    W = fit_combination(P, A, terms): each unit's standardised activations ≈ Σ_c W[k, c] z(P[:, c]), W ≥ 0, at most
    `terms` concepts. S[k, c] = W[k, c] for a chosen concept; any other gets corr(A[:, k], P[:, c]) − 2, below every
    chosen one and ordered by correlation. The label is the heaviest concept, its runners-up the next terms.
    """
    import torch

    Pn, An = P.double().numpy(), A.double().numpy()
    W = fit_combination(Pn, An, terms)
    corr = np.nan_to_num(_corr_matrix(An, Pn), nan=-1.0)
    return torch.from_numpy(np.where(W > 0, W, corr - 2.0)).float()


def _corr_matrix(A: np.ndarray, P: np.ndarray) -> np.ndarray:
    """units x concepts Pearson correlations over images; NaN for a constant column."""
    Za, _, sa = _standardise(A)
    Zp, _, sp = _standardise(P)
    r = Za.T @ Zp / len(A)
    return np.where((sa[:, None] > 0) & (sp[None, :] > 0), r, np.nan)


def describe(W_row: np.ndarray, concepts: list[str]) -> list[dict]:
    """A unit's combination, heaviest first: [{"label", "weight"}]."""
    idx = np.flatnonzero(W_row > 0)
    idx = idx[np.argsort(-W_row[idx], kind="stable")]
    return [{"label": concepts[int(c)], "weight": float(W_row[c])} for c in idx]


# ---------------------------------------------------------------- the tasks

PLANTED = 20  # planted units of the labeller's sanity checks
PLANTED_NOISE = 0.5  # their noise, in standard deviations of their concept's standardised scores
SHOWN = 3  # the planted concepts are drawn from the SHOWN * PLANTED most varied concepts
UNRELATED = 20  # concepts added by the second check: concept columns shuffled over images


def quality_task(layer: str, similarity: str, params: dict, settings: dict, scores: dict,
                 activations: list[dict]) -> dict:
    """One layer's held-out label quality, its combinations and its labels' stability (settings: holdout,
    resamples, terms, seed)."""
    A = np.concatenate([a[layer] for a in activations]).astype(np.float32)
    P = np.asarray(scores["matrix"], dtype=np.float32)
    concepts = list(scores["concepts"])
    n, units = A.shape
    seed = int(settings["seed"])
    first, held = split(n, float(settings["holdout"]), seed)
    k = positives(similarity, params, len(held))
    chosen = choose(P[first], A[first], similarity, params)
    ours = label_scores(P[held][:, chosen], A[held], k)
    drawn = np.random.default_rng([seed, 1]).integers(0, P.shape[1], units)  # the bar to beat
    chance = label_scores(P[held][:, drawn], A[held], k)
    W = fit_combination(P[first], A[first], int(settings["terms"]))
    simulated = pearson(simulate(W, P[first], P[held]), A[held])

    full = choose(P, A, similarity, params)
    rng = np.random.default_rng([seed, 2])  # depends on the seed and n alone: every layer and model draws alike
    draws = []
    for _ in range(int(settings["resamples"])):
        pick = rng.integers(0, n, n)
        draws.append(choose(P[pick], A[pick], similarity, params))
    same = np.mean(np.stack(draws) == full, axis=0) if draws else np.full(units, np.nan)

    def num(x) -> float | None:
        return None if np.isnan(x) else float(x)

    rows = []
    for u in range(units):
        rows.append({
            "unit": u, "heldout_label": concepts[int(chosen[u])],
            **{m: num(ours[m][u]) for m in METRICS},
            "random_label": concepts[int(drawn[u])], **{f"random_{m}": num(chance[m][u]) for m in METRICS},
            "combination": describe(W[u], concepts), "combination_pearson": num(simulated[u]),
            "stability": num(same[u]),
        })
    return {"layer": layer, "units": units, "first_images": len(first), "heldout_images": len(held), "positives": k,
            "resamples": len(draws), "resample_labels": [[concepts[int(c)] for c in d] for d in draws], "rows": rows}


QUALITY_SHAPE = {"layer": str, "units": int, "rows": [{"unit": int, "heldout_label": str}]}


def sanity_task(similarity: str, params: dict, settings: dict, scores: dict, noise: float = PLANTED_NOISE) -> dict:
    """NeuronEval's two sanity tests (ICML 2025) on units planted in this run's own concept scores: unit u is a
    concept's standardised scores plus noise. `recovered` counts the units labelled with their true concept.
    (1) Remove every planted unit's true concept from the set: a recovered unit's label must change and its held-out
    score drop (counted over the recovered units). (2) Add unrelated concepts (concept columns shuffled over
    images): no unit's score may rise (counted over all). Counts per held-out metric."""
    P = np.asarray(scores["matrix"], dtype=np.float32)
    n, concepts = P.shape
    seed = int(settings["seed"])
    rng = np.random.default_rng([seed, 3])
    varied = np.flatnonzero(P.std(axis=0) > 0)
    # planted on concepts the probe shows: among the most varied (a classifier's class that no probe image shows
    # has a flat, near-zero column, and no labeller can find it, whatever the unit)
    shown = varied[np.argsort(-P[:, varied].std(axis=0), kind="stable")[:SHOWN * PLANTED]]
    truth = rng.choice(shown, size=min(PLANTED, len(shown)), replace=False)
    Z, _, _ = _standardise(P[:, truth].astype(np.float64))
    A = (Z + noise * rng.standard_normal(Z.shape)).astype(np.float32)
    first, held = split(n, float(settings["holdout"]), seed)
    k = positives(similarity, params, len(held))

    def scored(Pset: np.ndarray) -> tuple[np.ndarray, dict]:
        lab = choose(Pset[first], A[first], similarity, params)
        return lab, label_scores(Pset[held][:, lab], A[held], k)

    base, base_scores = scored(P)
    keep = np.setdiff1d(np.arange(concepts), truth)
    less, less_scores = scored(P[:, keep])
    less = keep[less]  # back to the full set's indices
    shuffled = np.stack([rng.permutation(P[:, c]) for c in rng.choice(varied, size=UNRELATED)], axis=1)
    more, more_scores = scored(np.concatenate([P, shuffled], axis=1))
    found = base == truth  # the first test asks about units whose label is their true concept
    metrics = {}
    for m in METRICS:
        before, removed, added = base_scores[m], less_scores[m], more_scores[m]
        metrics[m] = {"removed_lower": int(np.sum(found & (removed < before))),
                      "added_raised": int(np.sum(added > before + 1e-9))}
    return {"units": len(truth), "noise": noise, "unrelated": UNRELATED, "heldout_images": len(held),
            "positives": k, "recovered": int(found.sum()), "removed_changed": int(np.sum(found & (less != base))),
            "metrics": metrics}


SANITY_SHAPE = {"units": int, "recovered": int, "metrics": dict}

