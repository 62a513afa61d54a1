"""CLIP-Dissect (Oikarinen & Weng, ICLR 2023): label every unit with the concept whose image scores best
match the unit's activations.

The similarity functions (registered in dissection/similarity.py, by name) are f(P, A) -> S, where
  P: images x concepts (CLIP cosines, or a stand-in scorer's scores),
  A: images x units (pooled activations),
  S: units x concepts (higher = better description).
All functions follow the formulas of the paper's code, vectorised over units in chunks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from report_builder.dissection.similarity import SIMILARITIES
from report_builder.pipeline.progress import current

CODE_VERSION = 1

# Elements of the largest temporary (chunk of units x top images x concepts) at once: small enough to
# stay in cache, measured fastest on CPU (larger chunks were up to 6x slower on 2 cores).
_CHUNK_ELEMENTS = 4_000_000


def _chunks(units: int, per_unit: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, per_unit))
    return [slice(i, min(units, i + step)) for i in range(0, units, step)]


def _top_images(A: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices of each unit's top_k images by activation, top_k x units (ties broken by torch.topk)."""
    return torch.topk(A, k=min(int(top_k), A.shape[0]), dim=0).indices


def _pmi(log_p_c_given_k: torch.Tensor, lam: float) -> torch.Tensor:
    """S = log p(c|k) - lam * log p(c), with log p(c) = logsumexp_k log p(c|k) - log K."""
    units = log_p_c_given_k.shape[0]
    log_p_c = torch.logsumexp(log_p_c_given_k, dim=0, keepdim=True) - math.log(units)
    return log_p_c_given_k - lam * log_p_c


def soft_wpmi(P: torch.Tensor, A: torch.Tensor, top_k: int = 100, a: float = 10.0, lam: float = 1.0,
              p_start: float = 0.998, p_end: float = 0.97) -> torch.Tensor:
    """Soft weighted pointwise mutual information (CLIP-Dissect's default).

    P̃ = softmax_c(a·P). For unit k with top images i_0..i_{top_k-1} (by activation), the image at
    rank r is in the unit's concept set with probability p_r = p_start - (r/top_k)(p_start - p_end), so
        log p(c|k) = Σ_r log(1 + p_r (P̃[i_r, c] - 1) + 1e-7)
        log p(c)   = logsumexp_k log p(c|k) - log K
        S[k, c]    = log p(c|k) - λ log p(c).
    """
    Pt = torch.softmax(a * P.float(), dim=1)
    inds = _top_images(A, top_k)
    k_eff = inds.shape[0]
    p_r = (p_start - torch.arange(k_eff, dtype=torch.float32) / top_k * (p_start - p_end)).view(-1, 1, 1)
    out = torch.empty(A.shape[1], P.shape[1])
    for sl in current().track(_chunks(A.shape[1], k_eff * P.shape[1]), "soft_wpmi", unit="unit chunks"):
        g = Pt[inds[:, sl]]  # top_k x units x concepts, a fresh copy: safe to work in place
        out[sl] = g.sub_(1).mul_(p_r).add_(1 + 1e-7).log_().sum(dim=0)
    return _pmi(out, lam)


def wpmi(P: torch.Tensor, A: torch.Tensor, top_k: int = 28, a: float = 2.0, lam: float = 0.6) -> torch.Tensor:
    """Weighted pointwise mutual information.

    P̃ = softmax_c(a·P);  log p(c|k) = Σ_{r < top_k} log(P̃[i_r, c] + 1e-7);
    S[k, c] = log p(c|k) - λ (logsumexp_k log p(c|k) - log K).
    """
    Pt = torch.softmax(a * P.float(), dim=1)
    inds = _top_images(A, top_k)
    out = torch.empty(A.shape[1], P.shape[1])
    for sl in current().track(_chunks(A.shape[1], inds.shape[0] * P.shape[1]), "wpmi", unit="unit chunks"):
        out[sl] = Pt[inds[:, sl]].add_(1e-7).log_().sum(dim=0)
    return _pmi(out, lam)


