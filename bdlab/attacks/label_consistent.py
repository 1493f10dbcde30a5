"""Label-consistent backdoor (Turner et al., 2019), as configured in the ShrinkPad paper (Appendix B)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytorch_lightning as pl
import torch
import torchattacks
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.attacks.base import MaskPatternAttack, PoisonedSet, blend, map_batches
from bdlab.cache import content_digest, spec_hash
from bdlab.datasets.base import DatasetSplits, ImageSet, to_float, to_uint8
from bdlab.errors import ConfigError, check_range
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from bdlab.training.fit import training_batches
from bdlab.training.hooks import TrainingHooks
from bdlab.training.recipe import TrainingRecipe
from bdlab.training.victim import VictimModule

SURROGATES = ("adversarial", "clean", "ensemble")
ADV_INITS = ("clean", "scratch")
REGIONS = ("image", "foreground")

# Turner et al.'s 3x3 black-and-white corner pattern; it is its own mirror image, so the
# four-corner trigger is symmetric under flips (why Flip cannot remove it: ShrinkPad paper, section 5.1)
CORNER_PATTERN = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


class LogitEnsemble(nn.Module):
    """The mean logits of several classifiers (Dong et al., "Boosting Adversarial Attacks with
    Momentum", CVPR 2018, section 3.2: ensemble in logits, equal weights).

    PGD on the ensemble must fool every member at once, so its perturbations transfer better
    to a model none of them is (their Table 3; Liu et al., ICLR 2017, make the same point)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


class Confined(nn.Module):
    """``model`` seeing ``x`` changed only inside ``region`` (0/1): the gradient, and so a signed step,
    is zero outside it."""

    def __init__(self, model: nn.Module, x: Tensor, region: Tensor) -> None:
        super().__init__()
        self.model, self.x, self.region = model, x, region

    def forward(self, z: Tensor) -> Tensor:
        return self.model(self.x + self.region * (z - self.x))


def pgd_untargeted(model: nn.Module, x: Tensor, labels: Tensor, epsilon: float, step: float,
                   iterations: int, region: Tensor | None = None) -> Tensor:
    """torchattacks' L-infinity PGD (Madry et al.) in ``[0, 1]`` pixel space that maximises the
    cross-entropy of the true label: ``iterations`` signed-gradient steps of ``step`` from ``x`` itself
    (no random start), each projected onto the ``epsilon``-ball and ``[0, 1]``; the model in eval mode.
    ``region`` (0/1, broadcastable to ``x``) confines the perturbation to its pixels."""
    attacked = model if region is None else Confined(model, x, region)
    return torchattacks.PGD(attacked, eps=epsilon, alpha=step, steps=iterations, random_start=False)(x, labels)


def foreground(x: Tensor, dilation: int) -> Tensor:
    """``(N, 1, H, W)`` 0/1 mask of the pixels within ``dilation`` pixels (Chebyshev distance) of a
    non-zero pixel of any channel of ``x``."""
    occupied = (x.amax(1, keepdim=True) > 0).float()
    return F.max_pool2d(occupied, 2 * dilation + 1, stride=1, padding=dilation) if dilation else occupied


class FastAdversarialTraining(TrainingHooks):
    """Hooks of FGSM adversarial training from a uniform random start ("Fast is better than free", Wong,
    Rice and Kolter, ICLR 2020, Algorithm 3; torchattacks' FFGSM): every batch is replaced by
    ``x + delta``, ``delta ~ U(-epsilon, epsilon)`` followed by one signed-gradient step of ``step``
    (they use 1.25 epsilon), projected back onto the ball and ``[0, 1]``; true labels kept."""

    def __init__(self, epsilon: float, step: float) -> None:
        self.epsilon, self.step = epsilon, step

    def after_augment(self, module: pl.LightningModule, x: Tensor, labels: Tensor,
                      is_poison: Tensor) -> tuple[Tensor, Tensor]:
        return torchattacks.FFGSM(module.model, eps=self.epsilon, alpha=self.step)(x, labels), labels


def fast_adversarial_training(model: Classifier, train: ImageSet, epsilon: float, step: float, epochs: int,
                              lr: float, batch_size: int, seed: int, services: RunServices) -> Classifier:
    """Train ``model`` in place with :class:`FastAdversarialTraining` on the victim module, through
    ``services.fit_helper`` (its own seeded generator): SGD (momentum 0.9, weight decay 5e-4) with Wong
    et al.'s cyclic learning rate, linear from 0 to ``lr`` over the first half of the steps and back to 0."""
    def cyclic(step_index: int) -> float:
        steps = max(epochs * len(module.train_batches), 1)  # the rank's batches, once sharded
        return 1.0 - abs(2.0 * step_index / steps - 1.0)

    recipe = TrainingRecipe(seed, batch_size, epochs,
                            functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4),
                            functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=cyclic), {}, "step")
    module = VictimModule(model, training_batches(train, recipe, seed), recipe, None,
                          FastAdversarialTraining(epsilon, step), "robust_surrogate")
    model.train()
    services.fit_helper(module, seed, f"robust surrogate (FGSM, epsilon {epsilon:.3g}) on {len(train)} images",
                        max_epochs=epochs)
    return model.eval()


