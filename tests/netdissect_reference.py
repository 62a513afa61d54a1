"""Network Dissection of one layer's recorded maps in memory, in one process: the reference that the sharded
tasks of report_builder.dissection.netdissect must equal. Used only by the tests."""
from __future__ import annotations

import numpy as np
import torch

from report_builder.dissection import netdissect as nd


def dissect_layer(maps: np.ndarray, probe, settings: nd.NetDissectSettings, rotation: torch.Tensor | None = None,
                  device: torch.device | str = "cpu") -> dict:
    """One layer's recorded maps in memory, dissected in one process: the reference the sharded tasks equal."""
    batches = nd.chunks(maps, rotation, device)
    n, _, h, w = maps.shape
    thresholds, method = nd.quantile_thresholds(batches, n * h * w, settings.quantile, settings.threshold, settings.seed)
    state = nd.TallyState(thresholds, len(probe.names), probe.category_names, min(settings.top_images, n))
    labels = probe.labels()
    first = 0
    for a in batches():
        state.add(a, [next(labels) for _ in range(a.shape[0])], first)
        first += a.shape[0]
    return nd.finish(thresholds, method, state.as_dict(), probe.names, nd._label_category(probe), rotation is None)
