"""IMC adapted to one defense (TrojanZoo §6.3, RQ8, Fig. 10): each adaptation changes the trojaned model's
training (or the trigger's) so that its defense's signal weakens while the backdoor stays."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from bdlab.attacks.base import blend
from bdlab.datasets.base import DatasetSplits
from bdlab.errors import ConfigError
from bdlab.services import RunServices
from bdlab.training.hooks import Batch

def neuron_means(activations: Tensor) -> Tensor:
    """Per-neuron activations of a layer, ``(N, C)``: a convolution's channels averaged over space."""
    return activations.flatten(2).mean(2) if activations.dim() > 2 else activations


class Adaptation:
    """What an adaptive IMC changes, as hooks IMC calls after its own (all default to no change):

    - :meth:`setup` validates against the data and the model, before anything is trained;
    - :meth:`prepare` trains what the attacker needs (a surrogate), before the trojaned model;
    - :meth:`reform`: the trigger's loss is taken on the model's output for ``reform(stamped)``;
    - :meth:`poison_batch`, :meth:`after_augment`, :meth:`extra_loss`: as
      :class:`~bdlab.training.hooks.TrainingHooks`, after IMC's per-batch stamping.
    """

    name = "none"
    feature_layers: tuple[str, ...] = ()

    def setup(self, data: DatasetSplits, resources: RunServices | None) -> None:
        """Validate; nothing is trained here."""

    def prepare(self, resources: RunServices) -> None:
        """Train what the adaptation needs before the trojaned model trains."""

    def reform(self, x: Tensor) -> Tensor:
        return x

    def poison_batch(self, x: Tensor, labels: Tensor, is_poison: Tensor,
                     stamp: Callable[[Tensor, float], Tensor]) -> tuple[Tensor, Tensor]:
        """``stamp(x, opacity)`` puts the current trigger on ``x`` at ``opacity`` times its own."""
        return x, labels

    def after_augment(self, module: pl.LightningModule, x: Tensor, labels: Tensor,
                      is_poison: Tensor) -> tuple[Tensor, Tensor]:
        return x, labels

    def extra_loss(self, batch: Batch) -> dict[str, Tensor]:
        return {}


class MagNetAdaptation(Adaptation):
    """Against MagNet (TrojanZoo §6.3: "we train a surrogate autoencoder h and conduct optimization with
    inputs reformed by h"). The attacker trains its own denoising autoencoder on the clean training set
    (MagNet's :class:`~bdlab.defenses.input_filtering.magnet.Autoencoder` and training, cached apart from
    the defender's, initialised and shuffled by the run's seed + 1, so it is not the defender's). Then
    the trigger's loss is the target cross-entropy of ``h(x + trigger)``, so the trigger is one that
    survives reconstruction, and half of each batch's poisoned images reach the model as ``h``
    reconstructs them, so the model answers to the reformed trigger too.

    Args:
        structure, epochs, noise: the surrogate, as MagNet's (defaults ``[3, average, 3]``, 10, 0.1).
    """

    name = "magnet"

    def __init__(self, structure: tuple[int | str, ...] = (3, "average", 3), epochs: int = 10,
                 noise: float = 0.1) -> None:
        self.structure, self.epochs, self.noise = list(structure), epochs, noise
        self.autoencoder: nn.Module | None = None
        self.seed = 0

    def setup(self, data: DatasetSplits, resources: RunServices | None) -> None:
        from bdlab.defenses.input_filtering.magnet import MagNet

        self.seed = getattr(resources, "seed", 0) + 1
        try:
            MagNet(structure=self.structure).setup(data, None)
        except ConfigError as error:
            raise ConfigError("attack.adaptive", f"magnet's surrogate autoencoder {error.message}") from None

    def prepare(self, resources: RunServices) -> None:
        from bdlab.defenses.input_filtering.magnet import MagNet

        class Surrogate(MagNet):
            name = "magnet_surrogate"  # its own cache entries: never the defender's autoencoder

        surrogate = Surrogate(structure=self.structure, epochs=self.epochs, noise=self.noise, seed=self.seed)
        autoencoder, _, _ = surrogate.autoencoder(resources)
        self.autoencoder = autoencoder.requires_grad_(False)

    def reform(self, x: Tensor) -> Tensor:
        if self.autoencoder is None:
            raise RuntimeError("the surrogate autoencoder is not trained yet: call prepare(resources)")
        return self.autoencoder.to(x.device)(x)

    def poison_batch(self, x: Tensor, labels: Tensor, is_poison: Tensor,
                     stamp: Callable[[Tensor, float], Tensor]) -> tuple[Tensor, Tensor]:
        reformed = is_poison.nonzero().flatten()[::2]  # every other poison: the rest keep the raw trigger
        if len(reformed):
            x = x.clone()
            with torch.no_grad():
                x[reformed] = self.reform(x[reformed])
        return x, labels