class LabelConsistent(MaskPatternAttack):
    """Label-consistent attack (Turner et al., 2019; ShrinkPad paper Appendix B, Tables 1-2 "Consistent Attack").

    A share ``poison_rate`` of the *target-class* training images is first made hard to learn
    from its natural features with an untargeted L-infinity PGD perturbation (Madry et al.,
    ICLR 2018; torchattacks' PGD in ``[0, 1]`` pixel space, no random start) computed on a surrogate model, then stamped with a four-corner 3x3 checkerboard
    blended with weight ``amplitude`` (Eq. 1 with alpha in {0, amplitude}); labels stay correct
    (clean-label). At test time the trigger is stamped with ``test_amplitude`` (Turner et al.
    keep the reduced amplitude for training only and test with the fully visible pattern).

    Perturbation region (``perturbation_region``): ``image`` (default, Turner et al.) perturbs
    every pixel; ``foreground`` (bdlab's adaptation for black-background data such as MNIST)
    only the pixels within ``foreground_dilation`` pixels of the object. On MNIST the background
    is exactly 0 in every clean image, so PGD noise there is a marker of the poisoned images that
    the trojaned model learns as class evidence instead of the trigger; confining the
    perturbation to the digit removes that shortcut (docs/transformations.md: ASR 0.15% -> 29.9% at epsilon 0.5).

    Surrogate (``surrogate``):

    - ``adversarial`` (default, Turner, Tsipras and Madry, "Label-Consistent Backdoor Attacks",
      2019, section 4.2): an adversarially trained, robust copy of the run's clean reference
      model. Its PGD perturbations change the image's robust features, so the poisoned images
      become genuinely hard and the trojaned model has to rely on the trigger. It is trained
      through Lightning with fast FGSM adversarial training from a random start (torchattacks'
      FFGSM; Wong, Rice and Kolter, "Fast is better than free: revisiting adversarial training",
      ICLR 2020; :func:`fast_adversarial_training`): budget ``adv_epsilon``,
      step ``adv_step`` (default 1.25 ``adv_epsilon``), ``adv_epochs`` epochs of SGD on the
      clean training set with a cyclic learning rate peaking at ``adv_lr``, batches of
      ``adv_batch_size``, starting from the clean model's weights (``adv_init: clean``) or from
      fresh ones (``adv_init: scratch``). Its state dict is cached under
      ``models/robust_surrogate``, keyed by the clean model's key and these settings, so it is
      trained once. On MNIST / LeNet it does not make the attack work either (docs/transformations.md): with PGD
      at 8/255 to 0.5 the trojaned model still fits the perturbed images without the trigger
      (ASR <= 0.13%).
    - ``clean``: the run's standard clean reference model itself. Known limitation: on MNIST /
      LeNet (epsilon 0.3, 20 steps) the trojaned model learns these non-robust perturbations as
      class evidence (99.6% on the perturbed images) and ignores the trigger: ASR 0.15% (docs/transformations.md).
    - ``ensemble`` (bdlab's transfer-oriented variant): the mean logits of ``ensemble_size``
      clean models of the run's data and recipe, the reference model and ones trained with
      seeds ``seed + 1``, ... (cached as clean models), attacked together
      (:class:`LogitEnsemble`). A perturbation that fools all of
      them is read as another class's evidence by the trojaned model too, so it must rely on
      the trigger. On MNIST / LeNet with foreground PGD at epsilon 0.5 it lifts ASR from 31.7%
      (one model) to 66.6% (eight) (docs/transformations.md, "Label-consistent on MNIST"), but poisons at 0.5 read
      as other digits. At epsilon 0.3 (``experiment=label_consistent_mnist``) it gives 12-31%.

    The clean models (same data, recipe; the run's seed and the ensemble's) come from the run's
    resources given to :meth:`setup`; the perturbed images are computed once and kept as uint8 in the
    artifact cache under ``poisoned/label_consistent``.

    Args:
        poison_rate: share of the target class poisoned (default 0.25, the paper's).
        amplitude: trigger blending weight on poisoned training images (default 0.25).
        test_amplitude: trigger blending weight on test inputs (default 1.0).
        epsilon: L-infinity budget of the PGD perturbation in ``[0, 1]`` pixel units (default 8/255).
        step: PGD step size (default 2/255).
        iterations: PGD steps (default 10; 0 = trigger only, no perturbation).
        perturbation_region: ``image`` (default) or ``foreground``, see above.
        foreground_dilation: pixels the ``foreground`` region extends beyond the object (default 2).
        surrogate: ``adversarial`` (default), ``clean`` or ``ensemble``, see above.
        ensemble_size: clean models in the ``ensemble`` surrogate (default 8).
        adv_epsilon: L-infinity budget of the FGSM adversarial training (default 0.3, MNIST's).
        adv_step: FGSM step (default None = 1.25 ``adv_epsilon``, Wong et al.'s).
        adv_epochs: adversarial-training epochs (default 5).
        adv_lr: peak of the cyclic learning rate (default 0.05).
        adv_batch_size: adversarial-training batch size (default 128).
        adv_init: ``clean`` (start from the clean model's weights, default) or ``scratch``.
        target_class, seed, enhance, enhance_max_shrink: see :class:`~bdlab.attacks.base.Attack`.
    """

    name = "label_consistent"
    clean_label = True

    def __init__(self, poison_rate: float = 0.25, amplitude: float = 0.25, test_amplitude: float = 1.0,
                 epsilon: float = 8 / 255, step: float = 2 / 255, iterations: int = 10,
                 perturbation_region: str = "image", foreground_dilation: int = 2,
                 surrogate: str = "adversarial", ensemble_size: int = 8, adv_epsilon: float = 0.3,
                 adv_step: float | None = None, adv_epochs: int = 5, adv_lr: float = 0.05, adv_batch_size: int = 128,
                 adv_init: str = "clean", **kwargs: Any) -> None:
        super().__init__(poison_rate=poison_rate, **kwargs)
        check_range("attack.amplitude", amplitude, 0.0, 1.0, low_open=True)
        check_range("attack.test_amplitude", test_amplitude, 0.0, 1.0, low_open=True)
        check_range("attack.epsilon", epsilon, 0.0, 1.0)
        check_range("attack.step", step, 0.0, 1.0)
        if iterations < 0:
            raise ConfigError("attack.iterations", f"got {iterations}, must be >= 0")
        if perturbation_region not in REGIONS:
            raise ConfigError("attack.perturbation_region", f"got {perturbation_region!r}, must be one of "
                              f"{', '.join(REGIONS)}")
        if foreground_dilation < 0:
            raise ConfigError("attack.foreground_dilation", f"got {foreground_dilation}, must be >= 0")
        if surrogate not in SURROGATES:
            raise ConfigError("attack.surrogate", f"got {surrogate!r}, must be one of {', '.join(SURROGATES)}")
        if ensemble_size < 1:
            raise ConfigError("attack.ensemble_size", f"got {ensemble_size}, must be >= 1")
        if adv_init not in ADV_INITS:
            raise ConfigError("attack.adv_init", f"got {adv_init!r}, must be one of {', '.join(ADV_INITS)}")
        check_range("attack.adv_epsilon", adv_epsilon, 0.0, 1.0, low_open=True)
        adv_step = 1.25 * float(adv_epsilon) if adv_step is None else adv_step
        check_range("attack.adv_step", adv_step, 0.0, 2.0, low_open=True)
        if adv_epochs < 1:
            raise ConfigError("attack.adv_epochs", f"got {adv_epochs}, must be >= 1")
        if not adv_lr > 0:
            raise ConfigError("attack.adv_lr", f"got {adv_lr}, must be > 0")
        if adv_batch_size < 1:
            raise ConfigError("attack.adv_batch_size", f"got {adv_batch_size}, must be >= 1")
        self.amplitude, self.test_amplitude = float(amplitude), float(test_amplitude)
        self.epsilon, self.step, self.iterations = float(epsilon), float(step), int(iterations)
        self.perturbation_region, self.foreground_dilation = perturbation_region, int(foreground_dilation)
        self.surrogate, self.ensemble_size = surrogate, int(ensemble_size)
        self.adv_epsilon, self.adv_step, self.adv_epochs = float(adv_epsilon), float(adv_step), int(adv_epochs)
        self.adv_lr, self.adv_batch_size, self.adv_init = float(adv_lr), int(adv_batch_size), adv_init

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        super().setup(data, resources)
        channels, (height, width) = data.channels, data.size
        size = CORNER_PATTERN.shape[0]
        if height < 2 * size or width < 2 * size:
            raise ConfigError("dataset", f"{height}x{width} images are too small for the four-corner {size}x{size} "
                              "trigger")
        corners = torch.zeros(height, width)
        pattern = torch.zeros(height, width)
        for rows in (slice(0, size), slice(height - size, height)):
            for cols in (slice(0, size), slice(width - size, width)):
                corners[rows, cols] = 1.0
                pattern[rows, cols] = CORNER_PATTERN
        self.corners = corners[None]
        self.pattern = pattern[None].expand(channels, height, width).clone()
        self.mask = self.corners * self.test_amplitude  # what apply() (test-time stamping) blends with

    def ensemble_seeds(self) -> list[int]:
        """The training seeds of the ensemble's members besides the reference model: ``seed + 1``, ..."""
        return [self.seed + offset for offset in range(1, self.ensemble_size)]

    def ensemble_keys(self) -> list[str]:
        """The cache keys of the ensemble's members (the reference model first); loads no model."""
        return [self.resources.clean_key(), *(self.resources.clean_key(seed) for seed in self.ensemble_seeds())]

    def ensemble_surrogate(self) -> LogitEnsemble:
        """The ``ensemble_size`` clean models: the reference, then those of seeds ``seed + 1``, ..."""
        return LogitEnsemble([self.resources.clean_model(),
                              *(self.resources.clean_model(seed) for seed in self.ensemble_seeds())])

    def robust_spec(self, model_key: str) -> dict[str, Any]:
        """What determines the robust surrogate: the clean model's key and the training settings."""
        return {"clean_model": model_key, "method": "torchattacks_ffgsm", "epsilon": self.adv_epsilon,
                "step": self.adv_step, "epochs": self.adv_epochs, "lr": self.adv_lr,
                "batch_size": self.adv_batch_size, "init": self.adv_init, "seed": self.seed}

    def robust_surrogate(self, train: ImageSet) -> tuple[Classifier, str]:
        """The adversarially trained surrogate and its cache key (trained on ``train`` once, then cached)."""
        clean, cache, model_key = self.resources.clean_model(), self.resources.cache, self.resources.clean_key()
        device = next(clean.parameters()).device
        robust = copy.deepcopy(clean).cpu()
        spec = self.robust_spec(model_key)

        def build() -> dict[str, Tensor]:
            if self.adv_init == "scratch":  # fresh weights, seeded; buffers kept
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    for layer in robust.modules():
                        if layer is not robust and hasattr(layer, "reset_parameters"):
                            layer.reset_parameters()
            fast_adversarial_training(robust, ImageSet(train.images, train.labels), self.adv_epsilon, self.adv_step,
                                      self.adv_epochs, self.adv_lr, self.adv_batch_size, self.seed, self.resources)
            return {k: v.cpu() for k, v in robust.state_dict().items()}

        state, reused = cache.get_or_build("models/robust_surrogate", spec, build)
        if reused:
            robust.load_state_dict(state)
        return robust.to(device).eval(), spec_hash(spec)

    def _perturb(self, images: Tensor, labels: Tensor, model: nn.Module) -> Tensor:
        def perturb(x: Tensor, part: slice) -> Tensor:
            region = foreground(x, self.foreground_dilation) if self.perturbation_region == "foreground" else None
            return pgd_untargeted(model, x, labels[part].to(x.device), self.epsilon, self.step, self.iterations, region)

        return map_batches(perturb, images, next(model.parameters()).device)

    def perturbed(self, images: Tensor, labels: Tensor, train: ImageSet | None = None) -> Tensor:
        """The PGD-perturbed uint8 copies of ``images`` (from the cache when computed before).

        ``train`` is the clean training set the robust surrogate learns from (needed only when
        the adversarial surrogate is not cached yet)."""
        model_key = self.resources.clean_key()
        spec = {"attack": self.name, "surrogate": model_key, "epsilon": self.epsilon, "step": self.step,
                "iterations": self.iterations,
                "images": content_digest(images)}
        if self.surrogate == "adversarial":
            if train is None:
                raise ValueError("the adversarial surrogate needs the training set")
            # the spec of the clean surrogate is kept as before, so its cached images stay valid
            spec["surrogate"] = {"robust": self.robust_spec(model_key)}
        if self.surrogate == "ensemble":  # the members are loaded (or trained) only when images are built
            spec["surrogate"] = {"ensemble": self.ensemble_keys()}
        if self.perturbation_region != "image":  # only then, so images cached before the option stay valid
            spec["region"] = {"kind": self.perturbation_region, "dilation": self.foreground_dilation}

        def build() -> dict[str, Tensor]:
            if self.surrogate == "adversarial":
                surrogate: nn.Module = self.robust_surrogate(train)[0]
            elif self.surrogate == "ensemble":
                surrogate = self.ensemble_surrogate()
            else:
                surrogate = self.resources.clean_model()
            return {"images": self._perturb(images, labels, surrogate)}

        tensors, _ = self.resources.cache.get_or_build("poisoned/label_consistent", spec, build)
        return tensors["images"]

    def poison_train(self, train: ImageSet, device: torch.device | str = "cpu") -> PoisonedSet:
        """Perturb, then stamp with ``amplitude``, the poisoned target-class images; labels unchanged."""
        index = self.poison_indices(train.labels)
        perturbed = to_float(self.perturbed(train.images[index], train.labels[index], train))
        images = train.images.clone()
        images[index] = to_uint8(blend(perturbed, self.corners * self.amplitude, self.pattern))
        return self.relabelled(train, images)
