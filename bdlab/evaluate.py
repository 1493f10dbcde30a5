"""The one evaluator: ACC, CCC, ASR and TMC of any model, optionally behind an input transform.

The pipeline (clean and trojaned models), every defense protocol (reformed inputs, sanitised
or retrained models) and the analyses (transformed triggers and images) call :func:`evaluate`,
so each metric of DESIGN.md is computed in one place, from logits, exactly as
:mod:`bdlab.metrics` defines it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bdlab.datasets.base import ImageSet, to_float
from bdlab.metrics import accuracy, attack_success_rate, target_confidence, true_class_confidence

EVAL_BATCH = 1024

Transform = Callable[[Tensor], Tensor]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def predict_logits(model: nn.Module, images: Tensor, transform: Transform | None = None,
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


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured; a metric whose inputs were not given is NaN (not applicable).

    ``acc`` and ``ccc`` come from the clean test set, ``asr`` and ``tmc`` from the poisoned test
    set (non-target images carrying the trigger, with their true labels).
    """

    acc: float = math.nan
    ccc: float = math.nan
    asr: float = math.nan
    tmc: float = math.nan
    clean_logits: Tensor | None = None
    poisoned_logits: Tensor | None = None

    def metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}/acc`` and ``{prefix}/ccc``, and when a poisoned set was evaluated ``{prefix}/asr`` and
        ``{prefix}/tmc``."""
        values: dict[str, float] = {}
        if self.clean_logits is not None:
            values.update({f"{prefix}/acc": self.acc, f"{prefix}/ccc": self.ccc})
        if self.poisoned_logits is not None:
            values.update({f"{prefix}/asr": self.asr, f"{prefix}/tmc": self.tmc})
        return values


def evaluate(model: nn.Module, clean: ImageSet | None, poisoned: ImageSet | None, target_class: int,
             transform: Transform | None = None, batch_size: int = EVAL_BATCH) -> Evaluation:
    """ACC and CCC of ``model`` on ``clean``, ASR and TMC on ``poisoned``, each input through
    ``transform`` (a batched function of float images in ``[0, 1]``) when one is given."""
    values: dict[str, object] = {}
    if clean is not None:
        logits = predict_logits(model, clean.images, transform, batch_size)
        values.update(acc=accuracy(logits, clean.labels), ccc=true_class_confidence(logits, clean.labels),
                      clean_logits=logits)
    if poisoned is not None:
        logits = predict_logits(model, poisoned.images, transform, batch_size)
        values.update(asr=attack_success_rate(logits, target_class), tmc=target_confidence(logits, target_class),
                      poisoned_logits=logits)
    return Evaluation(**values)  # type: ignore[arg-type]


def defense_effect(before: Evaluation, after: Evaluation) -> dict[str, float]:
    """The defense's metrics against the undefended model: ``defense/acc``, ``ccc``, ``asr``, ``tmc``
    after it, their ``*_before`` values, ARD (ASR before - after) and CAD (ACC before - after)."""
    metrics = after.metrics("defense")
    metrics.update({f"{key}_before": value for key, value in before.metrics("defense").items()
                    if key.removeprefix("defense/") in ("acc", "ccc", "asr")})
    if after.clean_logits is not None:
        metrics["defense/cad"] = before.acc - after.acc
    if after.poisoned_logits is not None:
        metrics["defense/ard"] = before.asr - after.asr
    return metrics
