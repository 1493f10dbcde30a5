"""STRIP (Gao et al., ACSAC 2019): trigger inputs keep their prediction when mixed with clean images."""

from __future__ import annotations

import torch
from torch import Tensor

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits, to_float
from bdlab.defenses.base import check_held_out_share
from bdlab.defenses.input_filtering.base import InputFilteringDefense
from bdlab.errors import ConfigError, check_range
from bdlab.evaluate import predict
from bdlab.services import RunServices


def mixtures(x: Tensor, overlays: Tensor, alpha: float) -> Tensor:
    """TrojanZoo's superimposition ``x + alpha (x_n - x)`` of a float batch ``x`` ``(B, C, H, W)`` with its
    overlays ``(B, N, C, H, W)``, flattened to ``(B N, C, H, W)``."""
    return (x[:, None] + alpha * (overlays - x[:, None])).flatten(0, 1)


def mean_entropy(logits: Tensor) -> Tensor:
    """Gao et al.'s normalised entropy ``H = (1/N) sum_n H(f(x (+) x_n))`` from the logits ``(B, N, K)`` of
    each input's ``N`` mixtures, in nats (the entropy of each mixture's prediction, then the mean)."""
    probabilities = torch.softmax(logits.double(), -1)
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1).mean(1)


class STRIP(InputFilteringDefense):
    """STRIP (Gao et al., ACSAC 2019; TrojanZoo Table 3 "Strip", Table 10, defaults Table 21).

    Each input is superimposed with ``num_overlays`` clean images drawn at random from the
    held-out split, ``x + alpha (x_n - x)``; the entropy of the model's prediction is computed
    for every mixture and averaged over the N mixtures (Gao et al.'s normalised entropy
    ``H_sum / N``; TrojanZoo averages the same way). A trigger that dominates the mixtures
    keeps the prediction fixed, so the entropy stays low: the suspicion score is ``-H``.

    Args:
        alpha: weight of the overlay image (default 0.5, "equal" mixing, TrojanZoo).
        num_overlays: N clean images per input (default 64, TrojanZoo); at most the size of the
            held-out split.
        batch_size: inputs per forward chunk (each expands to ``N`` mixtures).
        max_inputs: clean and poisoned test inputs scored (default 2000, a seeded subset; each costs
            ``N`` forward passes).
        fpr, seed: see :class:`~bdlab.defenses.input_filtering.base.InputFilteringDefense`.
    """

    name = "strip"

    def __init__(self, alpha: float = 0.5, num_overlays: int = 64, batch_size: int = 32, max_inputs: int | None = 2000,
                 **kwargs) -> None:
        super().__init__(max_inputs=max_inputs, **kwargs)
        check_range("defense.alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        if num_overlays < 1:
            raise ConfigError("defense.num_overlays", f"got {num_overlays}, must be >= 1")
        if batch_size < 1:
            raise ConfigError("defense.batch_size", f"got {batch_size}, must be >= 1")
        self.alpha, self.num_overlays, self.batch_size = alpha, num_overlays, batch_size

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        check_held_out_share("defense.num_overlays", self.num_overlays, data)

    def scores(self, context: RunServices, images: Tensor) -> Tensor:
        pool = context.data.defense.images
        generator = torch.Generator().manual_seed(self.seed)

        def mix(x: Tensor) -> Tensor:  # N distinct overlay images per input, drawn from the held-out clean split
            picks = torch.rand(len(x), len(pool), generator=generator).argsort(1)[:, :self.num_overlays]
            return mixtures(x, to_float(pool[picks].to(x.device)), self.alpha)

        logits = predict(context.trojan_model(), images, transform=mix, batch_size=self.batch_size)
        return -mean_entropy(logits.view(len(images), self.num_overlays, -1)).float()
