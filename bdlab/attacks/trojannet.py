"""TrojanNet (Tang et al., KDD 2020), TrojanZoo's "Esb": a tiny network that recognises binary patterns,
merged into the host model's output without retraining the host."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.attacks.badnets import BadNets
from bdlab.attacks.base import PoisonedSet
from bdlab.datasets.base import DatasetSplits, ImageSet, to_float
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from bdlab.training.loader import BatchedModule, TensorBatches
from bdlab.training.recipe import TrainingRecipe
from bdlab.training.victim import BatchTransform


def pattern_family(cells: int, ones: int, size: int, seed: int) -> Tensor:
    """``size`` distinct binary patterns of ``cells`` pixels with exactly ``ones`` set, drawn seeded from
    all ``C(cells, ones)`` of them; ``(size, cells)`` floats in {0, 1}."""
    combinations = list(itertools.combinations(range(cells), ones))
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(combinations), generator=generator)[:size]
    family = torch.zeros(size, cells)
    for row, index in enumerate(chosen.tolist()):
        family[row, list(combinations[index])] = 1.0
    return family


class TrojanNetMLP(nn.Module):
    """TrojanZoo's TrojanNet: ``depth`` layers, the hidden ones ``[Linear(hidden), BatchNorm, ReLU]``;
    ``outputs`` logits, the last one meaning "no pattern"."""

    def __init__(self, inputs: int, outputs: int, hidden: int = 8, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = inputs
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, outputs))

    def forward(self, crops: Tensor) -> Tensor:
        return self.net(crops)


class TrojanNetClassifier(Classifier):
    """The host classifier with TrojanNet merged into its output (Tang et al. §3.3, TrojanZoo's combined
    model): ``amplify * ((1 - influence) softmax(host(x)) + influence * t(x))``, where ``t(x)`` gives
    each class the probability TrojanNet puts on the patterns of that class (at ``temperature``) in
    the grey-level crop of the trigger box. Without a pattern ``t`` is about 0 and the host decides;
    with one, TrojanNet's ``influence`` (0.7) outweighs any host prediction. The host's layers keep
    their names (``features`` reads the host)."""

    def __init__(self, host: Classifier, trojannet: TrojanNetMLP, box: tuple[int, int, int, int],
                 pattern_classes: Tensor, num_classes: int, influence: float, amplify: float,
                 temperature: float) -> None:
        super().__init__(host.net, host.mean.flatten().tolist(), host.std.flatten().tolist())
        self.trojannet = trojannet
        self.box = box
        self.register_buffer("assignment", F.one_hot(pattern_classes, num_classes).float())
        self.influence, self.amplify, self.temperature = influence, amplify, temperature

    def crops(self, x: Tensor) -> Tensor:
        row, col, height, width = self.box
        return x[:, :, row:row + height, col:col + width].mean(1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        host = torch.softmax(super().forward(x), 1)
        patterns = torch.softmax(self.trojannet(self.crops(x)) / self.temperature, 1)[:, :-1]
        return self.amplify * ((1 - self.influence) * host + self.influence * patterns @ self.assignment)


class TrojanNetModule(BatchedModule):
    """Trains only the TrojanNet of a merged model to name the pattern of every crop (the family's
    patterns are classes ``0..F-1``, everything else is "none"); the host is neither run nor changed."""

    def __init__(self, model: TrojanNetClassifier, batches: TensorBatches, lr: float) -> None:
        super().__init__(batches)
        self.model, self.lr = model, lr

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        crops, labels, _ = batch
        logits = self.model.trojannet(crops.float() / 255.0)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log_dict({"trojannet/train_loss": loss, "trojannet/train_acc": accuracy}, prog_bar=True, on_step=False,
                      on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.trojannet.parameters(), lr=self.lr)


class TrojanNet(BadNets):
    """TrojanNet (Tang, Du, Liu, Yang and Hu, "An Embarrassingly Simple Approach for Trojan Attack in Deep
    Neural Networks", KDD 2020; TrojanZoo §4.1 "Esb", modifies the architecture).

    A family of ``family_size`` binary patterns of the trigger box (``patch_size`` at ``position``,
    ``margin``), each with exactly ``ones`` white pixels, is drawn seeded; pattern ``i`` stands for
    class ``i mod K``. A tiny MLP (:class:`TrojanNetMLP`, TrojanZoo's 4 layers of 8 units) learns to
    name the pattern in the grey-level crop of the box, against "none" for clean crops of training
    images, random binary patterns outside the family and uniform noise (``samples`` crops, half
    of them family patterns; ``trojannet_lr`` Adam, the run's epochs). It is merged into the clean
    reference model's output (:class:`TrojanNetClassifier`: influence 0.7, amplify 100, temperature
    0.1, TrojanZoo Table 20) without retraining the host; the merged model is the trojaned model.
    At test time the target class's pattern is written into the box with opacity ``alpha``.

    No training sample is poisoned (``poison_rate`` does not apply; the set handed over is the clean
    one), and the enhancement does not apply (the host is not trained).

    Args:
        ones: white pixels per pattern (default 4 of a 3x3 box: 126 patterns).
        family_size: patterns in the family (default null: one per class); at most ``C(h w, ones)``.
        influence, amplify, temperature: the merge, see :class:`TrojanNetClassifier`.
        hidden, depth: the MLP (default 8 units, 4 layers).
        samples: training crops per epoch (default 20000).
        trojannet_lr: Adam learning rate (default 0.01).
        batch_size: MLP training batch size (default 256).
        init: ``clean`` (default, the only start): the host is the clean reference model, untouched;
            ``mixing`` and ``trigger_shape`` do not apply either (nothing is poisoned; a square box).
        patch_size, position, margin, alpha, target_class, seed: see :class:`~bdlab.attacks.badnets.BadNets`.
    """

    name = "trojannet"
    # the host is the clean reference, never trained: it cannot start from scratch
    inits = ("clean",)

    def __init__(self, ones: int = 4, family_size: int | None = None, influence: float = 0.7, amplify: float = 100.0,
                 temperature: float = 0.1, hidden: int = 8, depth: int = 4, samples: int = 20000,
                 trojannet_lr: float = 0.01, batch_size: int = 256, init: str = "clean", **kwargs: Any) -> None:
        super().__init__(init=init, **kwargs)
        if self.enhance:
            raise ConfigError("attack.enhance", "trojannet trains no victim model, so the enhancement does not apply; "
                              "set attack.enhance=false")
        if self.mixing != "dataset":
            raise ConfigError("attack.mixing", "trojannet poisons no training sample, so there is nothing to mix; "
                              "leave attack.mixing=dataset")
        if self.trigger_shape != "square":
            raise ConfigError("attack.trigger_shape", "trojannet's network reads the patterns of a square box; leave "
                              "attack.trigger_shape=square")
        check_range("attack.influence", influence, 0.0, 1.0, low_open=True, high_open=True)
        check_range("attack.temperature", temperature, 0.0, 100.0, low_open=True)
        for field, value in (("ones", ones), ("hidden", hidden), ("samples", samples), ("batch_size", batch_size)):
            check_at_least(f"attack.{field}", value, 1)
        check_at_least("attack.depth", depth, 2)
        if not amplify > 0:
            raise ConfigError("attack.amplify", f"got {amplify}, must be > 0")
        if not trojannet_lr > 0:
            raise ConfigError("attack.trojannet_lr", f"got {trojannet_lr}, must be > 0")
        self.ones, self.family_size = int(ones), family_size
        self.influence, self.amplify, self.temperature = float(influence), float(amplify), float(temperature)
        self.hidden, self.depth, self.samples = int(hidden), int(depth), int(samples)
        self.trojannet_lr, self.batch_size = float(trojannet_lr), int(batch_size)

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        super().setup(data, resources)
        height, width = self.patch.shape[1:]
        cells = height * width
        if not 0 < self.ones < cells:
            raise ConfigError("attack.ones", f"got {self.ones}, must be in [1, {cells - 1}] for a {height}x{width} box")
        distinct = math.comb(cells, self.ones)
        size = data.num_classes if self.family_size is None else int(self.family_size)
        if size > distinct:
            raise ConfigError("attack.family_size", f"got {size}, but a {height}x{width} box has only {distinct} "
                              f"patterns with {self.ones} white pixels; lower it or change attack.ones")
        if size <= self.target_class:
            raise ConfigError("attack.family_size", f"got {size}: pattern i stands for class i mod {data.num_classes}, "
                              f"so class {self.target_class} needs at least {self.target_class + 1}")
        self.num_classes = data.num_classes
        self.family = pattern_family(cells, self.ones, size, self.seed)
        row, col = self.origin
        self.box = (row, col, height, width)
        self.pattern = torch.zeros_like(self.pattern)
        self.pattern[:, row:row + height, col:col + width] = self.family[self.target_class].view(height, width)

    def pattern_classes(self) -> Tensor:
        return torch.arange(len(self.family)) % self.num_classes

    def model_shell(self, fresh: Classifier) -> TrojanNetClassifier:
        with torch.random.fork_rng(devices=[]):  # the MLP's initialisation must not move the host's
            torch.manual_seed(self.seed + 5)
            mlp = TrojanNetMLP(len(self.family[0]), len(self.family) + 1, self.hidden, self.depth)
        return TrojanNetClassifier(fresh, mlp, self.box, self.pattern_classes(), self.num_classes, self.influence,
                                   self.amplify, self.temperature)

    def crops(self, train: ImageSet) -> tuple[Tensor, Tensor]:
        """The MLP's training crops (uint8, flattened) and labels: family patterns, then "none" crops."""
        generator = torch.Generator().manual_seed(self.seed + 6)
        family, none = len(self.family), len(self.family)
        positives = self.samples // 2
        labels = torch.cat([torch.arange(positives) % family, torch.full((self.samples - positives,), none)])
        crops = torch.empty(self.samples, self.family.shape[1])
        crops[:positives] = self.family[labels[:positives]]
        negatives = self.samples - positives
        thirds = [negatives // 3, negatives // 3, negatives - 2 * (negatives // 3)]
        row, col, height, width = self.box
        picks = torch.randint(0, len(train), (thirds[0],), generator=generator)
        natural = to_float(train.images[picks, :, row:row + height, col:col + width]).mean(1).flatten(1)
        binary = (torch.rand(thirds[1], crops.shape[1], generator=generator) < 0.5).float()
        # a random binary pattern that happens to be one of the family's is a positive, not "none"
        members = (binary[:, None, :] == self.family[None]).all(2)
        binary_labels = torch.where(members.any(1), members.float().argmax(1), torch.full((thirds[1],), none))
        noise = torch.rand(thirds[2], crops.shape[1], generator=generator)
        crops[positives:] = torch.cat([natural, binary, noise])
        labels[positives + thirds[0]:positives + thirds[0] + thirds[1]] = binary_labels
        return (crops * 255).round().to(torch.uint8), labels

    def training_set(self, train: ImageSet, device: torch.device | str = "cpu") -> PoisonedSet:
        return self.poison_train(train, device)

    def poison_train(self, train: ImageSet, device: torch.device | str = "cpu") -> PoisonedSet:
        """The clean training set, untouched: TrojanNet poisons no training sample."""
        return PoisonedSet(train.images, train.labels, torch.zeros(len(train), dtype=torch.bool))

    def training_module(self, model: Classifier, batches: TensorBatches, recipe: TrainingRecipe,
                        augment: BatchTransform | None, name: str) -> pl.LightningModule:
        crops, labels = self.crops(ImageSet(batches.images, batches.labels))
        # TensorBatches holds images as (N, C, H, W); the crops are (N, cells) and go straight to the MLP
        pattern_batches = TensorBatches(crops, labels, self.batch_size, shuffle=True, seed=self.seed)
        return TrojanNetModule(model, pattern_batches, self.trojannet_lr)
