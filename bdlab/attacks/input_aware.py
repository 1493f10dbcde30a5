"""The input-aware dynamic backdoor (Nguyen and Tran, NeurIPS 2020): a generator network makes a
different trigger for every input, and a trigger only works on the input it was made for."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from bdlab.attacks.base import Attack, blend
from bdlab.datasets.base import DatasetSplits, to_float
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from bdlab.training.hooks import Batch
from bdlab.training.loader import TensorBatches
from bdlab.training.recipe import TrainingRecipe
from bdlab.training.victim import BatchTransform, VictimModule

EPSILON = 1e-7  # the official code's, in the generators' output squashing and under the diversity ratio


class ConvBlock(nn.Sequential):
    """3x3 convolution, normalisation of each sample's feature map (group norm with one group; the
    official code's batch norm made a trigger depend on the batch it was generated in, and its
    running statistics lag behind the short schedule's weights), optionally ReLU."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True) -> None:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(1, out_channels)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class TriggerGenerator(nn.Module):
    """The paper's encoder-decoder generator (the official code's ``Generator``): ``depth`` stages of
    two convolution blocks and a 2x max-pool, starting at ``width`` channels and doubling up to the
    last stage; a middle block; ``depth`` stages of a 2x bilinear upsampling and two blocks, halving
    the channels down to ``out_channels``. The output is squashed into ``(0, 1)`` by
    ``tanh(.) / 2 + 1/2``. Images need sides divisible by ``2 ** depth``."""

    def __init__(self, in_channels: int, out_channels: int, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        current, following = in_channels, width
        for step in range(depth):
            layers += [ConvBlock(current, following), ConvBlock(following, following), nn.MaxPool2d(2)]
            current = following
            if step < depth - 1:
                following *= 2
        layers.append(ConvBlock(current, current))
        for step in range(depth):
            following = current // 2 if step < depth - 1 else out_channels
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), ConvBlock(current, current),
                       ConvBlock(current, following, relu=step < depth - 1)]
            current = following
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.net(x)) / (2 + EPSILON) + 0.5


def threshold(mask: Tensor) -> Tensor:
    """The official code's near-binary squashing of the mask generator's output: ``tanh(20 m - 10) / 2 + 1/2``."""
    return torch.tanh(mask * 20 - 10) / (2 + EPSILON) + 0.5


def diversity_loss(x: Tensor, x_other: Tensor, out: Tensor, out_other: Tensor) -> Tensor:
    """Eq. 4, ``L_div = ||x - x'|| / ||g(x) - g(x')||``, averaged over the pairs ``(x[i], x_other[i])``
    with their generated patterns (or masks) ``out``. Both distances are root-mean-square over a
    sample's values, as in the official code (the same ratio as the L2 norms for images and patterns
    of one shape), with ``EPSILON`` added under the ratio."""
    images = rms(x - x_other)
    generated = rms(out - out_other)
    return (images / (generated + EPSILON)).mean()


def rms(difference: Tensor) -> Tensor:
    """Per-sample root-mean-square; the norm's gradient is zero, not NaN, where a difference vanishes
    (identical masks of two inputs)."""
    flat = difference.flatten(1)
    return torch.linalg.vector_norm(flat, dim=1) / flat.shape[1] ** 0.5


