"""JSON files of the run directory: NaN becomes null, writes are atomic."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


def clean_nan(value):
    """NaN has no JSON form: undefined numbers become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_nan(v) for v in value]
    return value


def _default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, data: dict) -> None:
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean_nan(data), indent=2, default=_default, allow_nan=False))
    os.replace(tmp, path)