def cos_similarity(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """S[k, c] = <A[:, k], P[:, c]> / (|A[:, k]| |P[:, c]|): the cosine between the columns over images."""
    P = P.float() / P.float().norm(dim=0, keepdim=True)
    A = A.float() / A.float().norm(dim=0, keepdim=True)
    return A.T @ P


def cos_similarity_cubed(P: torch.Tensor, A: torch.Tensor, min_norm: float = 1e-3) -> torch.Tensor:
    """Centre each column over images, cube it, divide by max(L2 norm, min_norm), then S = A'ᵀ P'."""

    def prep(X: torch.Tensor) -> torch.Tensor:
        X = (X.float() - X.float().mean(dim=0, keepdim=True)) ** 3
        return X / X.norm(dim=0, keepdim=True).clamp(min=min_norm)

    return prep(A).T @ prep(P)


def rank_reorder(P: torch.Tensor, A: torch.Tensor, top_fraction: float = 0.05, p: float = 3.0,
                 scale_p: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Rank reordering, as in the paper's code.

    For unit k take its top n = ⌊top_fraction·N⌋ images (activations x, descending). For concept c,
    reorder x by the rank of P[i, c] among those images: image i gets the activation whose rank
    matches its CLIP rank. The error is mean |x - x_reordered|^p, divided by the same error against
    5 random permutations of x, and by (mean P over the top images)^scale_p. S = -error.
    """
    n = max(1, int(A.shape[0] * top_fraction))
    top_vals, inds = torch.topk(A.float(), k=n, dim=0)  # n x units, descending
    ascending = torch.flip(top_vals, dims=[0])
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(A.shape[1], P.shape[1])
    for k in current().track(range(A.shape[1]), "rank_reorder", unit="units"):
        x = ascending[:, k]
        perms = torch.stack([x[torch.randperm(n, generator=gen)] for _ in range(5)], dim=1)
        baseline = ((x.unsqueeze(1) - perms).abs() ** p).mean()
        clip_top = P.float()[inds[:, k]]  # n x concepts
        ranks = clip_top.argsort(dim=0).argsort(dim=0)  # ascending rank of each image per concept
        reordered = x[ranks]  # n x concepts
        err = ((top_vals[:, k : k + 1] - reordered).abs() ** p).mean(dim=0) / baseline
        out[k] = err / clip_top.mean(dim=0) ** scale_p
    return -out


def clip_dissect_task(layer: str, similarity: str, params: dict, scores: dict, activations: list[dict]) -> dict:
    """One layer labelled: its units' activations over the probe shards against every concept's image scores."""
    A = torch.from_numpy(np.concatenate([a[layer] for a in activations]))
    labels = label_activations(A, similarity, params, scores)
    return {"layer": layer, "units": int(A.shape[1]), "labels": [
        {"unit": u.unit, "label": u.label, "similarity": u.similarity, "scorer": u.scorer,
         "alternatives": [{"label": a, "similarity": v, "scorer": sc} for a, v, sc in u.alternatives]}
        for u in labels]}


def label_activations(A: torch.Tensor, similarity: str, params: dict, scores: dict) -> list[UnitLabel]:
    """Each column of A (images x units, or x learned directions) labelled with its best concept."""
    S = SIMILARITIES[similarity].function(torch.from_numpy(scores["matrix"]), A, **params)
    return label_units(S, scores["concepts"], scores["scorers"])


RESULT_SHAPE = {"layer": str, "units": int, "labels": [{"unit": int, "label": str, "similarity": float}]}


@dataclass(frozen=True)
class UnitLabel:
    unit: int
    label: str
    similarity: float
    scorer: str
    alternatives: tuple[tuple[str, float, str], ...]  # the next best (concept, similarity, scorer)


def label_units(S: torch.Tensor, concepts: list[str], scorers: list[str], alternatives: int = 3) -> list[UnitLabel]:
    """Each unit's best concept, its score, and the next best concepts."""
    k = min(1 + alternatives, S.shape[1])
    vals, idx = torch.topk(S, k=k, dim=1)
    out = []
    for unit in range(S.shape[0]):
        best = [(concepts[int(c)], float(v), scorers[int(c)]) for v, c in zip(vals[unit], idx[unit])]
        out.append(UnitLabel(unit, best[0][0], best[0][1], best[0][2], tuple(best[1:])))
    return out


def similarity_params(dissect_spec, seed: int) -> dict:
    """A spec's similarity parameters, with the run's seed for the functions that draw at random."""
    params = dict(dissect_spec.similarity_params)
    if SIMILARITIES[dissect_spec.similarity].seeded:
        params.setdefault("seed", seed)
    return params