def paired(values: Tensor) -> Tensor:
    """The partners of ``values`` in the diversity loss: the set rolled by half its length, so with as
    many cross sources as backdoor images each backdoor image is paired with one cross source (the
    official code's pairs), both ways."""
    return values.roll(len(values) // 2, dims=0)


class InputAware(Attack):
    """Input-aware dynamic backdoor (Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020).

    The trigger of an input ``x`` is ``t = (m(x), g(x))``, a mask and a pattern made for it by two
    generator networks (:class:`TriggerGenerator`), and the backdoor function is
    ``B(x, t) = x + m(x) * (g(x) - x)`` (the pattern blended in where the mask is on).

    1. Mask generator ``m`` (the paper's first stage): trained alone on the loss
       ``lambda_norm * mean(relu(m(x) - mask_density)) + lambda_div * L_div`` (the norm loss
       keeps each mask to about ``mask_density`` of the image; ``L_div``, Eq. 4, on masks makes
       masks of different inputs differ), then frozen. Its loss does not involve the classifier or
       the pattern generator, so here it runs during the first ``mask_steps`` batches of training,
       beside the other two, on ``mask_batch`` images of each (a short stage instead of the
       official 25 epochs; triggers during the stage use its current masks).
    2. Pattern generator ``g`` and classifier ``f`` trained jointly on one loss per batch: the
       flagged ``poison_rate`` share (paper: rho_b = 0.1) gets its own trigger and the target
       label (backdoor mode); ``cross_ratio`` times as many unflagged samples (paper: rho_c = 0.1,
       ratio 1) get the trigger of *another* image of the batch and keep their true labels
       (cross-trigger mode, which makes a trigger useless on other inputs); the rest stay clean.
       The loss is the cross-entropy over the batch plus ``lambda_div`` times the diversity loss
       (Eq. 4) ``||x - x'|| / ||g(x) - g(x')||`` over pairs of the generated patterns. The
       classifier steps with the run's recipe, the generators with Adam (the official code's
       learning rate 0.01, betas (0.5, 0.9)); the pattern generator's rate follows the recipe's
       schedule too (the official code decays both).

    After training, each poisoned test (and training) image is stamped with its own generated
    trigger. Both generators' weights are stored with the trojaned model.
    :attr:`trigger_mask` and :attr:`trigger_pattern` stay None: there is no one trigger.

    The official MNIST generator has ``width`` 16 and ``depth`` 2 (CIFAR-10: 32 and 3); the
    default width 8 halves it for a 2-core CPU. The generators normalise each sample's features
    (group norm) instead of the official batch norm, so a trigger depends on its input alone, the
    same while training and when the test set is stamped: in a first version with batch norm (and
    the mask stage on whole batches), the stamped MNIST test masks (running statistics) covered
    0.8% of the image against 2.1% in training mode, and the ASR was 41%; with group norm, 97.6%. Not tried under DDP (the mask generator gets no gradient after
    its stage).

    Args:
        cross_ratio: cross-trigger samples per backdoor sample in a batch (>= 0; default 1, the paper's
            rho_c = rho_b = 0.1).
        mask_density: share of the image a mask should cover, in (0, 1) (default 0.032, the paper's).
        lambda_div: weight of the diversity loss (>= 0; default 1, the paper's).
        lambda_norm: weight of the mask norm loss (>= 0; default 100, the official code's).
        generator_lr: Adam learning rate of the pattern generator (> 0; default 0.01).
        mask_lr: Adam learning rate of the mask generator (> 0; default 0.01).
        mask_steps: batches the mask generator trains on before it is frozen (>= 1; default 300).
        mask_batch: images of each of those batches it trains on (>= 2; default 32).
        generator_width: channels of the generators' first stage (>= 2; default 8).
        generator_depth: down/upsampling stages of the generators (>= 1; default 2); image sides must
            be divisible by ``2 ** depth``.
        poison_rate, target_class, seed, enhance, enhance_max_shrink: see :class:`~bdlab.attacks.base.Attack`.
    """

    name = "input_aware"
    stamps_per_batch = True

    def __init__(self, cross_ratio: float = 1.0, mask_density: float = 0.032, lambda_div: float = 1.0,
                 lambda_norm: float = 100.0, generator_lr: float = 0.01, mask_lr: float = 0.01, mask_steps: int = 300,
                 mask_batch: int = 32, generator_width: int = 8, generator_depth: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_at_least("attack.cross_ratio", cross_ratio, 0.0)
        check_range("attack.mask_density", mask_density, 0.0, 1.0, low_open=True, high_open=True)
        check_at_least("attack.lambda_div", lambda_div, 0.0)
        check_at_least("attack.lambda_norm", lambda_norm, 0.0)
        for field, value in (("generator_lr", generator_lr), ("mask_lr", mask_lr)):
            if not value > 0:
                raise ConfigError(f"attack.{field}", f"got {value}, must be > 0")
        check_at_least("attack.mask_steps", mask_steps, 1)
        check_at_least("attack.mask_batch", mask_batch, 2)
        check_at_least("attack.generator_width", generator_width, 2)
        check_at_least("attack.generator_depth", generator_depth, 1)
        self.cross_ratio, self.mask_density = float(cross_ratio), float(mask_density)
        self.lambda_div, self.lambda_norm = float(lambda_div), float(lambda_norm)
        self.generator_lr, self.mask_lr, self.mask_steps = float(generator_lr), float(mask_lr), int(mask_steps)
        self.mask_batch = int(mask_batch)
        self.generator_width, self.generator_depth = int(generator_width), int(generator_depth)
        self.channels = 0
        self.generator: TriggerGenerator | None = None  # the pattern generator g, from setup on
        self.mask_generator: TriggerGenerator | None = None  # the mask generator m, from setup on
        self._diversity: Tensor | None = None  # the current batch's L_div, from poison_batch to extra_loss
        self._last_density = torch.zeros(())  # the mean mask of the current batch's triggers (logged)

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        super().setup(data, resources)
        factor = 2 ** self.generator_depth
        if any(side % factor for side in data.size):
            height, width = data.size
            raise ConfigError("attack.generator_depth", f"the generators halve the image {self.generator_depth} times, "
                              f"so its sides must be divisible by {factor}; {data.name}'s are {height}x{width}")
        self.channels = data.channels
        self.reset_generators()

    def reset_generators(self) -> None:
        """Freshly initialised generators, seeded apart from the model's initialisation."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 5)
            self.generator = TriggerGenerator(self.channels, self.channels, self.generator_width, self.generator_depth)
            self.mask_generator = TriggerGenerator(self.channels, 1, self.generator_width, self.generator_depth)

    # ----------------------------------------------------------------------------- triggers

    def masks(self, x: Tensor) -> Tensor:
        """The mask generator's near-binary masks ``(N, 1, H, W)`` of ``x``."""
        return threshold(self.mask_generator(x))

    def mask_loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The mask generator's loss on a batch of clean images (each paired with the image half a batch
        away) and the masks' mean density."""
        masks = self.masks(x)
        norm = torch.relu(masks - self.mask_density).mean()
        diversity = diversity_loss(x, paired(x), masks, paired(masks)) if len(x) > 1 else masks.sum() * 0.0
        return self.lambda_norm * norm + self.lambda_div * diversity, masks.detach().mean()

    def triggered(self, x: Tensor, sources: Tensor | None = None) -> Tensor:
        """``x`` stamped with the triggers generated from ``sources`` (default: ``x`` itself, the
        backdoor mode; other images: the cross-trigger mode), with the generators as they are."""
        sources = x if sources is None else sources
        return blend(x, self.masks(sources), self.generator(sources))

    @torch.no_grad()
    def apply(self, x: Tensor) -> Tensor:
        if self.generator is None:
            raise RuntimeError("the input-aware generators are built in setup(data); call it first")
        self.generator.to(x.device).eval()
        self.mask_generator.to(x.device).eval()
        return self.triggered(x)

    # ----------------------------------------------------------------------------- training

    def cross_indices(self, is_poison: Tensor) -> Tensor:
        """The batch positions of the cross-trigger samples: the first ``cross_ratio`` times the number
        of flagged samples (rounded) among the unflagged ones (the batch is shuffled)."""
        clean = (~is_poison).nonzero().flatten()
        count = min(int(self.cross_ratio * int(is_poison.sum()) + 0.5), len(clean))
        return clean[:count]

    def poison_batch(self, x: Tensor, labels: Tensor, is_poison: Tensor) -> tuple[Tensor, Tensor]:
        """The flagged samples with their own triggers (labels already the target), the cross samples
        with the trigger of another image of the batch (labels kept); the pattern generator's graph
        is kept for the joint step and the batch's diversity loss is left for :meth:`extra_loss`.
        The mask generator is used as it is (frozen after its stage)."""
        self._diversity = None
        backdoor = is_poison.nonzero().flatten()
        if not len(backdoor):
            return x, labels
        cross = self.cross_indices(is_poison)
        # each cross sample's trigger comes from another image: a random nonzero shift away in the batch
        # (the global RNG, seeded by the training recipe)
        shift = torch.randint(1, len(x), (len(cross),), device=x.device) if len(x) > 1 else cross * 0
        sources = x[torch.cat([backdoor, (cross + shift) % len(x)])]
        patterns = self.generator(sources)
        with torch.no_grad():
            masks = self.masks(sources)
        targets = x[torch.cat([backdoor, cross])]
        x = x.index_copy(0, torch.cat([backdoor, cross]), blend(targets, masks, patterns))
        if len(sources) > 1:
            self._diversity = diversity_loss(sources, paired(sources), patterns, paired(patterns))
        self._last_density = masks.mean().detach()
        return x, labels

    def extra_loss(self, batch: Batch) -> dict[str, Tensor]:
        diversity, self._diversity = self._diversity, None
        if diversity is None or self.lambda_div == 0:
            return {}
        return {"div_loss": self.lambda_div * diversity}

    def training_module(self, model: Classifier, batches: TensorBatches, recipe: TrainingRecipe,
                        augment: BatchTransform | None, name: str) -> pl.LightningModule:
        self.reset_generators()  # every training starts from the same generators
        return InputAwareModule(model, batches, recipe, augment, hooks=self, name=name)

    def state_dict(self) -> dict[str, Tensor]:
        if self.generator is None:
            return {}
        state = {f"generator.{k}": v.detach().clone() for k, v in self.generator.state_dict().items()}
        state.update({f"mask_generator.{k}": v.detach().clone() for k, v in self.mask_generator.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for prefix, network in (("generator.", self.generator), ("mask_generator.", self.mask_generator)):
            own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            missing = set(network.state_dict()) - set(own)
            if missing:
                raise KeyError(f"{prefix}{min(missing)}")
            network.load_state_dict(own)


class InputAwareModule(VictimModule):
    """The input-aware attack's training (:class:`InputAware`): the victim module's poisoning,
    augmentation and loss, with Lightning's manual optimisation of three parts per batch:

    - during the first ``mask_steps`` batches, one Adam step of the mask generator on its own loss
      (:meth:`InputAware.mask_loss`) on the first ``mask_batch`` clean images of the batch; frozen
      (eval mode) afterwards;
    - one joint step of the classifier (the recipe's optimizer) and the pattern generator (Adam) on
      the cross-entropy of the poisoned batch plus the diversity loss; the recipe's scheduler, one
      for each of the two, is stepped per epoch.

    Logs, per epoch, the mask loss (while its stage lasts) and the mean mask density of the
    generated triggers beside the victim module's metrics.
    """

    hooks: InputAware

    def __init__(self, model: Classifier, train_batches: TensorBatches, recipe: TrainingRecipe,
                 augment: BatchTransform | None = None, hooks: InputAware | None = None, name: str = "model") -> None:
        if hooks is None or hooks.generator is None:
            raise ValueError("InputAwareModule needs an InputAware attack after setup(data)")
        super().__init__(model, train_batches, recipe, augment, hooks, name)
        self.generator = hooks.generator
        self.mask_generator = hooks.mask_generator
        self.automatic_optimization = False
        self.mask_steps_done = 0

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        model_optimizer, generator_optimizer, mask_optimizer = self.optimizers()
        if self.mask_steps_done < self.hooks.mask_steps:
            self.mask_generator.train()
            mask_loss, _ = self.hooks.mask_loss(to_float(batch[0][:self.hooks.mask_batch]))
            mask_optimizer.zero_grad(set_to_none=True)
            self.manual_backward(mask_loss)
            mask_optimizer.step()
            self.mask_steps_done += 1
            self._mask_sums += torch.stack([mask_loss.detach(), torch.ones((), device=self.device)])
        self.mask_generator.eval()
        self.generator.train()
        step = self.training_batch(batch)
        loss = self.model_loss(step)
        model_optimizer.zero_grad(set_to_none=True)
        generator_optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        model_optimizer.step()
        generator_optimizer.step()
        if step.is_poison.any():
            self._density_sums += torch.stack([self.hooks._last_density, torch.ones((), device=self.device)])
        return loss.detach()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._mask_sums = torch.zeros(2, device=self.device)
        self._density_sums = torch.zeros(2, device=self.device)

    def on_train_epoch_end(self) -> None:
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()
        reduce = self.trainer.strategy.reduce
        logged = {}
        for key, sums in (("mask_loss", self._mask_sums), ("mask_density", self._density_sums)):
            total, count = reduce(sums, reduce_op="sum").tolist()
            if count:
                logged[f"{self.name}/{key}"] = total / count
        if logged:
            self.log_dict(logged, rank_zero_only=True)
        super().on_train_epoch_end()

    def configure_optimizers(self):
        model = self.recipe.configure_optimizers(self.model.parameters())
        adam = {"betas": (0.5, 0.9)}  # the official code's
        generator = torch.optim.Adam(self.generator.parameters(), lr=self.hooks.generator_lr, **adam)
        optimizers = [model if isinstance(model, torch.optim.Optimizer) else model["optimizer"], generator,
                      torch.optim.Adam(self.mask_generator.parameters(), lr=self.hooks.mask_lr, **adam)]
        if isinstance(model, torch.optim.Optimizer):
            return optimizers
        # the pattern generator anneals with the classifier (the official code decays both): with a constant
        # rate it keeps moving its triggers while the classifier, at the end of its schedule, no longer follows
        return optimizers, [model["lr_scheduler"], {**model["lr_scheduler"], "scheduler": self.recipe.scheduler(generator)}]
