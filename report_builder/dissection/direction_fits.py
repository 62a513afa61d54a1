"""The fits behind the learned directions (registered in dissection/directions.py), and their tasks.

Each fit takes a layer's pooled activations A (images x channels) and returns a k x C projection matrix (a
direction's activation is projection @ a), the k x C dictionary, and how well and how sparsely the k directions
reconstruct A. The tasks fit one (model, layer, method) on the activation shards the CLIP-Dissect tasks read, and
label the projected activations with the same concept scores and similarity function as the units.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from report_builder.dissection.clip_dissect import label_activations
from report_builder.dissection.directions import DIRECTIONS

# 1: NMF (scikit-learn, nndsvda) and the TopK / ReLU+L1 sparse autoencoder, directions ordered by use
CODE_VERSION = 1
NMF_MAX_ITER = 500  # coordinate descent converges in well under this on a few hundred images x a few hundred channels
NMF_TOL = 1e-6  # scikit-learn's 1e-4 stops while a component is still off by a few degrees on exact data


def _quality(X: np.ndarray, X_hat: np.ndarray) -> dict:
    """Relative Frobenius error and the share of variance the reconstruction explains (float64 sums)."""
    X, X_hat = X.astype(np.float64), X_hat.astype(np.float64)
    residual = float(np.square(X - X_hat).sum())
    total = float(np.square(X).sum())
    spread = float(np.square(X - X.mean(axis=0, keepdims=True)).sum())
    return {"reconstruction_error": float(np.sqrt(residual / total)) if total > 0 else 0.0,
            "variance_explained": 1.0 - residual / spread if spread > 0 else 1.0}


def _capped(components: int, A: np.ndarray) -> int:
    """No more directions than channels or images: a basis no larger than the layer (NMF's nndsvd init needs it)."""
    return max(1, min(int(components), A.shape[0], A.shape[1]))


def fit_nmf(A: np.ndarray, components: int, seed: int) -> dict:
    """max(A, 0) ≈ W H (scikit-learn's NMF, init 'nndsvda', seeded), A: images x C.

    H's rows are scaled to unit norm (W takes the scale) and ordered by the mass they reconstruct, largest first.
    The projection is pinv(H)ᵀ (k x C): the least-squares code of an activation, linear in it, and W itself
    whenever max(A, 0) = W H exactly. NMF's own transform (non-negative least squares) is not linear, so it could
    not project a map and its average alike.
    """
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    A = np.asarray(A, np.float64)
    X = np.maximum(A, 0.0)
    k = _capped(components, A)
    model = NMF(n_components=k, init="nndsvda", random_state=seed, max_iter=NMF_MAX_ITER, tol=NMF_TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported: `iterations` reaches NMF_MAX_ITER
        W = model.fit_transform(X)
    H = model.components_
    norms = np.linalg.norm(H, axis=1)
    norms[norms == 0] = 1.0
    H, W = H / norms[:, None], W * norms[None]
    order = np.argsort(-W.sum(axis=0), kind="stable")
    H, W = H[order], W[:, order]
    mass = float(np.abs(A).sum())
    return {"projection": np.linalg.pinv(H).T.astype(np.float32), "dictionary": H.astype(np.float32),
            **_quality(X, W @ H), "sparsity": float((W > 0).mean()), "components": k,
            "clipped": float(np.abs(np.minimum(A, 0.0)).sum() / mass) if mass > 0 else 0.0,
            "iterations": int(model.n_iter_)}


def fit_sae(A: np.ndarray, components: int, seed: int, kind: str = "topk", k: int = 4, l1: float = 1e-3,
            steps: int = 1000, lr: float = 3e-3) -> dict:
    """A one-layer sparse autoencoder on A (images x C), trained full-batch with Adam on CPU, seeded.

    The activations are centred (b, their mean) and scaled by s, their root-mean-square distance from it, so that
    the settings do not depend on the layer's scale. Encoder pre-activations u = W_enc (a - b) / s + c; codes
    z = TopK_k(ReLU(u)) ('topk': the k largest per image, the rest 0) or ReLU(u) with an L1 penalty l1·|z|_1
    ('relu'); the reconstruction â = s (W_dec z) + b, with W_dec's rows kept at unit norm after every step (so the
    penalty cannot shrink codes by growing the dictionary). W_enc starts as W_dec (tied initialisation, as Gao et
    al. do). The projection is W_enc / s (the encoder's linear part); directions are ordered by how often they
    are active, most often first.
    """
    X = torch.from_numpy(np.asarray(A, np.float32))
    m = _capped(components, A)
    top = min(int(k), m)
    mean = X.mean(dim=0, keepdim=True)
    scale = float((X - mean).square().sum(dim=1).mean().sqrt().clamp(min=1e-12))
    Xn = (X - mean) / scale
    g = torch.Generator().manual_seed(seed)
    decoder = torch.randn(m, X.shape[1], generator=g)
    decoder /= decoder.norm(dim=1, keepdim=True)
    decoder.requires_grad_(True)
    encoder = decoder.detach().clone().requires_grad_(True)
    enc_bias = torch.zeros(m, requires_grad=True)
    dec_bias = torch.zeros(X.shape[1], requires_grad=True)
    optimiser = torch.optim.Adam([encoder, enc_bias, decoder, dec_bias], lr=lr)

    def encode(x: torch.Tensor) -> torch.Tensor:
        u = torch.relu(x @ encoder.T + enc_bias)
        if kind != "topk":
            return u
        values, index = u.topk(top, dim=1)
        return torch.zeros_like(u).scatter(1, index, values)

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        z = encode(Xn)
        error = (z @ decoder + dec_bias - Xn).square().sum(dim=1).mean()
        return (error + l1 * z.abs().sum(dim=1).mean() if kind == "relu" else error), z

    for _ in range(int(steps)):
        loss, _ = losses()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            decoder /= decoder.norm(dim=1, keepdim=True).clamp(min=1e-12)
    with torch.inference_mode():
        loss, z = losses()
        X_hat = (z @ decoder + dec_bias) * scale + mean
        active = z > 0
        order = torch.argsort(-active.sum(dim=0), stable=True)
        return {"projection": (encoder[order] / scale).numpy().astype(np.float32),
                "dictionary": decoder[order].numpy().astype(np.float32), **_quality(X.numpy(), X_hat.numpy()),
                "sparsity": float(active.float().mean()), "components": m,
                "dead": int((~active.any(dim=0)).sum()), "loss": float(loss)}


def pooled(layer: str, activations: list[dict]) -> np.ndarray:
    """The layer's pooled activations over every probe shard, images x C (float32)."""
    return np.concatenate([np.asarray(a[layer], np.float32) for a in activations])


def fit_task(layer: str, method: str, components: int, seed: int, settings: dict, activations: list[dict]) -> dict:
    """One model's layer fitted by one method (see the DIRECTIONS entry)."""
    fit = DIRECTIONS[method].function(pooled(layer, activations), components, seed, **settings)
    return {"layer": layer, "method": method, "components_asked": int(components), **fit}


def label_task(similarity: str, params: dict, fit: dict, scores: dict, activations: list[dict]) -> dict:
    """Each direction labelled as CLIP-Dissect labels a unit: the projected activations (images x k) against every
    concept's image scores, with the same similarity function and parameters."""
    projected = pooled(fit["layer"], activations) @ fit["projection"].T
    labels = label_activations(torch.from_numpy(np.ascontiguousarray(projected)), similarity, params, scores)
    return {"layer": fit["layer"], "method": fit["method"],
            "labels": [{"direction": u.unit, "label": u.label, "similarity": u.similarity, "scorer": u.scorer}
                       for u in labels]}


FIT_SHAPE = {"layer": str, "method": str, "projection": np.ndarray, "dictionary": np.ndarray,
             "reconstruction_error": float, "variance_explained": float, "sparsity": float, "components": int}
LABEL_SHAPE = {"layer": str, "method": str, "labels": [{"direction": int, "label": str, "similarity": float}]}
