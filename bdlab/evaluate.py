"""Batched inference over uint8 image sets."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bdlab.datasets.base import to_float

EVAL_BATCH = 1024


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def predict_logits(model: nn.Module, images: Tensor, transform: Callable[[Tensor], Tensor] | None = None,
                   batch_size: int = EVAL_BATCH) -> Tensor:
    """Logits (float32, CPU) of ``model`` on uint8 ``images``, optionally through a batched ``transform``."""
    model.eval()
    device = model_device(model)
    outputs = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size].to(device))
        if transform is not None:
            x = transform(x)
        outputs.append(model(x).float().cpu())
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)