class AdversarialAdaptation(Adaptation):
    """Against adversarial retraining (TrojanZoo §6.3: "we replace clean accuracy loss with adversarial
    accuracy loss ... resulting in a robust but trojan model"). Every clean image of a batch is replaced by
    its PGD adversarial example against the current model, with its true label (the defense's own
    :class:`~bdlab.defenses.model_sanitisation.adversarial_retraining.AdversarialTraining`, torchattacks'
    PGD, and its per-dataset budget: 0.3 / 0.05 x 10 grey, 8/255 / 2/255 x 7 colour); the poisoned images
    keep the trigger and the target label. The radius grows linearly over the first ``warmup_epochs``, as
    the defense's does. It trains only where a robust model exists at that budget: on MNIST from scratch or
    from the clean model, not on faint gratings whose classes lie within twice the radius of each other
    (docs/adaptive.md).

    Args:
        warmup_epochs: epochs of the radius ramp (default 1, the defense's).
    """

    name = "adversarial_retraining"

    def __init__(self, warmup_epochs: int = 1) -> None:
        self.warmup_epochs = warmup_epochs
        self.training = None

    def setup(self, data: DatasetSplits, resources: RunServices | None) -> None:
        from bdlab.defenses.model_sanitisation.adversarial_retraining import AdversarialTraining, pgd_defaults

        self.training = AdversarialTraining(*pgd_defaults(data.channels), self.warmup_epochs)

    def after_augment(self, module: pl.LightningModule, x: Tensor, labels: Tensor,
                      is_poison: Tensor) -> tuple[Tensor, Tensor]:
        clean = ~is_poison
        if not bool(clean.any()):
            return x, labels
        x = x.clone()
        x[clean] = self.training.after_augment(module, x[clean], labels[clean], is_poison[clean])[0]
        return x, labels


class StripAdaptation(Adaptation):
    """Against STRIP (TrojanZoo §6.3: "we use trigger inputs with high-transparency triggers together with
    their ground-truth classes to re-train f*"). STRIP superimposes an input on clean images, which halves
    the trigger's opacity, and flags the input when the blends still all go to one class. Here as many
    clean images as the batch has poisoned ones carry the trigger at ``opacity`` times its own (STRIP's
    0.5 blend by default) and keep their true labels, so a faded trigger stops working and STRIP's blends
    spread over classes, while the full trigger still sends inputs to the target.

    Args:
        opacity: the faded trigger's opacity relative to the trigger's (default 0.5, STRIP's alpha).
    """

    name = "strip"

    def __init__(self, opacity: float = 0.5) -> None:
        self.opacity = opacity

    def poison_batch(self, x: Tensor, labels: Tensor, is_poison: Tensor,
                     stamp: Callable[[Tensor, float], Tensor]) -> tuple[Tensor, Tensor]:
        faded = (~is_poison).nonzero().flatten()[:int(is_poison.sum())]
        if len(faded):
            x = x.clone()
            x[faded] = stamp(x[faded], self.opacity)
        return x, labels


class AbsAdaptation(Adaptation):
    """Against ABS (TrojanZoo §6.3: "we integrate the cost function (Algorithm 2 in [ABS]) in the loss
    function to train f*"). ABS finds a trojan by one neuron whose elevation alone lifts the target label,
    then reverse-engineers a trigger that elevates that neuron and few others. The term added to the
    model's loss is that elevation: on each layer ABS scans by default (the last convolution and the
    linear layers after it but the head), the largest rise of one neuron's mean activation on the
    batch's poisoned images over its mean on the clean ones, divided by the layer's largest clean
    activation magnitude (ABS's stimulation scale), times ``weight``. Lowering the largest rise while the trigger
    keeps working spreads its effect over many neurons, none of which stands out.

    Args:
        weight: weight of the term against the cross-entropy (default 0.1: at 1 the term, divided by a fresh
            model's small activations, drives LeNet to a constant prediction when IMC trains from scratch, on
            the toy problem, 16x16 gratings and MNIST alike; TrojanZoo gives no weight).
    """

    name = "abs"

    def __init__(self, weight: float = 0.1) -> None:
        self.weight = weight

    def setup(self, data: DatasetSplits, resources: RunServices | None) -> None:
        from bdlab.defenses.model_inspection.abs import ABS

        if resources is None:
            return
        try:
            self.feature_layers = tuple(ABS().layers_of(resources.fresh_model()))
        except ConfigError as error:
            raise ConfigError("attack.adaptive", f"abs needs a convolution in the model ({error.message})") from None

    def elevation(self, batch: Batch) -> Tensor:
        """The term before its weight (0 when the batch lacks poisoned or clean images)."""
        poison, clean = batch.is_poison, ~batch.is_poison
        total = batch.outputs["logits"].new_zeros(())
        if not (bool(poison.any()) and bool(clean.any())):
            return total
        for layer in self.feature_layers:
            means = neuron_means(batch.outputs[layer])
            rise = means[poison].mean(0) - means[clean].mean(0)
            # pre-activation layers can be all negative: their scale is the largest magnitude
            peak = means[clean].detach().abs().amax().clamp_min(1e-3)
            total = total + rise.amax().clamp_min(0.0) / peak
        return total

    def extra_loss(self, batch: Batch) -> dict[str, Tensor]:
        return {"abs_elevation": self.weight * self.elevation(batch)}


ADAPTATIONS: dict[str, type[Adaptation]] = {cls.name: cls for cls in
                                            (MagNetAdaptation, AdversarialAdaptation, StripAdaptation, AbsAdaptation)}


def adaptation(name: str | None, abs_weight: float) -> Adaptation:
    """The adaptation to defense ``name`` (:class:`Adaptation`, which changes nothing, for None); ``abs_weight`` is
    :class:`AbsAdaptation`'s ``weight``."""
    if name is None:
        return Adaptation()
    if name not in ADAPTATIONS:
        raise ConfigError("attack.adaptive", f"got {name!r}, IMC adapts to {', '.join(ADAPTATIONS)} (or null: "
                          "non-adaptive)")
    return AbsAdaptation(abs_weight) if name == AbsAdaptation.name else ADAPTATIONS[name]()


def opacity_stamp(mask: Tensor, pattern: Tensor) -> Callable[[Tensor, float], Tensor]:
    """``stamp(x, opacity)``: the mask-and-pattern trigger at ``opacity`` times the mask's own."""
    return lambda x, opacity: blend(x, mask * opacity, pattern)
