"""Learned directions: bases of a layer other than its units, fitted on its activations over the probe and then
dissected as units are (CLIP-Dissect labels; Network Dissection where the run has pixel labels).

One entry per kind of direction, everything the rest of the program needs to know about it. `dissect.directions`
takes this table's names (spec/schema.py), and the settings block its entry names; the graph adds a fit task per
model x layer x method that runs the entry's function (dissection/direction_fits.py). Torch-free, as the
spec reads it: the function is a "module:function" reference, imported only when it runs.

A fit function f(A, components, seed, **settings) -> dict takes a layer's pooled activations A (images x channels)
and returns at least
  projection            k x C: a direction's activation is projection @ a, linear in the layer's activation a, so
                        the average-pooled projection is the projection of the average-pooled map, and the same
                        matrix projects Network Dissection's maps (channels -> directions);
  dictionary            k x C: the directions in activation space (what a code of 1 adds to the reconstruction);
  reconstruction_error  ||X - X^||_F / ||X||_F over the matrix the method fits;
  variance_explained    1 - ||X - X^||^2 / ||X - mean X||^2;
  sparsity              the mean share of codes that are active (> 0) over the probe images;
and every key its entry lists in `reports`. tests/test_registries.py and tests/test_directions.py check each entry
against its function.

Adding a kind of direction is its fit function and one `Direction(...)` entry here (and, when it takes settings, a
settings model in spec/schema.py named by `settings`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# What every fit returns, whatever its kind (see the module docstring).
COMMON_REPORTS = ("projection", "dictionary", "reconstruction_error", "variance_explained", "sparsity", "components")


@dataclass(frozen=True)
class Direction:
    """One kind of learned direction."""

    name: str  # its name in dissect.directions.methods
    title: str  # how a text names it
    citation: str  # where the method comes from
    implementation: str  # "module:function": f(A, components, seed, **settings) -> dict (see the module docstring)
    fits: str  # what the method fits, as the report says it (e.g. that negative activations are clipped)
    reports: tuple[tuple[str, str], ...]  # (key, what it is) the fit reports beyond COMMON_REPORTS
    settings: str | None = None  # the key of dissect.directions holding its settings (a model in spec/schema.py)

    @property
    def function(self) -> Callable[..., Any]:
        """The fit function itself (imports its module, and with it torch and scikit-learn, now)."""
        module, name = self.implementation.split(":")
        return getattr(importlib.import_module(module), name)


FITS = "report_builder.dissection.direction_fits"

DIRECTIONS: dict[str, Direction] = {d.name: d for d in (
    Direction("nmf", "NMF", "Lee & Seung, Nature 1999; as concept directions, Fel et al., CRAFT, CVPR 2023",
              f"{FITS}:fit_nmf",
              "max(A, 0) ≈ W H with W, H ≥ 0 (scikit-learn's NMF, init nndsvda); a block output that can be negative "
              "(EfficientNet's) loses its negative part in the fit. A direction's activation is the least-squares "
              "code pinv(H)ᵀ a, linear in a, so maps and pooled values project alike",
              (("clipped", "the share of the activations' absolute mass below 0, set to 0 before the fit"),
               ("iterations", "NMF's coordinate-descent iterations"))),
    Direction("sae", "sparse autoencoder", "Bricken et al., Towards Monosemanticity, 2023; TopK: Gao et al., "
              "Scaling and evaluating sparse autoencoders, 2024", f"{FITS}:fit_sae",
              "a one-layer autoencoder z = TopK(ReLU(W_enc (a - b) / s + c)), â = s W_dec z + b (or ReLU with an L1 "
              "penalty), trained full-batch with Adam on CPU, seeded. A direction's activation is the encoder's "
              "linear part W_enc a / s (the bias and the sparsifying nonlinearity are not linear in a)",
              (("dead", "directions never active on any probe image"), ("loss", "the final training loss")),
              settings="sae"),
)}
