"""A model's outputs as the stages read them: the one batched softmax (explanations, evaluation, the classifier
scorer)."""
from __future__ import annotations

import numpy as np
import torch

from report_builder.models.zoo import LoadedModel


def class_probabilities(model: LoadedModel, images: np.ndarray | torch.Tensor, device: torch.device,
                        batch_size: int = 8) -> np.ndarray:
    """Softmax probabilities, N x classes (float32), for uint8 images N x H x W x 3 (a NumPy array or a tensor),
    `batch_size` images per forward pass of the model (its BatchNorm-folded copy where there is one)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = model.preprocess.normalize(images[i : i + batch_size], device)
            out.append(torch.softmax(model.outputs(x).float(), dim=1).cpu())
    return torch.cat(out).numpy()
