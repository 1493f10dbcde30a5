"""STRIP (Gao et al., ACSAC 2019): trigger inputs keep their prediction when mixed with clean images."""

from __future__ import annotations

import torch
from torch import Tensor

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits, to_float
from bdlab.defenses.base import check_held_out_share
from bdlab.defenses.input_filtering.base import InputFilteringDefense
from bdlab.errors import ConfigError, check_range
from bdlab.evaluate import model_device
from bdlab.services import RunServices


def mean_mixture_entropy(model: torch.nn.Module, x: Tensor, overlays: Tensor, alpha: float) -> Tensor:
    """Gao et al.'s normalised entropy ``H = (1/N) sum_n H(f(x (+) x_n))`` for a float batch ``x``
    ``(B, C, H, W)`` and its overlays ``(B, N, C, H, W)``; the superimposition is TrojanZoo's
    ``x + alpha (x_n - x)``. Entropies in nats."""
    batch, count = overlays.shape[:2]
    mixed = x[:, None] + alpha * (overlays - x[:, None])
    probabilities = torch.softmax(model(mixed.flatten(0, 1)).double(), 1)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1)
    return entropy.view(batch, count).mean(1)


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

    @torch.inference_mode()
    def scores(self, context: RunServices, images: Tensor) -> Tensor:
        model = context.trojan_model().eval()
        device = model_device(model)
        pool = context.data.defense.images
        generator = torch.Generator().manual_seed(self.seed)
        out = []
        for start in range(0, len(images), self.batch_size):
            x = to_float(images[start:start + self.batch_size].to(device))
            # N distinct overlay images per input, drawn from the held-out clean split
            picks = torch.rand(len(x), len(pool), generator=generator).argsort(1)[:, :self.num_overlays]
            overlays = to_float(pool[picks].to(device))
            out.append(-mean_mixture_entropy(model, x, overlays, self.alpha).float().cpu())
        return torch.cat(out)
