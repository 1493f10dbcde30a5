"""The one evaluator: ACC, CCC, ASR and TMC of any model, optionally behind an input transform.

The pipeline (clean and trojaned models), every defense protocol (reformed inputs, sanitised
or retrained models) and the analyses (transformed triggers and images) call :func:`evaluate`,
so each metric of docs/metrics.md is computed in one place, from logits, exactly as
:mod:`bdlab.metrics` defines it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from bdlab.nsr import NSRSettings
    from bdlab.services import RunServices

from bdlab.datasets.base import ImageSet, to_float
from bdlab.metrics import accuracy, attack_success_rate, target_confidence, true_class_confidence
from bdlab.stealth import stealthiness

EVAL_BATCH = 1024

Transform = Callable[[Tensor], Tensor]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def predict(model: nn.Module, images: Tensor, layers: str | Sequence[str] | None = None,
            transform: Transform | None = None, batch_size: int = EVAL_BATCH) -> Tensor | dict[str, Tensor]:
    """The one forward pass over a set: ``model`` on ``images`` in chunks of ``batch_size``, without
    gradients, on the model's device; results float32 on the CPU.

    ``images`` are uint8 in ``[0, 255]`` or float in ``[0, 1]``; ``transform`` (a batched function of float
    images) runs on each chunk first. Returns the logits, or with ``layers`` the activations of those
    named layers (:meth:`~bdlab.models.classifier.Classifier.features`: one tensor for one name, a
    dict for a list).
    """
    model.eval()
    device = model_device(model)
    chunks: list[Any] = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x = to_float(x) if x.dtype == torch.uint8 else x.float()
        if transform is not None:
            x = transform(x)
        chunks.append(model(x) if layers is None else model.features(x, layers))
    if isinstance(layers, (list, tuple)):
        names = list(layers)
        return {name: torch.cat([c[name].float().cpu() for c in chunks]) if chunks else torch.empty(0)
                for name in names}
    return torch.cat([c.float().cpu() for c in chunks]) if chunks else torch.empty(0, 0)


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
        logits = predict(model, clean.images, transform=transform, batch_size=batch_size)
        values.update(acc=accuracy(logits, clean.labels), ccc=true_class_confidence(logits, clean.labels),
                      clean_logits=logits)
    if poisoned is not None:
        logits = predict(model, poisoned.images, transform=transform, batch_size=batch_size)
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


def evaluate_attack(clean_model: nn.Module | None, trojan_model: nn.Module, services: RunServices,
                    nsr: NSRSettings) -> tuple[dict[str, float], Evaluation]:
    """The attack-level figures of a run: ACC, CCC (and with an attack ASR, TMC and NSR) of the clean
    reference and the trojaned model, the attack's CAD, the poisoned test images' stealthiness against
    their sources, and the attack's own report; returns them with the trojaned model's evaluation
    (what a defense is measured against).

    A given model's run may lack a clean reference (``clean_model`` None: its figures and CAD are NaN) and
    triggered inputs (ASR and TMC NaN): not applicable, never measured on something else."""
    data, attack, poisoned = services.data, services.attack, services.poisoned_test
    undefended = evaluate(trojan_model, data.test, poisoned, attack.target_class)
    if clean_model is not None:
        # the clean model on the triggered inputs too: how often the trigger alone, without a backdoor, hits the target
        metrics = evaluate(clean_model, data.test, poisoned, attack.target_class).metrics("clean")
    else:
        metrics = {"clean/acc": math.nan, "clean/ccc": math.nan}
    metrics.update(undefended.metrics("trojan"))
    metrics["attack/cad"] = metrics["clean/acc"] - metrics["trojan/acc"]
    if poisoned is None and services.has_attack():
        metrics.update({"trojan/asr": math.nan, "trojan/tmc": math.nan})
    if poisoned is not None:
        metrics.update(stealthiness(data.test.images[poisoned.sources], poisoned.images, services.device))
        metrics["clean/nsr"] = nsr.measure(clean_model, services) if clean_model is not None else math.nan
        metrics["trojan/nsr"] = nsr.measure(trojan_model, services)
        metrics.update(attack.report(data.test, poisoned, services.device))
    return metrics, undefended
