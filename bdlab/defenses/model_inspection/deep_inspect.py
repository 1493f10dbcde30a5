"""DeepInspect (Chen et al., IJCAI 2019): a conditional generator learns every class's trigger; a backdoor's needs little."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdlab.datasets.base import ImageSet, to_float
from bdlab.defenses.model_inspection.base import ModelInspection
from bdlab.errors import ConfigError, check_at_least
from bdlab.evaluate import model_device, predict
from bdlab.metrics import attack_success_rate
from bdlab.services import RunServices
from bdlab.training.loader import BatchedModule, TensorBatches


class ConditionalGenerator(nn.Module):
    """``G(z, k)``: noise and a one-hot class to an additive perturbation in ``[-1, 1]`` of the image's shape.

    DeepInspect's generator (and TrojanZoo's port: a linear layer to a feature map, then two transposed
    convolutions), at a width small enough for a CPU: a ``width`` x H/4 x W/4 map, upsampled twice by
    2, resized to the image size when it is not a multiple of 4, through tanh. With ``zero_start`` the
    last layer starts at zero: the first perturbations are none, and grow where the loss asks for them."""

    def __init__(self, noise_dim: int, num_classes: int, shape: tuple[int, int, int], width: int = 32,
                 zero_start: bool = False) -> None:
        super().__init__()
        self.noise_dim, self.num_classes, self.shape, self.width = noise_dim, num_classes, shape, width
        channels, height, width_px = shape
        self.grid = (math.ceil(height / 4), math.ceil(width_px / 4))
        self.fc = nn.Linear(noise_dim + num_classes, width * self.grid[0] * self.grid[1])
        self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.ReLU(),
                                nn.ConvTranspose2d(width // 2, channels, 4, 2, 1))
        if zero_start:  # no perturbation at first, so the L1 term does not have to undo random output everywhere
            nn.init.zeros_(self.up[-1].weight)
            nn.init.zeros_(self.up[-1].bias)

    def forward(self, z: Tensor, classes: Tensor) -> Tensor:
        code = torch.cat([z, F.one_hot(classes, self.num_classes).to(z.dtype)], 1)
        out = self.up(self.fc(code).view(len(z), self.width, *self.grid))
        if tuple(out.shape[2:]) != tuple(self.shape[1:]):
            out = F.interpolate(out, size=self.shape[1:], mode="bilinear", align_corners=False)
        return torch.tanh(out)


class DeepInspectModule(BatchedModule):
    """Trains the conditional generator against a frozen copy of the classifier (DeepInspect §3.2, Eq. 3):
    every image of a batch is paired with every class but its own, and the loss is::

        cross-entropy( f(clip(x + G(z, k))), k )  +  gamma * ||G(z, k)||_1

    The classifier stays in eval mode with its gradients off; only the generator is stepped (Adam)."""

    def __init__(self, classifier: nn.Module, generator: ConditionalGenerator, batches: TensorBatches,
                 gamma: float, lr: float) -> None:
        super().__init__(batches)
        self.classifier = classifier.requires_grad_(False)
        self.generator, self.gamma, self.lr = generator, gamma, lr

    def on_train_epoch_start(self) -> None:
        self.classifier.eval()  # Lightning put the whole module in train mode; batch norm must not move

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels, _ = batch
        classes = self.generator.num_classes
        x = to_float(images).repeat_interleave(classes, 0)
        targets = torch.arange(classes, device=x.device).repeat(len(images))
        keep = (targets != labels.repeat_interleave(classes)).float()
        delta = self.generator(torch.randn(len(x), self.generator.noise_dim, device=x.device), targets)
        cross_entropy = F.cross_entropy(self.classifier((x + delta).clamp(0.0, 1.0)), targets, reduction="none")
        size = delta.abs().flatten(1).sum(1)
        loss = ((cross_entropy + self.gamma * size) * keep).sum() / keep.sum()
        self.log("deep_inspect/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.generator.parameters(), lr=self.lr)


class DeepInspect(ModelInspection):
    """DeepInspect (Chen, Fu, Zhao & Koushanfar, "DeepInspect: A Black-box Trojan Detection and Mitigation
    Framework for Deep Neural Networks", IJCAI 2019; TrojanZoo's "Di", Table 21 settings).

    1. Inputs (§3.1): DeepInspect recovers a substitute training set by model inversion; bdlab has
       held-out clean images, and uses ``optimisation_images`` of them instead (TrojanZoo also samples
       10% of the training set).
    2. Trigger generation (§3.2, Eq. 3): a conditional generator ``G(z, k)``
       (:class:`ConditionalGenerator`, noise of ``noise_dim``) learns additive perturbations that send
       the images to class ``k``, penalised by their L1 norm (``gamma``, TrojanZoo's 0.02 on the mark's
       norm), for ``epochs`` over the images (TrojanZoo: 20) at Adam ``lr`` (TrojanZoo: 0.01). It is
       trained through Lightning (:class:`DeepInspectModule`, the run's Trainer arguments), the
       classifier frozen.
    3. Anomaly detection (§3.3): the per-class score is the perturbation magnitude the generator needs,
       the mean L1 norm of the *effective* change ``clip(x + G(z, k)) - x`` over the images not of
       class ``k`` (``samples`` noise draws each). DeepInspect tests the magnitudes with a double-MAD
       hypothesis test at significance 0.05; here the protocol's anomaly index (AIV > ``aiv_threshold``
       below the median: an abnormally *small* perturbation) is used, as in TrojanZoo's Table 11.
       The generated perturbations' success (share sent to ``k``) is reported per class (a class
       the generator never reaches also has a small magnitude, so read the two together), and
       ``G(0, k)`` is the reported trigger (#pixels, MLN, held-out ASR).

    Args:
        noise_dim: the generator's noise dimension (default 100, TrojanZoo's).
        width: feature maps of the generator's first layer (default 32).
        epochs: passes over the images (default 20, TrojanZoo's).
        batch_size: images per step, each paired with every other class (default 32).
        lr: Adam step size (default 0.01, TrojanZoo's).
        gamma: weight of the perturbation's L1 norm (default 0.02, TrojanZoo's).
        samples: noise draws per image when measuring the magnitude (default 4).
        zero_start: start the generator's last layer at zero (no perturbation) instead of PyTorch's
            random init (default false: on MNIST / LeNet seed 1 the zero start left the clean model's
            generator at large, useless perturbations; on tiny images it converges faster).
        optimisation_images, evaluation_images, aiv_threshold, seed: as
            :class:`~bdlab.defenses.model_inspection.base.ModelInspection` (defaults 200, 200, 2).
    """

    name = "deep_inspect"
    suspicious = "low"

    def __init__(self, noise_dim: int = 100, width: int = 32, epochs: int = 20, batch_size: int = 32,
                 lr: float = 0.01, gamma: float = 0.02, samples: int = 4, zero_start: bool = False,
                 optimisation_images: int = 200,
                 evaluation_images: int = 200, aiv_threshold: float = 2.0, seed: int = 0) -> None:
        super().__init__(optimisation_images, evaluation_images, aiv_threshold, seed)
        check_at_least("defense.noise_dim", noise_dim, 1)
        check_at_least("defense.width", width, 2)
        check_at_least("defense.epochs", epochs, 1)
        check_at_least("defense.batch_size", batch_size, 1)
        check_at_least("defense.samples", samples, 1)
        if not lr > 0:
            raise ConfigError("defense.lr", f"got {lr}, must be > 0")
        if not gamma > 0:
            raise ConfigError("defense.gamma", f"got {gamma}, must be > 0 (without it any perturbation size goes)")
        self.noise_dim, self.width, self.epochs, self.batch_size = int(noise_dim), int(width), int(epochs), int(batch_size)
        self.lr, self.gamma, self.samples, self.zero_start = float(lr), float(gamma), int(samples), bool(zero_start)

    def settings(self) -> dict[str, Any]:
        return {"noise_dim": self.noise_dim, "width": self.width, "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr, "gamma": self.gamma, "samples": self.samples,
                "zero_start": self.zero_start}

    def score(self, model: nn.Module, images: ImageSet, num_classes: int, services: RunServices) -> dict[str, Tensor]:
        model.eval()
        device = model_device(model)
        shape = tuple(images.images.shape[1:])
        with torch.random.fork_rng(devices=[]):  # the generator's initial weights, the run's RNG untouched
            torch.manual_seed(self.seed)
            generator = ConditionalGenerator(self.noise_dim, num_classes, shape, self.width, self.zero_start)
        batches = TensorBatches(images.images, images.labels, self.batch_size, shuffle=True, seed=self.seed)
        # a copy: Lightning moves the module between devices and the run's model must stay where it is
        module = DeepInspectModule(copy.deepcopy(model), generator, batches, self.gamma, self.lr)
        services.fit_helper(module, self.seed, f"DeepInspect generator on {len(images)} images", max_epochs=self.epochs)
        generator = generator.to(device).eval()
        return self.measure(model, generator, images, num_classes)

    @torch.no_grad()
    def measure(self, model: nn.Module, generator: ConditionalGenerator, images: ImageSet,
                num_classes: int) -> dict[str, Tensor]:
        """Per class: the mean effective L1 change, the generated perturbations' success, and ``G(0, k)``."""
        device = model_device(model)
        generator_rng = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        magnitude, success = torch.zeros(num_classes), torch.zeros(num_classes)
        for k in range(num_classes):
            others = to_float(images.images[images.labels != k].to(device))
            classes = torch.full((len(others),), k, device=device)
            noise = [torch.randn(len(others), self.noise_dim, generator=generator_rng) for _ in range(self.samples)]
            stamped = torch.cat([(others + generator(z.to(device), classes)).clamp(0.0, 1.0) for z in noise])
            magnitude[k] = (stamped - others.repeat(self.samples, 1, 1, 1)).abs().flatten(1).sum(1).mean().cpu()
            success[k] = attack_success_rate(predict(model, stamped), k)
        delta = generator(torch.zeros(num_classes, self.noise_dim, device=device),
                          torch.arange(num_classes, device=device)).cpu()
        return {"score": magnitude, "generated_asr": success, "delta": delta,
                "mask": torch.zeros(num_classes, 1, *delta.shape[2:]), "pattern": torch.zeros_like(delta)}
