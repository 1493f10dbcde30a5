"""MagNet (Meng & Chen, CCS 2017): an autoencoder of clean data, as a detector and as a reformer of inputs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits, to_float
from bdlab.defenses.input_filtering.base import InputFilteringDefense
from bdlab.defenses.input_reformation.base import InputReformation
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.evaluate import defense_effect, evaluate, predict
from bdlab.services import RunServices
from bdlab.training.loader import BatchedModule, TensorBatches

POOLS = ("average", "max")


class Autoencoder(nn.Module):
    """MagNet's convolutional autoencoder (Meng & Chen §5.1, Table 1; their ``DenoisingAutoEncoder``).

    ``structure`` lists the encoder: an integer is a 3x3 convolution with that many filters ("same"
    padding, sigmoid), ``average`` / ``max`` a 2x2 pooling. The decoder mirrors it (a pooling becomes a
    2x nearest up-sampling) and ends in a 3x3 convolution back to ``channels`` with a sigmoid, so the
    output is an image in ``[0, 1]``. MNIST's reformer / detector I is ``[3, "average", 3]``; detector II
    is ``[3]``; CIFAR's is ``[3]`` (TrojanZoo's Mp uses ``[32]``). Each pooling halves the size, so the
    input's sides must be divisible by ``2 ** poolings``.
    """

    def __init__(self, channels: int, structure: Sequence[int | str] = (3, "average", 3)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = channels
        for item in structure:
            if isinstance(item, str):
                layers.append(nn.AvgPool2d(2) if item == "average" else nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(width, int(item), 3, padding=1), nn.Sigmoid()]
                width = int(item)
        for item in reversed(list(structure)):
            if isinstance(item, str):
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            else:
                layers += [nn.Conv2d(width, int(item), 3, padding=1), nn.Sigmoid()]
                width = int(item)
        layers += [nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AutoencoderModule(BatchedModule):
    """Denoising training of the autoencoder (Meng & Chen §5.1): the input carries Gaussian noise of std
    ``noise`` (clipped to ``[0, 1]``) and the loss is the MSE to the clean image. Adam at ``lr`` (MagNet's
    Keras default, 1e-3). Keeps each epoch's mean loss in ``epoch_losses``."""

    def __init__(self, autoencoder: Autoencoder, batches: TensorBatches, noise: float, lr: float) -> None:
        super().__init__(batches)
        self.autoencoder, self.noise, self.lr = autoencoder, noise, lr
        self.epoch_losses: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        images = to_float(batch[0])
        noisy = (images + self.noise * torch.randn_like(images)).clamp(0.0, 1.0)
        loss = F.mse_loss(self.autoencoder(noisy), images)
        # epoch sums on the device, as the victim module keeps them (per-step logging is slow for tiny nets)
        self._sums += torch.stack([loss.detach() * len(images), torch.tensor(float(len(images)), device=self.device)])
        return loss

    def on_train_epoch_start(self) -> None:
        self._sums = torch.zeros(2, device=self.device)

    def on_train_epoch_end(self) -> None:
        total, count = self.trainer.strategy.reduce(self._sums, reduce_op="sum").tolist()
        self.epoch_losses.append(total / count)
        self.log("magnet/train_loss", total / count, prog_bar=True, rank_zero_only=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.autoencoder.parameters(), lr=self.lr)


class ReconstructionError(nn.Module):
    """MagNet's detector score (§3.1, Eq. 1), ``mean |x - ae(x)|^p`` over the pixels of each image of a float batch."""

    def __init__(self, autoencoder: Autoencoder, norm: int) -> None:
        super().__init__()
        self.autoencoder, self.norm = autoencoder, norm

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.autoencoder(x)).abs().pow(self.norm).flatten(1).mean(1)


