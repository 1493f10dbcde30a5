"""Adversarial retraining (TrojanZoo's "Ar"; Madry et al., ICLR 2018): PGD adversarial training of the trojaned
model, as a LightningModule whose adversarial examples come from torchattacks' PGD."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torchattacks
from torch import Tensor

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits, ImageSet, to_float
from bdlab.defenses.model_sanitisation.base import ModelSanitization
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.evaluate import predict
from bdlab.metrics import accuracy
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from bdlab.training.fit import fit_classifier
from bdlab.training.hooks import TrainingHooks

#: (epsilon, step, iterations) by image kind: single-channel images follow Madry et al.'s MNIST budget
#: (epsilon 0.3) with fewer, larger steps than their 40 x 0.01 so a CPU run takes minutes (10 x 0.05 still
#: travels 1.7 epsilon, TrojanZoo's ratio); colour images take TrojanZoo's Table 21 setting (8/255, 2/255, 7)
PGD_DEFAULTS: dict[str, tuple[float, float, int]] = {"grey": (0.3, 0.05, 10), "colour": (8 / 255, 2 / 255, 7)}
DATA = ("held_out", "train")


def pgd_defaults(channels: int) -> tuple[float, float, int]:
    """The (epsilon, step, iterations) default for images with ``channels`` channels."""
    return PGD_DEFAULTS["grey" if channels == 1 else "colour"]


def make_pgd(model: Classifier, epsilon: float, step: float, iterations: int) -> torchattacks.PGD:
    """torchattacks' L-infinity PGD with a uniform random start (Madry et al. §3), on the device of ``model``.
    bdlab's models take ``[0, 1]`` images and normalise inside, which is torchattacks' domain."""
    pgd = torchattacks.PGD(model, eps=epsilon, alpha=step, steps=iterations, random_start=True)
    pgd.set_device(next(model.parameters()).device)
    return pgd


class AdversarialTraining(TrainingHooks):
    """Madry et al.'s adversarial training (Eq. 2.1: min over the model of the expected max over the
    epsilon-ball of the loss) as hooks on the victim module: every batch, after the dataset's
    augmentation, is replaced by its PGD adversarial examples against the current model (made in eval
    mode, the model's parameters untouched), and the model takes its cross-entropy step on them with
    their true labels.

    Args:
        epsilon: the L-infinity radius of the perturbation, in ``[0, 1]`` pixel units.
        step: the PGD step size.
        iterations: PGD steps per batch.
        warmup_epochs: epochs over which the radius (and the step, in proportion) grows linearly from
            0 to ``epsilon``, batch by batch (Cai et al. 2018's curriculum; 0: the full radius from the
            first batch, Madry et al.'s form). No default here: :class:`AdversarialRetraining` holds it.
    """

    def __init__(self, epsilon: float, step: float, iterations: int, warmup_epochs: int) -> None:
        self.epsilon, self.step, self.iterations = epsilon, step, iterations
        self.warmup_epochs = warmup_epochs
        self.pgd: torchattacks.PGD | None = None

    def radius_share(self, module: pl.LightningModule) -> float:
        """The share of ``epsilon`` used for the module's current batch (1 after the warm-up)."""
        if self.warmup_epochs == 0:
            return 1.0
        # one optimiser step per batch: global_step counts the batches before this one
        return min(1.0, (module.global_step + 1) / (self.warmup_epochs * len(module.train_batches)))

    def after_augment(self, module: pl.LightningModule, x: Tensor, labels: Tensor,
                      is_poison: Tensor) -> tuple[Tensor, Tensor]:
        if self.pgd is None:  # built once the model is on its device: torchattacks moves inputs there
            self.pgd = make_pgd(module.model, self.epsilon, self.step, self.iterations)
        share = self.radius_share(module)
        self.pgd.eps, self.pgd.alpha = self.epsilon * share, self.step * share
        return self.pgd(x, labels), labels  # torchattacks restores the model's training mode afterwards


def robust_accuracy(model: Classifier, data: ImageSet, epsilon: float, step: float, iterations: int, seed: int,
                    batch: int = 500) -> float:
    """Top-1 accuracy (%) of ``model`` on PGD adversarial examples of ``data`` (random starts seeded by
    ``seed``, without touching the global random state)."""
    model.eval()
    pgd = make_pgd(model, epsilon, step, iterations)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        # PGD needs gradients, so it runs chunk by chunk here; the model's verdict goes through predict
        adversarial = torch.cat([pgd(to_float(x).to(device), y.to(device)).cpu()
                                 for x, y in zip(data.images.split(batch), data.labels.split(batch))])
    return accuracy(predict(model, adversarial), data.labels)


class AdversarialRetraining(ModelSanitization):
    """Adversarial retraining (TrojanZoo's "Ar", Pang et al. EuroS&P 2022, §3.3 and Table 21; Madry et al.,
    "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018, §3-4).

    TrojanZoo treats trigger inputs as one kind of adversarial input and adversarially trains the
    pre-trained (trojaned) model to make its predictions consistent in each input's vicinity. Here the
    trojaned model is trained by the victim module with :class:`AdversarialTraining`'s hooks (Madry et
    al.'s PGD training: each batch is replaced by its PGD examples, made with ``torchattacks.PGD``,
    random start, L-infinity ball) for ``epochs`` at ``lr``, with the run's recipe (SGD, momentum 0.9, weight decay 5e-4, cosine
    schedule), through Lightning.

    The PGD budget is per dataset when left null (chosen in ``setup`` from the images' channels):
    single-channel (MNIST-style) images take Madry et al.'s epsilon = 0.3 with 10 steps of 0.05
    (their MNIST setting is 40 steps of 0.01; fewer, larger steps keep a CPU run within minutes and
    still travel 1.7 epsilon, as TrojanZoo's 7 x 2/255 does for 8/255); colour images take TrojanZoo's
    Table 21 setting, epsilon = 8/255, step 2/255, 7 iterations, learning rate 0.01.

    Data and schedule: TrojanZoo's implementation (``AdvTrain.adv_train``) trains on the dataset's clean
    training loader for 50 epochs; the default ``data: train`` does the same (bdlab's clean training split)
    for 3 epochs, the first of them a warm-up in which the radius grows linearly from 0 to epsilon
    (``warmup_epochs`` 1; Cai et al., "Curriculum Adversarial Training", IJCAI 2018). Without the warm-up,
    Madry's epsilon = 0.3 from the first batch collapses a trained LeNet to chance on MNIST (ACC 11.4 on the
    training set as on the held-out split); with it the model keeps its accuracy and becomes robust
    (docs/trojanzoo.md). ``held_out`` trains on the held-out clean split instead, the data a defender is
    given everywhere else in bdlab (fine-pruning, unlearning, NAD); on MNIST's 500 held-out images that is
    too little to make LeNet robust, and the backdoor stays.

    Differences from TrojanZoo: its loop is "free"-style (one model step on the clean batch, then one
    model step after each of the 7 PGD iterations); this is Madry et al.'s form, one model step per
    batch on the final PGD examples.

    Reports ``defense/epsilon``, ``defense/step``, ``defense/iterations`` (the resolved budget) and
    ``defense/robust_acc_before`` / ``defense/robust_acc`` (held-out accuracy under the same PGD
    before and after retraining, so the retraining is seen to take), besides the sanitisation
    protocol's ACC, ASR, ARD, CAD and ART.

    Args:
        epsilon: L-infinity radius in ``(0, 1]`` pixel units (null: per dataset, 0.3 grey / 8/255 colour).
        step: PGD step size, > 0 (null: per dataset, 0.05 grey / 2/255 colour).
        iterations: PGD steps, >= 1 (null: per dataset, 10 grey / 7 colour).
        data: ``train`` (default, TrojanZoo's: the clean training split) or ``held_out``.
        epochs: adversarial training epochs (default 3; TrojanZoo's 50 are a GPU budget).
        warmup_epochs: epochs of a linear radius ramp from 0 to epsilon at the start, in ``[0, epochs]``
            (default 1; 0 is Madry et al.'s full radius from the first batch; see :class:`AdversarialTraining`).
        lr: learning rate (default 0.01, TrojanZoo's).
        seed: batch order and PGD random starts.
    """

    name = "adversarial_retraining"

    def __init__(self, epsilon: float | None = None, step: float | None = None, iterations: int | None = None,
                 data: str = "train", epochs: int = 3, warmup_epochs: int = 1, lr: float = 0.01,
                 seed: int = 0) -> None:
        if epsilon is not None:
            check_range("defense.epsilon", epsilon, 0.0, 1.0, low_open=True)
        if step is not None and not step > 0:
            raise ConfigError("defense.step", f"got {step}, must be > 0 (or null for the dataset's default)")
        if iterations is not None:
            check_at_least("defense.iterations", iterations, 1)
        if data not in DATA:
            raise ConfigError("defense.data", f"got {data!r}, must be held_out or train")
        check_at_least("defense.epochs", epochs, 1)
        check_range("defense.warmup_epochs", warmup_epochs, 0, epochs)
        if not lr > 0:
            raise ConfigError("defense.lr", f"got {lr}, must be > 0")
        self.epsilon = None if epsilon is None else float(epsilon)
        self.step = None if step is None else float(step)
        self.iterations = None if iterations is None else int(iterations)
        self.data, self.epochs, self.warmup_epochs = data, int(epochs), int(warmup_epochs)
        self.lr, self.seed = float(lr), seed

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        if len(data.defense) == 0:
            raise ConfigError("dataset.defense_fraction", "adversarial retraining needs held-out clean images "
                              "(its robust accuracy is measured on them, and defense.data=held_out trains on "
                              "them); raise it above 0")
        self.resolve(data.channels)

    def resolve(self, channels: int) -> None:
        """Fill the budget left null with the default for images with ``channels`` channels."""
        epsilon, step, iterations = pgd_defaults(channels)
        self.epsilon = epsilon if self.epsilon is None else self.epsilon
        self.step = step if self.step is None else self.step
        self.iterations = iterations if self.iterations is None else self.iterations

    def settings(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "step": self.step, "iterations": self.iterations, "data": self.data,
                "epochs": self.epochs, "warmup_epochs": self.warmup_epochs, "lr": self.lr, "seed": self.seed}

    def sanitize(self, model: Classifier, context: RunServices) -> dict[str, Any]:
        data = context.data
        self.resolve(data.channels)
        held_out = ImageSet(data.defense.images.to(context.device), data.defense.labels.to(context.device))
        model.to(context.device)
        budget = (self.epsilon, self.step, self.iterations)
        before = robust_accuracy(model, held_out, *budget, self.seed)
        train = data.defense if self.data == "held_out" else ImageSet(data.train.images, data.train.labels)
        fit_classifier(model, train, context.recipe.variant(self.epochs, self.lr), context.augment(),
                       AdversarialTraining(*budget, self.warmup_epochs), name="adversarial", seed=self.seed)
        model.to(context.device)
        after = robust_accuracy(model, held_out, *budget, self.seed)
        return {"epsilon": self.epsilon, "step": self.step, "iterations": self.iterations,
                "robust_acc_before": before, "robust_acc": after}