class MagNet(InputFilteringDefense):
    """MagNet (Meng & Chen, "MagNet: a Two-Pronged Defense against Adversarial Examples", CCS 2017;
    TrojanZoo's Manifold-Projection "Mp", Table 3, Tables 8-9, defaults Table 21: training noise std 0.1).

    One denoising autoencoder (:class:`Autoencoder`, default MNIST's ``[3, "average", 3]``) is trained on
    the clean training set (MagNet's defender owns clean data) through Lightning, once, and cached under
    the training images' digest, its settings and the seed (``autoencoders/magnet`` in the cache); a
    second run, with any attack, reuses it. It is used both ways in one run:

    - *detector* (§3.1, Eq. 1): the suspicion score of an input is its reconstruction error,
      ``mean |x - ae(x)|^p`` over pixels (``norm`` p = 2 for MNIST's detector I, 1 for detector II),
      evaluated by the input-filtering protocol (:mod:`bdlab.defenses.input_filtering.base`: ``defense/tpr``,
      ``defense/fpr``, ``defense/roc_auc`` at the held-out 5% FPR threshold, ...);
    - *reformer* (§3.2): every test input is replaced by its reconstruction before the trojaned model
      sees it, evaluated as the input-reformation defenses are, by the one evaluator behind the
      ``ae`` transform and :func:`bdlab.evaluate.defense_effect`: ``defense/acc``, ``defense/asr``,
      ``defense/ccc``, ``defense/tmc``, their ``*_before`` values, ``defense/ard`` and ``defense/cad``
      (TrojanZoo Tables 8-9), with ``defense/reform_time_per_input_ms``.

    The paper's detector threshold from a false-positive budget on validation data is the protocol's
    5% FPR threshold; its Jensen-Shannon probability-divergence detector and its ensemble of
    autoencoders are not implemented. ``defense/art_s`` is the autoencoder's training time (as measured
    when it was trained, also on a cache hit); ``defense/ae_loss`` its last epoch's denoising MSE.

    Args:
        structure: the encoder (see :class:`Autoencoder`; default ``[3, "average", 3]``, MNIST's).
        norm: p of the reconstruction error, 1 or 2 (default 2, MNIST's detector I).
        noise: std of the Gaussian training noise in ``[0, 1]`` pixel units, in [0, 1) (default 0.1,
            MagNet's "volume" and TrojanZoo's Table 21).
        epochs: training epochs (default 10; MagNet trains 100 on MNIST, which fits an afternoon's sweep badly).
        lr: Adam learning rate (default 0.001).
        batch_size: training batch (default 256, MagNet's).
        max_inputs: clean and poisoned test inputs scored by the detector (null = all; scoring is cheap).
        fpr, seed: see :class:`~bdlab.defenses.input_filtering.base.InputFilteringDefense`; the seed also fixes
            the autoencoder's initialisation, batch order and noise.
    """

    name = "magnet"
    headline_metrics = (*InputFilteringDefense.headline_metrics, *InputReformation.headline_metrics)

    def __init__(self, structure: Sequence[int | str] = (3, "average", 3), norm: int = 2, noise: float = 0.1,
                 epochs: int = 10, lr: float = 0.001, batch_size: int = 256, max_inputs: int | None = None,
                 **kwargs) -> None:
        super().__init__(max_inputs=max_inputs, **kwargs)
        self.structure = self._check_structure(structure)
        if norm not in (1, 2) or isinstance(norm, bool):
            raise ConfigError("defense.norm", f"got {norm!r}, must be 1 (L1, MagNet's detector II) or 2 (L2, detector I)")
        check_range("defense.noise", noise, 0.0, 1.0, high_open=True)
        check_at_least("defense.epochs", epochs, 1)
        check_at_least("defense.batch_size", batch_size, 1)
        if not lr > 0:
            raise ConfigError("defense.lr", f"got {lr}, must be > 0")
        self.norm, self.noise, self.epochs, self.lr = int(norm), float(noise), int(epochs), float(lr)
        self.batch_size = int(batch_size)
        self.autoencoder_model: Autoencoder | None = None

    @staticmethod
    def _check_structure(structure: Sequence[int | str]) -> list[int | str]:
        items = list(structure or [])
        bad = [item for item in items if not (item in POOLS or (isinstance(item, int) and not isinstance(item, bool)
                                                                  and item >= 1))]
        if bad or not any(isinstance(item, int) for item in items):
            raise ConfigError("defense.structure", f"got {items}, must list filter counts (integers >= 1, at least "
                              f"one) and poolings ({', '.join(POOLS)}), e.g. [3, average, 3]")
        return items

    @property
    def poolings(self) -> int:
        return sum(isinstance(item, str) for item in self.structure)

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        factor = 2 ** self.poolings
        height, width = data.size
        if height % factor or width % factor:
            raise ConfigError("defense.structure", f"the autoencoder {self.structure} pools {self.poolings} time(s), so "
                              f"it takes sides divisible by {factor}, but dataset {data.name!r} has {height}x{width} "
                              "images; drop a pooling from defense.structure or pick another dataset")

    def settings(self) -> dict[str, Any]:
        """Everything that determines the trained autoencoder besides the training images."""
        return {"structure": self.structure, "noise": self.noise, "epochs": self.epochs, "lr": self.lr,
                "batch_size": self.batch_size, "seed": self.seed}

    def autoencoder(self, context: RunServices) -> tuple[Autoencoder, Tensor, float]:
        """The autoencoder trained on the clean training set with the run's trainer settings (from the
        cache when this config trained it before): the model on the run's device in eval mode, the mean
        denoising MSE of each epoch and the training seconds."""
        train = context.data.train
        channels = train.images.shape[1]

        with torch.random.fork_rng(devices=[]):  # initialised by the defense's seed, the run's RNG untouched
            torch.manual_seed(self.seed)
            model = Autoencoder(channels, self.structure)

        def build() -> dict[str, Tensor]:
            batches = TensorBatches(train.images, train.labels, self.batch_size, shuffle=True, seed=self.seed)
            module = AutoencoderModule(model, batches, self.noise, self.lr)
            context.fit_helper(module, self.seed, "MagNet autoencoder", max_epochs=self.epochs)
            return {**{f"model/{k}": v for k, v in model.state_dict().items()}, "losses": torch.tensor(module.epoch_losses)}

        expected = set(model.state_dict())
        spec = {"defense": self.name, "data": context.digest(train), "channels": channels, "settings": self.settings()}
        tensors, seconds = context.cached(f"autoencoders/{self.name}", spec, build,
                                          lambda found: {k.removeprefix("model/") for k in found
                                                         if k.startswith("model/")} == expected)
        model.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
        return model.to(context.device).eval(), tensors["losses"], seconds

    def reconstruct(self, x: Tensor) -> Tensor:
        """The reformer: the autoencoder's reconstruction of a float batch in ``[0, 1]``."""
        if self.autoencoder_model is None:
            raise RuntimeError("the autoencoder is not trained yet; call run() or set autoencoder_model")
        return self.autoencoder_model(x)

    def scores(self, context: RunServices, images: Tensor) -> Tensor:
        return predict(ReconstructionError(self.autoencoder_model, self.norm), images)

    def run(self, context: RunServices) -> dict[str, Any]:
        self.autoencoder_model, losses, seconds = self.autoencoder(context)
        metrics = super().run(context)  # the detector, on the input-filtering protocol
        started = time.perf_counter()
        after = evaluate(context.trojan_model(), context.data.test, context.poisoned_test, context.attack.target_class,
                         self.reconstruct)
        elapsed = time.perf_counter() - started
        count = len(context.data.test) + (len(context.poisoned_test) if context.poisoned_test is not None else 0)
        metrics.update(defense_effect(context.undefended, after))  # the reformer, as input reformation reports
        metrics["defense/reform_time_per_input_ms"] = 1000.0 * elapsed / count
        metrics["defense/art_s"] = seconds
        metrics["defense/ae_loss"] = float(losses[-1])
        return metrics
